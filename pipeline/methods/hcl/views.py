"""HCL's own geometry (docs/hcl.md §4, §5): training crops, photometric variants, the evaluation resize, and which
cached crop each epoch uses. Pure functions of their seeds, no I/O.

Training, as the reference's data pipeline runs it (PIL images throughout, every op on uint8 pixels):

1. one square crop per image: side = int(s · short side), s ~ U[0.8, 1.0]; top = round((short − side) · u1) and
   left = round((short − side) · u2), u1, u2 ~ U[0, 1]. Both offsets range over the *short* side, as the
   reference's RandomResizedCrop2 computes them: on a landscape image the crop never reaches the right end;
2. resized bilinearly (PIL, antialiased) to `crop_resolution` (448);
3. photometric ops at 448, each its own coin with p = 0.8, in this fixed order: brightness, contrast, saturation
   (factors U[0.7, 1.3]) and hue (U[−0.1, 0.1]), torchvision's functional ops on PIL; then PIL's Gaussian blur
   with p = 0.5, σ = |0.1 + 3.8 (u − 0.5)| for the coin's own u < 0.5, i.e. σ ∈ [0, 1.8] px (the reference's
   formula is negative for most u; PIL takes |σ|); no grayscale (the reference's option is misspelt: never on);
4. the plain crop and each variant resized bilinearly (PIL) to `resolution` (224): pixel-aligned views.

The cache holds R crops per image (each its own scale and offset) with V variants each; an epoch uses one crop per
image (`epoch_crops`). Evaluation: the whole image resized to a square (bilinear without antialiasing, as the
reference's cv2.INTER_LINEAR; labels nearest, floor index), no crop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter

CROP_SCALE = (0.8, 1.0)  # §4: side / short side
JITTER = (("brightness", 0.3), ("contrast", 0.3), ("saturation", 0.3), ("hue", 0.1))  # §4: in this order
P_JITTER = 0.8  # each op its own coin
P_BLUR = 0.5
BLUR_SIGMA = (0.1, 2.0)  # the reference's nominal range; its formula makes |σ| ∈ [0, 1.8] (see `draw_photometric`)
_ADJUST = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast,
           "saturation": TF.adjust_saturation, "hue": TF.adjust_hue}
_CROP, _VIEW, _EPOCH = 0, 1, 2  # keeps the random streams of crops, variants and epochs apart


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def crop_box(height: int, width: int, seed: int, image: int, crop: int) -> tuple[int, int, int]:
    """(top, left, side) of crop `crop` of source image `image` (§4), seeded by (seed, image, crop)."""
    rng = _rng(seed, image, crop, _CROP)
    scale = rng.uniform(*CROP_SCALE)
    u_top, u_left = rng.uniform(), rng.uniform()
    short = min(height, width)
    side = max(1, int(scale * short))
    return int(round((short - side) * u_top)), int(round((short - side) * u_left)), side


@dataclass(frozen=True)
class Photometric:
    """One variant's parameters (§4): a factor per op of JITTER (None: its coin said no), the blur σ (None: no)."""

    factors: tuple[float | None, ...]
    blur: float | None


def draw_photometric(seed: int, image: int, crop: int, view: int) -> Photometric:
    """Variant `view` of crop `crop` of image `image`, seeded by (seed, image, crop, view).

    The blur reuses its coin's u, as the reference does: for u < 0.5, σ = |0.1 + (2.0 − 0.1) / 0.5 · (u − 0.5)|.
    """
    rng = _rng(seed, image, crop, view, _VIEW)
    factors = []
    for name, x in JITTER:
        applied = rng.random() < P_JITTER
        low, high = (-x, x) if name == "hue" else (max(0.0, 1 - x), 1 + x)
        factor = rng.uniform(low, high)  # drawn either way: a variant's factors do not depend on its coins
        factors.append(float(factor) if applied else None)
    u = rng.random()
    slope = (BLUR_SIGMA[1] - BLUR_SIGMA[0]) / (1 - P_BLUR)
    blur = abs(BLUR_SIGMA[0] + slope * (u - P_BLUR)) if u < P_BLUR else None
    return Photometric(tuple(factors), blur)


def apply_photometric(image: Image.Image, params: Photometric) -> Image.Image:
    """The ops of §4 on a PIL image, in their fixed order, then the blur."""
    for (name, _), factor in zip(JITTER, params.factors, strict=True):
        if factor is not None:
            image = _ADJUST[name](image, factor)
    if params.blur is not None:
        image = image.filter(ImageFilter.GaussianBlur(params.blur))
    return image


def _bilinear(image: Image.Image, size: int) -> Image.Image:
    return image.resize((size, size), Image.Resampling.BILINEAR)


def train_views(image: np.ndarray, label: np.ndarray | None, box: tuple[int, int, int],
                variants: list[Photometric], crop_resolution: int,
                resolution: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One cached crop: (plain (res,res,3), variants (V,res,res,3), label (res,res) nearest or None), all uint8.

    The plain crop is the variant with every op off: both go through the same two resizes, so they are
    pixel-aligned.
    """
    top, left, side = box
    crop = _bilinear(Image.fromarray(np.ascontiguousarray(image[top:top + side, left:left + side])), crop_resolution)
    plain = np.asarray(_bilinear(crop, resolution))
    views = np.stack([np.asarray(_bilinear(apply_photometric(crop, v), resolution)) for v in variants]) \
        if variants else np.zeros((0, *plain.shape), np.uint8)
    cropped = None
    if label is not None:
        cropped = np.asarray(Image.fromarray(np.ascontiguousarray(label[top:top + side, left:left + side]))
                             .resize((resolution, resolution), Image.Resampling.NEAREST))
    return plain, views, cropped


def nearest_indices(source: int, size: int) -> np.ndarray:
    """Floor-index nearest sampling (cv2.INTER_NEAREST, torch "nearest"): output i reads input ⌊i · source / size⌋."""
    return (np.arange(size) * source) // size


def val_view(image: np.ndarray, label: np.ndarray | None, size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """§5: the whole image resized to size x size (aspect not kept), bilinear without antialiasing and rounded to
    uint8 as cv2.INTER_LINEAR does (within 1 grey level of its fixed-point arithmetic); labels nearest."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    resized = y[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
    if label is None:
        return resized, None
    rows, cols = nearest_indices(label.shape[0], size), nearest_indices(label.shape[1], size)
    return resized, np.ascontiguousarray(label[rows[:, None], cols[None, :]])


def epoch_crops(n_images: int, crops: int, seed: int, epoch: int) -> np.ndarray:
    """Which cached crop (0..crops-1) each image slot uses in `epoch` (§4: a new crop every epoch), from (seed, epoch)
    alone, so a resumed run draws the same."""
    return _rng(seed, epoch, _EPOCH).integers(0, crops, n_images)


def epoch_keep(n_images: int, crops: int, seed: int, epoch: int) -> np.ndarray:
    """Bool per store sample (slot j, crop r at j·crops + r): True for the one crop of each slot `epoch` uses."""
    keep = np.zeros(n_images * crops, dtype=bool)
    keep[np.arange(n_images) * crops + epoch_crops(n_images, crops, seed, epoch)] = True
    return keep
