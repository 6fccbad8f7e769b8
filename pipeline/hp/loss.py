"""The hidden-positive contrastive loss L_hp (docs/hp.md §5).

B rounds; round b takes the n anchors of image b against all N = B·n patches of the batch, so no N x N
matrix ever exists. Autograd would still keep every round's n x N intermediates alive until backward
(O(N²) in total, ~10 GB per term at B = 64, 28x28), so each round's gradient w.r.t. z and z_mix is taken
right away with a local autograd pass and only the (N, D) results are kept: peak memory is O(n·N), or
O(tile·N) with `anchor_tile`, and the returned loss backpropagates through those stored gradients.

The contrast set and the weights are masks without gradient, so ω_i is a constant and the round loss
mean_i((τ/0.07)·l_i·ω_i) over the K kept anchors equals (τ/0.07)·Σ_i W_i·l_i / Σ_k W_k: its gradient is
(τ/0.07)/Σ_k W_k times that of Σ_i W_i·l_i, which tiles of anchors can add up before Σ_k W_k is known.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TAU_BASE = 0.07  # §5: the reference's base temperature in (τ/0.07)


@dataclass
class LossOutput:
    loss: torch.Tensor  # L_hp (scalar, differentiable w.r.t. z and z_mix)
    ghp_term: torch.Tensor  # Σ_rounds GHP term / (2B), detached; loss = ghp_term + lhp_term
    lhp_term: torch.Tensor  # Σ_rounds LHP term / (2B), detached
    positives_per_anchor: float  # mean |G_i ∪ H_i| over kept anchors
    kept_anchors: float  # fraction of the N anchors with G_i non-empty


def _not_self(anchors: torch.Tensor, total: int) -> torch.Tensor:
    """(t, N) bool: j ≠ i for anchor rows `anchors` (flat batch indices)."""
    return torch.arange(total, device=anchors.device)[None, :] != anchors[:, None]


def positive_masks(
    x_anchor: torch.Tensor, x_all: torch.Tensor, r_anchor: torch.Tensor, r_all: torch.Tensor, anchors: torch.Tensor
) -> torch.Tensor:
    """Hidden positives of some anchors among all N patches, (t, N) bool (§5).

    j is a positive of i iff j ≠ i and x_i·x_j > r_i or x_i·x_j > r_j (unit x, so x_i·x_j = cos): the rule
    of G with (f, r) and of H with (s_m, r^m). `anchors` are the anchors' flat indices into x_all.
    """
    sim = x_anchor @ x_all.T  # §5: cos(f_i, f_j) (or cos(s_m_i, s_m_j))
    mask = (sim > r_anchor[:, None]) | (sim > r_all[None, :])  # §5: > r_i or > r_j (symmetric)
    return mask & _not_self(anchors, x_all.shape[0])  # §5: j ≠ i


def anchor_losses(
    z_anchor: torch.Tensor, z_all: torch.Tensor, contrast: torch.Tensor, w: torch.Tensor, tau: float
) -> torch.Tensor:
    """Per-anchor l_i (§5) for anchors whose contrast set is non-empty.

    logp_ij = z_i·z_j/τ − log Σ_{k∈Dn_i} exp(z_i·z_k/τ) for every j; a positive j ∈ H_i outside Dn_i
    still gets its own z_i·z_j/τ in the numerator, as the spec (and the reference) has it.
    """
    logits = z_anchor @ z_all.T / tau  # §5: z_i·z_j/τ
    log_norm = logits.masked_fill(~contrast, float("-inf")).logsumexp(dim=1)  # §5: log Σ_{k∈Dn_i} exp(z_i·z_k/τ)
    logp = logits - log_norm[:, None]  # §5: logp_ij
    return -(w * logp).sum(dim=1) / w.sum(dim=1)  # §5: l_i = −Σ_j w_ij·logp_ij / Σ_j w_ij


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
    """One batch's patches as rows (N = B·n), in the loss's dtype, and the settings every tile reads."""

    f: torch.Tensor  # (N, C) unit backbone features, detached
    s_m: torch.Tensor  # (N, D) unit EMA codes, detached
    r: torch.Tensor  # (N,) pool criteria of f
    r_m: torch.Tensor  # (N,) pool criteria of s_m
    z: torch.Tensor  # (N, D) unit projections (a leaf when gradients are wanted)
    z_mix: torch.Tensor  # (N, D)
    u: torch.Tensor  # (n, N) uniform contrast draws
    n: int  # patches per image
    lam: float
    tau: float
    rho: float
    need_grad: bool


@dataclass
class _Tile:
    """What one tile of anchors contributes: per-anchor losses, W_i, ∂ Σ_i W_i·l_i and the positives counted."""

    l_ghp: torch.Tensor
    l_lhp: torch.Tensor
    w_sum: torch.Tensor
    grads: tuple[torch.Tensor, torch.Tensor] | None
    positives: int


def _tile(rows: _Rows, rnd: int, anchors: torch.Tensor) -> _Tile | None:
    """The anchors `anchors` of round `rnd` (§5); None when none of them has a hidden positive."""
    total = rows.f.shape[0]
    g_mask = positive_masks(rows.f[anchors], rows.f, rows.r[anchors], rows.r, anchors)  # §5: G_i
    h_mask = positive_masks(rows.s_m[anchors], rows.s_m, rows.r_m[anchors], rows.r_m, anchors)  # §5: H_i
    keep = g_mask.any(dim=1)  # §5: anchors with G_i empty are dropped (before the log-sum-exp)
    if not bool(keep.any()):
        return None
    anchors, g_mask, h_mask = anchors[keep], g_mask[keep], h_mask[keep]
    k_pos = anchors - rnd * rows.n  # §5: k(i), the position of i in its image
    contrast = (g_mask | (rows.u[k_pos] < rows.rho)) & _not_self(anchors, total)  # §5: Dn_i (H_i not in it)
    w = g_mask.to(rows.f.dtype) + rows.lam * h_mask.to(rows.f.dtype)  # §5: w_ij = 1[j∈G_i] + λ·1[j∈H_i]
    w_sum = w.sum(dim=1)  # §5: W_i = Σ_j w_ij
    grads = None
    with torch.enable_grad():
        l_g = anchor_losses(rows.z[anchors], rows.z, contrast, w, rows.tau)  # §5: GHP term, z
        l_l = anchor_losses(rows.z_mix[anchors], rows.z_mix, contrast, w, rows.tau)  # §5: LHP term, z_mix
        if rows.need_grad:  # ∂ Σ_i W_i·l_i (module docstring); scaled once the round's Σ_k W_k is known
            grads = torch.autograd.grad((w_sum * l_g).sum() + (w_sum * l_l).sum(), [rows.z, rows.z_mix])
    return _Tile(l_g.detach(), l_l.detach(), w_sum, grads, int((g_mask | h_mask).sum()))


def _rows(f, s_m, z, z_mix, r, r_m, u, lam, tau, rho, generator) -> _Rows:
    """The inputs as rows in float32 or better (§5); u drawn here when not given: one uniform (n x N) matrix per
    loss call, shared by all B rounds (§5)."""
    b, n = z.shape[:2]
    total, device = b * n, z.device
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32  # §5: float32 or better
    if u is None:
        gen_device = generator.device if generator is not None else device
        u = torch.rand((n, total), generator=generator, device=gen_device)
    need_grad = torch.is_grad_enabled() and (z.requires_grad or z_mix.requires_grad)
    as_rows = lambda x: x.detach().reshape(total, -1).to(dtype)  # noqa: E731
    return _Rows(as_rows(f), as_rows(s_m), as_rows(r).reshape(total), as_rows(r_m).reshape(total),
                 as_rows(z).requires_grad_(need_grad), as_rows(z_mix).requires_grad_(need_grad), u.to(device), n,
                 lam, tau, rho, need_grad)


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
    rows = _rows(f, s_m, z, z_mix, r, r_m, u, lam, tau, rho, generator)
    tile, device, scale = anchor_tile or n, z.device, tau / TAU_BASE  # §5: (τ/0.07)
    grads = [torch.zeros_like(rows.z), torch.zeros_like(rows.z_mix)] if rows.need_grad else []
    ghp = torch.zeros((), dtype=rows.z.dtype, device=device)
    lhp = torch.zeros((), dtype=rows.z.dtype, device=device)
    kept, positives = 0, 0

    with torch.autocast(device.type, enabled=False), torch.no_grad():
        for rnd in range(b):  # §5: round b = the n anchors of image b against all N patches
            tiles = [_tile(rows, rnd, torch.arange(rnd * n + start, rnd * n + min(start + tile, n), device=device))
                     for start in range(0, n, tile)]
            tiles = [t for t in tiles if t is not None]
            positives += sum(t.positives for t in tiles)
            if not tiles:  # no kept anchor in this round: it contributes 0
                continue
            w_sum = torch.cat([t.w_sum for t in tiles])
            omega = w_sum / w_sum.mean()  # §5: ω_i = W_i / mean_k W_k over the round's kept anchors
            ghp += (scale * torch.cat([t.l_ghp for t in tiles]) * omega).mean()  # §5: mean_i((τ/0.07)·l_i·ω_i), GHP
            lhp += (scale * torch.cat([t.l_lhp for t in tiles]) * omega).mean()  # §5: the same with z_mix, LHP
            kept += len(w_sum)
            for which, acc in enumerate(grads):  # ∂ round loss = (τ/0.07)/Σ_k W_k · ∂ Σ_i W_i·l_i
                acc += sum_in_order([t.grads[which] for t in tiles]) * (scale / w_sum.sum())

    ghp, lhp = ghp / (2 * b), lhp / (2 * b)  # §5: L_hp = Σ_rounds (GHP + LHP) / (2B)
    loss = ghp + lhp
    if rows.need_grad:
        grad_z = (grads[0] / (2 * b)).reshape(z.shape).to(z.dtype)
        grad_z_mix = (grads[1] / (2 * b)).reshape(z_mix.shape).to(z_mix.dtype)
        loss = _PrecomputedGrad.apply(loss, z, z_mix, grad_z, grad_z_mix)
    return LossOutput(loss=loss, ghp_term=ghp.detach(), lhp_term=lhp.detach(),
                      positives_per_anchor=positives / kept if kept else 0.0, kept_anchors=kept / (b * n))


def sum_in_order(parts: list[torch.Tensor]) -> torch.Tensor:
    """0 + parts[0] + parts[1] + ...: the accumulation order (and so the float rounding) of a running sum."""
    total = torch.zeros_like(parts[0])
    for part in parts:
        total += part
    return total
