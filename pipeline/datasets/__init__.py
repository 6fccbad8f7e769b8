"""Dataset readers: one module per folder layout, one registry to pick them by name.

Every reader returns `Sample`s with labels already mapped to the preset's class ids
(0..n_classes-1, 255 = ignore), so later stages never see a dataset's own id scheme.
"""
from __future__ import annotations

import inspect
from pathlib import Path

from pipeline.datasets.base import Sample, SegmentationDataset
from pipeline.datasets.cityscapes import Cityscapes
from pipeline.datasets.cocostuff import CocoStuff27
from pipeline.datasets.folder import Folder
from pipeline.datasets.potsdam import Potsdam
from pipeline.datasets.synthetic import Synthetic, ensure_synthetic
from pipeline.datasets.voc import VOC
from pipeline.errors import UserError

DATASETS: dict[str, type[SegmentationDataset]] = {
    "cityscapes": Cityscapes,
    "cocostuff27": CocoStuff27,
    "potsdam": Potsdam,
    "voc": VOC,
    "folder": Folder,
    "synthetic": Synthetic,
}


def open_dataset(name: str, root: str | Path, split: str, **options) -> SegmentationDataset:
    """The reader registered as `name` on root/split; unknown names and options are the user's to fix."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    cls = DATASETS[name]
    known = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "root", "split")]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise UserError(f"dataset {name!r} has no option {', '.join(unknown)} (options: {', '.join(known)})")
    return cls(root, split, **options)


def dataset_options(config: dict) -> dict:
    """The reader's options from the [dataset] section (everything but its name and root)."""
    return {k: v for k, v in config["dataset"].items() if k not in ("name", "root")}


def dataset_root(config: dict, workdir: Path) -> Path:
    """Where the configured dataset's files are: dataset.root, else <workdir>/data/<name>."""
    root = config["dataset"]["root"]
    return Path(root) if root else Path(workdir) / "data" / config["dataset"]["name"]


def open_split(config: dict, workdir: Path, split: str) -> SegmentationDataset:
    """The configured dataset's `split` (what `prepare` and HCL's features stages read)."""
    return open_dataset(config["dataset"]["name"], dataset_root(config, workdir), split, **dataset_options(config))


__all__ = ["DATASETS", "Sample", "SegmentationDataset", "dataset_options", "dataset_root", "ensure_synthetic",
           "open_dataset", "open_split"]
