"""`hp-pipe bench precision`: what bf16 autocast does to a trained run, not only to a step.

The same HP run twice, `train.amp = false` (fp32) and `train.amp = true` (bf16 autocast), on the same store: a
synthetic run of `iterations` iterations through the real stages (its loss curves compared point by point, its
cluster mIoU from the evaluate stage) and the planted bench's HP run (`benches/planted.py`, whose head mIoU is known
to move with the method). On a CPU without native bf16 the bf16 run is slower (emulated products): this bench
measures quality, the speed figures are `bench train --amp on|off`'s.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from benches.features import report
from benches.machine import machine
from pipeline.config import load_config
from pipeline.orchestration import paths
from pipeline.orchestration.graph import build
from pipeline.orchestration.runner import read_manifest

AMPS = {"fp32": "false", "bf16": "true"}


def synthetic_run(workdir: Path, iterations: int, amp: str) -> dict[str, Any]:
    """One synthetic HP run with train.amp = `amp`, trained and evaluated; its logged losses and cluster mIoU."""
    preset = load_config("synthetic")
    per_epoch = preset["dataset"]["n_train"] * 5 // preset["hp"]["batch_size"]  # five crops per image
    config = load_config("synthetic", {"train.amp": amp, "hp.epochs": math.ceil(iterations / per_epoch),
                                       "evaluate.protocol": "kmeans", "run.tensorboard": "false"})
    run = f"precision-{amp}"
    manifest = build(config, workdir, "evaluate", run=run)
    records = [json.loads(line) for line in
               (paths.run_dir(config, workdir, run) / "metrics.jsonl").read_text().splitlines()]
    metrics = json.loads(Path(manifest["outputs"]["metrics"]).read_text())
    cluster = next(r for r in metrics["results"] if r["name"] == "HP cluster")
    train = read_manifest(paths.stage_dir(config, workdir), f"train-{run}") or {}
    return {"losses": {r["iteration"]: r["loss"] for r in records}, "miou": cluster["miou"],
            "iterations": records[-1]["iteration"], "precision": metrics["protocol"]["precision"],
            "train_seconds": train.get("timings", {}).get("train_seconds")}


def curve_picture(runs: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    for name, run in runs.items():
        top.plot(list(run["losses"]), list(run["losses"].values()), label=f"{name} (cluster mIoU {run['miou']:.1f})")
    common = sorted(set(runs["fp32"]["losses"]) & set(runs["bf16"]["losses"]))
    bottom.plot(common, [runs["bf16"]["losses"][i] - runs["fp32"]["losses"][i] for i in common])
    top.set_ylabel("loss")
    top.legend()
    bottom.set_ylabel("bf16 − fp32")
    bottom.set_xlabel("iteration")
    top.set_title("HP on the synthetic set: train.amp = true (bf16) against false (fp32)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def precision(workdir: Path, iterations: int, planted_seeds: int, as_json: bool) -> dict[str, Any]:
    from benches.planted import PlantedBench, run_seed

    root = Path(workdir) / "bench-precision"
    runs = {name: synthetic_run(root, iterations, amp) for name, amp in AMPS.items()}
    common = sorted(set(runs["fp32"]["losses"]) & set(runs["bf16"]["losses"]))
    gaps = np.array([abs(runs["bf16"]["losses"][i] - runs["fp32"]["losses"][i]) for i in common])
    scale = np.array([abs(runs["fp32"]["losses"][i]) for i in common])
    picture = root / "loss_curves.png"
    curve_picture(runs, picture)
    figures: dict[str, Any] = {
        "machine": machine(), "iterations": runs["fp32"]["iterations"],
        "precision_fp32": runs["fp32"]["precision"], "precision_bf16": runs["bf16"]["precision"],
        "loss_points_compared": len(common),
        "loss_max_abs_gap": round(float(gaps.max()), 4), "loss_mean_rel_gap": round(float((gaps / scale).mean()), 5),
        "final_loss_fp32": runs["fp32"]["losses"][common[-1]], "final_loss_bf16": runs["bf16"]["losses"][common[-1]],
        "cluster_miou_fp32": runs["fp32"]["miou"], "cluster_miou_bf16": runs["bf16"]["miou"],
        "cluster_miou_bf16_minus_fp32": round(runs["bf16"]["miou"] - runs["fp32"]["miou"], 2),
        "train_seconds_fp32": runs["fp32"]["train_seconds"], "train_seconds_bf16": runs["bf16"]["train_seconds"],
        "loss_curves": str(picture),
    }
    planted = {name: [] for name in AMPS}
    for seed in range(planted_seeds):
        for name, amp in AMPS.items():
            bench = dataclasses.replace(PlantedBench(), train={"amp": amp == "true"})
            planted[name].append(run_seed(bench, seed, root / f"planted-{name}", broken=False)["head"]["miou"])
    if planted_seeds:
        figures.update({"planted_seeds": planted_seeds, "planted_head_miou_fp32": planted["fp32"],
                        "planted_head_miou_bf16": planted["bf16"],
                        "planted_head_miou_bf16_minus_fp32": round(float(np.mean(planted["bf16"])
                                                                         - np.mean(planted["fp32"])), 2)})
    report(figures, as_json)
    return figures
