"""Photometric views for the consistency term (docs/hp.md §3), drawn once per (image, seed) into the cache.

The transforms are the reference's own (torchvision v1, build.py of hynnsk/HP): ColorJitter(0.3, 0.3, 0.3,
0.1), RandomGrayscale(0.2), RandomApply([GaussianBlur((5, 5))]) with RandomApply's default p = 0.5 and
GaussianBlur's default sigma range (0.1, 2.0). They draw their parameters from the torch RNG only, so
seeding it reproduces a view exactly.

Quirk (reproduced by default): the reference applies them to the already-normalized tensor. ColorJitter
clamps float tensors to [0, 1], so such views end up in [0, 1] of the *normalized* space.
"""

from __future__ import annotations

import torch
import torchvision.transforms as T

from pipeline.extraction.backbone import IMAGENET_MEAN, IMAGENET_STD


def photometric_transform() -> T.Compose:
    """The reference's photometric augmentation, parameters sampled from the torch RNG at call time."""
    return T.Compose([
        T.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.1),
        T.RandomGrayscale(0.2),
        T.RandomApply([T.GaussianBlur((5, 5))], p=0.5),
    ])


def photometric_view(image: torch.Tensor, seed: int, on_normalized: bool = True) -> torch.Tensor:
    """One augmented copy of a normalized (3,H,W) image; deterministic in `seed`, caller's RNG untouched.

    on_normalized=True applies the transforms to the normalized tensor (HP's reference quirk);
    False applies them to the [0,1] image and normalizes the result again. (HCL's variants are made on PIL images
    at 448 px with their own ops: pipeline/methods/hcl/views.py.)
    """
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a (3,H,W) image, got {tuple(image.shape)}")
    image = image.float()
    mean = torch.tensor(IMAGENET_MEAN, device=image.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=image.device).view(3, 1, 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transform = photometric_transform()
        if on_normalized:
            return transform(image)
        return (transform(image * std + mean) - mean) / std
