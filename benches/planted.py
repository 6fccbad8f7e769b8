"""`hp-pipe bench quality --planted`: HP against raw features on planted features whose answer is known (issue 9 §4).

For each seed: a planted train and val store (`benches.planted_data`, no backbone), the HP heads trained on the
train store by the project's own trainer (`pipeline.methods.hp.training.train`) with the bench's own training settings
(`HP_TRAIN`, written out in full so that no preset edit changes the bench), then the cluster probe of
docs/hp.md §8 (k-means on training codes, cosine assignment at label size, Hungarian on the whole val set)
on the head's codes and on the raw features.
A second run of the same trainer with the hidden positives shuffled across anchors (a deliberately broken
loss) shows the bench can fail: it must not beat raw features.

`--method hcl` (`run_seed_hcl`): HCL's planted multi-level stores, HCL at the start, middle and end of training, and
a broken run whose loss gets each token's targets (MoGo's cluster assignment and the prediction target) from another
token of its kind (targets without information).
`--method stego` (`run_seed_stego`): HP's planted stores, STEGO's neighbour table by its own knn stage, STEGO trained
by its own trainer (`STEGO_TRAIN`), and a broken run whose neighbour table holds random crops (positives without
information), each probed like HP's head, with the trainer's initial head.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

import pipeline.methods.hp.step as hp_model
from benches.features import report
from benches.planted_data import (
    N_CLASSES,
    PlantedSettings,
    hcl_patch_sizes,
    label_fractions,
    patch_labels,
    write_hcl_store,
    write_store,
)
from benches.train import cluster_probe, positive_precision
from cache.reader import FeatureStore
from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.evaluation.codes import encode_range
from pipeline.evaluation.encoders import encoder_of, load_encoder
from pipeline.log import log
from pipeline.methods.hcl import step as hcl_step
from pipeline.methods.hcl import training as hcl_training
from pipeline.methods.hcl.heads import build_model
from pipeline.methods.hcl.loss import hcl_loss
from pipeline.methods.hcl.mogo import nearest_l2
from pipeline.methods.hp import training as hp_training
from pipeline.methods.hp.loss import LossOutput, hp_loss, positive_masks
from pipeline.methods.hp.pool import PoolIndex, pick_patches
from pipeline.methods.hp.step import HPHeads
from pipeline.methods.stego import stages as stego_stages
from pipeline.methods.stego import training as stego_training
from pipeline.methods.stego.head import StegoHead
from pipeline.methods.stego.stages import knn_body
from pipeline.orchestration.runner import StageContext
from pipeline.settings import TrainSection
from pipeline.training.checkpoints import load_checkpoint

# Every [hp] setting HP's result depends on, for a store of 200 planted scenes: the values the synthetic preset had
# when the bench's figures were first taken (batch 16, 10 epochs = 120 iterations, warm-up and Pool_sp renewal every
# 20 iterations, pool 256), D scaled to C = 64, the optimiser and dropout of docs/hp.md §2 and §5. Written out so that
# the bench does not follow the synthetic preset (which is sized for `make run`).
HP_TRAIN: dict[str, Any] = {
    "head_dim": 64, "epochs": 10, "batch_size": 16, "tau": 0.6, "alpha": 0.05, "rho": 0.02, "pool_size": 256,
    "renew_interval": 20, "ema_m": 0.99, "warmup": 20, "lr": 5e-4, "weight_decay": 0.1, "grad_clip": 10.0,
    "dropout": 0.1,
}


@dataclass(frozen=True)
class PlantedBench:
    """Sizes of the bench and its HP training settings (`HP_TRAIN` with `train`'s entries replacing them)."""

    n_train: int = 200  # 12 batches of 16 per epoch: the size HP_TRAIN's schedule was set for
    n_val: int = 64
    chunk_size: int = 16
    n_views: int = 2
    train: dict[str, Any] = field(default_factory=dict)  # replaces HP_TRAIN's entries (tests, experiments)
    planted: PlantedSettings = PlantedSettings()
    precision_images: int = 16  # training images whose positives are checked against their labels


def train_config(bench: PlantedBench, seed: int) -> dict[str, Any]:
    """A whole config whose [hp] section carries HP_TRAIN (and the bench's replacements, run settings such as
    log_interval going to [train]) over any preset value; the k-means protocol, so that the trainer trains no online
    probe."""
    run_keys = {f.name for f in dataclasses.fields(TrainSection)}
    overrides = {f"{'train' if k in run_keys else 'hp'}.{k}": v for k, v in {**HP_TRAIN, **bench.train}.items()}
    return load_config("synthetic", {**overrides, "hp.seed": seed, "train.method": "hp",
                                     "evaluate.protocol": "kmeans"})


def shuffled_positives(seed: int) -> tuple[Any, list[int]]:
    """A deliberately broken L_hp: the mining inputs (f, s_m, r, r^m) permuted over the batch's patches.

    G and H keep their sizes but become G[π(i), π(j)]: each anchor's positives are another patch's, i.e.
    random patches (precision at chance). Returns the loss and a call counter (the bench checks it ran).
    """
    generator = torch.Generator().manual_seed(10_000 + seed)
    calls = [0]

    def loss(f: torch.Tensor, s_m: torch.Tensor, z: torch.Tensor, z_mix: torch.Tensor, r: torch.Tensor,
             r_m: torch.Tensor, **kwargs: Any) -> LossOutput:
        calls[0] += 1
        b, n = f.shape[:2]
        perm = torch.randperm(b * n, generator=generator).to(f.device)
        shuffle = lambda x: x.reshape(b * n, *x.shape[2:])[perm].reshape(x.shape)  # noqa: E731
        return hp_loss(shuffle(f), shuffle(s_m), z, z_mix, shuffle(r), shuffle(r_m), **kwargs)

    return loss, calls


@contextlib.contextmanager
def loss_replaced(loss: Any) -> Iterator[None]:
    """The trainer's training step calls `loss` in place of hp_loss while inside (the broken run only)."""
    original = hp_model.hp_loss
    hp_model.hp_loss = loss
    try:
        yield
    finally:
        hp_model.hp_loss = original


def _codes(checkpoint: str | dict[str, Any], train: FeatureStore, val: FeatureStore
           ) -> tuple[np.ndarray, list[torch.Tensor]]:
    """Training codes as rows and val codes per image, from a checkpoint file or a checkpoint-like state."""
    encoder = load_encoder(checkpoint) if isinstance(checkpoint, str) else \
        encoder_of(checkpoint)
    train_codes = encode_range(encoder, train, 0, len(train), 16)
    val_codes = encode_range(encoder, val, 0, len(val), 16)
    return train_codes.permute(0, 2, 3, 1).reshape(-1, train_codes.shape[1]).numpy(), list(val_codes)


def _heads(checkpoint: str) -> tuple[HPHeads, torch.Tensor]:
    """The trained heads (eval mode) and the run's last Pool_sp."""
    state = load_checkpoint(checkpoint)
    heads = HPHeads(state["in_dim"], state["head_dim"])
    heads.load_state_dict(state["heads"])
    return heads.eval(), state["pool_sp"]


def positive_sources(x: torch.Tensor, r: torch.Tensor, patch_label: torch.Tensor, image: torch.Tensor,
                     prefix: str) -> dict[str, float]:
    """Where the hidden positives of unit `x` (criteria `r`, §5) come from: the anchor's own image or another,
    and how often each kind shares the anchor's class. Patches of one image share the planted style, so own-image
    positives can be of any class; only cross-image ones teach the head to ignore the style."""
    mask = positive_masks(x, x, r, r, torch.arange(len(x)))
    same = patch_label[:, None] == patch_label[None, :]
    own = image[:, None] == image[None, :]
    total = max(int(mask.sum()), 1)
    pct = lambda m: round(100 * float(same[m].float().mean()), 1) if bool(m.any()) else float("nan")  # noqa: E731
    return {f"{prefix}_own_image_share": round(100 * int((mask & own).sum()) / total, 1),
            f"{prefix}_own_image_precision": pct(mask & own),
            f"{prefix}_cross_image_precision": pct(mask & ~own),
            f"{prefix}_cross_image_per_anchor": round(int((mask & ~own).sum()) / len(x), 1)}


def code_geometry(x: torch.Tensor, patch_label: torch.Tensor, image: torch.Tensor, prefix: str) -> dict[str, float]:
    """Mean cosine of same-class patches of other images vs other-class patches of the same image: which one
    the features (or codes) group by, the class or the image."""
    sim = x @ x.T
    same = patch_label[:, None] == patch_label[None, :]
    own = image[:, None] == image[None, :]
    return {f"{prefix}_cos_same_class_other_image": round(float(sim[same & ~own].mean()), 3),
            f"{prefix}_cos_other_class_same_image": round(float(sim[~same & own].mean()), 3)}


def diagnose(checkpoint: str, store: FeatureStore, pool_size: int, images: int, seed: int) -> dict[str, float]:
    """Positive precision of G and H (bench quality's measure, with the trained S_m and its last Pool_sp), split
    by the positives' source image, and the geometry of raw features and head codes, on `images` training images."""
    heads, pool_sp = _heads(checkpoint)
    out = positive_precision(store, pool_size, heads, pool_sp, images=images, seed=seed)
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(store), min(len(store), images), replace=False))
    feats = torch.from_numpy(store.gather("feat", idx)).float()  # (b, h, w, C)
    b, h, w, c = feats.shape
    labels = store.gather("label", idx)
    patch_label = torch.from_numpy(np.stack([patch_labels(label_fractions(lab, h)) for lab in labels]).reshape(-1))
    image = torch.arange(b).repeat_interleave(h * w)
    f = torch.nn.functional.normalize(feats.reshape(-1, c), dim=1)
    pool_images = np.sort(rng.choice(len(store), pool_size, replace=len(store) < pool_size))
    pool_feats = torch.from_numpy(store.gather("feat", pool_images)).float().reshape(pool_size, -1, c)
    pool_ag = torch.nn.functional.normalize(pick_patches(pool_feats, torch.Generator().manual_seed(seed)), dim=1)
    with torch.no_grad():
        as_rows = lambda t: torch.nn.functional.normalize(t, dim=1).flatten(2).transpose(1, 2).reshape(b * h * w, -1)  # noqa: E731
        s_m = as_rows(heads.S_m(feats.permute(0, 3, 1, 2)))
        s = as_rows(heads.codes(feats.permute(0, 3, 1, 2)))
    out.update(positive_sources(f, PoolIndex(pool_ag, "torch").max_similarity(f), patch_label, image, "ghp"))
    out.update(positive_sources(s_m, PoolIndex(pool_sp, "torch").max_similarity(s_m), patch_label, image,
                                "task_specific"))
    out.update(code_geometry(f, patch_label, image, "raw"))
    out.update(code_geometry(s, patch_label, image, "head"))
    return out


def planted_stores(bench: PlantedBench | PlantedStegoBench, seed: int, root: Path
                   ) -> tuple[FeatureStore, FeatureStore, np.ndarray, dict[str, float]]:
    """HP's planted train and val stores of `seed` under `root`, the val labels and the cluster probe on the raw
    features (HP's and STEGO's benches share them: the same sizes and seed give the same stores)."""
    urls = {split: str(root / f"{split}.zarr") for split in ("train", "val")}
    write_store(urls["train"], bench.planted, seed, "train", bench.n_train, bench.n_views, bench.chunk_size)
    write_store(urls["val"], bench.planted, seed, "val", bench.n_val, 0, bench.chunk_size)
    train, val = FeatureStore.open(urls["train"]), FeatureStore.open(urls["val"])
    labels = val.read("label", 0, len(val))
    raw_val = list(torch.from_numpy(val.read("feat", 0, len(val))).float().permute(0, 3, 1, 2))
    raw_train = train.read("feat", 0, len(train)).reshape(-1, bench.planted.dim).astype(np.float32)
    return train, val, labels, cluster_probe(raw_train, raw_val, labels, N_CLASSES, seed)


def run_seed(bench: PlantedBench, seed: int, workdir: Path, broken: bool = True) -> dict[str, Any]:
    """Planted stores, HP (and the broken loss) trained, cluster probe on head codes and raw features."""
    t0 = time.perf_counter()
    root = Path(workdir) / f"seed-{seed}"
    train, val, labels, raw = planted_stores(bench, seed, root)
    config = train_config(bench, seed)
    pool_size = config["hp"]["pool_size"]
    out: dict[str, Any] = {"seed": seed, "raw": raw}

    def trained(name: str) -> str:
        ctx = StageContext(name=f"planted-{name}-seed{seed}", fingerprint=f"planted-{name}-{seed}", fresh=True,
                           manifest={})
        return hp_training.train(ctx, config, train, root / name)["checkpoint"]

    runs = {"head": trained("hp")}
    if broken:
        loss, calls = shuffled_positives(seed)
        with loss_replaced(loss):
            runs["broken"] = trained("broken")
        if not calls[0]:
            raise RuntimeError("the broken loss was never called: the trainer no longer reaches "
                               "pipeline.methods.hp.step.hp_loss, so the broken run would be a plain HP run")
    for name, checkpoint in runs.items():
        out[name] = cluster_probe(*_codes(checkpoint, train, val), labels, N_CLASSES, seed)
    # the trainer's initial heads: the same seed, then HPHeads (pipeline/methods/hp/training.py)
    torch.manual_seed(seed)
    start = HPHeads(bench.planted.dim, config["hp"]["head_dim"], config["hp"]["dropout"])
    out["head_start"] = cluster_probe(*_codes({"in_dim": bench.planted.dim, "head_dim": start.dim,
                                               "heads": start.state_dict()}, train, val), labels, N_CLASSES, seed)
    out["precision"] = diagnose(runs["head"], train, pool_size, bench.precision_images, seed)
    out["iterations"] = (len(train) // config["hp"]["batch_size"]) * config["hp"]["epochs"]
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


# ---------------------------------------------------------------- HCL on planted features (issue 9 §4, issue 18)
# HCL's settings (docs/hcl.md §2-§4) for a planted store of 200 images, written out like HP_TRAIN: the reference's
# optimiser, τ, momentum, MoGo sampling and bank renewal, 10 epochs with the lr drop from epoch 3; batch 16 so that an
# epoch has 12 steps (120 in all, as HP's bench); the head and the clusters of the synthetic preset's CPU scaling
# (768/2048/256/12 -> 192/512/128/4; K = 32 per bank with >= 20 points each, banks of ~2,000 / ~9,500 tokens).
HCL_TRAIN: dict[str, Any] = {
    "epochs": 10, "batch_size": 16, "lr": 1e-4, "weight_decay": 0.04, "lr_drop_epoch": 3, "lr_drop": 0.1,
    "tau": 0.07, "ema_m": 0.996, "clusters": 32, "kmeans_iterations": 20, "kmeans_min_points": 20,
    "sample_fraction": 0.3, "bank_replace": 0.5, "dim": 192, "hidden": 512, "out_dim": 128, "heads": 4,
}


@dataclass(frozen=True)
class PlantedHCLBench:
    """Sizes of HCL's planted bench (R crops with V variants per image) and its settings over HCL_TRAIN."""

    n_train: int = 200
    n_val: int = 64
    crops: int = 2
    n_views: int = 2
    chunk_size: int = 16
    hcl: dict[str, Any] = field(default_factory=dict)
    planted: PlantedSettings = PlantedSettings()


def hcl_config(bench: PlantedHCLBench, seed: int, epochs: int | None = None) -> dict[str, Any]:
    """A whole config whose [hcl] section carries HCL_TRAIN (and the bench's replacements), seeded by `seed`."""
    h = {**HCL_TRAIN, **bench.hcl, "seed": seed, **({"epochs": epochs} if epochs is not None else {})}
    return load_config("synthetic", {**{f"hcl.{k}": v for k, v in h.items()}, "train.method": "hcl",
                                     "evaluate.protocol": "kmeans", "train.checkpoint_interval": 10**9})


def shuffle_within_kind(k: torch.Tensor, fg_mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """k (..., d) with its rows permuted over the batch's tokens, foreground among foreground and background among
    background (fg_mask (...)): each kind's loss sees the same keys, each on another token (random, seeded)."""
    flat, fg = k.reshape(-1, k.shape[-1]), fg_mask.reshape(-1).bool().cpu()
    source = torch.arange(len(fg))
    for kind in (fg, ~fg):
        tokens = kind.nonzero().squeeze(1)
        source[tokens] = tokens[torch.randperm(len(tokens), generator=generator)]
    return flat[source.to(k.device)].reshape(k.shape)


def target_agreement(k: torch.Tensor, shuffled: torch.Tensor, fg_mask: torch.Tensor,
                     centroids: dict[str, Any]) -> tuple[int, int, float]:
    """(tokens, tokens whose MoGo target a(i) from `shuffled` is the one from their own key, the count expected by
    chance: Σ_kind Σ_j n_j² / n_kind for targets drawn independently with the same shares)."""
    d = k.shape[-1]
    with torch.no_grad(), torch.autocast(k.device.type, enabled=False):
        k, shuffled, fg = k.reshape(-1, d).float(), shuffled.reshape(-1, d).float(), fg_mask.reshape(-1).bool()
        same, chance = 0, 0.0
        for kind, tokens in (("fg", fg), ("bg", ~fg)):
            if not tokens.any():
                continue
            raw = centroids[kind]["raw"].float()
            plain = nearest_l2(k[tokens], raw)
            same += int((nearest_l2(shuffled[tokens], raw) == plain).sum())
            counts = torch.bincount(plain).double()
            chance += float((counts * counts).sum() / counts.sum())
    return len(fg), same, chance


def shuffled_targets(seed: int) -> tuple[Any, dict[str, float]]:
    """A deliberately broken HCL loss: hcl_loss with the momentum keys k shuffled across the batch's tokens within
    their kind (`shuffle_within_kind`), so that each token's MoGo target a(i) and its prediction target are another
    token's (no information about the token; L_fg and L_bg keep their target shares).

    Returns the loss and its record: the calls (the bench checks the trainer made them) and, over all calls, the
    tokens, those whose target is still their own one, and the count chance gives (`target_agreement`).
    """
    generator = torch.Generator().manual_seed(30_000 + seed)
    record: dict[str, float] = {"calls": 0, "tokens": 0, "same_target": 0, "chance_target": 0.0}

    def loss(q: torch.Tensor, k: torch.Tensor, pred_q: torch.Tensor, fg_mask: torch.Tensor,
             fg_centroids: dict[str, torch.Tensor], bg_centroids: dict[str, torch.Tensor],
             tau: float = 0.07) -> dict[str, torch.Tensor]:
        shuffled = shuffle_within_kind(k.detach(), fg_mask, generator)
        tokens, same, chance = target_agreement(k, shuffled, fg_mask, {"fg": fg_centroids, "bg": bg_centroids})
        record["calls"] += 1
        record["tokens"] += tokens
        record["same_target"] += same
        record["chance_target"] += chance
        return hcl_loss(q, shuffled, pred_q, fg_mask, fg_centroids, bg_centroids, tau)

    return loss, record


def run_seed_hcl(bench: PlantedHCLBench, seed: int, workdir: Path, broken: bool = True) -> dict[str, Any]:
    """Planted HCL stores, HCL trained by its own trainer, the cluster probe on HCL's segmentation features at the
    start (the trainer's initial model), after half the epochs and at the end, on the raw (finest) features, and on
    those of a run trained with shuffled targets (`shuffled_targets`: the broken run).

    The middle point is a real stop: the run is trained for half the epochs, then resumed to the end by the
    trainer's own resume (HCL's schedule depends on the epoch alone, so the run is the same as one without a stop).
    """
    t0 = time.perf_counter()
    root = Path(workdir) / f"hcl-seed-{seed}"
    s = bench.planted
    train = FeatureStore.open(write_hcl_store(str(root / "train.zarr"), s, seed, "train", bench.n_train,
                                              bench.crops, bench.n_views, bench.chunk_size))
    val = FeatureStore.open(write_hcl_store(str(root / "val.zarr"), s, seed, "val", bench.n_val,
                                            chunk_size=bench.chunk_size))
    labels = val.read("label", 0, len(val))
    raw_val = list(torch.from_numpy(val.read("feat", 0, len(val))).float().permute(0, 3, 1, 2))
    raw_train = train.read("feat", 0, len(train)).reshape(-1, s.dim).astype(np.float32)
    out: dict[str, Any] = {"seed": seed, "raw": cluster_probe(raw_train, raw_val, labels, N_CLASSES, seed)}
    config = hcl_config(bench, seed)
    epochs = config["hcl"]["epochs"]
    width = (len(hcl_patch_sizes(s)) + 1) * s.dim
    # the trainer's initial model: the same seed, then build_model (pipeline/methods/hcl/training.py)
    torch.manual_seed(seed)
    start = {"method": "hcl", "width": width, "hcl": config["hcl"], "patch_sizes": list(hcl_patch_sizes(s)),
             "model": build_model(width, config["hcl"]).state_dict()}
    out["start"] = cluster_probe(*_codes(start, train, val), labels, N_CLASSES, seed)
    for name, stop, fresh in (("middle", epochs // 2, True), ("end", epochs, False)):
        ctx = StageContext(name=f"planted-hcl-seed{seed}", fingerprint=f"planted-hcl-{seed}", fresh=fresh,
                           manifest={})
        result = hcl_training.train(ctx, hcl_config(bench, seed, stop), train, root / "hcl")
        out[name] = cluster_probe(*_codes(result["checkpoint"], train, val), labels, N_CLASSES, seed)
        out[f"{name}_iteration"] = result["iterations"]
    if broken:
        loss, record = shuffled_targets(seed)
        ctx = StageContext(name=f"planted-hcl-broken-seed{seed}", fingerprint=f"planted-hcl-broken-{seed}",
                           fresh=True, manifest={})
        with replaced(hcl_step, "hcl_loss", loss):
            result = hcl_training.train(ctx, config, train, root / "broken")
        if record["calls"] != result["iterations"]:
            raise RuntimeError(f"the broken loss was called {record['calls']} times in {result['iterations']} steps: "
                               "HCL's training step no longer calls pipeline.methods.hcl.step.hcl_loss, so the "
                               "broken run would be (partly) a plain HCL run")
        out["broken"] = cluster_probe(*_codes(result["checkpoint"], train, val), labels, N_CLASSES, seed)
        out["broken_targets"] = {"calls": record["calls"], "tokens": record["tokens"],
                                 "same_target": round(100 * record["same_target"] / record["tokens"], 1),
                                 "chance_target": round(100 * record["chance_target"] / record["tokens"], 1)}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def planted_hcl_quality(seeds: int, workdir: Path, as_json: bool,
                        bench: PlantedHCLBench | None = None) -> dict[str, Any]:
    """HCL on planted features: every seed printed as it finishes, then the figures (JSON on the last line)."""
    bench = bench or PlantedHCLBench()
    results = per_seed(seeds, lambda seed: run_seed_hcl(bench, seed, Path(workdir) / "bench-planted"), lambda r: (
        f"[planted] HCL seed {r['seed']}: cluster mIoU raw {r['raw']['miou']:.2f}  HCL at the start "
        f"{r['start']['miou']:.2f}, iteration {r['middle_iteration']} {r['middle']['miou']:.2f}, "
        f"iteration {r['end_iteration']} {r['end']['miou']:.2f}  broken (shuffled targets) "
        f"{r['broken']['miou']:.2f}  | tokens whose target survived the shuffle: "
        f"{r['broken_targets']['same_target']:.1f}% (chance {r['broken_targets']['chance_target']:.1f}%)  "
        f"{r['seconds']:.0f}s"))
    per = {name: [r[name]["miou"] for r in results] for name in ("end", "raw", "start", "middle", "broken")}
    figures = {
        "hcl_miou": _mean(per["end"]), "raw_miou": _mean(per["raw"]),
        "hcl_start_miou": _mean(per["start"]), "hcl_middle_miou": _mean(per["middle"]),
        "hcl_broken_miou": _mean(per["broken"]),
        "hcl_minus_raw_miou": round(_mean(per["end"]) - _mean(per["raw"]), 2),
        "hcl_minus_start_miou": round(_mean(per["end"]) - _mean(per["start"]), 2),
        "hcl_broken_minus_raw_miou": round(_mean(per["broken"]) - _mean(per["raw"]), 2),
        "seeds": [r["seed"] for r in results],
        "hcl_miou_per_seed": per["end"], "raw_miou_per_seed": per["raw"],
        "hcl_start_miou_per_seed": per["start"], "hcl_middle_miou_per_seed": per["middle"],
        "hcl_broken_miou_per_seed": per["broken"],
        "broken_same_target_per_seed": [r["broken_targets"]["same_target"] for r in results],
        "broken_chance_target_per_seed": [r["broken_targets"]["chance_target"] for r in results],
        "iterations": results[0]["end_iteration"], "middle_iteration": results[0]["middle_iteration"],
        "train_images": bench.n_train, "crops": bench.crops, "views": bench.n_views, "val_images": bench.n_val,
        "hcl_settings": {k: hcl_config(bench, 0)["hcl"][k] for k in HCL_TRAIN},
        "planted": dataclasses.asdict(bench.planted),
        "seconds": round(sum(r["seconds"] for r in results), 1), "threads": torch.get_num_threads(),
    }
    report(figures, as_json)
    return figures


# ---------------------------------------------------------------- STEGO on planted features (issue 27 §6)
# Every [stego] setting STEGO's result depends on, for HP's planted store of 200 scenes, written out like HP_TRAIN:
# the loss weights and shifts, Adam's lr, the dropout and the neighbour ranks of the ViT-S/8 COCO configuration
# (presets.toml [defaults.stego]); the head width and the S = 7 sampled points per side of the synthetic preset,
# whose stores have this grid (14 × 14 patches); batch 16 for 10 epochs: 12 batches an epoch, 120 in all, as HP's
# and HCL's benches (max_steps 0: whole epochs).
STEGO_TRAIN: dict[str, Any] = {
    "head_dim": 32, "batch_size": 16, "max_steps": 0, "epochs": 10, "lr": 5e-4, "feature_samples": 7,
    "neg_samples": 5, "num_neighbors": 7, "pointwise": True, "zero_clamp": True, "stabilize": False,
    "w_intra": 0.67, "w_inter": 0.25, "w_neg": 0.63, "b_intra": 0.08, "b_inter": 0.02, "b_neg": 0.66,
    "correspondence_weight": 1.0, "dropout": 0.1,
}
# The neighbour table's [stego_cache] settings: the reference's 30 neighbours and its dropout before pooling.
STEGO_KNN: dict[str, Any] = {"knn_size": 30, "knn_dropout": 0.1, "knn_seed": 0}


@dataclass(frozen=True)
class PlantedStegoBench:
    """Sizes of STEGO's planted bench (HP's stores: the same sizes give the same stores) and its settings over
    STEGO_TRAIN and STEGO_KNN."""

    n_train: int = 200
    n_val: int = 64
    chunk_size: int = 16
    n_views: int = 2  # unused by STEGO; kept so that the train store is HP's bench's, raw figure included
    stego: dict[str, Any] = field(default_factory=dict)  # replaces STEGO_TRAIN's entries (tests, experiments)
    knn: dict[str, Any] = field(default_factory=dict)  # replaces STEGO_KNN's entries
    planted: PlantedSettings = PlantedSettings()


def stego_config(bench: PlantedStegoBench, seed: int) -> dict[str, Any]:
    """A whole config whose [stego] and [stego_cache] carry STEGO_TRAIN and STEGO_KNN (and the bench's
    replacements) over any preset value, seeded by `seed`; the k-means protocol, so that no online probe trains."""
    s = {**STEGO_TRAIN, **bench.stego, "seed": seed}
    knn = {**STEGO_KNN, **bench.knn}
    return load_config("synthetic", {**{f"stego.{k}": v for k, v in s.items()},
                                     **{f"stego_cache.{k}": v for k, v in knn.items()}, "train.method": "stego",
                                     "evaluate.protocol": "kmeans", "train.checkpoint_interval": 10**9})


def neighbour_table(config: dict[str, Any], store: FeatureStore, root: Path) -> dict[str, Any]:
    """The knn-train stage's own body (pipeline/methods/stego/stages.py) on the planted train store: global
    features, then the nearest crops by faiss. Returns the stage's manifest as STEGO's trainer reads it upstream."""
    job = SimpleNamespace(config=config, upstream=lambda step, stage: {
        "outputs": {"store": store.url}, "fingerprint": store.attrs["fingerprint"]})
    step = SimpleNamespace(config={"store": str(root / "stego-knn-train.zarr")})
    ctx = StageContext(name="planted-knn", fingerprint=f"planted-knn-{store.attrs['fingerprint']}", fresh=True,
                       manifest={})
    return {"outputs": knn_body(job, step, ctx)}


def random_neighbours(seed: int) -> tuple[Any, list[int]]:
    """A deliberately broken STEGO: `read_table` whose table keeps each crop at rank 0 and replaces every other
    rank by a random other crop, so that each positive is a random image (no information). Returns the reader and
    a call counter (the bench checks the trainer read through it)."""
    rng = np.random.default_rng(20_000 + seed)
    calls = [0]

    def read(manifest: dict[str, Any], n_samples: int) -> np.ndarray:
        calls[0] += 1
        k = stego_stages.read_table(manifest, n_samples).shape[1]
        others = (np.arange(n_samples)[:, None] + rng.integers(1, n_samples, (n_samples, k - 1))) % n_samples
        return np.concatenate([np.arange(n_samples)[:, None], others], axis=1).astype(np.int64)

    return read, calls


def recorded_positives() -> tuple[Any, list[tuple[np.ndarray, np.ndarray]]]:
    """STEGO's `positives` that also keeps every (anchors, positives) pair it draws: what the trainer really used."""
    original = stego_training.positives
    drawn: list[tuple[np.ndarray, np.ndarray]] = []

    def draw(table: np.ndarray, index: torch.Tensor, num_neighbors: int, generator: torch.Generator) -> np.ndarray:
        pos = original(table, index, num_neighbors, generator)
        drawn.append((index.numpy().copy(), np.asarray(pos).copy()))
        return pos

    return draw, drawn


@contextlib.contextmanager
def replaced(owner: Any, name: str, value: Any) -> Iterator[None]:
    """`owner.name` is `value` while inside (STEGO's trainer looks its table reader and positives up there)."""
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


def positive_figures(drawn: list[tuple[np.ndarray, np.ndarray]], table: np.ndarray, num_neighbors: int,
                     mix: np.ndarray) -> dict[str, float]:
    """What the positives a run drew were: the share among the anchor's `num_neighbors` nearest crops of the real
    table (100 for a plain run, chance for a broken one), and their class overlap with the anchor (Σ_c min of the
    two images' pixel shares; 100: the same classes in the same proportions)."""
    anchors = np.concatenate([a for a, _ in drawn])
    pos = np.concatenate([p for _, p in drawn])
    in_table = (table[anchors, 1:num_neighbors + 1] == pos[:, None]).any(1)
    overlap = np.minimum(mix[anchors], mix[pos]).sum(1)
    return {"in_table": round(100 * float(in_table.mean()), 1), "class_overlap": round(100 * float(overlap.mean()), 1),
            "drawn": len(pos)}


def run_seed_stego(bench: PlantedStegoBench, seed: int, workdir: Path, broken: bool = True) -> dict[str, Any]:
    """HP's planted stores, the neighbour table by STEGO's own knn stage, STEGO trained by its own trainer (and with a
    random neighbour table: the broken run), the cluster probe on the codes of the trainer's initial head, of the
    trained heads, and on the raw features."""
    t0 = time.perf_counter()
    root = Path(workdir) / f"stego-seed-{seed}"
    train, val, labels, raw = planted_stores(bench, seed, root)
    out: dict[str, Any] = {"seed": seed, "raw": raw}
    config = stego_config(bench, seed)
    s = config["stego"]
    manifest = neighbour_table(config, train, root)
    table = stego_stages.read_table(manifest, len(train))
    train_labels = train.read("label", 0, len(train))
    mix = np.stack([np.bincount(lab.ravel(), minlength=N_CLASSES) / lab.size for lab in train_labels])

    def trained(name: str) -> str:
        ctx = StageContext(name=f"planted-stego-{name}-seed{seed}", fingerprint=f"planted-stego-{name}-{seed}",
                           fresh=True, manifest={})
        draw, drawn = recorded_positives()
        with replaced(stego_training, "positives", draw):
            result = stego_training.train(ctx, config, train, root / name, {"knn-train": manifest})
        out[f"{name}_positives"] = positive_figures(drawn, table, s["num_neighbors"], mix)
        out["iterations"] = result["iterations"]
        return result["checkpoint"]

    runs = {"head": trained("head")}
    if broken:
        read, calls = random_neighbours(seed)
        with replaced(stego_training, "read_table", read):
            runs["broken"] = trained("broken")
        if not calls[0]:
            raise RuntimeError("the random neighbour table was never read: STEGO's trainer no longer reads its table "
                               "through pipeline.methods.stego.training.read_table, so the broken run would be a "
                               "plain STEGO run")
    for name, checkpoint in runs.items():
        out[name] = cluster_probe(*_codes(checkpoint, train, val), labels, N_CLASSES, seed)
    # the trainer's initial head: the same seed, then StegoHead (StegoTraining.build)
    torch.manual_seed(seed)
    start = StegoHead(bench.planted.dim, s["head_dim"], s["dropout"])
    out["start"] = cluster_probe(*_codes({"method": "stego", "in_dim": bench.planted.dim, "head_dim": s["head_dim"],
                                          "dropout": s["dropout"], "head": start.state_dict()}, train, val),
                                 labels, N_CLASSES, seed)
    ranks = table[:, 1:s["num_neighbors"] + 1]
    others = ~np.eye(len(mix), dtype=bool)
    out["table_class_overlap"] = round(100 * float(np.minimum(mix[:, None], mix[ranks]).sum(-1).mean()), 1)
    out["chance_class_overlap"] = round(100 * float(np.minimum(mix[:, None], mix[None]).sum(-1)[others].mean()), 1)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def planted_stego_quality(seeds: int, workdir: Path, as_json: bool,
                          bench: PlantedStegoBench | None = None) -> dict[str, Any]:
    """STEGO on planted features: every seed printed as it finishes, then the figures (JSON on the last line)."""
    bench = bench or PlantedStegoBench()
    results = per_seed(seeds, lambda seed: run_seed_stego(bench, seed, Path(workdir) / "bench-planted"), lambda r: (
        f"[planted] STEGO seed {r['seed']}: cluster mIoU raw {r['raw']['miou']:.2f}  STEGO head "
        f"{r['head']['miou']:.2f}  broken (random neighbours) {r['broken']['miou']:.2f}  (head at the start "
        f"{r['start']['miou']:.2f})  | positives' class overlap with the anchor: neighbours "
        f"{r['table_class_overlap']:.1f}%, random {r['chance_class_overlap']:.1f}%  {r['seconds']:.0f}s"))
    per = {name: [r[name]["miou"] for r in results] for name in ("head", "raw", "broken", "start")}
    figures = {
        "stego_miou": _mean(per["head"]), "raw_miou": _mean(per["raw"]), "broken_miou": _mean(per["broken"]),
        "stego_start_miou": _mean(per["start"]),
        "stego_minus_raw_miou": round(_mean(per["head"]) - _mean(per["raw"]), 2),
        "stego_minus_start_miou": round(_mean(per["head"]) - _mean(per["start"]), 2),
        "broken_minus_raw_miou": round(_mean(per["broken"]) - _mean(per["raw"]), 2),
        "broken_beats_raw": _mean(per["broken"]) > _mean(per["raw"]),
        "seeds": [r["seed"] for r in results],
        "stego_miou_per_seed": per["head"], "raw_miou_per_seed": per["raw"], "broken_miou_per_seed": per["broken"],
        "stego_start_miou_per_seed": per["start"],
        "stego_acc_per_seed": [r["head"]["acc"] for r in results],
        "raw_acc_per_seed": [r["raw"]["acc"] for r in results],
        "broken_acc_per_seed": [r["broken"]["acc"] for r in results],
        "table_class_overlap_per_seed": [r["table_class_overlap"] for r in results],
        "chance_class_overlap_per_seed": [r["chance_class_overlap"] for r in results],
        "positives_in_table_per_seed": [r["head_positives"]["in_table"] for r in results],
        "broken_positives_in_table_per_seed": [r["broken_positives"]["in_table"] for r in results],
        "train_images": bench.n_train, "val_images": bench.n_val, "iterations": results[0]["iterations"],
        "stego_settings": {k: stego_config(bench, 0)["stego"][k] for k in STEGO_TRAIN},
        "knn_settings": {k: stego_config(bench, 0)["stego_cache"][k] for k in STEGO_KNN},
        "planted": dataclasses.asdict(bench.planted),
        "seconds": round(sum(r["seconds"] for r in results), 1), "threads": torch.get_num_threads(),
    }
    report(figures, as_json)
    return figures


def planted_bench(method: str) -> tuple[Any, PlantedBench | PlantedHCLBench | PlantedStegoBench]:
    """(the quality run, its bench settings) of `bench quality --planted --method M`."""
    benches = {"hp": (planted_quality, PlantedBench()), "hcl": (planted_hcl_quality, PlantedHCLBench()),
               "stego": (planted_stego_quality, PlantedStegoBench())}
    if method not in benches:
        raise UserError(f"bench quality --planted has no planted bench for method '{method}' (benches: "
                        f"{', '.join(benches)})")
    return benches[method]


def with_style(bench: PlantedBench | PlantedHCLBench | PlantedStegoBench, style: float | None
               ) -> PlantedBench | PlantedHCLBench | PlantedStegoBench:
    """The bench, or a control run of it whose generator has another image-style strength (`--style`): the bench's
    own setting (1.1) was fixed from the raw figure alone and is never changed; a control says what the style does."""
    if style is None:
        return bench
    if not (style >= 0 and np.isfinite(style)):
        raise UserError(f"--style must be a finite number >= 0, got {style}")
    log.info(f"[planted] control run: image style {style:g} (the bench's generator uses {bench.planted.style:g})")
    return dataclasses.replace(bench, planted=dataclasses.replace(bench.planted, style=style))


def per_seed(seeds: int, run: Callable[[int], dict[str, Any]], line: Callable[[dict[str, Any]], str]
             ) -> list[dict[str, Any]]:
    """`run(seed)` for seeds 0..seeds-1, each result's `line` printed as it finishes (a bench is minutes a seed)."""
    if seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {seeds}")
    results = []
    for seed in range(seeds):
        results.append(run(seed))
        log.info(line(results[-1]))
    return results


def _mean(values: list[float]) -> float:
    return round(statistics.fmean(values), 2)


def planted_quality(seeds: int, workdir: Path, as_json: bool, bench: PlantedBench | None = None) -> dict[str, Any]:
    """Every seed printed as it finishes, then the figures (means over seeds first; JSON on the last line)."""
    bench = bench or PlantedBench()

    def line(r: dict[str, Any]) -> str:
        p = r["precision"]
        return (f"[planted] seed {r['seed']}: cluster mIoU raw {r['raw']['miou']:.2f}  "
                f"HP head {r['head']['miou']:.2f}  broken loss {r['broken']['miou']:.2f}  "
                f"(head at the start {r['head_start']['miou']:.2f})  "
                f"| positive precision G {p['ghp_precision']:.1f}% "
                f"({p['ghp_own_image_share']:.0f}% from the anchor's image, {p['ghp_own_image_precision']:.0f}% "
                f"precise there, {p['ghp_cross_image_precision']:.0f}% across images)  H "
                f"{p['task_specific_precision']:.1f}%  chance {p['positives_chance']:.1f}%  {r['seconds']:.0f}s")

    results = per_seed(seeds, lambda seed: run_seed(bench, seed, Path(workdir) / "bench-planted"), line)
    per = {name: [r[name]["miou"] for r in results] for name in ("head", "raw", "broken", "head_start")}
    prec = {key: [r["precision"][key] for r in results] for key in results[0]["precision"]}
    cfg = train_config(bench, 0)["hp"]
    figures = {
        "head_miou": _mean(per["head"]), "raw_miou": _mean(per["raw"]), "broken_miou": _mean(per["broken"]),
        "head_minus_raw_miou": round(_mean(per["head"]) - _mean(per["raw"]), 2),
        "broken_minus_raw_miou": round(_mean(per["broken"]) - _mean(per["raw"]), 2),
        "head_beats_raw_by_5": _mean(per["head"]) >= _mean(per["raw"]) + 5,  # issue 9 §4's target
        "broken_beats_raw": _mean(per["broken"]) > _mean(per["raw"]),  # must stay false: the bench can fail
        "seeds": [r["seed"] for r in results],
        "head_start_miou": _mean(per["head_start"]),  # the trainer's initial heads: what training changed
        "head_miou_per_seed": per["head"], "head_start_miou_per_seed": per["head_start"],
        "raw_miou_per_seed": per["raw"], "broken_miou_per_seed": per["broken"],
        "head_acc_per_seed": [r["head"]["acc"] for r in results],
        "raw_acc_per_seed": [r["raw"]["acc"] for r in results],
        "broken_acc_per_seed": [r["broken"]["acc"] for r in results],
        **{f"{key}_per_seed": values for key, values in prec.items()},
        "train_images": bench.n_train, "val_images": bench.n_val, "iterations": results[0]["iterations"],
        "train_settings": {k: cfg[k] for k in HP_TRAIN},
        "planted": dataclasses.asdict(bench.planted),
        "seconds": round(sum(r["seconds"] for r in results), 1),
        "threads": torch.get_num_threads(),
    }
    report(figures, as_json)
    return figures
