"""What both trainers share: device, run plan, RNG states, resume messages, the metrics log and the outputs.

The method-specific loops (stages/train.py for HP, stages/train_hcl.py for HCL) call these, so resume, checkpoint
reporting and run layout are written once.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cache.reader import FeatureStore
from pipeline import paths
from pipeline.checkpoints import load_checkpoint
from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.files import atomic_write_text
from pipeline.plots import CURVES, training_curves
from pipeline.runner import StageContext
from pipeline.tensorboard import open_training_board
from pipeline.wording import plural


def backbone_identity(store: FeatureStore) -> dict[str, str]:
    """What a checkpoint records of the features it was trained on: `predict` checks its live backbone against
    it without needing the store (a run folder may be copied without its features)."""
    return {k: store.attrs[k] for k in ("backbone", "weights", "weights_hash")}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device = cuda, but no CUDA device is available; use --set train.device=cpu")
    return torch.device(name)


def rng_states(generator: torch.Generator, device: torch.device) -> dict[str, Any]:
    """Every torch RNG a run draws from (numpy ones are the caller's)."""
    return {"torch": torch.get_rng_state(), "generator": generator.get_state(),
            "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None}


def restore_rng(state: dict[str, Any], generator: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["rng"]["torch"])
    generator.set_state(state["rng"]["generator"])
    if device.type == "cuda" and state["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(state["rng"]["cuda"])


def kept_checkpoint(ckpt: Path) -> str:
    """What a stopped run leaves to resume from, said as it is."""
    if ckpt.exists():
        state = load_checkpoint(ckpt)
        return f"the last good checkpoint {ckpt} (iteration {state['iteration']}) is kept"
    return f"no checkpoint was written yet ({ckpt} does not exist): a rerun starts from the beginning"


def log_resume(ctx: StageContext, state: dict[str, Any], ckpt: Path, total: int) -> None:
    ctx.log(f"resuming from {ckpt} at iteration {state['iteration']} of {total}")
    if state.get("threads") not in (None, torch.get_num_threads()):
        ctx.log(f"note: the run started with {state['threads']} torch threads, it resumes with "
                f"{torch.get_num_threads()}: float reductions may differ in the last bits")


class MetricsLog:
    """metrics.jsonl, cut back to the checkpoint's iteration on resume so it never holds a line twice; and, unless
    run.tensorboard = false, the same lines as TensorBoard scalars (pipeline/tensorboard.py, same rule on resume)."""

    def __init__(self, path: Path, keep_until: int, config: Config | None = None, log=print):
        self.path = path
        self.records = []
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a kill
                if record["iteration"] <= keep_until:
                    self.records.append(record)
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in self.records))
        self.board = open_training_board(config, path.parent, keep_until, log) if config is not None else None
        if self.board is not None and keep_until > 0:  # its writer purged step keep_until: write that step again
            for record in [r for r in self.records if r["iteration"] == keep_until][-1:]:
                self.board.scalars(record, timed=False)  # its seconds count from another process's start
            self.checkpointed(keep_until, paths.checkpoint_path(path.parent))

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.board is not None:
            self.board.scalars(record)

    def checkpointed(self, iteration: int, checkpoint: Path) -> None:
        """Called after each checkpoint: TensorBoard's overlay images of it."""
        if self.board is not None:
            self.board.checkpointed(iteration, checkpoint)

    def close(self) -> None:
        if self.board is not None:
            self.board.close()
            self.board = None


@dataclass
class RunPlan:
    """What every trainer settles before its first step."""

    device: torch.device
    amp: bool
    iters_per_epoch: int
    total: int
    ckpt: Path


def plan_run(ctx: StageContext, config: Config, section: str, store: FeatureStore, out: Path,
             images: int | None = None) -> RunPlan:
    """Device, iterations (batch size and epochs from the method's `section`), a fresh run folder when asked.

    An epoch is one pass over the store's samples, or over `images` when given (HCL: one of each image's cached
    crops per epoch, docs/hcl.md §4).
    """
    device = pick_device(config["train"]["device"])
    batch_size = config[section]["batch_size"]
    per_epoch, what = (len(store), "training crops") if images is None else (images, "training images")
    iters_per_epoch = per_epoch // batch_size
    if iters_per_epoch == 0:
        raise UserError(f"{section}.batch_size = {batch_size} exceeds the {per_epoch} {what} in "
                        f"{store.url}; lower it with --set {section}.batch_size=N")
    if ctx.fresh and out.exists():
        shutil.rmtree(out)  # a changed config or --force: this run starts over
    out.mkdir(parents=True, exist_ok=True)
    return RunPlan(device, bool(config["train"]["amp"]) and device.type == "cuda", iters_per_epoch,
                   iters_per_epoch * config[section]["epochs"], paths.checkpoint_path(out))


def run_outputs(ctx: StageContext, plan: RunPlan, log: MetricsLog, store: FeatureStore, out: Path, steps: int,
                seconds: float, label: str, curves=CURVES, **timings: Any) -> dict[str, Any]:
    """Curves, then the stage's outputs and one-line summary (shared by the methods)."""
    log.close()
    random_init = " [random-init backbone]" if store.random_init else ""
    training_curves(log.records, out / "curves.png", title=f"{ctx.name} ({label}){random_init}", curves=curves)
    last = log.records[-1] if log.records else {}
    rate = steps / seconds if seconds > 0 else 0.0
    return {
        "method": label.lower(), "run_dir": str(out), "checkpoint": str(plan.ckpt), "iterations": plan.total,
        "iterations_per_epoch": plan.iters_per_epoch, "final": last, "store": store.url,
        "random_init": store.random_init, "device": str(plan.device),
        "timings": {"train_seconds": round(seconds, 3), **timings},
        "summary": f"{label}: {plural(plan.total, 'iteration')} ({rate:.2f} it/s), final loss "
                   f"{last.get('loss', float('nan')):.4f} -> {out}"
                   + (" [RANDOM-INIT backbone features]" if store.random_init else ""),
    }
