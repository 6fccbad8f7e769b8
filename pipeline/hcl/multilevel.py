"""HCL's parallel multi-level ViT (docs/hcl.md §1): the same frozen DINO weights run at several patch sizes.

Each branch resizes DINO's patch-embedding kernel FlexiViT-style (pseudo-inverse of a bicubic antialiased resize,
bias kept), resizes the position embeddings to its grid with DINO's own bicubic formula (`dino_interpolate_pos_embed`,
the one the native `Backbone` forward uses, so the native branch is exactly `Backbone(...).feat`), then runs the
blocks and final norm.
Branches are cached at their native grids; `concat_levels` builds the (levels + 1) * C input of the head on loading.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from timm.layers import resample_patch_embed
from torch import Tensor

from pipeline.backbone import Backbone, _attention_logits, dino_interpolate_pos_embed
from pipeline.errors import UserError

PATCH_SIZES: dict[str, tuple[int, ...]] = {
    "vit_small_patch16_224.dino": (16, 32, 56),
    "vit_small_patch8_224.dino": (8, 16, 32, 56),
    # not in the spec, which names ViT-S only: the same sizes, so HCL also runs on presets with a ViT-B (potsdam)
    "vit_base_patch16_224.dino": (16, 32, 56),
    "vit_base_patch8_224.dino": (8, 16, 32, 56),
}

# docs/hcl.md §1: pseudo-inverse of torch's bicubic, antialiased resize (align_corners False), as the reference's
# `pi_resize_patch_embed`. Antialias matters even when upsampling: torch's antialiased bicubic is PIL's cubic
# (a = -0.5), the plain one a = -0.75. Bilinear kernels differ from these by about half their magnitude.
# Changing this changes every coarse branch: bump cache.schema.HCL_SCHEMA so stores written before are rebuilt.
KERNEL_RESIZE = {"interpolation": "bicubic", "antialias": True}

# model -> {patch: resized kernel}; weak keys so a dropped backbone frees its kernels.
_KERNELS: weakref.WeakKeyDictionary[torch.nn.Module, dict[int, Tensor]] = weakref.WeakKeyDictionary()


def patch_sizes(name: str) -> tuple[int, ...]:
    """The branch patch sizes of a backbone, finest first."""
    if name not in PATCH_SIZES:
        raise UserError(f"HCL's multi-level backbone is defined for {', '.join(PATCH_SIZES)}, not {name!r}; "
                        "choose one of those backbones")
    return PATCH_SIZES[name]


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
    b, (h, w) = images.shape[0], (images.shape[-2] // patch, images.shape[-1] // patch)
    weight = m.patch_embed.proj.weight if patch == backbone.patch_size else _kernel(m, patch)
    captured: list[Tensor] = []
    hook = m.blocks[-1].attn.qkv.register_forward_hook(lambda _mod, _inp, out: captured.append(out))
    try:
        with backbone._autocast():
            x = F.conv2d(images, weight, m.patch_embed.proj.bias, stride=patch)
            x = m.patch_embed.norm(x.flatten(2).transpose(1, 2))
            x = torch.cat([m.cls_token.expand(b, -1, -1).to(x.dtype), x], dim=1)
            x = x + dino_interpolate_pos_embed(m.pos_embed, h, w).to(x.dtype)
            x = m.norm_pre(m.patch_drop(m.pos_drop(x)))
            x = m.norm(m.blocks(x)).float()
    finally:
        hook.remove()
    attn = _attention_logits(m.blocks[-1].attn, captured[-1])[:, :, 0].softmax(dim=-1)[:, :, 1:]
    return x[:, 1:].reshape(b, h, w, -1), x[:, 0], attn.reshape(b, -1, h, w)


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
    (finest patch first, then coarser), then the CLS token copied to every position."""
    if finest not in levels:
        raise KeyError(f"finest level {finest!r} not among {sorted(levels)}")
    names = sorted((k for k in levels if k.startswith("p") and k[1:].isdigit()), key=lambda k: int(k[1:]))
    b, h, w, c = levels[finest].shape
    parts = [levels[finest]]
    for name in names:
        if name == finest:
            continue
        grid = levels[name].permute(0, 3, 1, 2).float()
        parts.append(F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False).permute(0, 2, 3, 1))
    parts.append(levels["cls"].float()[:, None, None, :].expand(b, h, w, c))
    return torch.cat([p.float() for p in parts], dim=-1)
