"""`features --method hcl`: HCL's own stores (docs/hcl.md §1, §4, §5), written from the dataset's source images.

HCL does not train on HP's five-crops nor evaluate on HP's crops: its stages (`features-<split>-hcl`) read the source
images themselves (never `prepare` or HP's stores) and write one zarr group per split (pipeline/orchestration/graph.py
`hcl_store_url`), with the geometry of pipeline/methods/hcl/views.py (chunks: pipeline/methods/hcl/store.py):

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

from pathlib import Path
from typing import Any

import numpy as np

from cache import writer
from cache.reader import FeatureStore
from cache.schema import HCL_SCHEMA, HCLLayout
from pipeline.config import Config
from pipeline.datasets import SegmentationDataset, open_split
from pipeline.errors import UserError
from pipeline.extraction.backbone import Backbone, check_resolution
from pipeline.extraction.workers import (
    SCHEDULERS,
    extraction_attrs,
    feature_backbone,
    feature_batch_size,
    fill_chunks,
    overlapped,
)
from pipeline.methods.hcl.multilevel import patch_sizes
from pipeline.methods.hcl.store import (
    Geometry,
    compute_chunks,
    geometry,
    image_order,
    load_chunk,
    mask_preview,
    worker_chunk,
)
from pipeline.orchestration import coverage, paths
from pipeline.orchestration.graph import Build, Step, build
from pipeline.orchestration.runner import StageContext
from pipeline.orchestration.stage import implement
from pipeline.wording import plural


def run(config: Config, workdir: Path, split: str, store: str | None = None, force: bool = False,
        scheduler: str = "local", address: str | None = None, workers: int = 2) -> dict[str, Any]:
    """Build (or resume, or find up to date) HCL's store of `split`; its manifest (whatever train.method says: the
    stage belongs to HCL's graph)."""
    geometry(config, split)  # a bad split or geometry is refused before anything runs
    config = {**config, "train": {**config["train"], "method": "hcl"}}
    return build(config, workdir, f"features-{split}-hcl", force=force,
                 stores={f"hcl-{split}": store} if store else None,
                 options={"scheduler": scheduler, "address": address, "workers": workers})


def preflight(job: Build, step: Step) -> None:
    """HCL needs >= 2 crops and >= 2 variants to train (docs/hcl.md §4); the scheduler is one of three."""
    geometry(job.config, step.name.split("-")[1])
    scheduler = job.options.get("scheduler", "local")
    if scheduler not in SCHEDULERS:
        raise UserError(f"--scheduler must be local, local-cluster or distributed, got '{scheduler}'")


def store_attrs(config: Config, split: str, geo: Geometry, backbone: Backbone, dataset: SegmentationDataset,
                order: np.ndarray, fp: str) -> dict[str, Any]:
    """What the store records about itself: its geometry, its images' order and how it was computed."""
    h = config["hcl_features"]
    return {
        "kind": "hcl", "hcl_schema": HCL_SCHEMA, "dataset": config["dataset"]["name"], "split": split,
        "backbone": backbone.name, "patch_size": backbone.patch_size, "resolution": geo.resolution,
        "weights": backbone.weights, "weights_hash": backbone.weights_hash, "random_init": backbone.random_init,
        "fingerprint": fp, "n_classes": config["dataset"]["n_classes"],
        "class_names": list(dataset.class_names), "patch_sizes": list(patch_sizes(backbone.name)),
        "images": len(dataset), "crops": geo.crops, "views": geo.views,
        "geometry": {**{k: h[k] for k in ("seed", "mask_mass", "mask_min_size")}, **(
            {"crop_resolution": geo.crop_resolution, "crop": "square, 0.8-1.0 of the short side (docs/hcl.md §4)",
             "sample": "slot j, crop r at j * crops + r; slots hold the images in a seeded permutation"}
            if geo.train else {"resize": "whole image, bilinear (labels nearest), aspect not kept (§5)"})},
        "samples": [dataset.sample_name(int(i)) for i in order],  # the image of each slot
        "extraction": extraction_attrs(backbone, config),
        "backbone_facts": backbone.facts.attrs(),  # arch, tag, patch, width, heads, prefix tokens
    }


def fill(job: Build, ctx: StageContext, group, url: str, geo: Geometry, backbone: Backbone,
         dataset: SegmentationDataset, order: np.ndarray, labelled: bool, n: int) -> tuple[int, float]:
    """Compute every chunk not yet done, locally (decode | backbone | write overlapped) or on dask workers:
    (samples found done, seconds)."""
    config, f = job.config, job.config["features"]
    batch = feature_batch_size(config)

    def local(pending: list[int], progress) -> None:
        def write(chunk: int, data: dict[str, np.ndarray]) -> None:
            writer.write_chunk(group, chunk, data)
            progress.update(len(data["feat"]))

        overlapped(pending, lambda c: (c, load_chunk(dataset, geo, order, labelled, *writer.chunk_range(group, c))),
                   lambda items: compute_chunks(backbone, geo, config["hcl_features"], items, batch), write,
                   workers=f["workers"], pin_memory=backbone.device.type == "cuda",
                   group=max(1, batch // f["chunk_size"]))

    return fill_chunks(group, url, job.options, local, worker_chunk,
                       (paths.for_workers(url), coverage.covered_only(config), paths.for_workers(job.workdir),
                        geo.split),
                       {"total": n, "desc": ctx.name, "unit": "crop" if geo.train else "img"}, ctx.log)


def body(job: Build, step: Step, ctx: StageContext) -> dict[str, Any]:
    """Create (or repair and resume) the split's HCL store and fill it; the stage's outputs."""
    config, split, url = job.config, step.name.split("-")[1], step.config["store"]
    geo = geometry(config, split)
    dataset = open_split(config, job.workdir, split)
    n_images = len(dataset)
    if not n_images:
        raise UserError(f"dataset {config['dataset']['name']} has no {split} images")
    labelled = any(item.label is not None for item in dataset.items)  # listed label files, none decoded
    backbone = feature_backbone(config)
    key = "resolution" if geo.train else "val_resolution"
    check_resolution(geo.resolution, backbone.facts, f"hcl_features.{key}")  # names the resolutions that work
    sizes = patch_sizes(backbone.name)
    order = image_order(n_images, geo)
    layout = HCLLayout(n_images * geo.crops, geo.resolution, sizes, backbone.embed_dim, geo.views, labelled, geo.train)
    f = config["features"]
    group = writer.create_store(url, layout, f["chunk_size"], store_attrs(config, split, geo, backbone, dataset, order,
                                                                          ctx.fingerprint),
                                ctx.fresh, f["compressor"], f["clevel"], log=ctx.log)  # bad chunks redone first
    finished, seconds = fill(job, ctx, group, url, geo, backbone, dataset, order, labelled, layout.n_samples)
    return outputs_of(job, url, geo, backbone, layout, group, n_images, finished, seconds)


def outputs_of(job: Build, url: str, geo: Geometry, backbone: Backbone, layout: HCLLayout, group, n_images: int,
               finished: int, seconds: float) -> dict[str, Any]:
    """The stage's outputs and summary line (training: the foreground share and a preview of the masks)."""
    n, sizes = layout.n_samples, list(layout.patch_sizes)
    stored = sum(writer.stored_bytes(group).values())
    note = " [RANDOM-INIT backbone]" if backbone.random_init else ""
    native, concatenated = layout.native_fp16_bytes_per_sample(), layout.concatenated_fp16_bytes_per_sample()
    outputs: dict[str, Any] = {
        "store": url, "images": n_images, "samples": n, "crops": geo.crops, "views": geo.views,
        "resolution": geo.resolution, "patch_sizes": sizes, "computed": n - finished,
        "store_bytes": stored, "random_init": backbone.random_init,
        "native_fp16_bytes_per_sample": native, "concatenated_fp16_bytes_per_sample": concatenated,
        "native_over_concatenated": round(native / concatenated, 3),
        "precision": {"forward": extraction_attrs(backbone, job.config)["dtype"], "amp": job.config["features"]["amp"],
                      "store_dtype": "float16"},
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
            done_store, job.sdir / "features" / f"hcl-{geo.split}-foreground.png",
            f"{backbone.name} foreground masks{' [RANDOM-INIT]' if backbone.random_init else ''}"))
        what += f", {fg:.0%} foreground"
    outputs["summary"] = (f"HCL {geo.split} store: {what}, patches {'/'.join(map(str, sizes))}, "
                          f"{stored / 2**20:.1f} MiB -> {url}{note}")
    return outputs


# this module's functions for the stages the graph declares (pipeline/orchestration/stage.py)
implement("features-train-hcl", "features-val-hcl", body=body, preflight=preflight)
