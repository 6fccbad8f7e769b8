"""The reference's offline geometry (docs/hp.md §7), reproduced on numpy arrays.

Both follow torchvision's rounding exactly (`five_crop`, `Resize(int)` + `CenterCrop`), so crops
made here line up pixel for pixel with the reference's cropped datasets.
"""
from __future__ import annotations

import numpy as np
from PIL import Image


def five_crop(array: np.ndarray, ratio: float) -> list[np.ndarray]:
    """Top-left, top-right, bottom-left, bottom-right and centre crops of int(ratio*H) x int(ratio*W)."""
    h, w = array.shape[:2]
    ch, cw = int(ratio * h), int(ratio * w)
    if not (0 < ch <= h and 0 < cw <= w):
        raise ValueError(f"crop ratio {ratio} gives a {ch}x{cw} crop of a {h}x{w} array")
    top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    corners = [(0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw), (top, left)]
    return [np.ascontiguousarray(array[y:y + ch, x:x + cw]) for y, x in corners]


def resize_shorter_center_crop(array: np.ndarray, size: int) -> np.ndarray:
    """Nearest-resize the shorter side to `size` (aspect kept), then centre-crop size x size."""
    h, w = array.shape[:2]
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    resized = _resize_nearest(array, new_w, new_h)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return np.ascontiguousarray(resized[top:top + size, left:left + size])


def _resize_nearest(array: np.ndarray, new_w: int, new_h: int) -> np.ndarray:
    if array.shape[:2] == (new_h, new_w):
        return array
    if array.dtype == np.uint8 and (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        return np.asarray(Image.fromarray(array).resize((new_w, new_h), Image.NEAREST))
    if array.ndim == 2 and np.issubdtype(array.dtype, np.integer):
        # 32-bit integer PIL image: exact for any label dtype that fits in int32
        out = Image.fromarray(array.astype(np.int32)).resize((new_w, new_h), Image.NEAREST)
        return np.asarray(out).astype(array.dtype)
    raise TypeError(f"resize_shorter_center_crop takes (H,W,3) uint8 or (H,W) integer arrays, "
                    f"got {array.dtype} {array.shape}")


def model_size(height: int, width: int, shorter: int, patch: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(resized size, cropped size): shorter side -> `shorter`, then both sides down to multiples of `patch`."""
    scale = shorter / min(height, width)
    resized = (max(patch, round(height * scale)), max(patch, round(width * scale)))
    return resized, (resized[0] // patch * patch, resized[1] // patch * patch)


def shorter_side_geometry(config: dict, size: tuple[int, int], patch: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(resized, cropped) for predict with the val store's geometry (docs/hp.md §7): the shorter side to
    prepare.val_resolution, both sides cropped down to multiples of the patch. HP's and STEGO's Method.geometry."""
    return model_size(*size, config["prepare"]["val_resolution"], patch)
