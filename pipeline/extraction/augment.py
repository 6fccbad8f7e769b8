"""Photometric views for the consistency term (docs/hp.md §3), drawn once per (image, seed) into the cache.

The transforms are the reference's own (torchvision v1, build.py of hynnsk/HP): ColorJitter(0.3, 0.3, 0.3,
0.1), RandomGrayscale(0.2), RandomApply([GaussianBlur((5, 5))]) with RandomApply's default p = 0.5 and
GaussianBlur's default sigma range (0.1, 2.0). They draw their parameters from the torch RNG only, so
seeding it reproduces a view exactly.

Quirk (reproduced by default): the reference applies them to the already-normalized tensor. ColorJitter
clamps float tensors to [0, 1], so such views end up in [0, 1] of the *normalized* space.

Speed: the hue shift is most of a view's cost in torchvision (an HSV round trip ending in a 6-way einsum), and
views are made beside the backbone in the features stage, so `adjust_hue` below computes the same floats with
a cheaper final selection (bit for bit the same: tests/test_augment.py compares the bits).
"""

from __future__ import annotations

import functools

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F

from pipeline.extraction.backbone import IMAGENET_MEAN, IMAGENET_STD


def adjust_hue(img: torch.Tensor, hue_factor: float) -> torch.Tensor:
    """torchvision's `adjust_hue` on a float32 (3,H,W) tensor, bit for bit, in about half the time.

    The arithmetic is torchvision's own, op for op (`_rgb2hsv`, the shift, `_hsv2rgb`); only the end differs:
    torchvision picks each output channel out of (v, q, p, t) with an einsum against a one-hot mask of the hue
    sector, which adds the picked value to zeros; here it is picked with `gather`, and `+ 0.0` turns a -0.0 into
    0.0 as that sum does. Where the einsum would meet a NaN or an infinity (0 * NaN: for a channel max of exactly
    0 beside a negative channel, or non-finite inputs) torchvision itself computes the image, NaNs included.
    """
    if not (-0.5 <= hue_factor <= 0.5):
        raise ValueError(f"hue_factor ({hue_factor}) is not in [-0.5, 0.5].")
    if img.dtype != torch.float32 or img.ndim != 3 or img.shape[0] != 3 or img.device.type != "cpu":
        return F.adjust_hue(img, hue_factor)  # what the fast path below is not written (or tested) for
    r, g, b = img.unbind(dim=0)
    # _rgb2hsv (torchvision.transforms._functional_tensor), op for op
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    eqc = maxc == minc
    cr = maxc - minc
    s = cr / torch.where(eqc, 1.0, maxc)
    cr_divisor = torch.where(eqc, 1.0, cr)
    rc = (maxc - r) / cr_divisor
    gc = (maxc - g) / cr_divisor
    bc = (maxc - b) / cr_divisor
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    # the shift (adjust_hue), then _hsv2rgb with v = maxc
    h = (h + hue_factor) % 1.0
    v = maxc
    i = torch.floor(h * 6.0)
    f = (h * 6.0) - i
    sector = i.to(dtype=torch.int32) % 6
    p = torch.clamp((v * (1.0 - s)), 0.0, 1.0)
    q = torch.clamp((v * (1.0 - s * f)), 0.0, 1.0)
    t = torch.clamp((v * (1.0 - s * (1.0 - f))), 0.0, 1.0)
    picks = torch.stack((v, q, p, t))
    if not bool(torch.isfinite(picks.sum())):  # a NaN or an infinity somewhere (or a sum past float32's range)
        return F.adjust_hue(img, hue_factor)
    # torchvision's rows by sector: r = (v, q, p, p, t, v), g = (t, v, v, q, p, p), b = (p, p, t, v, v, q)
    index = _SECTOR_PICKS.take(sector.long() + _ROW_OFFSETS)
    return picks.gather(0, index) + 0.0


# position in (v, q, p, t) of each output channel's value, sector by sector; one row of six per channel
_SECTOR_PICKS = torch.tensor([[0, 1, 2, 2, 3, 0], [3, 0, 0, 1, 2, 2], [2, 2, 3, 0, 0, 1]])
_ROW_OFFSETS = torch.tensor([0, 6, 12]).view(3, 1, 1)


class _ColorJitter(T.ColorJitter):
    """torchvision's ColorJitter (same parameters, same draws from the torch RNG, same order) with the hue shift
    above."""

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        fn_idx, brightness, contrast, saturation, hue = self.get_params(
            self.brightness, self.contrast, self.saturation, self.hue)
        for fn_id in fn_idx:
            if fn_id == 0 and brightness is not None:
                img = F.adjust_brightness(img, brightness)
            elif fn_id == 1 and contrast is not None:
                img = F.adjust_contrast(img, contrast)
            elif fn_id == 2 and saturation is not None:
                img = F.adjust_saturation(img, saturation)
            elif fn_id == 3 and hue is not None:
                img = adjust_hue(img, hue)
        return img


def photometric_transform() -> T.Compose:
    """The reference's photometric augmentation, parameters sampled from the torch RNG at call time."""
    return T.Compose([
        _ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.1),
        T.RandomGrayscale(0.2),
        T.RandomApply([T.GaussianBlur((5, 5))], p=0.5),
    ])


@functools.cache
def _shared_transform() -> T.Compose:
    """One transform for every view: it holds only its parameter ranges (the draws come from the RNG at call
    time), so building it once saves that Python work per view."""
    return photometric_transform()


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
        # the transforms draw from the CPU generator only; torch.manual_seed would also (lazily) reseed every
        # accelerator's RNG, a Python stack capture per call that holds the GIL beside the backbone's thread
        torch.default_generator.manual_seed(seed)
        transform = _shared_transform()
        if on_normalized:
            return transform(image)
        return (transform(image * std + mean) - mean) / std
