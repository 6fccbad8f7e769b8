"""Cityscapes, fine annotations, 27 classes: label ids 7..33 -> 0..26, ids < 7 ignored (STEGO/HP)."""
from __future__ import annotations

from pathlib import Path

from pipeline.datasets.base import IGNORE, Item, SegmentationDataset, lut_from_dict

FIRST_ID = 7
LAST_ID = 33
CLASS_NAMES = [
    "road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail", "bridge",
    "tunnel", "pole", "polegroup", "traffic light", "traffic sign", "vegetation", "terrain", "sky",
    "person", "rider", "car", "truck", "bus", "caravan", "trailer", "train", "motorcycle", "bicycle",
]
ID_TO_CLASS = {i: IGNORE for i in range(FIRST_ID)} | {i: i - FIRST_ID for i in range(FIRST_ID, LAST_ID + 1)}
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"


class Cityscapes(SegmentationDataset):
    name = "cityscapes"
    n_classes = len(CLASS_NAMES)
    class_names = CLASS_NAMES
    layout = ("  leftImg8bit/{train,val}/<city>/<stem>_leftImg8bit.png\n"
              "  gtFine/{train,val}/<city>/<stem>_gtFine_labelIds.png")

    def __init__(self, root: str | Path, split: str, n_classes: int | None = None) -> None:
        super().__init__(root, split)
        self.check_n_classes(n_classes)
        self.lut, self.lut_source = lut_from_dict(ID_TO_CLASS), "the 34 Cityscapes label ids"
        images = self.require(self.require(self.root) / "leftImg8bit" / split)
        labels = self.require(self.root / "gtFine" / split)
        items = []
        for city in sorted(p for p in images.iterdir() if p.is_dir()):
            for path in sorted(city.glob("*" + IMAGE_SUFFIX)):
                stem = path.name[: -len(IMAGE_SUFFIX)]
                items.append(Item(stem, path, labels / city.name / (stem + LABEL_SUFFIX)))
        if not items:
            raise self.empty(images, "<city>/*" + IMAGE_SUFFIX)
        self.set_items(items)

