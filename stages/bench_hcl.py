"""`hp-pipe bench train --method hcl`: HCL from the cache against the same iteration with live backbone passes.

The reference's iteration runs the frozen ViT at every patch size on both photometric views and derives the
foreground mask from the finest branch's attention, every step; so does its MoGoClustering pass over the training
set. Here both sides run the same head, loss and optimizer on the same crops, side by side in one process.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import torch

from cache.reader import FeatureStore
from pipeline.backbone import normalize
from pipeline.hcl.extract import hcl_views
from pipeline.hcl.foreground import foreground_mask
from pipeline.hcl.heads import build_model
from pipeline.hcl.mogo import MemoryBank
from pipeline.hcl.multilevel import multilevel_features, patch_sizes
from pipeline.hcl.step import head_input, mogo_samples, param_groups, training_step, two_variants, variant_levels
from stages import features as features_stage
from stages import features_hcl, prepare, train_hcl
from stages.bench import bench_config, report
from stages.bench_train import _median_seconds


def _live_inputs(backbone, images: np.ndarray, indices: np.ndarray, seed: int,
                 variants: tuple[int, ...]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """What the reference computes live: the requested variants through every branch (head inputs), and the
    foreground mask from the first one's attention."""
    x = normalize(torch.from_numpy(np.ascontiguousarray(images)))
    views = hcl_views(x, indices, 2, seed).reshape(len(x), 2, *x.shape[1:])
    levels = [multilevel_features(backbone, views[:, v]) for v in variants]
    sizes, cpu = patch_sizes(backbone.name), torch.device("cpu")
    return [head_input(lv, sizes, cpu) for lv in levels], foreground_mask(levels[0]["cls_attn"]).flatten(1)


def train(images: int, resolution: int, backbone: str, weights: str, batch_size: int, iterations: int,
          repeats: int, workdir: Path, as_json: bool) -> None:
    config = bench_config(images, resolution, backbone, weights, 1, 8, **{  # the spec's head, not the CPU preset's
        "train.method": "hcl", "hcl.batch_size": batch_size, "hcl.kmeans_min_points": 1, "hcl.dim": 768,
        "hcl.hidden": 2048, "hcl.out_dim": 256, "hcl.heads": 12, "hcl.clusters": 500})
    workdir = Path(workdir) / "bench-train-hcl"
    store = FeatureStore.open(features_hcl.run(config, workdir, "train")["outputs"]["store"])
    model_bb = features_stage.resolve_backbone(config)
    h_cfg, seed = config["hcl"], config["hcl_features"]["seed"]
    sizes = tuple(store.attrs["hcl"]["patch_sizes"])
    width = (len(sizes) + 1) * model_bb.embed_dim
    torch.manual_seed(0)
    generator, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
    model = build_model(width, h_cfg)
    optimizer = torch.optim.AdamW(param_groups(model, h_cfg["weight_decay"]), lr=h_cfg["lr"])
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    cpu = torch.device("cpu")
    banks = {"fg": MemoryBank(0), "bg": MemoryBank(1)}
    mogo = lambda: train_hcl.mogo_pass(model, store, sizes, h_cfg, banks, 0, generator, cpu, print)  # noqa: E731
    centroids = mogo()
    directory = prepare.prepared_dir(config, workdir, "train")
    names, _ = prepare.read_prepared(directory)
    decoded, _ = prepare.load_prepared(directory, names, False)

    def step(x1, x2, fg) -> None:
        out = training_step(model, x1, x2, fg, centroids["fg"], centroids["bg"], h_cfg["tau"])
        train_hcl.optimize(model, out.loss, optimizer, scaler, h_cfg["ema_m"])

    def from_cache() -> None:
        batches = store.batches(train_hcl.step_names(sizes), batch_size, shuffle_seed=0, drop_last=True)
        for _, batch in zip(range(iterations), batches, strict=False):
            v1, v2 = two_variants(len(batch["index"]), 2, generator)
            step(head_input(variant_levels(batch, sizes, v1), sizes, cpu),
                 head_input(variant_levels(batch, sizes, v2), sizes, cpu), batch["fg_mask"].flatten(1))

    def live() -> None:
        for _ in range(iterations):
            idx = rng.choice(len(decoded), batch_size, replace=False)
            (x1, x2), fg = _live_inputs(model_bb, decoded[idx], idx, seed, (0, 1))
            step(x1, x2, fg)

    def mogo_live() -> None:
        """The reference's pass: every branch of view 2 and the mask, live, then the same sampling and k-means."""
        fg_all, bg_all = [], []
        for start in range(0, len(decoded), batch_size):
            idx = np.arange(start, min(start + batch_size, len(decoded)))
            (x2,), fg = _live_inputs(model_bb, decoded[idx], idx, seed, (train_hcl.MOGO_VIEW,))  # view 2 only
            fg_s, bg_s = mogo_samples(model, x2, fg, h_cfg["sample_fraction"], generator)
            fg_all.append(fg_s)
            bg_all.append(bg_s)
        train_hcl.mogo_centroids({"fg": fg_all, "bg": bg_all}, banks, 0, h_cfg, print, "the live pass")

    cache_s, live_s = [], []
    for _ in range(repeats):  # side by side, alternating
        cache_s.append(_median_seconds(from_cache, 1))
        live_s.append(_median_seconds(live, 1))
    mogo_cache, mogo_ref = _median_seconds(mogo, repeats), _median_seconds(mogo_live, repeats)
    figures = {
        "method": "hcl", "backbone": backbone + (" [random-init]" if model_bb.random_init else ""),
        "patch_sizes": list(sizes), "resolution": resolution, "batch_size": batch_size, "iterations": iterations,
        "head_dim": h_cfg["dim"], "train_crops": len(store),
        "cache_iterations_per_s": round(iterations / statistics.median(cache_s), 3),
        "live_iterations_per_s": round(iterations / statistics.median(live_s), 3),
        "ratio": round(statistics.median(r / c for c, r in zip(cache_s, live_s, strict=True)), 2),
        "mogo_cache_s": round(mogo_cache, 3), "mogo_live_s": round(mogo_ref, 3),
        "mogo_ratio": round(mogo_ref / mogo_cache, 2),
        "threads": torch.get_num_threads(),
    }
    report(figures, as_json)
