"""Any folder of images, labels optional: the way to run the pipeline on one's own pictures."""
from __future__ import annotations

from pathlib import Path

from pipeline.datasets.base import Item, SegmentationDataset, identity_lut
from pipeline.errors import UserError
from pipeline.methods.contract import MIN_ITERATIONS as MIN_ITERATIONS  # what small_data rules guarantee
from pipeline.methods.registry import method_of

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
        kind = "class" if labelled else "cluster"  # unlabelled: n_classes is the clusters to find
        self.class_names = list(class_names) if class_names else [f"{kind} {i}" for i in range(self.n_classes)]
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


# ---------------------------------------------------------------- small folders (a handful of photos, no --set)
UNLABELLED_CLUSTERS = 5  # dataset.n_classes of a folder without labels: the clusters to find (STEGO's
                         # reference default for a directory of images, dir_dataset_n_classes: 5)


def images_of(root: Path, split: str) -> tuple[Path | None, list[Path]]:
    """The images folder `split` reads and its images (None, [] when no layout matches)."""
    images = next((i for i, _ in layouts(root, split) if i.is_dir()), None)
    return images, (list_images(images) if images is not None else [])


def label_classes(folders: list[Path]) -> int:
    """1 + the largest class id (255 = ignore left out) in the label PNGs of `folders`; 0 when there are none."""
    import numpy as np
    from PIL import Image

    top = -1
    for folder in dict.fromkeys(folders):
        for path in sorted(folder.glob("*.png")) if folder.is_dir() else []:
            with Image.open(path) as im:
                ids = np.unique(np.asarray(im))
            ids = ids[ids != 255]
            top = max(top, int(ids.max()) if len(ids) else -1)
    return top + 1


def small_data_settings(config: dict, explicit: set[str]) -> list[str]:
    """Settings derived from a `folder` dataset, set in `config`; returns them as "key = value (why)".

    dataset.n_classes first, whatever the folder's size: with labels and n_classes = 0 it is read from the labels;
    without labels it is UNLABELLED_CLUSTERS, the number of clusters to find. Then the configured method's own rule
    (its `Method.small_data`, pipeline/methods/contract.py): the presets keep the references' values (HP's batch 64,
    pool 2048 and warm-up 1000, ...), which on a dozen images would train for no iteration at all (fewer crops than
    a batch), so for a folder that small each method says what its batch, its length (MIN_ITERATIONS iterations at
    least) and whatever else is larger than the data become. A key the user set (`explicit`, "section.key") is
    never changed; a folder big enough for the preset gets no change from the method's rule.
    """
    root = str(config["dataset"].get("root") or "")
    if config["dataset"]["name"] != "folder" or not root or not Path(root).is_dir():
        return []  # no folder yet: the stages say what is missing
    root_path = Path(root)
    train_dir, train = images_of(root_path, "train")
    val_dir, val = images_of(root_path, "val")
    if not train:
        return []
    lines = []

    def put(key: str, value: object, why: str) -> None:
        section, name = key.split(".")
        if key in explicit or config[section][name] == value:
            return
        config[section][name] = value
        lines.append(f"{key} = {value} ({why})")

    if not config["dataset"]["n_classes"] and "dataset.n_classes" not in explicit:
        folders = [next(lab for i, lab in layouts(root_path, split) if i.is_dir()) for split, (_, images) in
                   (("train", (train_dir, train)), ("val", (val_dir, val))) if images]
        n_classes = label_classes(folders)
        if n_classes:
            put("dataset.n_classes", n_classes, "1 + the largest class id in the labels; --set dataset.n_classes=K "
                "if some class never appears")
        elif not any(folder.is_dir() and any(folder.glob("*.png")) for folder in folders):
            put("dataset.n_classes", UNLABELLED_CLUSTERS, f"no labels: {UNLABELLED_CLUSTERS} clusters to find; choose "
                "with --clusters K or --set dataset.n_classes=K")
    crops = len(train) * (5 if config["prepare"]["five_crop"] else 1)  # the shared prepare store's training crops
    for key, value, why in method_of(config).small_data(config, len(train), crops, explicit):
        put(key, value, why)
    if val_dir == train_dir:
        lines.append(f"no separate val images: the same {len(train)} images serve as train and val "
                     "(add train/images and val/images folders to keep them apart)")
    return lines
