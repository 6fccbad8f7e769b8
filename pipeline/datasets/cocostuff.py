"""COCO-Stuff-27 in the STEGO/HP layout: 182 fine stuff+thing ids -> 27 coarse classes.

`FINE_TO_COARSE` is STEGO's table (src/data.py, class Coco) verbatim. As in the reference, the
train split reads the curated list Coco164kFull_Stuff_Coarse.txt and the val split the IIC list
Coco164kFull_Stuff_Coarse_7.txt (2,175 images); `image_list` picks another file in curated/<split>/.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.datasets.base import Item, SegmentationDataset, lut_from_dict, read_id_list
from pipeline.errors import UserError

FINE_TO_COARSE = {
    0: 9, 1: 11, 2: 11, 3: 11, 4: 11, 5: 11, 6: 11, 7: 11, 8: 11, 9: 8, 10: 8, 11: 8, 12: 8,
    13: 8, 14: 8, 15: 7, 16: 7, 17: 7, 18: 7, 19: 7, 20: 7, 21: 7, 22: 7, 23: 7, 24: 7,
    25: 6, 26: 6, 27: 6, 28: 6, 29: 6, 30: 6, 31: 6, 32: 6, 33: 10, 34: 10, 35: 10, 36: 10,
    37: 10, 38: 10, 39: 10, 40: 10, 41: 10, 42: 10, 43: 5, 44: 5, 45: 5, 46: 5, 47: 5, 48: 5,
    49: 5, 50: 5, 51: 2, 52: 2, 53: 2, 54: 2, 55: 2, 56: 2, 57: 2, 58: 2, 59: 2, 60: 2,
    61: 3, 62: 3, 63: 3, 64: 3, 65: 3, 66: 3, 67: 3, 68: 3, 69: 3, 70: 3, 71: 0, 72: 0,
    73: 0, 74: 0, 75: 0, 76: 0, 77: 1, 78: 1, 79: 1, 80: 1, 81: 1, 82: 1, 83: 4, 84: 4,
    85: 4, 86: 4, 87: 4, 88: 4, 89: 4, 90: 4, 91: 17, 92: 17, 93: 22, 94: 20, 95: 20, 96: 22,
    97: 15, 98: 25, 99: 16, 100: 13, 101: 12, 102: 12, 103: 17, 104: 17, 105: 23, 106: 15,
    107: 15, 108: 17, 109: 15, 110: 21, 111: 15, 112: 25, 113: 13, 114: 13, 115: 13, 116: 13,
    117: 13, 118: 22, 119: 26, 120: 14, 121: 14, 122: 15, 123: 22, 124: 21, 125: 21, 126: 24,
    127: 20, 128: 22, 129: 15, 130: 17, 131: 16, 132: 15, 133: 22, 134: 24, 135: 21, 136: 17,
    137: 25, 138: 16, 139: 21, 140: 17, 141: 22, 142: 16, 143: 21, 144: 21, 145: 25, 146: 21,
    147: 26, 148: 21, 149: 24, 150: 20, 151: 17, 152: 14, 153: 21, 154: 26, 155: 15, 156: 23,
    157: 20, 158: 21, 159: 24, 160: 15, 161: 24, 162: 22, 163: 25, 164: 15, 165: 20, 166: 17,
    167: 17, 168: 22, 169: 14, 170: 18, 171: 18, 172: 18, 173: 18, 174: 18, 175: 18, 176: 18,
    177: 26, 178: 26, 179: 19, 180: 19, 181: 24,
}
CLASS_NAMES = [
    "electronic-things", "appliance-things", "food-things", "furniture-things", "indoor-things",
    "kitchen-things", "accessory-things", "animal-things", "outdoor-things", "person-things",
    "sports-things", "vehicle-things",
    "ceiling-stuff", "floor-stuff", "food-stuff", "furniture-stuff", "rawmaterial-stuff", "textile-stuff",
    "wall-stuff", "window-stuff", "building-stuff", "ground-stuff", "plant-stuff", "sky-stuff",
    "solid-stuff", "structural-stuff", "water-stuff",
]
SPLIT_DIRS = {"train": "train2017", "val": "val2017"}
IMAGE_LISTS = {"train": "Coco164kFull_Stuff_Coarse.txt", "val": "Coco164kFull_Stuff_Coarse_7.txt"}


class CocoStuff27(SegmentationDataset):
    name = "cocostuff27"
    n_classes = len(CLASS_NAMES)
    class_names = CLASS_NAMES
    layout = ("  images/{train2017,val2017}/<id>.jpg\n"
              "  annotations/{train2017,val2017}/<id>.png   (stuffthingmaps: ids 0..181, 255 unlabeled)\n"
              "  curated/train2017/Coco164kFull_Stuff_Coarse.txt     (one image id per line)\n"
              "  curated/val2017/Coco164kFull_Stuff_Coarse_7.txt")

    def __init__(self, root: str | Path, split: str, image_list: str | None = None,
                 n_classes: int | None = None) -> None:
        super().__init__(root, split)
        self.check_n_classes(n_classes)
        self.lut, self.lut_source = lut_from_dict(FINE_TO_COARSE), "the 182 COCO-Stuff fine ids"
        d = SPLIT_DIRS[split]
        images = self.require(self.require(self.root) / "images" / d)
        labels = self.require(self.root / "annotations" / d)
        curated = self.require(self.root / "curated" / d)
        list_file = curated / (image_list or IMAGE_LISTS[split])
        if not list_file.is_file():
            have = ", ".join(sorted(p.name for p in curated.glob("*.txt"))) or "none"
            raise UserError(f"{self.name}: missing image list {list_file} (lists in {curated}: {have}) — "
                            f"download STEGO's curated lists or pick one with dataset.image_list\n"
                            f"expected layout under {self.root}:\n{self.layout}")
        ids = sorted(read_id_list(list_file))
        self.set_items([Item(i, images / f"{i}.jpg", labels / f"{i}.png") for i in ids], listed_in=list_file)
        if not self.items:
            raise UserError(f"{self.name}: image list {list_file} is empty")

