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


# ---------------------------------------------------------------- small folders (a handful of photos, no --set)
MIN_ITERATIONS = 60  # HP iterations a small folder trains for at least, whatever its size


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
    """Settings derived from the size of a `folder` dataset, set in `config`; returns them as "key = value (why)".

    The preset keeps the reference's values (batch 64, pool 2048, warm-up 1000 iterations), which on a dozen images
    would train for no iteration at all (fewer crops than a batch). For a folder that small: the batch halves until
    four batches fit in the crops (at least 2), the pool holds at most one entry per crop, the run lasts at least
    MIN_ITERATIONS iterations, Pool_sp is renewed at least once per epoch and the λ warm-up takes the first quarter.
    With labels and dataset.n_classes = 0, the number of classes is read from the labels. A key the user set
    (`explicit`, "section.key") is never changed; a folder big enough for the preset gets no change at all.
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
    t_cfg = config["hp"]
    crops = len(train) * (5 if config["prepare"]["five_crop"] else 1)
    batch = t_cfg["batch_size"]
    while batch > 2 and 4 * batch > crops:
        batch //= 2
    per_epoch = max(1, crops // batch)
    epochs = max(t_cfg["epochs"], -(-MIN_ITERATIONS // per_epoch))
    size = f"{len(train)} training images, {crops} crops"
    put("hp.batch_size", batch, f"{size}: four batches per epoch at least")
    put("hp.epochs", epochs, f"{per_epoch} iterations per epoch: at least {MIN_ITERATIONS} in all")
    put("hp.pool_size", min(t_cfg["pool_size"], crops), "at most one pool entry per crop")
    put("hp.renew_interval", min(t_cfg["renew_interval"], per_epoch), "Pool_sp renewed at least once per epoch")
    put("hp.warmup", min(t_cfg["warmup"], per_epoch * epochs // 4), "λ ramps up after the first quarter")
    if val_dir == train_dir:
        lines.append(f"no separate val images: the same {len(train)} images serve as train and val "
                     "(add train/images and val/images folders to keep them apart)")
    return lines
