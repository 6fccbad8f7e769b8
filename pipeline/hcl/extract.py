"""From a chunk of stored crops to its HCL arrays (specs/HCL.md §1, §4). Pure computation, no I/O.

The plain crop gets its coarser branches and CLS token (its finest branch is the store's `feat` already) and its
foreground mask, made from the `cls_attn` the store holds. Training crops also get `n_views` photometric variants,
each through every branch. Variants are seeded by the sample's global index, so a chunk is the same whichever
process computes it and however often.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.augment import photometric_view
from pipeline.backbone import Backbone, normalize
from pipeline.extract import view_seed
from pipeline.hcl.foreground import foreground_mask
from pipeline.hcl.multilevel import branch_forward, patch_sizes

_VIEW_SEED_OFFSET = 1_000  # keeps HCL's variant seeds apart from HP's photometric views of the same crop


def hcl_views(x: torch.Tensor, indices: np.ndarray, n_views: int, seed: int) -> torch.Tensor:
    """(B,3,H,W) normalized crops -> (B*n_views,3,H,W) HCL photometric variants, sample-major, pixel-aligned."""
    return torch.stack([
        photometric_view(x[i], view_seed(seed, int(indices[i]), _VIEW_SEED_OFFSET + k), on_normalized=False,
                         method="hcl")
        for i in range(len(x))
        for k in range(n_views)
    ])


def _f16(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float16).cpu().numpy()


def hcl_chunk(backbone: Backbone, images: np.ndarray, cls_attn: np.ndarray, indices: np.ndarray, n_views: int,
              seed: int, mass: float = 0.7, min_size: int = 3) -> dict[str, np.ndarray]:
    """images (B,H,W,3) uint8, cls_attn (B,heads,h,w) of the finest branch -> the HCLLayout arrays of the chunk."""
    sizes = patch_sizes(backbone.name)
    x = normalize(torch.from_numpy(np.ascontiguousarray(images)))
    out: dict[str, np.ndarray] = {}
    for i, patch in enumerate(sizes):
        feat, cls, _ = branch_forward(backbone, x, patch)
        if i:
            out[f"hcl_p{patch}"] = _f16(feat)
        else:
            out["hcl_cls"] = _f16(cls)  # the finest branch's patches are the store's `feat`
    out["fg_mask"] = foreground_mask(torch.from_numpy(cls_attn).float(), mass=mass, min_size=min_size).numpy()
    if n_views:
        views = hcl_views(x, indices, n_views, seed)
        b = len(x)
        for patch in sizes:
            feat, cls, _ = branch_forward(backbone, views, patch)
            out[f"hcl_aug_p{patch}"] = _f16(feat).reshape(b, n_views, *feat.shape[1:])
            if patch == sizes[0]:
                out["hcl_aug_cls"] = _f16(cls).reshape(b, n_views, -1)
    return out
