"""Any folder of images, labels optional: the way to run the pipeline on one's own pictures."""
from __future__ import annotations

from pathlib import Path

from pipeline.datasets.base import Item, SegmentationDataset, identity_lut
from pipeline.errors import UserError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def layouts(root: Path, split: str) -> list[tuple[Path, Path]]:
    """(images, labels) folder pairs, the first whose images folder exists wins."""
    return [(root / split / "images", root / split / "labels"),
            (root / "images" / split, root / "labels" / split),
            (root / "imgs" / split, root / "labels" / split),      # STEGO's DirectoryDataset
            (root / "images", root / "labels"),
            (root, root / "labels")]


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


class Folder(SegmentationDataset):
    name = "folder"
    layout = ("  <split>/images/*.{jpg,png,...}   [<split>/labels/<stem>.png]\n"
              "  or images/*.{jpg,png,...}        [labels/<stem>.png]\n"
              "  or the images directly in the root [labels/<stem>.png]\n"
              "  labels: single-channel PNGs of class ids 0..n_classes-1, 255 = ignore")

    def __init__(self, root: str | Path, split: str, n_classes: int | None = None,
                 class_names: list[str] | None = None) -> None:
        super().__init__(root, split)
        self.require(self.root)
        images, labels = next((i, lab) for i, lab in layouts(self.root, split) if i.is_dir())
        files = list_images(images)
        if not files:
            raise self.empty(images, "image (" + ", ".join(sorted(IMAGE_EXTENSIONS)) + ")")
        self.images_dir = images
        labelled = labels.is_dir() and any(labels.glob("*.png"))
        self.labels_dir = labels if labelled else None
        if labelled and not n_classes:
            raise UserError(f"{labels} holds labels: say how many classes they have with "
                            f"--set dataset.n_classes=K (ids 0..K-1, 255 = ignore)")
        self.n_classes = int(n_classes or 0)
        self.class_names = list(class_names) if class_names else [f"class {i}" for i in range(self.n_classes)]
        if len(self.class_names) != self.n_classes:
            raise UserError(f"dataset.class_names has {len(self.class_names)} names for "
                            f"dataset.n_classes = {self.n_classes}")
        if self.n_classes > 255:
            raise UserError(f"dataset.n_classes = {self.n_classes}: at most 255 classes (255 means ignore)")
        self.lut, self.lut_source = identity_lut(self.n_classes), f"{self.n_classes} classes"
        items = [Item(p.stem, p, labels / f"{p.stem}.png" if labelled else None) for p in files]
        unlabelled = [it.label for it in items if it.label is not None and not it.label.is_file()]
        if unlabelled:
            raise UserError(f"{len(unlabelled)} image(s) in {images} have no label in {labels}, e.g. "
                            f"{unlabelled[0]} — add the missing labels or move the labels folder away")
        self.set_items(items)
