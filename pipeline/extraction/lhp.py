"""Local hidden positives (docs/hp.md §1): per-patch 3x3 weights from the last block's attention logits.

Only the 3x3 window around each anchor is ever used, so we store (h, w, 9) instead of the n x n map.
Window slot k holds the neighbour at offset WINDOW_OFFSETS[k] = (dy, dx), row-major over -1..1
(slot 4 is the anchor itself); slots outside the image are 0.
"""

from __future__ import annotations

import math

import torch

WINDOW_OFFSETS: tuple[tuple[int, int], ...] = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))


def _quantile_sorted(s: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile(..., interpolation='linear') along the last dim of an already sorted tensor.

    Same arithmetic as torch (bit-exact on CPU), but without torch.quantile's input size limit, and
    both quantiles share one sort.
    """
    n = s.shape[-1]
    rank = float(torch.tensor(q, dtype=s.dtype)) * (n - 1)  # as torch: q in the input dtype, rank in double
    lo, hi = math.floor(rank), math.ceil(rank)
    weight = torch.tensor(rank - lo, dtype=s.dtype, device=s.device)
    return torch.lerp(s[..., lo : lo + 1], s[..., hi : hi + 1], weight)


def window_index(h: int, w: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 9) flat neighbour indices (clipped into range) and (n, 9) validity mask for an h x w grid."""
    y = torch.arange(h, device=device).view(h, 1, 1)
    x = torch.arange(w, device=device).view(1, w, 1)
    dy = torch.tensor([o[0] for o in WINDOW_OFFSETS], device=device).view(1, 1, 9)
    dx = torch.tensor([o[1] for o in WINDOW_OFFSETS], device=device).view(1, 1, 9)
    ny, nx = y + dy, x + dx
    valid = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
    index = ny.clamp(0, h - 1) * w + nx.clamp(0, w - 1)
    return index.reshape(h * w, 9), valid.reshape(h * w, 9)


def window_counts(h: int, w: int) -> torch.Tensor:
    """|W_i| per patch as float32 (h, w): 9 inside, 6 on an edge, 4 in a corner; a grid constant."""
    return window_index(h, w)[1].sum(-1).reshape(h, w).float()


def lhp_weights(attn_logits: torch.Tensor, h: int, w: int, sigma: float = 28.0) -> torch.Tensor:
    """(B, n, n) head-averaged attention logits -> (B, h, w, 9) LHP weights, float32.

    Per anchor row: clamp to [q10, q90], softmax, * sigma, zero entries below the row mean, keep the
    3x3 window around the anchor (0 outside the image).
    """
    b, n, n2 = attn_logits.shape
    if n != h * w or n2 != n:
        raise ValueError(f"attention {tuple(attn_logits.shape)} does not match a {h}x{w} grid")
    a = attn_logits.float()
    s = a.sort(dim=-1).values
    q10, q90 = _quantile_sorted(s, 0.1), _quantile_sorted(s, 0.9)
    del s
    a = torch.max(torch.min(a, q90), q10).softmax(dim=-1) * sigma
    a = a.masked_fill(a < a.mean(dim=-1, keepdim=True), 0.0)
    index, valid = window_index(h, w, a.device)
    out = a.gather(-1, index.expand(b, n, 9)) * valid
    return out.reshape(b, h, w, 9)
