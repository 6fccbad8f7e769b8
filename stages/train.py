"""`train`: the configured method's heads trained from the feature cache alone (docs/hp.md §2-§5, docs/hcl.md §2-§4).

The stage asks the configured method (pipeline/methods/registry.py) for its store and trainer (HP:
pipeline/methods/hp/training.py, HCL: pipeline/methods/hcl/training.py, ...; all run
the loop of pipeline/training/trainer.py) and records the run. A run lives in `<workdir>/<dataset>/runs/<run>/`:
checkpoints/last.pt (atomic, every `checkpoint_interval` iterations and at the end), metrics.jsonl, curves.png. A
killed run resumes from its checkpoint to the same final weights as an uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cache.reader import FeatureStore
from pipeline.config import Config
from pipeline.methods.registry import method_of
from pipeline.orchestration import paths, runs
from pipeline.orchestration.graph import Build, Step, build
from pipeline.orchestration.runner import StageContext
from pipeline.orchestration.stage import implement


def run(config: Config, workdir: Path, run: str | None = None, force: bool = False,
        replace: bool = False) -> dict[str, Any]:
    """Train the configured method (train.method) into run `run` (default: the method's name), its store first.

    A run that exists with other settings is refused before anything runs (`preflight`), unless `force`
    (start over) or `replace` (evaluate --force: retrain it if its settings differ, reuse it if they do not). The
    run's whole config is recorded in its folder (pipeline/orchestration/runs.py) for evaluate, predict, report and
    status.
    """
    return build(config, workdir, "train", run=run, force=force, replace=replace)


def preflight(job: Build, step: Step) -> None:
    """Before the features stage: a run with other settings is refused, and a refused command changes nothing."""
    if not (job.force or job.replace):
        out = paths.run_dir(job.config, job.workdir, step.run)
        runs.refuse_to_replace(job.sdir, step.run, step.config, step.inputs, paths.checkpoint_path(out), job.config)


def body(job: Build, step: Step, ctx: StageContext) -> dict[str, Any]:
    """The method's trainer on the store its features stage wrote (it records the fingerprint of that stage)."""
    method = method_of(job.config)
    upstream = {name: job.upstream(step, name) for name in step.inputs}  # by declared stage name
    features = upstream[method.stores["train"]]  # features-train, or HCL's own features-train-hcl
    store = FeatureStore.open(features["outputs"]["store"],
                              expect={"split": "train", "fingerprint": features["fingerprint"]})
    method.check_store(store)  # a clear message when the store lacks what the method needs
    return method.train(ctx, job.config, store, paths.run_dir(job.config, job.workdir, step.run), upstream,
                        preview=method.store_url(job.config, job.workdir, "val"))  # TensorBoard's val images


def then(job: Build, step: Step, manifest: dict[str, Any]) -> None:
    """A run from before records existed gets one now."""
    runs.ensure_record(paths.run_dir(job.config, job.workdir, step.run), job.config)


# this module's functions for the stages the graph declares (pipeline/orchestration/stage.py)
implement("train", body=body, preflight=preflight, then=then)
