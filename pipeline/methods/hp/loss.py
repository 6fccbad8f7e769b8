"""The hidden-positive contrastive loss L_hp (docs/hp.md §5).

B rounds; round b takes the n anchors of image b against all N = B·n patches of the batch, so no N x N
matrix ever exists: the peak is a few n x N blocks (or tile x N with `anchor_tile`).

The GHP and LHP terms are one computation on z and on z_mix with the same masks, so the two run as one
batch of two: `pair` below is z and z_mix stacked, (2, N, D).

The gradient is written out rather than taken by autograd, which would keep every round's n x N
intermediates alive until backward (~10 GB per term at B = 64, 28x28). The contrast set and the weights
are masks without gradient, so ω_i is a constant and the round loss mean_i((τ/0.07)·l_i·ω_i) over the kept
anchors equals (τ/0.07)·Σ_i W_i·l_i / Σ_k W_k. With logits s_ij = z_i·z_j/τ,

    W_i·l_i = W_i·log Σ_{k∈Dn_i} exp(s_ik) − Σ_j w_ij·s_ij,   so   ∂(W_i·l_i)/∂s_ij = W_i·p_ij − w_ij =: m_ij

with p_i the softmax of s_i over Dn_i (0 outside). Then ∂/∂z_i = Σ_j m_ij·z_j/τ (i as anchor) and
∂/∂z_j = Σ_i m_ij·z_i/τ (j as a contrasted patch): two matmuls, and the loss backpropagates through the
(N, D) results. Masks are float 0/1 blocks: comparisons written straight into float, and products with
0/1, are the cheapest elementwise passes on a CPU.

Under autocast (train.amp, pipeline/precision.py) the products alone run in its dtype, as autocast runs a matmul:
the similarities, the logits and the two gradient products take bf16 (fp16 on CUDA) operands, and everything after
them (thresholds, exp, log, the sums, the gradient accumulation) stays in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TAU_BASE = 0.07  # §5: the reference's base temperature in (τ/0.07)
SAFE_EXP = 50.0  # logits up to this need no max-shift before exp (float32 overflows past 88)


@dataclass
class LossOutput:
    loss: torch.Tensor  # L_hp (scalar, differentiable w.r.t. z and z_mix)
    ghp_term: torch.Tensor  # Σ_rounds GHP term / (2B), detached; loss = ghp_term + lhp_term
    lhp_term: torch.Tensor  # Σ_rounds LHP term / (2B), detached
    positives_per_anchor: float  # mean |G_i ∪ H_i| over kept anchors
    kept_anchors: float  # fraction of the N anchors with G_i non-empty


def positive_masks(
    x_anchor: torch.Tensor, x_all: torch.Tensor, r_anchor: torch.Tensor, r_all: torch.Tensor, anchors: torch.Tensor
) -> torch.Tensor:
    """Hidden positives of some anchors among all N patches, (t, N) bool (§5).

    j is a positive of i iff j ≠ i and x_i·x_j > r_i or x_i·x_j > r_j (unit x, so x_i·x_j = cos): the rule
    of G with (f, r) and of H with (s_m, r^m). `anchors` are the anchors' flat indices into x_all.
    """
    return _positives(x_anchor, x_all, r_anchor, r_all, anchors)


def _mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """a @ b written into `out`, whose dtype may be wider than the operands' (reduced-precision products)."""
    if out is None or out.dtype == a.dtype:
        return torch.matmul(a, b, out=out)
    return out.copy_(torch.matmul(a, b))


def _addmm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float) -> None:
    """acc += alpha·(a @ b), the product in b's dtype (a float32 block is rounded to it first), acc float32."""
    if a.dtype == b.dtype == acc.dtype:
        acc.addmm_(a, b, alpha=alpha)
    else:
        acc.add_(torch.mm(a.to(b.dtype), b), alpha=alpha)


def _positives(x_anchor, x_all, r_anchor, r_all, anchors, sim=None, threshold=None, out=None) -> torch.Tensor:
    """positive_masks, written into `out` (bool when None; a float 0/1 block in the loss) with scratch blocks."""
    sim = _mm(x_anchor, x_all.T, sim)  # §5: cos(f_i, f_j) (or cos(s_m_i, s_m_j))
    threshold = torch.minimum(r_anchor[:, None], r_all[None, :], out=threshold)  # §5: > r_i or > r_j,
    mask = torch.gt(sim, threshold, out=out)  # i.e. > min(r_i, r_j)
    mask[torch.arange(len(anchors), device=mask.device), anchors] = 0  # §5: j ≠ i
    return mask


class _Blocks:
    """Scratch (rows x N) blocks, made on first use and reused by every tile of one loss call: a fresh block of
    this size is page-faulted in from the OS each time, which costs more than the elementwise work done on it
    (8 fresh 196 x 3136 blocks: 3.5 ms, against 0.24 ms for 8 reused ones on a 2-core CPU)."""

    def __init__(self, columns: int, dtype: torch.dtype, device: torch.device):
        self.columns, self.dtype, self.device, self.made = columns, dtype, device, {}

    def __call__(self, name: str, rows: int) -> torch.Tensor:
        block = self.made.get(name)
        if block is None or block.shape[0] < rows:
            block = self.made[name] = torch.empty((rows, self.columns), dtype=self.dtype, device=self.device)
        return block[:rows]


class _PrecomputedGrad(torch.autograd.Function):
    """The loss value, whose gradients w.r.t. z and z_mix were already computed round by round."""

    @staticmethod
    def forward(ctx, value, z, z_mix, grad_z, grad_z_mix):
        ctx.save_for_backward(grad_z, grad_z_mix)
        return value.clone()

    @staticmethod
    def backward(ctx, grad_out):
        grad_z, grad_z_mix = ctx.saved_tensors
        return (
            None,
            grad_out.to(grad_z.dtype) * grad_z if ctx.needs_input_grad[1] else None,
            grad_out.to(grad_z_mix.dtype) * grad_z_mix if ctx.needs_input_grad[2] else None,
            None,
            None,
        )


def _check_shapes(f, s_m, z, z_mix, r, r_m, u) -> None:
    b, n = z.shape[:2]
    expected = {"f": (b, n), "s_m": (b, n), "z_mix": tuple(z.shape), "r": (b, n), "r_m": (b, n)}
    got = {"f": tuple(f.shape[:2]), "s_m": tuple(s_m.shape[:2]), "z_mix": tuple(z_mix.shape),
           "r": tuple(r.shape), "r_m": tuple(r_m.shape)}
    if z.ndim != 3 or f.ndim != 3 or s_m.ndim != 3 or got != expected:
        shapes = ", ".join(f"{k}={v}" for k, v in got.items())
        raise ValueError(f"hp_loss: z is {tuple(z.shape)} (B, n, D) but {shapes}")
    if u is not None and tuple(u.shape) != (n, b * n):
        raise ValueError(f"hp_loss: u must be (n, N) = {(n, b * n)}, got {tuple(u.shape)}")


@dataclass
class _Rows:
    """One batch's patches as rows (N = B·n), and the settings every tile reads. f, s_m and pair are only ever
    operands of products: in the products' dtype (autocast's, else the loss's); everything else in the loss's."""

    f: torch.Tensor  # (N, C) unit backbone features
    s_m: torch.Tensor  # (N, D) unit EMA codes
    r: torch.Tensor  # (N,) pool criteria of f
    r_m: torch.Tensor  # (N,) pool criteria of s_m
    pair: torch.Tensor  # (2, N, D): z and z_mix, unit projections
    drawn: torch.Tensor  # (n, N) float 0/1: u_{k, j} < ρ, the random part of Dn (§5)
    n: int  # patches per image
    lam: float
    tau: float
    need_grad: bool
    needs_shift: bool  # |s_ij| could pass SAFE_EXP: exp needs the row max taken out first
    blocks: _Blocks


@dataclass
class _Tile:
    """What one tile of anchors contributes to its round (§5): Σ_i W_i·l_i of each term over the kept anchors,
    Σ_i W_i, −m_ij of each term (module docstring) when gradients are wanted, and the counts reported."""

    first: int  # the tile's anchors are rows first..last − 1, dropped ones included (their rows of m are 0)
    last: int
    weighted: torch.Tensor  # (2,): Σ_i W_i·l_i with z, with z_mix
    w_total: torch.Tensor  # Σ_i W_i over the kept anchors
    minus_m: torch.Tensor | None  # (2, t, N)
    kept: int
    positives: int


def _contrast_max(logits: torch.Tensor, contrast: torch.Tensor) -> torch.Tensor:
    """Each row's largest logit over its contrast set Dn_i (0 where Dn_i is empty): the shift before exp. The row's
    max over all N would include s_ii = 1/τ and patches outside Dn_i, and for a small τ push every exp(s_ik − shift)
    of Dn_i below float32's smallest number (log 0 = −inf)."""
    inside = torch.where(contrast.bool(), logits, float("-inf")).amax(dim=2, keepdim=True)
    return torch.where(torch.isfinite(inside), inside, 0)


def _terms(pair_anchor, pair, contrast, w, w_sum, keep, rows, out) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Σ_i W_i·l_i over the tile's kept anchors for z and z_mix (§5) and, when gradients are wanted, −m_ij.

    W_i·l_i = W_i·log Σ_{k∈Dn_i} exp(s_ik) − Σ_j w_ij·s_ij: a positive j ∈ H_i outside Dn_i still gets its
    own s_ij in the numerator, as the spec has it. A dropped anchor's row of w is 0, so its −m_ij are 0.
    The logits, then the exponentials, then −m are written into the (2, t, N) block `out`.
    """
    logits = _mm(pair_anchor / rows.tau, pair.transpose(1, 2), out)  # §5: s_ij = z_i·z_j/τ
    pair_term = logits.view(2, -1) @ w.view(-1)  # §5: Σ_i Σ_j w_ij·s_ij
    shift = _contrast_max(logits, contrast) if rows.needs_shift else None
    # shifted, Dn_i's logits are ≤ 0; the others (masked out next) are clamped there too, so that none overflows
    shifted = logits.sub_(shift).clamp_(max=0) if shift is not None else logits
    exp = shifted.exp_().mul_(contrast)  # §5: exp(s_ik), k ∈ Dn_i
    norm = exp.sum(dim=2)  # §5: Σ_{k∈Dn_i} exp(s_ik) (over exp(shift_i) when shifted)
    log_norm = torch.where(keep, norm.log() + (shift.squeeze(2) if shift is not None else 0), 0)  # 0 if dropped
    weighted = log_norm @ w_sum - pair_term  # §5: Σ_i W_i·l_i, l_i = −Σ_j w_ij·logp_ij / W_i
    if not rows.need_grad:
        return weighted, None
    softmax_scale = torch.where(keep, w_sum / norm, 0)  # W_i / Σ_k exp(s_ik)
    return weighted, torch.addcmul(w, exp, softmax_scale[..., None], value=-1, out=exp)  # −m_ij = w_ij − W_i·p_ij


def _tile(rows: _Rows, rnd: int, start: int, stop: int) -> _Tile | None:
    """The anchors at positions start..stop − 1 of image `rnd` (§5); None when none has a hidden positive.

    A dropped anchor keeps its row, zeroed in w, so that every tile is one dense block: it adds nothing to
    the round's sums and its m_ij are 0.
    """
    first, last = rnd * rows.n + start, rnd * rows.n + stop  # the anchors' rows (flat indices first..last − 1)
    anchors = torch.arange(first, last, device=rows.f.device)
    block = lambda name: rows.blocks(name, last - first)  # noqa: E731
    pair_block = rows.blocks("pair", 2 * (last - first)).view(2, last - first, -1)
    scratch = pair_block[0], pair_block[1]  # similarities and thresholds first, then the logits of z and z_mix
    g = _positives(rows.f[first:last], rows.f, rows.r[first:last], rows.r, anchors, *scratch, block("g"))  # §5: G
    h = _positives(rows.s_m[first:last], rows.s_m, rows.r_m[first:last], rows.r_m, anchors, *scratch, block("h"))
    g_count, h_count = g.sum(dim=1), h.sum(dim=1)  # §5: H_i, above; |G_i|, |H_i|
    keep = g_count > 0  # §5: anchors with G_i empty are dropped (before the log-sum-exp)
    if not bool(keep.any()):
        return None
    contrast = torch.maximum(g, rows.drawn[start:stop], out=block("contrast"))  # §5: Dn_i = G_i ∪ {u_k(i),j < ρ}
    contrast[torch.arange(len(anchors), device=g.device), anchors] = 0  # §5: j ≠ i
    # reported: Σ_kept |G_i ∪ H_i| = Σ_kept (|G_i| + |H_i|) − Σ |G_i ∩ H_i| (a dropped anchor's G_i is empty)
    positives = int(g_count.sum() + h_count[keep].sum() - torch.dot(g.view(-1), h.view(-1)))
    w = torch.add(g, h, alpha=rows.lam, out=h)  # §5: w_ij = 1[j∈G_i] + λ·1[j∈H_i] (H_i not in Dn_i); over H
    if not bool(keep.all()):
        w.mul_(keep[:, None])  # a dropped anchor weighs nothing
    w_sum = torch.where(keep, g_count + rows.lam * h_count, 0)  # §5: W_i = Σ_j w_ij = |G_i| + λ·|H_i|, or 0
    weighted, minus_m = _terms(rows.pair[:, first:last], rows.pair, contrast, w, w_sum, keep, rows, pair_block)
    return _Tile(first, last, weighted, w_sum.sum(), minus_m, int(keep.sum()), positives)


def _add_gradients(rows: _Rows, tile: _Tile, into: torch.Tensor, alpha: float) -> None:
    """into += alpha·∂ Σ_i W_i·l_i / ∂(z, z_mix) for one tile: its anchors' rows and every patch's (docstring)."""
    for minus_m, z, acc in zip(tile.minus_m, rows.pair, into, strict=True):  # z, then z_mix
        _addmm_(acc[tile.first:tile.last], minus_m, z, -alpha / rows.tau)  # Σ_j m_ij·z_j/τ, i as anchor
        _addmm_(acc, minus_m.T, z[tile.first:tile.last], -alpha / rows.tau)  # Σ_i m_ij·z_i/τ, j contrasted
    tile.minus_m = None  # its block is the next tile's


def _round(rows: _Rows, rnd: int, tile_size: int, grads: torch.Tensor | None, scale: float):
    """Round `rnd`'s GHP and LHP terms (§5), its kept anchors and positives; adds its gradient to `grads`.

    The round loss mean_i((τ/0.07)·l_i·ω_i), ω_i = W_i / mean_k W_k, is (τ/0.07)·Σ_i W_i·l_i / Σ_k W_k.
    One tile per round (the default) scales its gradient before adding; several tiles add theirs to a
    round buffer, scaled once the round's Σ_k W_k is known.
    """
    starts = range(0, rows.n, tile_size)
    buffer = torch.zeros_like(grads) if grads is not None and len(starts) > 1 else None
    tiles = []
    for start in starts:
        tile = _tile(rows, rnd, start, min(start + tile_size, rows.n))
        if tile is not None and buffer is not None:
            _add_gradients(rows, tile, buffer, 1.0)
        tiles += [tile] if tile is not None else []
    if not tiles:  # no kept anchor in this round: it contributes 0
        return torch.zeros(2, dtype=rows.r.dtype, device=rows.pair.device), 0, 0
    w_total = sum(t.w_total for t in tiles)  # §5: Σ_k W_k over the round's kept anchors
    terms = scale * sum(t.weighted for t in tiles) / w_total  # §5: mean_i((τ/0.07)·l_i·ω_i), GHP and LHP
    per_w = scale / float(w_total)  # ∂ round loss = (τ/0.07)/Σ_k W_k · ∂ Σ_i W_i·l_i
    if buffer is not None:
        grads.add_(buffer, alpha=per_w)
    elif grads is not None:
        _add_gradients(rows, tiles[0], grads, per_w)
    return terms, sum(t.kept for t in tiles), sum(t.positives for t in tiles)


def _rows(f, s_m, z, z_mix, r, r_m, u, lam, tau, rho, generator, products=None) -> _Rows:
    """The inputs as rows in float32 or better (§5), the products' operands in `products` when given (autocast's
    dtype); u drawn here when not given: one uniform (n x N) matrix per loss call, shared by all B rounds (§5)."""
    b, n = z.shape[:2]
    total, device = b * n, z.device
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32  # §5: float32 or better
    if u is None:
        gen_device = generator.device if generator is not None else device
        u = torch.rand((n, total), generator=generator, device=gen_device)
    need_grad = torch.is_grad_enabled() and (z.requires_grad or z_mix.requires_grad)
    as_rows = lambda x: x.detach().reshape(total, -1).to(dtype)  # noqa: E731
    pair = torch.stack([as_rows(z), as_rows(z_mix)])
    largest = float(pair.norm(dim=2).max()) if total else 0.0
    needs_shift = largest * largest / tau > SAFE_EXP  # |z_i·z_j|/τ ≤ max‖z‖²/τ (Cauchy-Schwarz)
    operand = (lambda x: x.to(products)) if products is not None and dtype == torch.float32 else (lambda x: x)
    return _Rows(operand(as_rows(f)), operand(as_rows(s_m)), as_rows(r).reshape(total), as_rows(r_m).reshape(total),
                 operand(pair),
                 (u.to(device) < rho).to(dtype), n, lam, tau, need_grad, needs_shift, _Blocks(total, dtype, device))


def hp_loss(
    f: torch.Tensor,
    s_m: torch.Tensor,
    z: torch.Tensor,
    z_mix: torch.Tensor,
    r: torch.Tensor,
    r_m: torch.Tensor,
    lam: float,
    tau: float,
    rho: float,
    u: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    anchor_tile: int | None = None,
) -> LossOutput:
    """L_hp of docs/hp.md §5 for one batch.

    f (B, n, C) unit backbone features; s_m (B, n, D) unit EMA codes; z, z_mix (B, n, D) unit projections;
    r, r_m (B, n) pool criteria; u (n, N) the uniform contrast mask (drawn from `generator` when None);
    anchor_tile: anchors per tile within a round (None or 0: the whole round). Only z and z_mix get
    gradients. Anchors with G_i empty are dropped before the log-sum-exp, and a round that keeps no anchor
    contributes 0 (the reference would give NaN for both).
    """
    _check_shapes(f, s_m, z, z_mix, r, r_m, u)
    if anchor_tile is not None and anchor_tile < 0:
        raise ValueError(f"hp_loss: anchor_tile must be positive (or 0/None for whole rounds), got {anchor_tile}")
    b, n = z.shape[:2]
    device_type = z.device.type
    products = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    rows = _rows(f, s_m, z, z_mix, r, r_m, u, lam, tau, rho, generator, products)
    grads = torch.zeros(rows.pair.shape, dtype=rows.r.dtype, device=z.device) if rows.need_grad else None
    terms, kept, positives = torch.zeros(2, dtype=rows.r.dtype, device=z.device), 0, 0
    with torch.autocast(z.device.type, enabled=False), torch.no_grad():
        for rnd in range(b):  # §5: round b = the n anchors of image b against all N patches
            round_terms, round_kept, round_positives = _round(rows, rnd, anchor_tile or n, grads, tau / TAU_BASE)
            terms, kept, positives = terms + round_terms, kept + round_kept, positives + round_positives
    ghp, lhp = terms / (2 * b)  # §5: L_hp = Σ_rounds (GHP + LHP) / (2B)
    loss = ghp + lhp
    if rows.need_grad:
        grad_z, grad_z_mix = (grads / (2 * b)).reshape(2, *z.shape).to(z.dtype)
        loss = _PrecomputedGrad.apply(loss, z, z_mix, grad_z, grad_z_mix)
    return LossOutput(loss=loss, ghp_term=ghp.detach(), lhp_term=lhp.detach(),
                      positives_per_anchor=positives / kept if kept else 0.0, kept_anchors=kept / (b * n))
