"""From a chunk of HCL views to its store arrays (docs/hcl.md §1, §4). Pure computation, no I/O.

Every branch of the plain views (the finest one is `feat`, the others `hcl_p<patch>`), the finest branch's CLS token,
the foreground mask from the finest branch's CLS attention (training), and every branch of the photometric variants
(training). The views themselves come from pipeline/methods/hcl/views.py, seeded by the source image, so a chunk is
the same
whichever process computes it and however often.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.extraction.backbone import Backbone, normalize
from pipeline.methods.hcl.foreground import foreground_mask
from pipeline.methods.hcl.multilevel import branch_forward, patch_sizes


def _f16(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float16).cpu().numpy()


def hcl_chunk(backbone: Backbone, images: np.ndarray, variants: np.ndarray | None, with_mask: bool,
              mass: float = 0.7, min_size: int = 3) -> dict[str, np.ndarray]:
    """images (B,H,W,3) uint8 plain views, variants (B,V,H,W,3) uint8 or None -> the HCLLayout feature arrays."""
    sizes = patch_sizes(backbone.name)
    x = normalize(torch.from_numpy(np.ascontiguousarray(images)))
    out: dict[str, np.ndarray] = {}
    for i, patch in enumerate(sizes):
        feat, cls, attn = branch_forward(backbone, x, patch)
        if i:
            out[f"hcl_p{patch}"] = _f16(feat)
            continue
        out["feat"], out["hcl_cls"] = _f16(feat), _f16(cls)
        if with_mask:  # §1: from the finest branch's last-block CLS->patch attention (float32)
            out["fg_mask"] = foreground_mask(attn, mass=mass, min_size=min_size).cpu().numpy()
    if variants is not None and variants.shape[1]:
        b, v = variants.shape[:2]
        xv = normalize(torch.from_numpy(np.ascontiguousarray(variants.reshape(b * v, *variants.shape[2:]))))
        for patch in sizes:
            feat, cls, _ = branch_forward(backbone, xv, patch)
            out[f"hcl_aug_p{patch}"] = _f16(feat).reshape(b, v, *feat.shape[1:])
            if patch == sizes[0]:
                out["hcl_aug_cls"] = _f16(cls).reshape(b, v, -1)
    return out
