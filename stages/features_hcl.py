"""`features --method hcl`: add HCL's arrays (specs/HCL.md §1, §4) to a finished feature store.

Its own stage (`features-<split>-hcl`) with its own done flags, reading the crops and the CLS attention the store
already holds: HP's arrays are never recomputed or touched, and one store serves both methods. Resumable per
chunk like the features stage; upsampling and concatenation of the branches happen when loading.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from cache import writer
from cache.reader import FeatureStore
from cache.schema import DONE_HCL, HCL_SCHEMA, HCLLayout
from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.graph import method_of, stage_dir, stage_plan
from pipeline.hcl.extract import hcl_chunk
from pipeline.hcl.multilevel import patch_sizes
from pipeline.runner import StageContext, run_stage
from stages import features

ATTRS = "hcl"  # the family's attributes in the store: fingerprint, patch sizes, views, complete


def hcl_arrays(store) -> list[str]:
    """The HCL arrays a FeatureStore holds, after checking they are complete (a clear message otherwise)."""
    info = store.attrs.get(ATTRS) or {}
    if not info.get("complete"):
        raise UserError(f"store {store.url} has no complete HCL arrays; run `hp-pipe features --method hcl` "
                        "for this dataset (or `hp-pipe train --method hcl`, which runs it)")
    if info.get("hcl_schema", 1) != HCL_SCHEMA:  # e.g. 1: coarse branches from bilinear patch kernels
        raise UserError(f"store {store.url} holds HCL arrays of version {info.get('hcl_schema', 1)}, this hp-pipe "
                        f"reads version {HCL_SCHEMA} (patch kernels resized bicubic, antialiased: specs/HCL.md §1); "
                        "rerun `hp-pipe features --method hcl` for this dataset (add --force if it says up to date)")
    return [n for n in store.names() if n.startswith("hcl_") or n == "fg_mask"]


def compute_chunk(group, backbone, chunk: int, views: int, h: dict[str, Any]) -> int:
    """Compute and write one chunk's HCL arrays, then its flag; returns the samples written."""
    start, stop = writer.chunk_range(group, chunk)
    data = hcl_chunk(backbone, group["image"][start:stop], group["cls_attn"][start:stop], np.arange(start, stop),
                     views, h["seed"], h["mask_mass"], h["mask_min_size"])
    writer.write_chunk(group, chunk, data, DONE_HCL)
    return stop - start


def worker_chunk(url: str, config: Config, views: int, chunk: int) -> int:
    """Runs on a dask worker: the backbone is loaded once per process; disjoint chunks, one writer each."""
    import torch

    torch.set_num_threads(1)
    group = writer.open_group(url, mode="r+")
    return compute_chunk(group, features.resolve_backbone(config), chunk, views, config["hcl_features"])


def mask_preview(group, path: Path, title: str, k: int = 4) -> Path:
    """The first crops with their foreground masks (nearest-upsampled) blended over them, as a PNG."""
    from pipeline.plots import overlay_grid

    images, masks = group["image"][:k], group["fg_mask"][:k].astype(np.uint8)
    scale = images.shape[1] // masks.shape[1]
    full = np.zeros(images.shape[:3], dtype=np.uint8)
    up = masks.repeat(scale, axis=1).repeat(scale, axis=2)
    full[:, : up.shape[1], : up.shape[2]] = up[:, : full.shape[1], : full.shape[2]]
    path.parent.mkdir(parents=True, exist_ok=True)
    overlay_grid(images, {"fg_mask": full}, 2, path, ["background", "foreground"], title)
    return path


def run(config: Config, workdir: Path, split: str, store: str | None = None, force: bool = False,
        scheduler: str = "local", address: str | None = None, workers: int = 2) -> dict[str, Any]:
    base = features.run(config, workdir, split, store, scheduler=scheduler, address=address, workers=workers)
    url = base["outputs"]["store"]
    name = f"features-{split}-hcl"
    stage_config, inputs = stage_plan(config, workdir, {split: url})[name]
    h = config["hcl_features"]
    if split == "train" and h["views"] < 2:
        raise UserError(f"hcl_features.views = {h['views']}: HCL needs two photometric variants per crop "
                        "(--set hcl_features.views=2)")

    def body(ctx: StageContext) -> dict[str, Any]:
        backbone = features.resolve_backbone(config)
        group = writer.open_group(url, mode="r+")
        n, res = group["feat"].shape[0], int(group.attrs["resolution"])
        views = h["views"] if split == "train" else 0
        layout = HCLLayout(n, res, patch_sizes(backbone.name), backbone.embed_dim, views)
        attrs = {"fingerprint": ctx.fingerprint, "hcl_schema": HCL_SCHEMA, "patch_sizes": list(layout.patch_sizes),
                 "views": views,
                 "seed": h["seed"], "mask_mass": h["mask_mass"], "mask_min_size": h["mask_min_size"]}
        writer.add_arrays(group, layout, DONE_HCL, ATTRS, attrs, ctx.fresh, config["features"]["compressor"],
                          config["features"]["clevel"])
        done = writer.finished_chunks(group, DONE_HCL)
        pending = [int(c) for c in np.flatnonzero(~done)]
        if done.any():
            ctx.log(f"resuming: {int(done.sum())} of {done.size} chunks already have their HCL arrays")
        t0 = time.perf_counter()
        finished = n - sum(np.diff(writer.chunk_range(group, c))[0] for c in pending)
        with tqdm(total=n, initial=finished, desc=name, unit="img") as progress:
            if scheduler == "local":
                for chunk in pending:
                    progress.update(compute_chunk(group, backbone, chunk, views, h))
            else:
                features.run_dask(worker_chunk, (url, config, views), pending, progress,
                                  address if scheduler == "distributed" else None, workers)
        if not writer.finished_chunks(group, DONE_HCL).all():
            raise RuntimeError(f"some HCL chunks of {url} were not written; rerun to finish them")
        group.attrs[ATTRS] = {**attrs, "complete": True}
        seconds = time.perf_counter() - t0
        stored = sum(v for k, v in features.stored_bytes(group).items() if k in layout.arrays())
        fg = float(np.mean(group["fg_mask"][:]))
        preview = mask_preview(group, stage_dir(config, workdir) / "features" / f"{split}-foreground.png",
                               f"{backbone.name} foreground masks{' [RANDOM-INIT]' if backbone.random_init else ''}")
        note = " [RANDOM-INIT backbone]" if backbone.random_init else ""
        native, concatenated = layout.native_fp16_bytes_per_sample(), layout.concatenated_fp16_bytes_per_sample()
        return {
            "store": url, "samples": n, "patch_sizes": list(layout.patch_sizes), "views": views,
            "store_bytes": stored, "foreground_share": round(fg, 4), "random_init": backbone.random_init,
            "preview": str(preview),
            "native_fp16_bytes_per_sample": native, "concatenated_fp16_bytes_per_sample": concatenated,
            "native_over_concatenated": round(native / concatenated, 3),
            "timings": {"extract_seconds": round(seconds, 3)},
            "summary": f"HCL arrays for {n} samples (patches {'/'.join(map(str, layout.patch_sizes))}, {views} "
                       f"variants, {fg:.0%} foreground), {stored / 2**20:.1f} MiB; native grids hold "
                       f"{native / concatenated:.2f} of the concatenated form's bytes -> {url}{note}",
        }

    return run_stage(stage_dir(config, workdir), name, stage_config, inputs, body, force)


def run_for_method(config: Config, workdir: Path, split: str) -> dict[str, Any]:
    """The features stage the configured method reads: HCL's arrays for hcl (which runs the base stage first)."""
    if method_of(config) == "hcl":
        manifest = run(config, workdir, split)
        hcl_arrays(FeatureStore.open(manifest["outputs"]["store"]))  # refuses arrays another version wrote
        return manifest
    return features.run(config, workdir, split)
