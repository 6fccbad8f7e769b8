"""`hp-pipe bench quality --planted`: HP against raw features on planted features whose answer is known (issue 9 §4).

For each seed: a planted train and val store (`pipeline.planted`, no backbone), the HP heads trained on the
train store by the project's own trainer (`stages.train.train`) with the synthetic preset's training settings
(already scaled to a store of 200 crops), then the cluster probe of specs/HP.md §8 (k-means on training codes,
cosine assignment at label size, Hungarian on the whole val set) on the head's codes and on the raw features.
A second run of the same trainer with the hidden positives shuffled across anchors (a deliberately broken
loss) shows the bench can fail: it must not beat raw features.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import pipeline.hp.model as hp_model
from cache.reader import FeatureStore
from pipeline.checkpoints import load_checkpoint
from pipeline.config import load_config
from pipeline.encoders import load_encoder
from pipeline.hp.loss import LossOutput, hp_loss
from pipeline.hp.model import HPHeads
from pipeline.planted import N_CLASSES, PlantedSettings, write_store
from pipeline.runner import StageContext
from stages import train as train_stage
from stages.bench import report
from stages.bench_train import cluster_probe, positive_precision
from stages.evaluate import encode_range


@dataclass(frozen=True)
class PlantedBench:
    """Sizes of the bench and the training settings layered over the synthetic preset's [train] section."""

    n_train: int = 200  # the synthetic preset's 40 images x 5 crops: its training settings fit this size
    n_val: int = 64
    chunk_size: int = 16
    n_views: int = 2
    train: dict[str, Any] = field(default_factory=lambda: {"head_dim": 64})  # D scaled to C = 64
    planted: PlantedSettings = PlantedSettings()
    precision_images: int = 16  # training images whose positives are checked against their labels


def train_config(bench: PlantedBench, seed: int) -> dict[str, Any]:
    """The synthetic preset (batch 16, 10 epochs, pool 256, warmup 20, renew 20, ...) with the bench's overrides."""
    overrides = {f"train.{k}": v for k, v in bench.train.items()}
    return load_config("synthetic", {**overrides, "train.seed": seed, "train.method": "hp"})


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


def _codes(checkpoint: str, train: FeatureStore, val: FeatureStore) -> tuple[np.ndarray, list[torch.Tensor]]:
    encoder = load_encoder(checkpoint)
    train_codes = encode_range(encoder, train, 0, len(train), 16)
    val_codes = encode_range(encoder, val, 0, len(val), 16)
    return train_codes.permute(0, 2, 3, 1).reshape(-1, train_codes.shape[1]).numpy(), list(val_codes)


def _precision(checkpoint: str, store: FeatureStore, pool_size: int, images: int, seed: int) -> dict[str, float]:
    """Positive precision of G and H (bench quality's measure) with the trained S_m and its last Pool_sp."""
    state = load_checkpoint(checkpoint)
    heads = HPHeads(state["in_dim"], state["head_dim"])
    heads.load_state_dict(state["heads"])
    heads.eval()
    return positive_precision(store, pool_size, heads, state["pool_sp"], images=images, seed=seed)


def run_seed(bench: PlantedBench, seed: int, workdir: Path, broken: bool = True) -> dict[str, Any]:
    """Planted stores, HP (and the broken loss) trained, cluster probe on head codes and raw features."""
    t0 = time.perf_counter()
    root = Path(workdir) / f"seed-{seed}"
    urls = {split: str(root / f"{split}.zarr") for split in ("train", "val")}
    write_store(urls["train"], bench.planted, seed, "train", bench.n_train, bench.n_views, bench.chunk_size)
    write_store(urls["val"], bench.planted, seed, "val", bench.n_val, 0, bench.chunk_size)
    train, val = FeatureStore.open(urls["train"]), FeatureStore.open(urls["val"])
    labels = val.read("label", 0, len(val))
    config = train_config(bench, seed)
    pool_size = config["train"]["pool_size"]

    raw_val = list(torch.from_numpy(val.read("feat", 0, len(val))).float().permute(0, 3, 1, 2))
    raw_train = train.read("feat", 0, len(train)).reshape(-1, bench.planted.dim).astype(np.float32)
    out: dict[str, Any] = {"seed": seed, "raw": cluster_probe(raw_train, raw_val, labels, N_CLASSES, seed)}

    def trained(name: str) -> str:
        ctx = StageContext(name=f"planted-{name}-seed{seed}", fingerprint=f"planted-{name}-{seed}", fresh=True,
                           manifest={})
        return train_stage.train(ctx, config, train, root / name)["checkpoint"]

    runs = {"head": trained("hp")}
    if broken:
        loss, calls = shuffled_positives(seed)
        with loss_replaced(loss):
            runs["broken"] = trained("broken")
        if not calls[0]:
            raise RuntimeError("the broken loss was never called: the trainer no longer reaches "
                               "pipeline.hp.model.hp_loss, so the broken run would be a plain HP run")
    for name, checkpoint in runs.items():
        out[name] = cluster_probe(*_codes(checkpoint, train, val), labels, N_CLASSES, seed)
    out["precision"] = _precision(runs["head"], train, pool_size, bench.precision_images, seed)
    out["iterations"] = (len(train) // config["train"]["batch_size"]) * config["train"]["epochs"]
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def _mean(values: list[float]) -> float:
    return round(statistics.fmean(values), 2)


def planted_quality(seeds: int, workdir: Path, as_json: bool, bench: PlantedBench | None = None) -> dict[str, Any]:
    """Every seed printed as it finishes, then the figures (means over seeds first; JSON on the last line)."""
    bench = bench or PlantedBench()
    if seeds < 1:
        from pipeline.errors import UserError

        raise UserError(f"--seeds must be at least 1, got {seeds}")
    workdir = Path(workdir) / "bench-planted"
    results = []
    for seed in range(seeds):
        r = run_seed(bench, seed, workdir)
        p = r["precision"]
        print(f"[planted] seed {seed}: cluster mIoU raw {r['raw']['miou']:.2f}  HP head {r['head']['miou']:.2f}  "
              f"broken loss {r['broken']['miou']:.2f}  | positive precision G {p['ghp_precision']:.1f}%  "
              f"H {p['task_specific_precision']:.1f}% (chance {p['positives_chance']:.1f}%)  {r['seconds']:.0f}s",
              flush=True)
        results.append(r)
    per = {name: [r[name]["miou"] for r in results] for name in ("head", "raw", "broken")}
    prec = {key: [r["precision"][key] for r in results] for key in results[0]["precision"]}
    cfg = train_config(bench, 0)["train"]
    figures = {
        "head_miou": _mean(per["head"]), "raw_miou": _mean(per["raw"]), "broken_miou": _mean(per["broken"]),
        "head_minus_raw_miou": round(_mean(per["head"]) - _mean(per["raw"]), 2),
        "broken_minus_raw_miou": round(_mean(per["broken"]) - _mean(per["raw"]), 2),
        "seeds": [r["seed"] for r in results],
        "head_miou_per_seed": per["head"], "raw_miou_per_seed": per["raw"], "broken_miou_per_seed": per["broken"],
        "head_acc_per_seed": [r["head"]["acc"] for r in results],
        "raw_acc_per_seed": [r["raw"]["acc"] for r in results],
        "broken_acc_per_seed": [r["broken"]["acc"] for r in results],
        **{f"{key}_per_seed": values for key, values in prec.items()},
        "train_images": bench.n_train, "val_images": bench.n_val, "iterations": results[0]["iterations"],
        "train_settings": {k: cfg[k] for k in ("head_dim", "epochs", "batch_size", "tau", "alpha", "rho",
                                               "pool_size", "renew_interval", "ema_m", "warmup")},
        "planted": dataclasses.asdict(bench.planted),
        "seconds": round(sum(r["seconds"] for r in results), 1),
        "threads": torch.get_num_threads(),
    }
    report(figures, as_json)
    return figures
