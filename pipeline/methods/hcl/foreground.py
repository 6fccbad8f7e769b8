"""HCL's fixed foreground mask (docs/hcl.md §1) from the finest branch's last-block CLS->patch attention.

Mean over heads, Gaussian blur (kernel 7, sigma 0.6, reflect padding as torchvision's GaussianBlur; replicate on
grids too small to reflect), keep the patches that together hold `mass` of the attention (DINO's cumulative-mass
threshold, largest first), then drop 8-connected components smaller than `min_size` patches. Not learned: cacheable.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor

_EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity


def gaussian_kernel1d(kernel: int, sigma: float) -> Tensor:
    """torchvision's `_get_gaussian_kernel1d`: samples at integer offsets, normalized to sum 1."""
    x = torch.linspace(-(kernel // 2), kernel // 2, kernel, dtype=torch.float64)
    pdf = torch.exp(-0.5 * (x / sigma) ** 2)
    return pdf / pdf.sum()


def gaussian_blur(maps: Tensor, kernel: int = 7, sigma: float = 0.6) -> Tensor:
    """(B,h,w) -> (B,h,w) separable Gaussian blur, same size."""
    k = gaussian_kernel1d(kernel, sigma).to(maps.device)
    pad = kernel // 2
    mode = "reflect" if min(maps.shape[-2:]) > pad else "replicate"
    x = F.pad(maps[:, None].double(), (pad, pad, pad, pad), mode=mode)
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    x = F.conv2d(x, k.view(1, 1, -1, 1))
    return x[:, 0].to(maps.dtype)


def mass_threshold(maps: Tensor, mass: float) -> Tensor:
    """(B,h,w) non-negative -> bool: DINO's rule, ascending sort, keep where the cumulative share > 1 - mass.

    Equivalently: largest first, keep a patch while the patches kept before it hold less than `mass`.
    """
    flat = maps.flatten(1).double()
    val, idx = torch.sort(flat, dim=1)
    cum = torch.cumsum(val / val.sum(dim=1, keepdim=True), dim=1)
    keep = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, idx, cum > 1 - mass)
    return keep.view_as(maps)


def remove_small(mask: np.ndarray, min_size: int) -> np.ndarray:
    """(h,w) bool: drop 8-connected components with fewer than `min_size` patches."""
    labels, n = ndimage.label(mask, structure=_EIGHT)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_size
    keep[0] = False
    return keep[labels]


def foreground_mask(cls_attn: Tensor, mass: float = 0.7, kernel: int = 7, sigma: float = 0.6,
                    min_size: int = 3) -> Tensor:
    """(B,heads,h,w) softmaxed CLS->patch attention -> (B,h,w) bool foreground."""
    if cls_attn.ndim != 4:
        raise ValueError(f"expected (B, heads, h, w) attention, got {tuple(cls_attn.shape)}")
    blurred = gaussian_blur(cls_attn.float().mean(dim=1), kernel, sigma)
    kept = mass_threshold(blurred, mass).cpu().numpy()
    out = np.stack([remove_small(m, min_size) for m in kept])
    return torch.from_numpy(out).to(cls_attn.device)
