"""The one training loop both methods run (docs/hp.md §2-§5, docs/hcl.md §2-§4), and what it is made of.

`train` owns what a run is, whatever the method: the device and the run plan, the seeds, resume with every RNG,
the NaN guard, the atomic checkpoints (pipeline/training/checkpoints.py), metrics.jsonl and TensorBoard (MetricsLog),
the
progress bar, the log and checkpoint intervals, the curves and the stage outputs. A method adds its state and its
step through `MethodHooks` (HP: pipeline/methods/hp/training.py, HCL: pipeline/methods/hcl/training.py), so resume,
the NaN guard
and checkpoint correctness are written once.

A run lives in `<workdir>/<dataset>/runs/<run>/` (pipeline/orchestration/paths.py): checkpoints/last.pt (every
`train.checkpoint_interval` iterations and at the end), metrics.jsonl, curves.png. A killed run resumes from its
checkpoint to the same final weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm import tqdm

from cache.reader import FeatureStore
from pipeline import precision
from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.files import atomic_write_text
from pipeline.orchestration import paths, runs
from pipeline.orchestration.runner import StageContext
from pipeline.reporting.plots import CURVES, training_curves
from pipeline.reporting.tensorboard import open_training_board
from pipeline.training.checkpoints import load_checkpoint, save_checkpoint
from pipeline.wording import plural


# ---------------------------------------------------------------- what a method adds
class StepResult(Protocol):
    loss: torch.Tensor  # the scalar the optimizer steps on
    terms: dict[str, float]  # its parts, logged as they are


class MethodHooks(Protocol):
    """A method's part of the loop, called in this order: `build` (after the seeds), then `load_state_dict` (a
    resumed run, its RNGs already restored) or `start` (a fresh run); `epoch_start` once per epoch (also when a run
    resumes mid-epoch); `inputs`, `forward` (under autocast) and `update` once per batch; `state_dict` and
    `rng_states` at each checkpoint; `finish` once, on the outputs."""

    section: str  # the config section with the method's batch_size, epochs, seed and lr
    label: str  # "HP" or "HCL": the outputs' method, the summary line, the curves' title
    curves: Any  # the panels of curves.png (pipeline/reporting/plots.py)
    epoch_images: int | None  # an epoch passes over this many images, or over the store's samples when None
    names: list[str]  # the store arrays a batch reads (set by `build`)

    def build(self, plan: RunPlan, generator: torch.Generator) -> None: ...
    def start(self) -> None: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def rng_states(self) -> dict[str, Any]: ...
    def epoch_start(self, epoch: int, checkpoint: Callable[[], None]) -> np.ndarray | None: ...
    def inputs(self, t: int, i: int, batch: dict[str, torch.Tensor]) -> Any: ...
    def forward(self, inputs: Any) -> StepResult: ...
    def update(self, out: StepResult, batch: dict[str, torch.Tensor]) -> dict[str, float]: ...
    def postfix(self, terms: dict[str, float]) -> dict[str, str]: ...
    def finish(self, outputs: dict[str, Any]) -> dict[str, Any]: ...


# ---------------------------------------------------------------- the loop
def train(ctx: StageContext, config: Config, store: FeatureStore, out: Path, method: MethodHooks,
          preview: str | None = None) -> dict[str, Any]:
    """Train `method` on `store` into the run folder `out`, from its checkpoint when it has one; the stage outputs.

    Epoch e reads the store in the order seeded by seed·1000 + e, so a run resumed at iteration t reads, from batch
    t mod (iterations per epoch) on, what the uninterrupted run read; with every RNG restored it ends on the same
    weights.
    """
    plan = plan_run(ctx, config, method.section, store, out, images=method.epoch_images)
    runs.ensure_record(out, config)  # a new (or started over) run records its settings first
    section, run_cfg = config[method.section], config["train"]
    torch.manual_seed(section["seed"])  # the weights' initialization draws from here
    generator = torch.Generator().manual_seed(section["seed"])  # every draw of the steps
    method.build(plan, generator)
    t = start_or_resume(ctx, method, plan, generator)
    log = MetricsLog(out / "metrics.jsonl", keep_until=t, config=config, log=ctx.log, preview=preview)

    def checkpoint() -> None:  # atomic, and refused if a weight is not finite (pipeline/training/checkpoints.py)
        save_checkpoint(plan.ckpt, {
            "iteration": t, **method.state_dict(),
            "rng": {**rng_states(generator, plan.device), **method.rng_states()},
            "config": config, "store": store.url, "random_init": store.random_init,
            "backbone": backbone_identity(store), "fingerprint": ctx.fingerprint, "threads": torch.get_num_threads(),
        })
        log.checkpointed(t, plan.ckpt)  # TensorBoard: overlay images of this checkpoint

    t0, t_start = time.perf_counter(), t
    with tqdm(total=plan.total, initial=t, desc=ctx.name, unit="it", smoothing=0.05) as bar:
        while t < plan.total:
            epoch, first = divmod(t, plan.iters_per_epoch)
            keep = method.epoch_start(epoch, checkpoint)  # HCL: the epoch's crops, after its MoGo pass
            batches = store.batches(method.names, section["batch_size"], shuffle_seed=section["seed"] * 1000 + epoch,
                                    drop_last=True, buffer_chunks=run_cfg["buffer_chunks"], start_batch=first,
                                    keep=keep)
            for i, batch in enumerate(batches, start=first):
                inputs = method.inputs(t, i, batch)
                with torch.autocast(plan.device.type, dtype=plan.autocast or torch.float32,
                                    enabled=plan.autocast is not None):
                    step = method.forward(inputs)
                if not torch.isfinite(step.loss):  # the NaN guard: the bad step reaches no weight, no checkpoint
                    raise UserError(f"training diverged: the loss is {step.loss.item()} at iteration {t} "
                                    f"(terms {step.terms}); {kept_checkpoint(plan.ckpt)}. "
                                    f"Check the feature store, or lower {method.section}.lr")
                terms = method.update(step, batch)
                t += 1
                bar.update(1)
                bar.set_postfix(**method.postfix(terms), refresh=False)
                if t % run_cfg["log_interval"] == 0 or t == plan.total:
                    log.append({"iteration": t, "epoch": epoch, **{k: round(v, 6) for k, v in terms.items()},
                                "seconds": round(time.perf_counter() - t0, 3)})
                if t % run_cfg["checkpoint_interval"] == 0 or t == plan.total:
                    checkpoint()
                if t == plan.total:  # max_steps may end a run inside an epoch
                    break
    return method.finish(run_outputs(ctx, plan, log, store, out, t - t_start, time.perf_counter() - t0,
                                     method.label, method.curves))


def start_or_resume(ctx: StageContext, method: MethodHooks, plan: RunPlan, generator: torch.Generator) -> int:
    """The iteration the loop starts at: the checkpoint's, with every RNG and the method's state as they were when
    it was written; else 0, after the method's first draws (HP's pools)."""
    if not plan.ckpt.exists():
        method.start()
        return 0
    state = load_checkpoint(plan.ckpt)
    restore_rng(state, generator, plan.device)
    method.load_state_dict(state)
    log_resume(ctx, state, plan.ckpt, plan.total)
    return state["iteration"]


# ---------------------------------------------------------------- the parts of a run
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
    """Every torch RNG a run draws from (numpy ones are the method's: `MethodHooks.rng_states`)."""
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
    run.tensorboard = false, the same lines as TensorBoard scalars (pipeline/reporting/tensorboard.py, same rule on
    resume)."""

    def __init__(self, path: Path, keep_until: int, config: Config | None = None, log=print,
                 preview: str | None = None):
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
        self.board = open_training_board(config, path.parent, keep_until, log, preview) if config is not None else None
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
    autocast: torch.dtype | None  # the step's autocast dtype under train.amp (pipeline/precision.py), None: fp32
    iters_per_epoch: int
    total: int
    ckpt: Path

    @property
    def loss_scaling(self) -> bool:
        """fp16 needs its loss scaled (a GradScaler, as the references on their GPUs); bf16 and fp32 do not."""
        return self.autocast == torch.float16


def plan_run(ctx: StageContext, config: Config, section: str, store: FeatureStore, out: Path,
             images: int | None = None) -> RunPlan:
    """Device, iterations (batch size and epochs, or max_steps, from the method's `section`), a fresh run folder
    when asked.

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
    # a method that counts batches (its section's `max_steps`, STEGO) runs that many, epochs following on
    total = config[section].get("max_steps") or iters_per_epoch * config[section]["epochs"]
    return RunPlan(device, precision.training_autocast(config["train"]["amp"], device.type), iters_per_epoch, total,
                   paths.checkpoint_path(out))


def run_precision(plan: RunPlan, store: FeatureStore) -> dict[str, Any]:
    """What a run's numbers depend on beyond its settings: the step's autocast dtype ("float32": none), the dtype
    the store holds its features in, and the dtype its backbone forward ran in (train manifests, reports)."""
    return {"train_autocast": precision.dtype_name(plan.autocast), "store_dtype": str(store.array("feat").dtype),
            "store_forward": store.attrs.get("extraction", {}).get("dtype", "float32")}


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
        "random_init": store.random_init, "device": str(plan.device), "precision": run_precision(plan, store),
        "timings": {"train_seconds": round(seconds, 3), **timings},
        "summary": f"{label}: {plural(plan.total, 'iteration')} ({rate:.2f} it/s"
                   + (f", {precision.dtype_name(plan.autocast)} autocast" if plan.autocast is not None else "")
                   + f"), final loss {last.get('loss', float('nan')):.4f} -> {out}"
                   + (" [RANDOM-INIT backbone features]" if store.random_init else ""),
    }
