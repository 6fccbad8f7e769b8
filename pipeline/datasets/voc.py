"""Pascal VOC 2012 segmentation (21 classes); train uses the 10,582-image trainaug set when present."""
from __future__ import annotations

from pathlib import Path

from pipeline.datasets.base import Item, SegmentationDataset, identity_lut, read_id_list
from pipeline.errors import UserError

CLASS_NAMES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
]
AUG_LISTS = ("trainaug.txt", "train_aug.txt")


class VOC(SegmentationDataset):
    name = "voc"
    n_classes = len(CLASS_NAMES)
    class_names = CLASS_NAMES
    layout = ("  VOCdevkit/VOC2012/  (or these folders directly under the root)\n"
              "    JPEGImages/<id>.jpg\n"
              "    SegmentationClass/<id>.png      (palette PNG: class indices 0..20, 255 boundary)\n"
              "    ImageSets/Segmentation/{train,val}.txt\n"
              "    optional trainaug: SegmentationClassAug/<id>.png + ImageSets/Segmentation/trainaug.txt")

    def __init__(self, root: str | Path, split: str, trainaug: bool = True,
                 n_classes: int | None = None) -> None:
        super().__init__(root, split)
        self.check_n_classes(n_classes)
        self.lut, self.lut_source = identity_lut(self.n_classes), "the 21 VOC classes"
        voc = self._find_voc_dir()
        images = self.require(voc / "JPEGImages")
        sets = self.require(voc / "ImageSets" / "Segmentation")
        labels, list_file = voc / "SegmentationClass", sets / f"{split}.txt"
        aug = self._find_aug(voc, sets) if split == "train" and trainaug else None
        if aug is not None:
            labels, list_file = aug
        self.require(labels)
        self.require(list_file)
        self.trainaug = aug is not None
        ids = sorted(read_id_list(list_file))
        if not ids:
            raise UserError(f"{self.name}: split list {list_file} is empty")
        self.set_items([Item(i, images / f"{i}.jpg", labels / f"{i}.png") for i in ids], listed_in=list_file)

    def _find_voc_dir(self) -> Path:
        self.require(self.root)
        for d in (self.root, self.root / "VOC2012", self.root / "VOCdevkit" / "VOC2012"):
            if (d / "JPEGImages").is_dir():
                return d
        raise self.missing(self.root / "VOCdevkit" / "VOC2012" / "JPEGImages")

    def _find_aug(self, voc: Path, sets: Path) -> tuple[Path, Path] | None:
        """(SegmentationClassAug folder, trainaug list) when both exist, else None (plain train)."""
        folder = next((d for d in (voc / "SegmentationClassAug", self.root / "SegmentationClassAug")
                       if d.is_dir()), None)
        listed = next((sets / n for n in AUG_LISTS if (sets / n).is_file()), None)
        return (folder, listed) if folder is not None and listed is not None else None
