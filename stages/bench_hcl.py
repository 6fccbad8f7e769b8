"""`hp-pipe bench train --method hcl`: HCL from its cache against the same iteration with live backbone passes.

The reference's iteration crops each image anew, makes two photometric views at 448 px, resizes them to 224, runs
the frozen ViT at every patch size on both and derives the foreground mask from view 2's finest-branch attention,
every step; so does its MoGoClustering pass over the training set (view 2 only). Here both sides run the same head,
loss and optimizer, side by side in one process: the cache side reads HCL's store (one cached crop per image and
epoch, docs/hcl.md §4), the live side makes the views with the same code the store was written with
(pipeline/hcl/views.py) from the decoded source images.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import torch

from cache.reader import FeatureStore, batch_plan
from pipeline.backbone import normalize
from pipeline.config import load_config
from pipeline.datasets import open_split
from pipeline.hcl.foreground import foreground_mask
from pipeline.hcl.heads import build_model
from pipeline.hcl.mogo import MemoryBank
from pipeline.hcl.multilevel import multilevel_features, patch_sizes
from pipeline.hcl.step import head_input, mogo_samples, param_groups, training_step, two_variants, variant_levels
from pipeline.hcl.views import crop_box, draw_photometric, train_views
from pipeline.workers import resolve_backbone
from stages import features_hcl, train_hcl
from stages.bench import report
from stages.bench_train import _median_seconds, cycle_epochs

_LIVE_CROPS = 1_000  # live crops are numbered from here on, so that they never repeat a cached one


def bench_config(images: int, resolution: int, backbone: str, weights: str, batch_size: int):
    """The synthetic preset with `images` source images of 2x`resolution` px, the spec's HCL head (§2)."""
    return load_config("synthetic", {
        "dataset.n_train": images, "dataset.n_val": 1, "dataset.size": 2 * resolution,
        "features.backbone": backbone, "features.weights": weights, "features.chunk_size": 8,
        "hcl_features.resolution": resolution, "hcl_features.crop_resolution": 2 * resolution,
        "train.method": "hcl", "hcl.batch_size": batch_size, "hcl.kmeans_min_points": 1, "hcl.dim": 768,
        "hcl.hidden": 2048, "hcl.out_dim": 256, "hcl.heads": 12, "hcl.clusters": 500})


def live_views(sources: list[np.ndarray], images: np.ndarray, crop: int, config) -> np.ndarray:
    """What the reference's loader makes per step: a new crop of each image and two photometric views of it,
    (B, 2, res, res, 3) uint8."""
    h = config["hcl_features"]
    out = []
    for i in images:
        image = sources[int(i)]
        box = crop_box(*image.shape[:2], h["seed"], int(i), crop)
        views = [draw_photometric(h["seed"], int(i), crop, v) for v in range(2)]
        out.append(train_views(image, None, box, views, h["crop_resolution"], h["resolution"])[1])
    return np.stack(out)


def _live_inputs(backbone, views: np.ndarray, wanted: tuple[int, ...]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The wanted views through every branch (head inputs), and the foreground mask from the last one's attention
    (the reference's k view, view 2)."""
    levels = [multilevel_features(backbone, normalize(torch.from_numpy(np.ascontiguousarray(views[:, v]))))
              for v in wanted]
    sizes, cpu = patch_sizes(backbone.name), torch.device("cpu")
    return [head_input(lv, sizes, cpu) for lv in levels], foreground_mask(levels[-1]["cls_attn"]).flatten(1)


def train(images: int, resolution: int, backbone: str, weights: str, batch_size: int, iterations: int,
          repeats: int, workdir: Path, as_json: bool) -> None:
    config = bench_config(images, resolution, backbone, weights, batch_size)
    workdir = Path(workdir) / "bench-train-hcl"
    manifest = features_hcl.run(config, workdir, "train")
    store = FeatureStore.open(manifest["outputs"]["store"])
    features_hcl.hcl_arrays(store)
    model_bb = resolve_backbone(config)
    h_cfg = config["hcl"]
    n_images, crops = int(store.attrs["images"]), int(store.attrs["crops"])
    sizes = tuple(store.attrs["patch_sizes"])
    width = (len(sizes) + 1) * model_bb.embed_dim
    torch.manual_seed(0)
    generator, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
    model = build_model(width, h_cfg)
    optimizer = torch.optim.AdamW(param_groups(model, h_cfg["weight_decay"]), lr=h_cfg["lr"])
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    cpu = torch.device("cpu")
    banks = {"fg": MemoryBank(0), "bg": MemoryBank(1)}
    first_epoch = train_hcl.epoch_crops(store, h_cfg["seed"], 0)
    mogo = lambda: train_hcl.mogo_pass(model, store, sizes, h_cfg, banks, 0, generator, cpu, print,  # noqa: E731
                                       first_epoch)
    centroids = mogo()
    dataset = open_split(config, workdir, "train")
    sources = [dataset[i].image for i in range(len(dataset))]  # decoded once: neither side times JPEG decoding
    live_crop = iter(range(_LIVE_CROPS, 10**9))

    def step(x1, x2, fg) -> None:
        out = training_step(model, x1, x2, fg, centroids["fg"], centroids["bg"], h_cfg["tau"])
        train_hcl.optimize(model, out.loss, optimizer, scaler, h_cfg["ema_m"])

    def epoch_batches(epoch: int):
        keep = train_hcl.epoch_crops(store, h_cfg["seed"], epoch)  # §4: one cached crop per image and epoch
        return store.batches(train_hcl.step_names(sizes), batch_size, shuffle_seed=epoch, drop_last=True, keep=keep)

    def from_cache() -> None:
        for _, batch in cycle_epochs(epoch_batches, iterations):
            v1, v2 = two_variants(len(batch["index"]), 2, generator)
            step(head_input(variant_levels(batch, sizes, v1), sizes, cpu),
                 head_input(variant_levels(batch, sizes, v2), sizes, cpu), batch["fg_mask"].flatten(1))

    def live() -> None:
        for _ in range(iterations):
            idx = rng.choice(n_images, batch_size, replace=False)
            (x1, x2), fg = _live_inputs(model_bb, live_views(sources, idx, next(live_crop), config), (0, 1))
            step(x1, x2, fg)

    def mogo_live() -> None:
        """The reference's pass: a new crop, every branch of view 2 and its mask, live, then the same sampling and
        k-means."""
        fg_all, bg_all = [], []
        crop = next(live_crop)
        for start in range(0, n_images, batch_size):
            idx = np.arange(start, min(start + batch_size, n_images))
            views = live_views(sources, idx, crop, config)
            (x2,), fg = _live_inputs(model_bb, views, (train_hcl.MOGO_VIEW,))  # view 2 only
            fg_s, bg_s = mogo_samples(model, x2, fg, h_cfg["sample_fraction"], generator)
            fg_all.append(fg_s)
            bg_all.append(bg_s)
        train_hcl.mogo_centroids({"fg": fg_all, "bg": bg_all}, banks, 0, h_cfg, print, "the live pass")

    epoch_iterations = sum(len(batches) for _, batches in batch_plan(  # what an epoch of training really reads
        len(store), store.chunk_size, batch_size, 0, config["train"]["buffer_chunks"], True, first_epoch))
    cache_s, live_s = [], []
    for _ in range(repeats):  # side by side, alternating
        cache_s.append(_median_seconds(from_cache, 1))
        live_s.append(_median_seconds(live, 1))
    mogo_cache, mogo_ref = _median_seconds(mogo, repeats), _median_seconds(mogo_live, repeats)
    figures = {
        "method": "hcl", "backbone": backbone + (" [random-init]" if model_bb.random_init else ""),
        "patch_sizes": list(sizes), "resolution": resolution, "crop_resolution": 2 * resolution,
        "train_images": n_images, "crops_per_image": crops, "views_per_crop": int(store.attrs["views"]),
        "cached_crops": len(store), "batch_size": batch_size,
        "iterations_per_epoch": epoch_iterations,  # §4: one pass over the images, = train_images // batch_size
        "iterations": iterations, "head_dim": h_cfg["dim"],
        "cache_iterations_per_s": round(iterations / statistics.median(cache_s), 3),
        "live_iterations_per_s": round(iterations / statistics.median(live_s), 3),
        "ratio": round(statistics.median(r / c for c, r in zip(cache_s, live_s, strict=True)), 2),
        "mogo_cache_s": round(mogo_cache, 3), "mogo_live_s": round(mogo_ref, 3),
        "mogo_ratio": round(mogo_ref / mogo_cache, 2),
        "threads": torch.get_num_threads(),
    }
    report(figures, as_json)
