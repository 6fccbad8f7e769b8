"""`hp-pipe bench …`: speed measured side by side in one run, reported as medians and ratios."""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from cache import writer
from cache.reader import FeatureStore
from cache.schema import QUANTIZED, scale_array
from pipeline.config import load_config
from pipeline.extraction import prepared, timing
from pipeline.extraction.backbone import normalize
from pipeline.extraction.workers import feature_backbone
from pipeline.methods.hp import store as hp_store
from pipeline.orchestration import paths
from pipeline.orchestration.graph import build


def report(figures: dict, as_json: bool) -> None:
    """A bench's result: its figures as a table on stdout (with --json, the same as one JSON line last). This is the
    command's output, not a message, so it is printed whatever --quiet says."""
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


def vit_forward_flops(patch: int, dim: int, resolution: int, depth: int = 12, mlp_ratio: int = 4,
                      width: int | None = None, prefix_tokens: int = 1) -> int:
    """FLOPs (2 per multiply-add) of one ViT forward as the features stage runs it: patch embedding, `depth` blocks
    of T = (resolution/patch)·(width/patch) + prefix_tokens tokens (CLS and registers: qkv, q.k^T, attention x v,
    projection, MLP) and the last block's logits recomputed once more for LHP / CLS attention
    (pipeline/extraction/backbone.py). Softmax, norms and GELU (elementwise) left out."""
    n = (resolution // patch) * ((width or resolution) // patch)
    t = n + prefix_tokens
    embed = 2 * n * dim * 3 * patch * patch
    block = 2 * t * dim * (3 * dim + dim + 2 * mlp_ratio * dim) + 2 * 2 * t * t * dim
    return embed + depth * block + 2 * t * t * dim


# The H100's forward rate for ViT-S/8 at 224 px is an ESTIMATE (no GPU was available to measure it): the measured
# rate of timm's own inference benchmark on an RTX 4090 (results/benchmark-infer-amp-nchw-pt291-cu128-4090.csv of
# huggingface/pytorch-image-models: vit_small_patch8_224, AMP, batch 1024: 1882.13 img/s, 22.44 GMACs), scaled by the
# memory bandwidth of an H100 SXM over an RTX 4090 (3.35 / 1.008 TB/s): the conservative one of the two ratios (the
# dense bf16 tensor peaks, 989 / 165 TFLOP/s, would give 1.8x more).
RTX4090_VIT_S8_IMAGES_PER_S = 1882.13
H100_OVER_RTX4090 = 3.35 / 1.008


def h100_forward_images_per_s_estimate() -> float:
    """ESTIMATE: ViT-S/8 forwards per second at 224 px on one H100 (see the constants above)."""
    return RTX4090_VIT_S8_IMAGES_PER_S * H100_OVER_RTX4090


def decode_seconds(config, workdir: Path, url: str) -> tuple[float, float, int]:
    """One DataLoader worker's work for every chunk of the store, timed alone in this thread with one torch thread:
    decode the prepared crops, normalize, make the photometric views (pipeline/methods/hp/store.py `load_chunk`).
    Returns (wall seconds, this thread's CPU seconds, crops): the CPU seconds are what a worker on a core of its
    own takes, whatever else shares this machine's cores."""
    group = writer.open_group(url, mode="r")
    directory = str(paths.prepared_dir(config, workdir, "train"))
    names, labelled = prepared.read_prepared(directory)
    order = hp_store.sample_order(config, "train", len(names))
    settings = hp_store.settings_for(config, "train")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a DataLoader worker runs with one thread
    try:
        t0, c0 = time.perf_counter(), time.thread_time()
        for chunk in range(writer.finished_chunks(group).size):
            hp_store.load_chunk(group, chunk, directory, names, order, labelled, settings)
        return time.perf_counter() - t0, time.thread_time() - c0, len(names)
    finally:
        torch.set_num_threads(threads)


def device_figures(config, workdir: Path, url: str, n_views: int, repeats: int) -> dict:
    """Decode + views per worker, apart from the forward, and the workers an H100 would need (docs/cache.md,
    "Computing a store"): at the H100's ViT-S/8 rate (an estimate) over the 1 + K passes per stored crop."""
    runs = [decode_seconds(config, workdir, url) for _ in range(repeats)]
    crops = runs[0][2]
    per_worker = crops / statistics.median(cpu for _, cpu, _ in runs)  # a worker = a process on its own core
    h100 = h100_forward_images_per_s_estimate()
    crops_per_s = h100 / (1 + n_views)
    return {
        "decode_images_per_s_per_worker": round(per_worker, 2),
        "decode_images_per_s_wall": round(crops / statistics.median(wall for wall, _, _ in runs), 2),
        "load_average_1min": round(os.getloadavg()[0], 1),  # the wall figure shares the cores with this
        "vit_s8_gflops_per_forward": round(vit_forward_flops(8, 384, 224) / 1e9, 2),
        "h100_forward_images_per_s_estimate": round(h100),
        "h100_stored_crops_per_s_estimate": round(crops_per_s),
        "workers_needed_h100_estimate": math.ceil(crops_per_s / per_worker),
    }


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
    build(config, workdir, "prepare")
    directory = paths.prepared_dir(config, workdir, "train")
    names, labelled = prepared.read_prepared(directory)
    decoded, _ = prepared.load_prepared(directory, names, labelled)
    model = feature_backbone(config)  # the stage's device and amp: both sides run the same forward
    bare, stage, passes, parts = [], [], {"bare": 0, "stage": 0}, []
    manifest = {}
    for _ in range(repeats):
        seconds, done = bare_forward_seconds(model, decoded, n_views, chunk_size)
        bare.append(seconds)
        passes["bare"] += done
        timing.reset()
        manifest = build(config, workdir, "features-train", force=True)
        parts.append(timing.snapshot())
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
        "patch": model.patch_size, "grid": resolution // model.patch_size,  # a whole grid (checked by the stage)
        "prefix_tokens": model.facts.num_prefix_tokens,  # CLS + registers: never stored
        "forward_passes_per_image": 1 + n_views,
        "passes_bare": passes["bare"], "passes_stage": passes["stage"],  # all repeats: equal, or the bench fails
        "bare_images_per_s": round(n / statistics.median(bare), 2),
        "stage_images_per_s": round(n / statistics.median(stage), 2),
        "ratio": round(statistics.median(b / s for b, s in zip(bare, stage, strict=True)), 3),
        **stage_breakdown(parts, stage, bare),
        "store_feature_bytes_per_image": round(per_image),
        "store_total_bytes_per_image": round(manifest["outputs"]["store_bytes"] / n),
        "raw_fp16_feature_bytes_per_image": round(raw),
        "store_vs_raw_fp16": round(per_image / raw, 3),
        **device_figures(config, workdir, manifest["outputs"]["store"], n_views, repeats),
        "threads": torch.get_num_threads(),
        "stage_dir": str(paths.stage_dir(config, workdir)),
    }
    int8_config = bench_config(images, resolution, backbone, weights, n_views, chunk_size, **{"features.dtype": "int8"})
    figures.update(int8_figures(int8_config, workdir, manifest, chunk_size, repeats))
    report(figures, as_json)


# The parts of the features stage (pipeline/extraction/timing.py), in pipeline order: decode and augment run in the
# loader thread, forward and lhp on the stage's own thread, write in the writer thread; the waits are the stage's
# thread idle on the other two.
STAGE_PARTS = ("decode", "augment", "forward", "lhp", "write", "wait_decode", "wait_write")


def stage_breakdown(parts: list[dict], stage: list[float], bare: list[float]) -> dict:
    """Where the stage's time goes, medians over the repeats: per part its wall seconds, its share of the stage's
    wall time and its CPU seconds (the part's own thread: for write, without the compression zarr runs in its own
    threads). The parts overlap (three threads), so the shares do not
    add up to 1; what the stage loses to the bare forward shows as `stage_other_s` (the stage's thread neither
    computing nor waiting: queues, chunk merging, Python) and `forward_slowdown` (the stage's forward over the bare
    one: the cores the loader and writer threads take from it)."""
    run = statistics.median(stage)
    figures: dict[str, float] = {}
    for part in STAGE_PARTS:
        wall = statistics.median(p.get(part, {}).get("wall_s", 0.0) for p in parts)
        figures[f"{part}_s"] = round(wall, 3)
        figures[f"{part}_share"] = round(wall / run, 3)
        figures[f"{part}_cpu_s"] = round(statistics.median(p.get(part, {}).get("cpu_s", 0.0) for p in parts), 3)
    main = ("forward", "lhp", "wait_decode", "wait_write")
    other = [s - sum(p.get(n, {}).get("wall_s", 0.0) for n in main) for s, p in zip(stage, parts, strict=True)]
    figures["stage_other_s"] = round(statistics.median(other), 3)
    figures["stage_other_share"] = round(statistics.median(other) / run, 3)
    figures["forward_slowdown"] = round(statistics.median(
        p.get("forward", {}).get("wall_s", 0.0) / b for p, b in zip(parts, bare, strict=True)), 3)
    return figures


def float_array_bytes(manifest: dict) -> int:
    """Stored bytes of a features store's float feature arrays: `feat`, `feat_aug` and, int8, their scales."""
    names = {*QUANTIZED, *(scale_array(n) for n in QUANTIZED)}
    return sum(v for k, v in manifest["outputs"]["array_bytes"].items() if k in names)


def int8_figures(config, workdir: Path, fp16_manifest: dict, batch_size: int, repeats: int) -> dict:
    """The same crops stored with `features.dtype = "int8"` beside the float16 store (docs/cache.md, "Compact
    cache"): bytes of the float arrays, the least per-patch cosine to float16, and both stores read the same way
    (`FeatureStore.batches` of `feat` and `feat_aug`, one epoch per repeat, sides alternating)."""
    fp16_url = fp16_manifest["outputs"]["store"]
    url = str(Path(fp16_url).with_name(Path(fp16_url).stem + "-int8.zarr"))
    manifest = build(config, workdir, "features-train", stores={"train": url}, force=True)
    stores = {"fp16": FeatureStore.open(fp16_url), "int8": FeatureStore.open(url)}
    names = [n for n in QUANTIZED if n in stores["fp16"].names()]
    if not np.array_equal(*(s.read("crop_order", 0, len(s)) for s in stores.values())):
        raise RuntimeError("bench features: the float16 and int8 stores hold different crops")
    cosine = 1.0
    for name in names:
        a, b = (s.read(name, 0, len(s)).astype(np.float64).reshape(-1, s.array(name).shape[-1])
                for s in stores.values())
        cos = (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)
        cosine = min(cosine, float(cos.min()))
    seconds: dict[str, list[float]] = {side: [] for side in stores}
    crops = {side: 0 for side in stores}
    for r in range(repeats):
        for side, store in stores.items():
            t0 = time.perf_counter()
            for batch in store.batches(names, batch_size, shuffle_seed=r, prefetch=0):
                crops[side] += len(batch["index"])
            seconds[side].append(time.perf_counter() - t0)
    if crops["fp16"] != crops["int8"]:
        raise RuntimeError(f"bench features: the read sides read different crops: {crops}")
    n = len(stores["fp16"])
    rate = {side: n / statistics.median(t) for side, t in seconds.items()}
    return {
        "int8_bytes_ratio": round(float_array_bytes(manifest) / float_array_bytes(fp16_manifest), 4),
        "int8_cosine": round(cosine, 6),
        "fp16_float_bytes_per_image": round(float_array_bytes(fp16_manifest) / n),
        "int8_float_bytes_per_image": round(float_array_bytes(manifest) / n),
        "read_arrays": names, "read_batch_size": batch_size,
        "read_crops_fp16": crops["fp16"], "read_crops_int8": crops["int8"],  # all repeats: equal, or the bench fails
        "read_fp16_crops_per_s": round(rate["fp16"], 1),
        "read_int8_crops_per_s": round(rate["int8"], 1),
        "int8_store": url,
    }
