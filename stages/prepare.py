"""`prepare`: the fixed geometry of docs/hp.md §7, done once, offline.

Training images are five-cropped (ratio 0.5) and each crop resized (shorter side, nearest)
and centre-cropped to `resolution`; validation images are resized and centre-cropped to
`val_resolution`. Labels get the same geometry. Every file is written atomically and a sample
whose files exist is skipped, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline.config import Config, fingerprint
from pipeline.datasets import dataset_root, open_split
from pipeline.datasets.base import SPLITS
from pipeline.datasets.geometry import five_crop, resize_shorter_center_crop
from pipeline.errors import UserError
from pipeline.extraction.prepared import crops_per_image
from pipeline.files import atomic_write_png, atomic_write_text
from pipeline.orchestration import paths
from pipeline.orchestration.graph import Build, Step, build
from pipeline.orchestration.runner import StageContext
from pipeline.orchestration.stage import implement
from pipeline.wording import plural


def crops_of(image: np.ndarray, label: np.ndarray | None, split: str, p: dict[str, Any]):
    """[(suffix, image crop, label crop)] with the geometry of docs/hp.md §7."""
    if split != "train":
        size = p["val_resolution"]
        return [("", resize_shorter_center_crop(image, size), None if label is None else
                 resize_shorter_center_crop(label, size))]
    size = p["resolution"]
    images = five_crop(image, p["crop_ratio"]) if p["five_crop"] else [image]
    labels = five_crop(label, p["crop_ratio"]) if p["five_crop"] and label is not None else [label] * len(images)
    return [
        (f"_{k}" if len(images) > 1 else "", resize_shorter_center_crop(im, size),
         None if lb is None else resize_shorter_center_crop(lb, size))
        for k, (im, lb) in enumerate(zip(images, labels, strict=True))
    ]


def prepare_split(config: Config, workdir: Path, split: str, force: bool) -> dict[str, Any]:
    """Crops of every sample not yet prepared under the same geometry; finished crops are kept."""
    dataset = open_split(config, workdir, split)
    out = paths.prepared_dir(config, workdir, split)
    geometry = fingerprint(config["dataset"], config["prepare"])
    marker = out / "geometry.txt"
    if out.exists() and (force or not marker.exists() or marker.read_text().strip() != geometry):
        for f in out.glob("*/*.png"):  # crops of another geometry (or --force): start over
            f.unlink()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, geometry + "\n")
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    n_crops = crops_per_image(config, split)
    suffixes = [f"_{k}" for k in range(n_crops)] if n_crops > 1 else [""]
    labelled = len(dataset) > 0 and dataset[0].label is not None
    names = []
    for i in tqdm(range(len(dataset)), desc=f"prepare {split}", unit="img", leave=False):
        base = dataset.sample_name(i)
        if all((out / "images" / f"{base}{s}.png").exists() for s in suffixes):
            names += [base + s for s in suffixes]  # finished by an earlier run
            continue
        sample = dataset[i]
        for suffix, image, label in crops_of(sample.image, sample.label, split, config["prepare"]):
            if label is not None:
                atomic_write_png(out / "labels" / f"{sample.name}{suffix}.png", label)
            atomic_write_png(out / "images" / f"{sample.name}{suffix}.png", image)  # image last: the commit point
            names.append(sample.name + suffix)
    if not names:
        root = dataset_root(config, workdir)
        raise UserError(f"dataset {config['dataset']['name']} has no {split} images under {root}")
    atomic_write_text(out / "samples.txt", "\n".join(names) + "\n")
    atomic_write_text(out / "labelled.txt", "1\n" if labelled else "0\n")
    return {"dir": str(out), "samples": len(names), "source_images": len(dataset), "labelled": bool(labelled)}


def summary(outputs: dict[str, dict[str, Any]]) -> str:
    """The stage's one line: crops and source images per split, counted in words ("1 image", "5 crops")."""
    return ", ".join(f"{split}: {plural(o['samples'], 'crop')} from {plural(o['source_images'], 'image')}"
                     for split, o in outputs.items())


def run(config: Config, workdir: Path, force: bool = False) -> dict[str, Any]:
    """Prepare both splits (or find them up to date); the stage's manifest."""
    return build(config, workdir, "prepare", force=force)


def body(job: Build, step: Step, ctx: StageContext) -> dict[str, Any]:
    outputs = {split: prepare_split(job.config, job.workdir, split, ctx.forced) for split in SPLITS}
    return {**outputs, "summary": f"{summary(outputs)} -> {job.sdir / 'prepared'}"}


# this module's functions for the stages the graph declares (pipeline/orchestration/stage.py)
implement("prepare", body=body)
