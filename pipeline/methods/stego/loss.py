"""STEGO's contrastive correlation loss and the jointly trained linear probe's loss (docs/stego.md §3). No I/O.

Random draws of one `stego_loss` call, all from the caller's generator, in this order:

1. `P1`: B*S*S*2 uniforms (anchor coordinates),
2. `P2`: B*S*S*2 uniforms (positive and negative coordinates),
3. `neg_samples` times a `super_perm(B)` (one `randperm(B)` each).

The cluster probe's loss is `pipeline.evaluation.online_probes.cluster_lookup_loss`: STEGO's `ClusterLookup` with
hard assignment computes the same value and gradient (docs/stego.md §3, "Probes").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

NORM_EPS = 1e-10  # the eps of the reference's channel normalisation in the loss (§3.4)
NO_CLAMP = -9999.0  # the lower clamp with zero_clamp off: below any cosine, i.e. no clamp (§3.4)
STABILIZE_MAX = 0.8  # the upper clamp of the code correlation with stabilize on (§3.4)


def sample(t: Tensor, coords: Tensor) -> Tensor:
    """(B, C, h, w) at (B, S, S, 2) coordinates in [-1, 1] -> (B, C, S, S) (§3.2).

    Bilinear, border padding, align_corners=True: -1 and +1 are the centres of the border patches. `coords[..., 0]`
    is the horizontal (x, width) and `coords[..., 1]` the vertical coordinate, as in grid_sample; like the reference
    the two S axes of the grid are transposed first, so output point (i, j) is `coords[:, j, i]`. That only reorders
    the points, but it keeps the sampled values in the reference's layout."""
    grid = coords.transpose(1, 2)
    return F.grid_sample(t, grid.to(t.dtype), mode="bilinear", padding_mode="border", align_corners=True)


def super_perm(size: int, generator: torch.Generator) -> Tensor:
    """Partner index for each batch item (§3.6): a random permutation whose fixed points are moved on by one, mod
    `size`. Never maps i to itself when size >= 2, but is not a bijection (two items can share a partner)."""
    perm = torch.randperm(size, generator=generator, device=generator.device)
    fixed = perm == torch.arange(size, device=perm.device)
    return (perm + fixed.long()) % size


def _wide(t: Tensor) -> Tensor:
    """`t` in float32 or better: a bf16/fp16 tensor (autocast's, train.amp) is widened, float64 kept."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _unit(t: Tensor) -> Tensor:
    """Unit vectors along channels, normalised in fp32 or better also under autocast: a bf16 head's codes too."""
    return F.normalize(_wide(t), dim=1, eps=NORM_EPS)


def correlation(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity of every point of `a` (B, C, S, S) with every point of `b` of the same image:
    (B, S, S, S, S), indexed [n, h, w, i, j] (§3.4). Under autocast the product runs in its dtype (as autocast runs
    a matmul) and the result comes back in fp32, so that the loss's clamps and sums stay fp32."""
    return _wide(torch.einsum("nchw,ncij->nhwij", _unit(a), _unit(b)))


def correlation_term(f1: Tensor, f2: Tensor, c1: Tensor, c2: Tensor, shift: float, pointwise: bool,
                     zero_clamp: bool, stabilize: bool) -> tuple[Tensor, Tensor]:
    """One term of the loss, elementwise: `-clamp(Cd) * (F - shift)`, and `Cd` (§3.4).

    The feature correlation `F` carries no gradient (the backbone is frozen); only the code correlation `Cd` does."""
    with torch.no_grad():
        u1, u2 = _unit(f1.detach()), _unit(f2.detach())
    return _term(u1, u2, c1, c2, shift, pointwise, zero_clamp, stabilize)


def _term(u1: Tensor, u2: Tensor, c1: Tensor, c2: Tensor, shift: float, pointwise: bool, zero_clamp: bool,
          stabilize: bool) -> tuple[Tensor, Tensor]:
    """`correlation_term` with the feature samples already normalised (`_unit`): `stego_loss` normalises each
    feature sample once, not once per term it enters (the anchors' enter all 2 + neg_samples terms, twice in the
    intra one). The same numbers: `_unit` of the same tensor is the same tensor."""
    with torch.no_grad():
        fd = _wide(torch.einsum("nchw,ncij->nhwij", u1, u2))  # §3.4 F, as `correlation`
        if pointwise:
            global_mean = fd.mean()
            fd = fd - fd.mean(dim=(3, 4), keepdim=True)  # §3.4 centre each anchor point over its partners
            # §3.4 quirk: the reference then adds back the uncentred global mean (after removing the centred
            # tensor's own mean, zero up to rounding)
            fd = fd - fd.mean() + global_mean
    cd = correlation(c1, c2)  # §3.4 Cd, with gradient
    low = 0.0 if zero_clamp else NO_CLAMP  # §3.4 zero_clamp
    clamped = cd.clamp(low, STABILIZE_MAX) if stabilize else cd.clamp(min=low)  # §3.4 stabalize (sic)
    return -clamped * (fd - shift), cd  # §3.4 L = -clamp(Cd) * (F - b)


@dataclass(frozen=True, kw_only=True)
class StegoLossSettings:
    """The loss's hyper-parameters (config keys stego.*, docs/stego.md §5). Weights and shifts depend on the preset,
    so they have no defaults."""

    feature_samples: int = 11  # S: points per image side
    neg_samples: int = 5
    pointwise: bool
    zero_clamp: bool = True
    stabilize: bool = False
    w_intra: float
    w_inter: float
    w_neg: float
    b_intra: float
    b_inter: float
    b_neg: float
    correspondence_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.feature_samples < 1:
            raise ValueError(f"stego.feature_samples must be >= 1, got {self.feature_samples}")
        if self.neg_samples < 0:
            raise ValueError(f"stego.neg_samples must be >= 0, got {self.neg_samples}")


@dataclass
class StegoLossOutput:
    """`loss` is differentiable; the rest are detached scalars for logging (the reference logs the same six)."""

    loss: Tensor
    intra: Tensor
    inter: Tensor
    neg: Tensor
    cd_intra: Tensor
    cd_inter: Tensor
    cd_neg: Tensor


def _uniform_coords(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> Tensor:
    """U[-1, 1) coordinates (§3.1)."""
    return (torch.rand(shape, generator=generator, device=generator.device) * 2 - 1).to(device)


def stego_loss(f: Tensor, c: Tensor, f_pos: Tensor, c_pos: Tensor, settings: StegoLossSettings,
               generator: torch.Generator) -> StegoLossOutput:
    """STEGO's correspondence loss for anchors (f, c) and their KNN positives (f_pos, c_pos), all (B, ., h, w)
    (§3, items 1-7). The draw order is in the module docstring. Gradients reach `c` and `c_pos` only."""
    s = settings
    batch, device = c.shape[0], c.device
    shape = (batch, s.feature_samples, s.feature_samples, 2)
    p1 = _uniform_coords(shape, generator, device)  # §3.1 P1, anchors
    p2 = _uniform_coords(shape, generator, device)  # §3.1 P2, positives and negatives
    with torch.no_grad():
        f = f.detach().to(c.dtype)
        f_pos = f_pos.detach().to(c.dtype)
        fs = sample(f, p1)  # §3.3 fs
        fs_pos = sample(f_pos, p2)  # §3.3 fs+
        us, us_pos = _unit(fs), _unit(fs_pos)  # the feature samples normalised once (`_term`)
    cs = sample(c, p1)  # §3.3 cs
    cs_pos = sample(c_pos, p2)  # §3.3 cs+
    flags = {"pointwise": s.pointwise, "zero_clamp": s.zero_clamp, "stabilize": s.stabilize}

    intra, cd_intra = _term(us, us, cs, cs, s.b_intra, **flags)  # §3.5 intra, same points both sides
    inter, cd_inter = _term(us, us_pos, cs, cs_pos, s.b_inter, **flags)  # §3.5 inter
    neg_terms, neg_cds = [], []
    for _ in range(s.neg_samples):
        partner = super_perm(batch, generator).to(device)  # §3.6 another anchor of the batch
        with torch.no_grad():
            us_neg = _unit(sample(f[partner], p2))  # §3.6 at the reused P2
        cs_neg = sample(c[partner], p2)
        term, cd = _term(us, us_neg, cs, cs_neg, s.b_neg, **flags)  # §3.6 negative term
        neg_terms.append(term)
        neg_cds.append(cd.detach())

    zero = c.new_zeros(())
    neg = torch.stack(neg_terms).mean() if neg_terms else zero  # §3.7 mean over neg_samples*B*S^4 entries
    cd_neg = torch.stack(neg_cds).mean() if neg_cds else zero
    intra_mean, inter_mean = intra.mean(), inter.mean()  # §3.7 means over B*S^4 entries
    loss = s.correspondence_weight * (s.w_intra * intra_mean + s.w_inter * inter_mean + s.w_neg * neg)  # §3.7
    return StegoLossOutput(loss=loss, intra=intra_mean.detach(), inter=inter_mean.detach(), neg=neg.detach(),
                           cd_intra=cd_intra.detach().mean(), cd_inter=cd_inter.detach().mean(), cd_neg=cd_neg)


def linear_probe_loss(logits: Tensor, labels: Tensor, n_classes: int) -> Tensor:
    """The linear probe's loss (§3, "Probes"): logits (B, K, h, w) upsampled bilinearly (align_corners=False) to the
    labels' (B, H, W) size, cross-entropy averaged over pixels with 0 <= label < n_classes. A batch without such a
    pixel gives 0 (with a zero gradient) where the reference's mean over no pixels would be NaN."""
    labels = labels.long()
    if tuple(logits.shape[-2:]) != tuple(labels.shape[-2:]):
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    valid = (labels >= 0) & (labels < n_classes)
    per_pixel = F.cross_entropy(logits, torch.where(valid, labels, -100), ignore_index=-100, reduction="none")
    return per_pixel.sum() / valid.sum().clamp(min=1)  # no host sync for the empty case
