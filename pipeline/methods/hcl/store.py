"""HCL's own stores (docs/hcl.md §1, §4, §5), chunk by chunk: the geometry of each split, what one chunk holds and how
chunks are computed (locally or on dask workers), and the check that a store is an HCL store of this version. The
`features --method hcl` stage (stages/features_hcl.py) creates the store and calls these.

Crops and variants are seeded by (hcl_features.seed, source image, crop, variant): a chunk is the same whoever
computes it.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cache import writer
from cache.order import crop_permutation
from cache.reader import FeatureStore
from cache.schema import HCL_SCHEMA
from pipeline.config import Config
from pipeline.datasets import SegmentationDataset, open_split
from pipeline.datasets.base import IGNORE, SPLITS
from pipeline.errors import UserError
from pipeline.extraction.backbone import Backbone
from pipeline.extraction.workers import feature_backbone, feature_batch_size, in_batches, split_samples
from pipeline.methods.hcl.extract import hcl_chunk
from pipeline.methods.hcl.views import crop_box, draw_photometric, train_views, val_view

REBUILD = "rerun `hp-pipe features --method hcl` for this dataset (add --force if it says up to date)"


@dataclass(frozen=True)
class Geometry:
    """What one split's store holds per image (docs/hcl.md §4-§5), from [hcl_features]."""

    split: str
    crops: int  # R samples per image (1 for evaluation)
    views: int  # V photometric variants per crop (0 for evaluation)
    crop_resolution: int  # where the photometric ops run (training)
    resolution: int  # side of the stored views
    seed: int

    @property
    def train(self) -> bool:
        return self.split == "train"


def geometry(config: Config, split: str) -> Geometry:
    """The split's geometry; HCL needs >= 2 crops and >= 2 variants to train (§4)."""
    if split not in SPLITS:
        raise UserError(f"--split must be one of {', '.join(SPLITS)}, got '{split}'")
    h = config["hcl_features"]
    for key in ("crops", "views"):
        if split == "train" and h[key] < 2:
            what = "crops per image (one is drawn per epoch)" if key == "crops" else "photometric variants per crop"
            raise UserError(f"hcl_features.{key} = {h[key]}: HCL needs at least two {what} "
                            f"(docs/hcl.md §4); use --set hcl_features.{key}=2")
    if split == "train":
        return Geometry(split, h["crops"], h["views"], h["crop_resolution"], h["resolution"], h["seed"])
    return Geometry(split, 1, 0, 0, h["val_resolution"], h["seed"])


def image_order(n_images: int, geo: Geometry) -> np.ndarray:
    """Image slot -> source image: a seeded permutation for training (chunks of unrelated images), else identity."""
    return crop_permutation(n_images, geo.seed).astype(np.int32) if geo.train else np.arange(n_images, dtype=np.int32)


def hcl_arrays(store: FeatureStore) -> list[str]:
    """The HCL arrays of an HCL store of this version; anything else is refused with the command that rebuilds it."""
    attrs = store.attrs
    if attrs.get("kind") != "hcl":
        old = attrs.get("hcl") or {}
        if old:  # HCL arrays added to one of HP's stores (HCL schema 1-2)
            raise UserError(f"store {store.url} holds HCL arrays of version {old.get('hcl_schema', 1)} added to HP's "
                            f"five-crop store; this hp-pipe reads HCL's own stores (version {HCL_SCHEMA}: its own "
                            f"crops, views and evaluation geometry, docs/hcl.md §4-§5): {REBUILD}")
        raise UserError(f"store {store.url} is not an HCL store: {REBUILD}")
    if attrs.get("hcl_schema") != HCL_SCHEMA:
        raise UserError(f"store {store.url} is an HCL store of version {attrs.get('hcl_schema')}, this hp-pipe reads "
                        f"version {HCL_SCHEMA}: {REBUILD}")
    return [n for n in store.names() if n.startswith("hcl_") or n in ("feat", "fg_mask")]


# ---------------------------------------------------------------- one chunk
def load_chunk(dataset: SegmentationDataset, geo: Geometry, order: np.ndarray, labelled: bool, start: int,
               stop: int) -> tuple[np.ndarray, np.ndarray | None, dict[str, np.ndarray]]:
    """Decode the chunk's source images (each once) and make its views: (plain views, variants, other arrays)."""
    decoded: dict[int, Any] = {}
    plain, variants, labels, sources, boxes = [], [], [], [], []
    for s in range(start, stop):
        slot, r = divmod(s, geo.crops)
        i = int(order[slot])
        if i not in decoded:
            decoded[i] = dataset[i]
        sample = decoded[i]
        source_label = sample.label
        if labelled and source_label is None:  # an unlabelled image in a partly labelled split: all ignored
            source_label = np.full(sample.image.shape[:2], IGNORE, dtype=np.uint8)
        if geo.train:
            box = crop_box(*sample.image.shape[:2], geo.seed, i, r)
            views = [draw_photometric(geo.seed, i, r, v) for v in range(geo.views)]
            image, aug, label = train_views(sample.image, source_label if labelled else None, box, views,
                                            geo.crop_resolution, geo.resolution)
            variants.append(aug)
            boxes.append(box)
        else:
            image, label = val_view(sample.image, source_label if labelled else None, geo.resolution)
        plain.append(image)
        labels.append(label)
        sources.append(i)
    arrays = {"image": np.stack(plain), "source_image": np.asarray(sources, dtype=np.int32)}
    if labelled:
        arrays["label"] = np.stack(labels)
    if geo.train:
        arrays["crop_box"] = np.asarray(boxes, dtype=np.int32)
    return arrays["image"], np.stack(variants) if geo.train else None, arrays


def chunk_arrays(backbone: Backbone, geo: Geometry, h: dict[str, Any], images: np.ndarray,
                 variants: np.ndarray | None, arrays: dict[str, np.ndarray],
                 batch_size: int = 0) -> dict[str, np.ndarray]:
    """Everything one store chunk (or several merged ones) holds, in forwards of `batch_size` views (0: all)."""
    out = in_batches(lambda a, b: hcl_chunk(backbone, images[a:b], None if variants is None else variants[a:b],
                                            geo.train, h["mask_mass"], h["mask_min_size"]),
                     len(images), batch_size or len(images))
    out.update(arrays)
    return out


def compute_chunks(backbone: Backbone, geo: Geometry, h: dict[str, Any], items: list[tuple[int, tuple]],
                   batch_size: int = 0) -> list[tuple[int, dict[str, np.ndarray]]]:
    """One device batch of consecutive loaded chunks -> (chunk, arrays) of each, every chunk whole."""
    if len(items) == 1:
        return [(items[0][0], chunk_arrays(backbone, geo, h, *items[0][1], batch_size))]
    loaded = [item[1] for item in items]
    images = np.concatenate([i[0] for i in loaded])
    variants = None if loaded[0][1] is None else np.concatenate([i[1] for i in loaded])
    arrays = {k: np.concatenate([i[2][k] for i in loaded]) for k in loaded[0][2]}
    data = chunk_arrays(backbone, geo, h, images, variants, arrays, batch_size)
    parts = split_samples(data, [len(i[0]) for i in loaded])
    return [(item[0], part) for item, part in zip(items, parts, strict=True)]


@functools.lru_cache(maxsize=4)
def _listed(dataset_section: str, workdir: str, split: str) -> SegmentationDataset:
    """The split's file list, scanned once per worker process (not once per chunk)."""
    return open_split({"dataset": json.loads(dataset_section)}, Path(workdir), split)


def worker_chunk(url: str, config: Config, workdir: str, split: str, chunk: int) -> int:
    """Runs on a dask worker: the backbone is loaded once per process; the image order is recomputed (a pure
    function of the config); disjoint chunks, one writer each."""
    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    geo = geometry(config, split)
    group = writer.open_group(url, mode="r+")
    dataset = _listed(json.dumps(config["dataset"], sort_keys=True), workdir, split)
    start, stop = writer.chunk_range(group, chunk)
    inputs = load_chunk(dataset, geo, image_order(len(dataset), geo), "label" in group, start, stop)
    data = chunk_arrays(feature_backbone(config), geo, config["hcl_features"], *inputs, feature_batch_size(config))
    writer.write_chunk(group, chunk, data)
    return stop - start


def mask_preview(store: FeatureStore, path: Path, title: str, k: int = 4) -> Path:
    """The first crops with their foreground masks (nearest-upsampled) blended over them, as a PNG."""
    from pipeline.reporting.plots import overlay_grid

    images, masks = store.read("image", 0, k), store.read("fg_mask", 0, k).astype(np.uint8)
    scale = images.shape[1] // masks.shape[1]
    full = np.zeros(images.shape[:3], dtype=np.uint8)
    up = masks.repeat(scale, axis=1).repeat(scale, axis=2)
    full[:, : up.shape[1], : up.shape[2]] = up[:, : full.shape[1], : full.shape[2]]
    path.parent.mkdir(parents=True, exist_ok=True)
    overlay_grid(images, {"fg_mask": full}, 2, path, ["background", "foreground"], title)
    return path


def check_manifest(job: Any, step: Any, manifest: dict[str, Any]) -> None:
    """After a features-<split>-hcl stage (the executor's `then`): its store is an HCL store of this version."""
    hcl_arrays(FeatureStore.open(manifest["outputs"]["store"]))
