"""HCL's parallel multi-level ViT (docs/hcl.md §1): the same frozen backbone weights run at several patch sizes.

Each branch resizes the patch-embedding kernel FlexiViT-style (pseudo-inverse of a bicubic antialiased resize,
bias kept), then runs the native `Backbone.tokens` forward on its grid: positions reach the grid by the model's own
path (DINO v1's bicubic formula, timm's dynamic resampling for DINOv2, rotary embeddings for DINOv3), so the native
branch is exactly `Backbone(...).feat`. Prefix tokens: the CLS token is kept, registers are dropped.
Branches are cached at their native grids; `concat_levels` builds the (levels + 1) * C input of the head on loading.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from timm.layers import resample_patch_embed
from torch import Tensor

from pipeline.extraction.backbone import Backbone, backbone_facts

# The coarsest branch of every backbone (docs/hcl.md §1): the papers' 56 px patches.
COARSEST = 56

# docs/hcl.md §1: pseudo-inverse of torch's bicubic, antialiased resize (align_corners False), as the reference's
# `pi_resize_patch_embed`. Antialias matters even when upsampling: torch's antialiased bicubic is PIL's cubic
# (a = -0.5), the plain one a = -0.75. Bilinear kernels differ from these by about half their magnitude.
# Changing this changes every coarse branch: bump cache.schema.HCL_SCHEMA so stores written before are rebuilt.
KERNEL_RESIZE = {"interpolation": "bicubic", "antialias": True}

# model -> {patch: resized kernel}; weak keys so a dropped backbone frees its kernels.
_KERNELS: weakref.WeakKeyDictionary[torch.nn.Module, dict[int, Tensor]] = weakref.WeakKeyDictionary()


def branch_sizes(patch: int) -> tuple[int, ...]:
    """Branch patch sizes for a native patch size, finest first: the native patch, its doublings below 56, then 56
    (docs/hcl.md §1): 8 -> 8/16/32/56, 16 -> 16/32/56 (the papers' DINO branches), 14 -> 14/28/56."""
    sizes = [patch]
    while sizes[-1] * 2 < COARSEST:
        sizes.append(sizes[-1] * 2)
    if sizes[-1] < COARSEST:
        sizes.append(COARSEST)
    return tuple(sizes)


def patch_sizes(name: str) -> tuple[int, ...]:
    """The branch patch sizes of a backbone, finest first (any supported ViT; its patch size from timm)."""
    return branch_sizes(backbone_facts(name).patch_size)


def resize_patch_kernel(weight: Tensor, size: int) -> Tensor:
    """FlexiViT resize (C_out, C_in, p, p) -> (C_out, C_in, size, size): w' = pinv(B)^T w for the resize map B
    (bicubic, antialiased: docs/hcl.md §1).

    Keeps <x, w> == <B x, w'> for every patch x when upsampling, so a patch resized by B embeds as before.
    """
    if weight.ndim != 4 or weight.shape[-1] != weight.shape[-2]:
        raise ValueError(f"expected a square conv kernel (C_out, C_in, p, p), got {tuple(weight.shape)}")
    return resample_patch_embed(weight, [size, size], **KERNEL_RESIZE)


def _kernel(model: torch.nn.Module, patch: int) -> Tensor:
    cache = _KERNELS.setdefault(model, {})
    native = model.patch_embed.proj.weight
    if patch not in cache or cache[patch].device != native.device:
        cache[patch] = resize_patch_kernel(native.detach(), patch)
    return cache[patch]


def _fit_to_patch(images: Tensor, patch: int) -> Tensor:
    """Resize (bilinear) to the nearest multiple of `patch`, so the coarse grid still spans the whole image
    and stays aligned with the finest grid when upsampled. 224 and 448 px need no resize for any HCL patch."""
    height, width = images.shape[-2:]
    h, w = max(1, round(height / patch)), max(1, round(width / patch))
    if (h * patch, w * patch) == (height, width):
        return images
    return F.interpolate(images, size=(h * patch, w * patch), mode="bilinear", align_corners=False, antialias=True)


@torch.inference_mode()
def branch_forward(backbone: Backbone, images: Tensor, patch: int) -> tuple[Tensor, Tensor, Tensor]:
    """One branch on normalized (B,3,H,W) images -> (patch tokens (B,h,w,C), CLS token (B,C),
    softmaxed last-block CLS->patch attention (B,heads,h,w)); all float32."""
    m = backbone.model
    images = _fit_to_patch(images.to(backbone.device, torch.float32), patch)
    kernel = None if patch == backbone.patch_size else _kernel(m, patch)
    out = backbone.tokens(images, patch, kernel)
    return out.feat, out.cls, out.cls_attn


def multilevel_features(backbone: Backbone, images: Tensor) -> dict[str, Tensor]:
    """{"p16": (B,h,w,C), "p32": ..., "cls": (B,C), "cls_attn": (B,heads,h,w)}: every branch at its native grid,
    CLS token and attention from the finest branch (what the cache stores)."""
    out: dict[str, Tensor] = {}
    for i, patch in enumerate(patch_sizes(backbone.name)):
        feat, cls, attn = branch_forward(backbone, images, patch)
        out[f"p{patch}"] = feat
        if i == 0:
            out["cls"], out["cls_attn"] = cls, attn
    return out


def concat_levels(levels: dict[str, Tensor], finest: str) -> Tensor:
    """Cached branches -> head input (B,h,w,(levels+1)*C): finest grid, coarser grids upsampled bilinearly to it
    (finest patch first, then coarser), then the CLS token copied to every position.

    Each part is written once, straight into its slice of the float32 output: no float copy of each part and no
    second copy by a concatenation (the same values as `torch.cat` of the float32 parts)."""
    if finest not in levels:
        raise KeyError(f"finest level {finest!r} not among {sorted(levels)}")
    names = sorted((k for k in levels if k.startswith("p") and k[1:].isdigit()), key=lambda k: int(k[1:]))
    b, h, w, c = levels[finest].shape
    coarser = [name for name in names if name != finest]
    out = torch.empty((b, h, w, (len(coarser) + 2) * c), dtype=torch.float32, device=levels[finest].device)
    out[..., :c] = levels[finest]
    for i, name in enumerate(coarser, start=1):
        grid = levels[name].permute(0, 3, 1, 2).float()
        up = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)
        out[..., i * c:(i + 1) * c] = up.permute(0, 2, 3, 1)
    out[..., -c:] = levels["cls"][:, None, None, :]
    return out
