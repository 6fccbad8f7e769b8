"""`hp-pipe bench train --method hcl`: HCL from its cache against the same iteration with live backbone passes.

The reference's iteration crops each image anew, makes two photometric views at 448 px, resizes them to 224, runs
the frozen ViT at every patch size on both and derives the foreground mask from view 2's finest-branch attention,
every step; so does its MoGoClustering pass over the training set (view 2 only). Here both sides run the same head,
loss and optimizer, side by side in one process: the cache side reads HCL's store (one cached crop per image and
epoch, docs/hcl.md §4), the live side makes the views with the same code the store was written with
(pipeline/methods/hcl/views.py) from the decoded source images.

Each side's iteration is also timed part by part (`cache_<part>_s` and `_share`, `live_<part>_s` and `_share`), and
`ratio_ceiling` is the ratio the cache side would reach if reading and assembling its inputs cost nothing: the live
iteration over the step both sides share. The live side's extra work is its views and backbone passes only, so the
ratio can never exceed 1 + (views + backbone) / step.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch

from benches.features import report
from benches.train import _median_seconds, cycle_epochs
from cache.reader import FeatureStore, batch_plan
from pipeline.config import load_config
from pipeline.datasets import open_split
from pipeline.extraction.backbone import normalize
from pipeline.extraction.workers import resolve_backbone
from pipeline.methods.hcl import training as hcl_training
from pipeline.methods.hcl.foreground import foreground_mask
from pipeline.methods.hcl.heads import build_model
from pipeline.methods.hcl.mogo import MemoryBank
from pipeline.methods.hcl.multilevel import multilevel_features, patch_sizes
from pipeline.methods.hcl.step import (
    head_input,
    mogo_samples,
    param_groups,
    training_step,
    two_variants,
    view_inputs,
)
from pipeline.methods.hcl.store import hcl_arrays
from pipeline.methods.hcl.views import crop_box, draw_photometric, train_views
from pipeline.orchestration.graph import build

_LIVE_CROPS = 1_000  # live crops are numbered from here on, so that they never repeat a cached one

# the cache side's iteration, part by part (`HCLSides.from_cache`): figure name -> what it times
CACHE_PARTS = {
    "read": "waiting for the next batch from the store's prefetching reader",
    "assemble": "two variants drawn, both views' head inputs (upsampled, concatenated branches) and the mask",
    "forward_backward": "online and momentum heads, the loss, its backward",
    "optimizer": "the AdamW step",
    "ema": "the momentum update",
}

# the live side's iteration (`HCLSides.live`)
LIVE_PARTS = {
    "views": "new crops and photometric views (PIL, 448 px, then 224)",
    "backbone": "every branch on both views, the foreground mask, the head inputs",
    "step": "the step both sides share: forward, loss, backward, AdamW, momentum update",
}


class PartClock:
    """Seconds spent in each part of a loop, summed over every lap: `lap(part)` charges the time since the previous
    lap (or `start`) to `part`."""

    def __init__(self, parts):
        self.seconds = dict.fromkeys(parts, 0.0)
        self.last = time.perf_counter()

    def start(self) -> None:
        self.last = time.perf_counter()

    def lap(self, part: str) -> None:
        now = time.perf_counter()
        self.seconds[part] += now - self.last
        self.last = now


def part_figures(side: str, seconds: dict[str, float], iterations: int) -> dict[str, float]:
    """Per-part seconds per iteration and each part's share of their sum, as `<side>_<part>_s` and
    `<side>_<part>_share`."""
    total = sum(seconds.values()) or 1.0
    out = {}
    for part, s in seconds.items():
        out[f"{side}_{part}_s"] = round(s / max(1, iterations), 4)
        out[f"{side}_{part}_share"] = round(s / total, 3)
    return out


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


class HCLSides:
    """The two sides of `bench train --method hcl` on the same model: steps and the MoGo pass from HCL's store, and
    the reference's way (new crops, views and every backbone branch, live, each step and each pass)."""

    def __init__(self, config, store: FeatureStore, model_bb, sources: list[np.ndarray], iterations: int):
        h_cfg = config["hcl"]
        self.config, self.store, self.model_bb, self.sources, self.iterations = config, store, model_bb, sources, \
            iterations
        self.h_cfg, self.batch_size, self.n_images = h_cfg, h_cfg["batch_size"], int(store.attrs["images"])
        self.sizes = tuple(store.attrs["patch_sizes"])
        width = (len(self.sizes) + 1) * model_bb.embed_dim
        torch.manual_seed(0)
        self.generator, self.rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
        self.model = build_model(width, h_cfg)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, h_cfg["weight_decay"]), lr=h_cfg["lr"])
        self.scaler = torch.amp.GradScaler("cuda", enabled=False)
        self.banks = {"fg": MemoryBank(0), "bg": MemoryBank(1)}
        self.n_variants = int(store.attrs["views"])
        self.first_epoch = hcl_training.epoch_crops(store, h_cfg["seed"], 0)
        self.clock, self.cache_iterations = PartClock(CACHE_PARTS), 0
        self.live_clock, self.live_iterations = PartClock(LIVE_PARTS), 0
        self.centroids = self.mogo()
        self.live_crop = iter(range(_LIVE_CROPS, 10**9))

    def mogo(self) -> dict[str, dict[str, torch.Tensor]]:
        """The pass over the first epoch's cached crops (pipeline/methods/hcl/training.py)."""
        return hcl_training.mogo_pass(self.model, self.store, self.sizes, self.h_cfg, self.banks, 0, self.generator,
                                      torch.device("cpu"), print, self.first_epoch)

    def step(self, x1, x2, fg) -> None:
        out = training_step(self.model, x1, x2, fg, self.centroids["fg"], self.centroids["bg"], self.h_cfg["tau"])
        hcl_training.optimize(self.model, out.loss, self.optimizer, self.scaler, self.h_cfg["ema_m"])

    def epoch_batches(self, epoch: int):
        keep = hcl_training.epoch_crops(self.store, self.h_cfg["seed"], epoch)  # §4: one cached crop per image
        return self.store.batches(hcl_training.step_names(self.sizes), self.batch_size, shuffle_seed=epoch,
                                  drop_last=True, keep=keep)

    def from_cache(self) -> None:
        """What HCLTraining does per batch (inputs, forward, update), each part timed on `self.clock`: the same
        calls as `step`, with `optimize` in its three parts."""
        clock, h_cfg = self.clock, self.h_cfg
        clock.start()
        for _, batch in cycle_epochs(self.epoch_batches, self.iterations):
            clock.lap("read")
            views = two_variants(len(batch["index"]), self.n_variants, self.generator)
            x1, x2 = view_inputs(batch, self.sizes, views, torch.device("cpu"))
            fg = batch["fg_mask"].flatten(1)
            clock.lap("assemble")
            out = training_step(self.model, x1, x2, fg, self.centroids["fg"], self.centroids["bg"], h_cfg["tau"])
            hcl_training.backward(out.loss, self.optimizer, self.scaler)
            clock.lap("forward_backward")
            hcl_training.optimizer_step(self.optimizer, self.scaler)
            clock.lap("optimizer")
            self.model.momentum_update(h_cfg["ema_m"])
            clock.lap("ema")
            self.cache_iterations += 1

    def live(self) -> None:
        """The reference's iteration; `self.live_clock` charges its views, its backbone passes (with the mask and
        the head inputs) and the step both sides share."""
        clock = self.live_clock
        clock.start()
        for _ in range(self.iterations):
            idx = self.rng.choice(self.n_images, self.batch_size, replace=False)
            views = live_views(self.sources, idx, next(self.live_crop), self.config)
            clock.lap("views")
            (x1, x2), fg = _live_inputs(self.model_bb, views, (0, 1))
            clock.lap("backbone")
            self.step(x1, x2, fg)
            clock.lap("step")
            self.live_iterations += 1

    def mogo_live(self) -> None:
        """The reference's pass: a new crop, every branch of view 2 and its mask, live, then the same sampling and
        k-means."""
        fg_all, bg_all = [], []
        crop = next(self.live_crop)
        for start in range(0, self.n_images, self.batch_size):
            idx = np.arange(start, min(start + self.batch_size, self.n_images))
            views = live_views(self.sources, idx, crop, self.config)
            (x2,), fg = _live_inputs(self.model_bb, views, (hcl_training.MOGO_VIEW,))  # view 2 only
            fg_s, bg_s = mogo_samples(self.model, x2, fg, self.h_cfg["sample_fraction"], self.generator)
            fg_all.append(fg_s)
            bg_all.append(bg_s)
        hcl_training.mogo_centroids({"fg": fg_all, "bg": bg_all}, self.banks, 0, self.h_cfg, print, "the live pass")


def train(images: int, resolution: int, backbone: str, weights: str, batch_size: int, iterations: int,
          repeats: int, workdir: Path, as_json: bool) -> None:
    config = bench_config(images, resolution, backbone, weights, batch_size)
    workdir = Path(workdir) / "bench-train-hcl"
    manifest = build(config, workdir, "features-train-hcl")
    store = FeatureStore.open(manifest["outputs"]["store"])
    hcl_arrays(store)
    model_bb = resolve_backbone(config)
    h_cfg = config["hcl"]
    n_images, crops = int(store.attrs["images"]), int(store.attrs["crops"])
    dataset = open_split(config, workdir, "train")
    sources = [dataset[i].image for i in range(len(dataset))]  # decoded once: neither side times JPEG decoding
    sides = HCLSides(config, store, model_bb, sources, iterations)
    epoch_iterations = sum(len(batches) for _, batches in batch_plan(  # what an epoch of training really reads
        len(store), store.chunk_size, batch_size, 0, config["train"]["buffer_chunks"], True, sides.first_epoch))
    cache_s, live_s = [], []
    for _ in range(repeats):  # side by side, alternating
        cache_s.append(_median_seconds(sides.from_cache, 1))
        live_s.append(_median_seconds(sides.live, 1))
    mogo_cache, mogo_ref = _median_seconds(sides.mogo, repeats), _median_seconds(sides.mogo_live, repeats)
    shared_s = sum(sides.clock.seconds[p] for p in ("forward_backward", "optimizer", "ema")) / sides.cache_iterations
    figures = {
        "method": "hcl", "backbone": backbone + (" [random-init]" if model_bb.random_init else ""),
        "patch_sizes": list(sides.sizes), "resolution": resolution, "crop_resolution": 2 * resolution,
        "train_images": n_images, "crops_per_image": crops, "views_per_crop": int(store.attrs["views"]),
        "cached_crops": len(store), "batch_size": batch_size,
        "iterations_per_epoch": epoch_iterations,  # §4: one pass over the images, = train_images // batch_size
        "iterations": iterations, "head_dim": h_cfg["dim"],
        "cache_iterations_per_s": round(iterations / statistics.median(cache_s), 3),
        "live_iterations_per_s": round(iterations / statistics.median(live_s), 3),
        "ratio": round(statistics.median(r / c for c, r in zip(cache_s, live_s, strict=True)), 2),
        **part_figures("cache", sides.clock.seconds, sides.cache_iterations),
        **part_figures("live", sides.live_clock.seconds, sides.live_iterations),
        # the ratio if reading and assembling cost nothing: the live iteration over the work both sides share
        "ratio_ceiling": round(statistics.median(live_s) / iterations / shared_s, 2),
        "mogo_cache_s": round(mogo_cache, 3), "mogo_live_s": round(mogo_ref, 3),
        "mogo_ratio": round(mogo_ref / mogo_cache, 2),
        "threads": torch.get_num_threads(),
    }
    report(figures, as_json)
