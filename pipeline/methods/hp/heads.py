"""The trained heads of Hidden Positives (docs/hp.md §2) and the LHP mix (§3).

Module and parameter names follow the reference implementation (`cluster1`, `cluster2.0`, `cluster2.2`)
so a reference segmentation-head state dict loads into `SegmentationHead` key for key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.extraction.lhp import WINDOW_OFFSETS, window_counts


class SegmentationHead(nn.Module):
    """S(f) = L1(f) + L3(relu(L2(f))), per patch (1x1 convolutions with bias), C -> D (§2)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.cluster1 = nn.Sequential(nn.Conv2d(in_dim, dim, 1))  # L1: C -> D
        self.cluster2 = nn.Sequential(nn.Conv2d(in_dim, in_dim, 1), nn.ReLU(), nn.Conv2d(in_dim, dim, 1))  # L3∘relu∘L2

    def forward(self, f: torch.Tensor, drop: nn.Module | None = None) -> torch.Tensor:
        """(B, C, h, w) -> (B, D, h, w). In training `drop` is the Dropout2d of §2, drawn once per branch:
        the reference computes cluster1(drop(f)) + cluster2(drop(f)), two independent masks."""
        if drop is None:
            return self.cluster1(f) + self.cluster2(f)
        return self.cluster1(drop(f)) + self.cluster2(drop(f))


class ProjectionHead(nn.Module):
    """P: one linear layer D -> D applied per patch; z = normalize(P(s)) over channels (§2).

    A 1x1 convolution; the reference's nn.Linear(D, D) weight is this one's weight[:, :, 0, 0].
    """

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) -> (B, D, h, w) with unit L2 norm at every position, normalized in fp32 under autocast."""
        return F.normalize(self.proj(s).float(), dim=1)


@torch.no_grad()
def ema_update(ema: nn.Module, online: nn.Module, m: float) -> None:
    """θ_m ← m·θ_m + (1−m)·θ for every parameter; buffers are copied, as in the reference (§2)."""
    ema_params, online_params = dict(ema.named_parameters()), dict(online.named_parameters())
    if ema_params.keys() != online_params.keys():
        raise ValueError("ema_update: the EMA module and the online module have different parameters")
    mine = list(ema_params.values())
    theirs = [online_params[name].detach() for name in ema_params]
    torch._foreach_mul_(mine, m)  # one fused pass per op over all parameters: the same arithmetic, element by element
    torch._foreach_add_(mine, theirs, alpha=1.0 - m)
    online_buffers = dict(online.named_buffers())
    for name, b_m in ema.named_buffers():
        b_m.copy_(online_buffers[name])


def lhp_mix(s: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """s_mix_i = (1/|W_i|) Σ_{j∈W_i} a_ij s_j over the 3x3 window W_i (§3).

    s (B, D, h, w); weights (B, h, w, 9), the cached LHP weights in `WINDOW_OFFSETS` slot order.
    Nine shifted views of a zero-padded s, so memory stays O(B·D·n) and the gradient reaches every s_j
    in the window ("gradient propagation to local hidden positives"). Slots outside the image multiply
    the zero padding, so they contribute nothing whatever the cache holds there.
    """
    b, d, h, w = s.shape
    if weights.shape != (b, h, w, 9):
        raise ValueError(f"lhp_mix: weights {tuple(weights.shape)} do not match codes {tuple(s.shape)}; "
                         f"expected {(b, h, w, 9)}")
    a = weights.to(s.dtype).permute(0, 3, 1, 2)  # (B, 9, h, w): a_ij for slot k = offset of j from i
    padded = F.pad(s, (1, 1, 1, 1))
    mix = torch.zeros_like(s)
    for k, (dy, dx) in enumerate(WINDOW_OFFSETS):
        mix = mix + a[:, k : k + 1] * padded[:, :, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]  # Σ_j a_ij s_j
    return mix / window_counts(h, w).to(device=s.device, dtype=s.dtype)  # 1/|W_i|: 9, 6 or 4
