"""Potsdam-3 in the STEGO/HP layout: .mat tiles, 6 fine classes -> 3 coarse ones.

As in the reference (STEGO/HP `Potsdam`), train reads labelled_train.txt and val labelled_test.txt;
`split_list` picks another list in root (e.g. unlabelled_train.txt). A listed tile without a
gt/<id>.mat is unlabelled (label None), where the reference would substitute a constant map.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.io import loadmat

from pipeline.datasets.base import Item, SegmentationDataset, lut_from_dict, read_id_list
from pipeline.errors import UserError

FINE_TO_COARSE = {0: 0, 4: 0,   # roads and cars
                  1: 1, 5: 1,   # buildings and clutter
                  2: 2, 3: 2}   # vegetation and trees; 255 stays ignore
CLASS_NAMES = ["roads and cars", "buildings and clutter", "vegetation and trees"]
SPLIT_LISTS = {"train": "labelled_train.txt", "val": "labelled_test.txt"}


class Potsdam(SegmentationDataset):
    name = "potsdam"
    n_classes = len(CLASS_NAMES)
    class_names = CLASS_NAMES
    layout = ("  imgs/<id>.mat   (key 'img': H x W x >=3 channels, the first 3 are RGB)\n"
              "  gt/<id>.mat     (key 'gt': H x W fine ids 0..5, 255 ignore)\n"
              "  labelled_train.txt, labelled_test.txt, unlabelled_train.txt   (one id per line)")

    def __init__(self, root: str | Path, split: str, split_list: str | None = None,
                 n_classes: int | None = None) -> None:
        super().__init__(root, split)
        self.check_n_classes(n_classes)
        self.lut, self.lut_source = lut_from_dict(FINE_TO_COARSE), "the 6 Potsdam fine ids"
        images = self.require(self.require(self.root) / "imgs")
        gt = self.root / "gt"
        list_file = self.require(self.root / (split_list or SPLIT_LISTS[split]))
        items = []
        for i in sorted(read_id_list(list_file)):
            label = gt / f"{i}.mat"
            items.append(Item(i, images / f"{i}.mat", label if label.is_file() else None))
        if not items:
            raise UserError(f"{self.name}: split list {list_file} is empty")
        self.set_items(items, listed_in=list_file)

    def read_image(self, path: Path) -> np.ndarray:
        img = _load_array(path, "img", "image")
        if img.ndim != 3 or img.shape[2] < 3:
            raise UserError(f"image {path}: 'img' has shape {img.shape}, expected H x W x >=3 channels")
        img = img[:, :, :3]
        if img.dtype == np.uint8:
            return np.ascontiguousarray(img)
        if np.issubdtype(img.dtype, np.floating) and img.size and img.min() >= 0 and img.max() <= 1:
            return (img * 255).astype(np.uint8)   # torchvision to_pil_image's float convention
        if np.issubdtype(img.dtype, np.integer) and img.size and img.min() >= 0 and img.max() <= 255:
            return img.astype(np.uint8)
        raise UserError(f"image {path}: 'img' is {img.dtype} outside 0..255 — expected 8-bit RGB(IR) tiles")

    def read_raw_label(self, path: Path) -> np.ndarray:
        gt = _load_array(path, "gt", "label")
        if gt.ndim == 3 and gt.shape[2] == 1:
            gt = gt[:, :, 0]
        if gt.ndim != 2:
            raise UserError(f"label {path}: 'gt' has shape {gt.shape}, expected H x W class ids")
        if not np.issubdtype(gt.dtype, np.integer):
            if not np.array_equal(gt, np.round(gt)):
                raise UserError(f"label {path}: 'gt' holds non-integer values — expected class ids")
            gt = gt.astype(np.int64)
        return gt


def _load_array(path: Path, key: str, what: str) -> np.ndarray:
    if not path.is_file():
        raise UserError(f"missing {what} {path} — restore it or remove its id from the split list")
    try:
        data = loadmat(str(path))
    except Exception as e:  # scipy raises many types (ValueError, MatReadError, OSError, ...) on bad files
        raise UserError(f"cannot read {what} {path}: {e} — re-download or delete it") from None
    if key not in data:
        keys = sorted(k for k in data if not k.startswith("_"))
        raise UserError(f"{what} {path} has no {key!r} array (it has {keys}) — expected STEGO's .mat tiles")
    return np.asarray(data[key])
