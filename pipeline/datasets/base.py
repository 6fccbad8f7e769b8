"""What every reader shares: the `Sample` record, the base class, and the checked file readers.

Readers only list files in `__init__`; pixels are read (and checked) lazily in `__getitem__`,
so opening a 100k-image dataset costs one directory scan and every bad file is reported by name.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from pipeline.errors import UserError

SPLITS = ("train", "val")
IGNORE = 255
LIST_SUFFIXES = {"jpg", "jpeg", "png", "mat", "bmp", "tif", "tiff", "webp"}


@dataclass
class Sample:
    name: str                  # unique, filesystem-safe stem (used for output file names)
    image: np.ndarray          # (H, W, 3) uint8 RGB
    label: np.ndarray | None   # (H, W) uint8 class ids 0..n_classes-1, 255 = ignore; None when unlabelled


@dataclass(frozen=True)
class Item:
    name: str
    image: Path
    label: Path | None


class SegmentationDataset:
    """A sorted list of (name, image file, label file) with a label-id lookup table.

    Subclasses fill `items` and `lut` in `__init__`; they override `read_image` / `read_raw_label`
    only when their files are not ordinary images (Potsdam's .mat files).
    """

    name: str = ""
    n_classes: int = 0
    class_names: list[str] = []
    layout: str = ""             # the expected folder layout, shown in error messages

    def __init__(self, root: str | Path, split: str) -> None:
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r} for dataset {self.name}: "
                            f"use one of {', '.join(SPLITS)}")
        self.root = Path(root).expanduser()
        self.split = split
        self.items: list[Item] = []
        self.lut = identity_lut(self.n_classes)
        self.lut_source = ""     # where the id scheme comes from, for messages

    def __len__(self) -> int:
        return len(self.items)

    def source(self, i: int) -> str:
        return str(self.items[i].image)

    def sample_name(self, i: int) -> str:
        """The i-th sample's name without reading its files (resume checks use it)."""
        return self.items[i].name

    def __getitem__(self, i: int) -> Sample:
        if not -len(self.items) <= i < len(self.items):
            raise IndexError(i)
        item = self.items[i]
        image = self.read_image(item.image)
        label = None
        if item.label is not None:
            label = map_label(self.read_raw_label(item.label), self.lut, item.label, self.lut_source)
            check_same_size(image, label, item.image, item.label)
        return Sample(item.name, image, label)

    def read_image(self, path: Path) -> np.ndarray:
        return read_rgb(path)

    def read_raw_label(self, path: Path) -> np.ndarray:
        return read_index_png(path)

    def set_items(self, items: list[Item], listed_in: Path | str = "") -> None:
        """Keep the items; names must be unique because outputs are written under them."""
        seen: dict[str, Item] = {}
        for item in items:
            if item.name in seen:
                where = f" (listed in {listed_in})" if listed_in else ""
                raise UserError(f"two samples share the name {item.name!r}: {seen[item.name].image} and "
                                f"{item.image}{where} — rename or remove one of them")
            seen[item.name] = item
        self.items = items

    def check_n_classes(self, n_classes: int | None) -> None:
        """A preset may restate n_classes; a different value is a config mistake."""
        if n_classes not in (None, self.n_classes):
            raise UserError(f"dataset.n_classes = {n_classes}, but {self.name} has {self.n_classes} "
                            f"classes — remove the override or set it to {self.n_classes}")

    def missing(self, path: Path) -> UserError:
        """The error for a missing folder or file: names it and shows the expected layout."""
        hint = " (point the dataset root at the right folder with --data-root)" if path == self.root else ""
        return UserError(f"{self.name}: {path} does not exist{hint}\n"
                         f"expected layout under {self.root}:\n{self.layout}")

    def empty(self, folder: Path, pattern: str) -> UserError:
        return UserError(f"{self.name}: no {pattern} files in {folder}\n"
                         f"expected layout under {self.root}:\n{self.layout}")

    def require(self, path: Path) -> Path:
        if not path.exists():
            raise self.missing(path)
        return path


def read_id_list(path: Path) -> list[str]:
    """Ids from a split list: the first token of each non-empty line, without folder or image suffix."""
    ids = []
    for line in path.read_text().splitlines():
        if line.strip():
            token = line.split()[0].rsplit("/", 1)[-1]
            stem, dot, ext = token.rpartition(".")
            ids.append(stem if dot and ext.lower() in LIST_SUFFIXES else token)
    return ids


def identity_lut(n_classes: int) -> np.ndarray:
    return lut_from_dict({i: i for i in range(n_classes)})


def lut_from_dict(mapping: dict[int, int]) -> np.ndarray:
    """Raw id -> class id table over 0..255; -1 marks ids that are an error; 255 always means ignore."""
    lut = np.full(256, -1, np.int16)
    for raw, cls in mapping.items():
        lut[raw] = cls
    lut[IGNORE] = IGNORE
    return lut


def map_label(raw: np.ndarray, lut: np.ndarray, path: Path, scheme: str = "") -> np.ndarray:
    """Map raw label ids through `lut`; any id the table does not know is the user's error."""
    if raw.dtype != np.uint8:
        if raw.size and (raw.min() < 0 or raw.max() > 255):
            bad = np.unique(raw[(raw < 0) | (raw > 255)])
            raise _bad_ids(path, bad, lut, scheme)
        raw = raw.astype(np.uint8)
    out = lut[raw]
    invalid = out < 0
    if invalid.any():
        raise _bad_ids(path, np.unique(raw[invalid]), lut, scheme)
    return out.astype(np.uint8)


def _bad_ids(path: Path, bad: np.ndarray, lut: np.ndarray, scheme: str) -> UserError:
    valid = np.flatnonzero(lut >= 0)
    ranges = f"{valid[0]}..{valid[-2]} and 255" if len(valid) > 1 else "255"
    shown = ", ".join(str(v) for v in bad[:10].tolist()) + (" ..." if len(bad) > 10 else "")
    scheme = f" of {scheme}" if scheme else ""
    return UserError(f"label {path} has ids {shown} outside the valid ids{scheme} ({ranges}) — "
                     f"check that it belongs to this dataset, or fix/remove it")


def check_same_size(image: np.ndarray, label: np.ndarray, image_path: Path, label_path: Path) -> None:
    if image.shape[:2] != label.shape[:2]:
        (h, w), (lh, lw) = image.shape[:2], label.shape[:2]
        raise UserError(f"label {label_path} is {lw}x{lh} but its image {image_path} is {w}x{h} — "
                        f"a label must have its image's size")


def read_rgb(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB from any PIL-readable image, as a viewer shows it: the EXIF orientation applied, a single
    channel (grey, binary, 16-bit grey) replicated, a palette looked up, alpha dropped, 16 bits scaled to 8 (the
    nearest 8-bit value of v / 65535). Unreadable files are reported by name."""
    if not path.is_file():
        raise UserError(f"missing image {path} — restore it or remove it from the dataset")
    try:
        with Image.open(path) as im:
            im.load()
            return as_rgb(ImageOps.exif_transpose(im))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read image {path}: {e} — re-download or delete it") from None


def as_rgb(im: Image.Image) -> np.ndarray:
    """A PIL image of any mode as (H, W, 3) uint8 (see `read_rgb`)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey (Pillow reads some as 32-bit "I")
        grey = np.asarray(im, dtype=np.float64)
        grey = np.clip(np.rint(grey * 255.0 / 65535.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if im.mode == "F":  # float grey, taken as 0..1
        grey = np.clip(np.rint(np.asarray(im, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def read_index_png(path: Path) -> np.ndarray:
    """(H, W) raw ids from a single-channel label image (grey 'L', palette 'P' indices, or 16-bit)."""
    if not path.is_file():
        raise UserError(f"missing label {path} — restore it or remove its image from the dataset")
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("L", "P", "1"):
                return np.asarray(im, dtype=np.uint8).copy()
            if mode.startswith("I"):
                return np.asarray(im).astype(np.int32)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read label {path}: {e} — re-download or delete it") from None
    raise UserError(f"label {path} is a {mode} image; labels must be single-channel images of class ids "
                    f"(grey or palette PNG), not colour pictures")
