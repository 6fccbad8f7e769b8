"""`hp-pipe bench …`: speed measured side by side in one run, reported as medians and ratios."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from pipeline import paths, prepared
from pipeline.backbone import normalize
from pipeline.config import load_config
from pipeline.workers import resolve_backbone
from stages import features as features_stage
from stages import prepare


def report(figures: dict, as_json: bool) -> None:
    width = max(len(k) for k in figures)
    for key, value in figures.items():
        print(f"{key:{width}}  {value}")
    if as_json:
        print(json.dumps(figures))


def bare_forward_seconds(backbone, images: np.ndarray, n_views: int, chunk_size: int) -> tuple[float, int]:
    """The backbone alone on in-memory images: the same batches and passes as the stage makes.
    Returns (seconds, forward passes per image summed over the images)."""
    t0, passes = time.perf_counter(), 0
    for start in range(0, len(images), chunk_size):
        x = normalize(torch.from_numpy(np.ascontiguousarray(images[start : start + chunk_size])))
        backbone(x)
        passes += len(x)
        if n_views:
            backbone(x.repeat_interleave(n_views, dim=0))
            passes += len(x) * n_views
    return time.perf_counter() - t0, passes


def bench_config(images: int, resolution: int, backbone: str, weights: str, n_views: int, chunk_size: int,
                 **extra: object):
    """The synthetic preset sized for a benchmark: `images` five-crops at `resolution` px."""
    return load_config("synthetic", {
        "dataset.n_train": -(-images // 5), "dataset.n_val": 1, "dataset.size": 2 * resolution,
        "prepare.resolution": resolution, "features.backbone": backbone, "features.weights": weights,
        "features.n_views": n_views, "features.chunk_size": chunk_size, **extra,
    })


def features(images: int, resolution: int, backbone: str, weights: str, n_views: int, chunk_size: int,
             repeats: int, workdir: Path, as_json: bool) -> None:
    config = bench_config(images, resolution, backbone, weights, n_views, chunk_size)
    workdir = Path(workdir) / "bench-features"
    prepare.run(config, workdir)
    directory = paths.prepared_dir(config, workdir, "train")
    names, labelled = prepared.read_prepared(directory)
    decoded, _ = prepared.load_prepared(directory, names, labelled)
    model = resolve_backbone(config)
    bare, stage, passes = [], [], {"bare": 0, "stage": 0}
    manifest = {}
    for _ in range(repeats):
        seconds, done = bare_forward_seconds(model, decoded, n_views, chunk_size)
        bare.append(seconds)
        passes["bare"] += done
        manifest = features_stage.run(config, workdir, "train", force=True)
        stage.append(manifest["timings"]["extract_seconds"])
        passes["stage"] += manifest["outputs"]["computed"] * (1 + n_views)
    n = len(names)
    if passes["bare"] != passes["stage"]:
        raise RuntimeError(f"bench features: the sides did different work (backbone passes): {passes}")
    fp16 = [name for name in ("feat", "feat_aug", "lhp", "cls_attn") if name in manifest["outputs"]["array_bytes"]]
    per_image = sum(manifest["outputs"]["array_bytes"][name] for name in fp16) / n
    raw = manifest["outputs"]["raw_fp16_feature_bytes"] / n
    figures = {
        "images": n,
        "backbone": backbone + (" [random-init]" if model.random_init else ""),
        "resolution": resolution,
        "forward_passes_per_image": 1 + n_views,
        "passes_bare": passes["bare"], "passes_stage": passes["stage"],  # all repeats: equal, or the bench fails
        "bare_images_per_s": round(n / statistics.median(bare), 2),
        "stage_images_per_s": round(n / statistics.median(stage), 2),
        "ratio": round(statistics.median(b / s for b, s in zip(bare, stage, strict=True)), 3),
        "store_feature_bytes_per_image": round(per_image),
        "store_total_bytes_per_image": round(manifest["outputs"]["store_bytes"] / n),
        "raw_fp16_feature_bytes_per_image": round(raw),
        "store_vs_raw_fp16": round(per_image / raw, 3),
        "threads": torch.get_num_threads(),
        "stage_dir": str(paths.stage_dir(config, workdir)),
    }
    report(figures, as_json)
