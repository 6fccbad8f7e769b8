"""`features --method hcl`: HCL's own stores (docs/hcl.md §1, §4, §5), written from the dataset's source images.

HCL does not train on HP's five-crops nor evaluate on HP's crops: its stages (`features-<split>-hcl`) read the source
images themselves (never `prepare` or HP's stores) and write one zarr group per split (pipeline/graph.py
`hcl_store_url`), with the geometry of pipeline/hcl/views.py:

- training: sample s = (image slot j, crop r), s = j·R + r, R = hcl_features.crops square crops per image (each
  its own scale and offset), each with the plain view and V = hcl_features.views photometric variants through every
  patch-size branch, its foreground mask, pixels, label, source image and crop box. Image slots hold the source
  images in a seeded permutation (hcl_features.seed), so that chunks hold unrelated images like HP's store;
- evaluation: one sample per image, the whole image resized to hcl_features.val_resolution, every branch, no mask
  and no variants.

Resumable per chunk with the ordinary `_done` flags; each chunk is computed and written by one writer, locally
(decode | backbone | write overlapped) or on dask workers. Crops and variants are seeded by (hcl_features.seed,
source image, crop, variant): a chunk is the same whoever computes it.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from cache import writer
from cache.order import crop_permutation
from cache.reader import FeatureStore
from cache.schema import HCL_SCHEMA, HCLLayout
from pipeline import paths
from pipeline.backbone import Backbone
from pipeline.config import Config
from pipeline.datasets import SegmentationDataset, open_split
from pipeline.datasets.base import IGNORE
from pipeline.errors import UserError
from pipeline.graph import method_of, stage_plan
from pipeline.hcl.extract import hcl_chunk
from pipeline.hcl.multilevel import patch_sizes
from pipeline.hcl.views import crop_box, draw_photometric, train_views, val_view
from pipeline.runner import StageContext, manifest_path, run_stage
from pipeline.wording import plural
from pipeline.workers import (
    extraction_attrs,
    feature_backbone,
    feature_batch_size,
    in_batches,
    overlapped,
    run_dask,
    split_samples,
)

SPLITS = ("train", "val")
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
    from pipeline.plots import overlay_grid

    images, masks = store.read("image", 0, k), store.read("fg_mask", 0, k).astype(np.uint8)
    scale = images.shape[1] // masks.shape[1]
    full = np.zeros(images.shape[:3], dtype=np.uint8)
    up = masks.repeat(scale, axis=1).repeat(scale, axis=2)
    full[:, : up.shape[1], : up.shape[2]] = up[:, : full.shape[1], : full.shape[2]]
    path.parent.mkdir(parents=True, exist_ok=True)
    overlay_grid(images, {"fg_mask": full}, 2, path, ["background", "foreground"], title)
    return path


# ---------------------------------------------------------------- the stage
def run(config: Config, workdir: Path, split: str, store: str | None = None, force: bool = False,
        scheduler: str = "local", address: str | None = None, workers: int = 2) -> dict[str, Any]:
    """Build (or resume, or find up to date) HCL's store of `split`."""
    geo = geometry(config, split)
    if scheduler not in ("local", "local-cluster", "distributed"):
        raise UserError(f"--scheduler must be local, local-cluster or distributed, got '{scheduler}'")
    url = store or paths.hcl_store_url(config, workdir, split)
    name = f"features-{split}-hcl"
    sdir = paths.stage_dir(config, workdir)
    stage_config, inputs = stage_plan(config, workdir, {f"hcl-{split}": url})[name]
    h, f = config["hcl_features"], config["features"]

    def body(ctx: StageContext) -> dict[str, Any]:
        dataset = open_split(config, workdir, split)
        n_images = len(dataset)
        if not n_images:
            raise UserError(f"dataset {config['dataset']['name']} has no {split} images")
        labelled = any(item.label is not None for item in dataset.items)  # listed label files, none decoded
        backbone = feature_backbone(config)
        key = "resolution" if geo.train else "val_resolution"
        if geo.resolution % backbone.patch_size:
            raise UserError(f"hcl_features.{key} = {geo.resolution} is not a multiple of the patch size "
                            f"{backbone.patch_size} of {backbone.name}; use --set hcl_features.{key}=N")
        sizes = patch_sizes(backbone.name)
        order = image_order(n_images, geo)
        layout = HCLLayout(n_images * geo.crops, geo.resolution, sizes, backbone.embed_dim, geo.views, labelled,
                           geo.train)
        attrs = {
            "kind": "hcl", "hcl_schema": HCL_SCHEMA, "dataset": config["dataset"]["name"], "split": split,
            "backbone": backbone.name, "patch_size": backbone.patch_size, "resolution": geo.resolution,
            "weights": backbone.weights, "weights_hash": backbone.weights_hash, "random_init": backbone.random_init,
            "fingerprint": ctx.fingerprint, "n_classes": config["dataset"]["n_classes"],
            "class_names": list(dataset.class_names), "patch_sizes": list(sizes), "images": n_images,
            "crops": geo.crops, "views": geo.views,
            "geometry": {**{k: h[k] for k in ("seed", "mask_mass", "mask_min_size")}, **(
                {"crop_resolution": geo.crop_resolution, "crop": "square, 0.8-1.0 of the short side (docs/hcl.md §4)",
                 "sample": "slot j, crop r at j * crops + r; slots hold the images in a seeded permutation"}
                if geo.train else {"resize": "whole image, bilinear (labels nearest), aspect not kept (§5)"})},
            "samples": [dataset.sample_name(int(i)) for i in order],  # the image of each slot
            "extraction": extraction_attrs(backbone, config),
        }
        group = writer.create_store(url, layout, f["chunk_size"], attrs, ctx.fresh, f["compressor"], f["clevel"],
                                    log=ctx.log)  # a kept store is repaired first: exactly its bad chunks redone
        done = writer.finished_chunks(group)
        pending = [int(c) for c in np.flatnonzero(~done)]
        finished = int(sum(np.diff(writer.chunk_range(group, int(c)))[0] for c in np.flatnonzero(done)))
        if finished:
            ctx.log(f"resuming: {int(done.sum())} of {done.size} chunks already in {url}")
        t0 = time.perf_counter()
        n = layout.n_samples
        with tqdm(total=n, initial=finished, desc=name, unit="crop" if geo.train else "img") as progress:
            if scheduler == "local":
                def write(chunk: int, data: dict[str, np.ndarray]) -> None:
                    writer.write_chunk(group, chunk, data)
                    progress.update(len(data["feat"]))

                batch = feature_batch_size(config)
                overlapped(pending, lambda c: (c, load_chunk(dataset, geo, order, labelled,
                                                             *writer.chunk_range(group, c))),
                           lambda items: compute_chunks(backbone, geo, h, items, batch), write,
                           workers=f["workers"], pin_memory=backbone.device.type == "cuda",
                           group=max(1, batch // f["chunk_size"]))
            else:
                run_dask(worker_chunk, (url, config, str(workdir), split), pending, progress,
                         address if scheduler == "distributed" else None, workers)
        if not writer.finished_chunks(group).all():
            raise RuntimeError(f"some chunks of {url} were not written; rerun to finish them")
        writer.mark_complete(group)
        seconds = time.perf_counter() - t0
        stored = sum(writer.stored_bytes(group).values())
        note = " [RANDOM-INIT backbone]" if backbone.random_init else ""
        native, concatenated = layout.native_fp16_bytes_per_sample(), layout.concatenated_fp16_bytes_per_sample()
        outputs: dict[str, Any] = {
            "store": url, "images": n_images, "samples": n, "crops": geo.crops, "views": geo.views,
            "resolution": geo.resolution, "patch_sizes": list(sizes), "computed": n - finished,
            "store_bytes": stored, "random_init": backbone.random_init,
            "native_fp16_bytes_per_sample": native, "concatenated_fp16_bytes_per_sample": concatenated,
            "native_over_concatenated": round(native / concatenated, 3),
            "timings": {"extract_seconds": round(seconds, 3)},
        }
        what = (f"{plural(n_images, 'image')} x {plural(geo.crops, 'crop')} ({plural(geo.views, 'variant')} each, "
                f"{geo.resolution} px views)" if geo.train
                else f"{plural(n_images, 'whole image')} at {geo.resolution} px")
        if geo.train:
            done_store = FeatureStore.open(url)  # checked reads: a damaged chunk is named, never a traceback
            fg = float(np.mean(done_store.read("fg_mask", 0, n)))
            outputs["foreground_share"] = round(fg, 4)
            outputs["preview"] = str(mask_preview(
                done_store, sdir / "features" / f"hcl-{split}-foreground.png",
                f"{backbone.name} foreground masks{' [RANDOM-INIT]' if backbone.random_init else ''}"))
            what += f", {fg:.0%} foreground"
        outputs["summary"] = (f"HCL {split} store: {what}, patches {'/'.join(map(str, sizes))}, "
                              f"{stored / 2**20:.1f} MiB -> {url}{note}")
        return outputs

    check = writer.recorded_store_check(url, str(manifest_path(sdir, name)))  # up to date only if it passes
    manifest = run_stage(sdir, name, stage_config, inputs, body, force, check)
    if manifest["outputs"].get("store") != url:  # train and evaluate read the store named here
        raise UserError(f"{manifest_path(sdir, name)} names the store {manifest['outputs'].get('store')!r}, but this "
                        f"run's store is {url}: refused (an edited manifest cannot redirect hp-pipe to another "
                        "store). Rerun with --force")
    return manifest


def run_for_method(config: Config, workdir: Path, split: str) -> dict[str, Any]:
    """The features stage the configured method reads: HCL's own store for hcl, HP's otherwise."""
    if method_of(config) == "hcl":
        manifest = run(config, workdir, split)
        hcl_arrays(FeatureStore.open(manifest["outputs"]["store"]))  # refuses stores another version wrote
        return manifest
    from stages import features  # HP's features stage (this module never needs it otherwise)

    return features.run(config, workdir, split)
