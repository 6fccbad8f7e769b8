"""The stage graph, as data, and the one executor that walks it.

The generic stages are declared in `STAGES` (a run's sub-stages included); the configured method adds its own and
wires its train and evaluate stages to the stores it reads (`method_stages`, from its registered Method,
pipeline/methods/contract.py). A stage declares the config sections in its fingerprint, the stages whose
fingerprints are its inputs, the stages that must run before it, and its functions (body, check, preflight,
then): those of the module of stages/ that implements it (pipeline/orchestration/stage.py `implement`), or a
method's own. A stage's fingerprint covers its
sections and its inputs' fingerprints, so changing a value invalidates exactly the stages that read it and
everything downstream of them.

`build(config, workdir, target)` computes the plan once (one dataset listing), walks the target's upstream in order
and runs each stage through pipeline/orchestration/runner.py `run_stage`; `hp-pipe status` reads the same plan.
Stages never run each other (docs/stages.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cache.schema import SCHEMA_VERSION
from pipeline.config import Config, fingerprint, sections
from pipeline.errors import UserError
from pipeline.methods.contract import Method
from pipeline.methods.registry import method_of
from pipeline.orchestration import coverage, paths
from pipeline.orchestration.stage import Stage, implemented

# the generic stages; a method adds its own (its Method's `stages`: HCL's stores, STEGO's neighbour table, ...) and
# says which stores its train and evaluate stages read (its Method's `stores`, `train_inputs`, `val_inputs`). Their
# functions are those of stages/<stage>.py, registered there (pipeline/orchestration/stage.py `implement`).
_FEATURES = Stage(sections=("dataset", "prepare", "features"), inputs=("prepare",))
STAGES: dict[str, Stage] = {
    "prepare": Stage(sections=("dataset", "prepare"), once=True),  # stages/prepare.py
    "features-train": _FEATURES,  # stages/features.py
    "features-val": _FEATURES,
    "train": Stage(sections=("train",), level="run"),  # stages/train.py
    # evaluate's sub-stages (docs/evaluation.md): the head's codes, then the probes per feature kind; all in
    # stages/evaluate.py
    "codes": Stage(level="sub"),
    "probe-head": Stage(level="sub"),
    "probe-raw": Stage(level="sub"),
    # [paper]: the numbers the report compares with. Its "train" input is the training settings' fingerprint (the
    # run's name aside), as evaluate manifests have always recorded it; codes and probes read the run's own.
    "evaluate": Stage(sections=("evaluate", "paper"), after=("codes", "probe-head", "probe-raw"), level="run"),
}
# [features] keys that change where and how fast a store is computed, not what it holds: outside every fingerprint
# (decode workers give bit-identical stores; device and batch size change only float rounding), so a store written
# on a GPU is reused on the CPU. `amp` enters as the forward's resolved dtype (float32 | bfloat16 | float16).
EXTRACTION_ONLY_KEYS = ("device", "workers", "batch_size")


def features_fingerprint(config: Config) -> dict[str, Any]:
    """[features] as the feature stages' fingerprints read it: `amp = "auto"` on a GPU (bf16) and on the CPU (fp32)
    are told apart, so a store written with autocast is never taken for one written without (and the reverse)."""
    from pipeline.extraction.workers import extraction_numerics

    f = {k: v for k, v in config["features"].items() if k not in EXTRACTION_ONLY_KEYS}
    f["amp"] = extraction_numerics(config)
    return f


def method_stages(method: Method) -> dict[str, Stage]:
    """The graph for `method`: the generic stages, its own, and its train and evaluate stages wired to its stores."""
    r, train, val = dataclasses.replace, method.train_inputs or (method.stores["train"],), method.stores["val"]
    return {**{k: v for k, v in STAGES.items() if k not in ("train", "codes", "probe-head", "probe-raw", "evaluate")},
            **method.stages,
            "train": r(STAGES["train"], sections=("train", method.section), inputs=train),
            "codes": r(STAGES["codes"], inputs=("train", val, *method.val_inputs)),
            "probe-head": r(STAGES["probe-head"], inputs=("train", val, "codes")),
            "probe-raw": r(STAGES["probe-raw"], inputs=("train", val)),
            "evaluate": r(STAGES["evaluate"], inputs=("train", val))}


def stages_of(config: Config) -> dict[str, Stage]:
    """The stages of the configured method's graph."""
    return method_stages(method_of(config))


def source_lists(config: Config, workdir: Path, memo: dict[str, Any] | None = None) -> dict[str, list[str]] | None:
    """The source files each split lists (None when the dataset cannot be read: the stage itself will say why).
    `memo`: one command's listings, so that a command lists a dataset once however many plans it makes."""
    import json

    from pipeline.datasets import open_split

    key = json.dumps([config["dataset"], str(workdir)], sort_keys=True, default=str)
    if memo is not None and key in memo:
        return memo[key]
    listing = _list_sources(config, workdir, open_split)
    if memo is not None:
        memo[key] = listing
    return listing


def _list_sources(config: Config, workdir: Path, open_split) -> dict[str, list[str]] | None:
    try:
        listing = {}
        for split in ("train", "val"):
            dataset = open_split(config, workdir, split)
            listing[split] = [dataset.source(i) for i in range(len(dataset))]
        return listing
    except UserError:
        return None


def stage_plan(config: Config, workdir: Path, stores: dict[str, str] | None = None,
               memo: dict[str, Any] | None = None) -> dict[str, tuple[dict, dict]]:
    """stage -> (its config, its inputs {upstream: fingerprint}), in dependency order.

    Besides config sections, `prepare` depends on the list of source files and each `features-<split>` stage on the
    URL of the store it writes and the store schema version; a method's own stages on what their `extras` say (HCL's
    stores: their split's source files, store URL, backbone keys and store version); when the method trains its
    evaluation probes with the head (protocol paper), `train` also on their settings (docs/hp.md §8).
    """
    from pipeline.precision import training_numerics

    listing = source_lists(config, workdir, memo)
    extras: dict[str, dict[str, Any]] = {
        "prepare": {"sources": fingerprint(listing) if listing is not None else "unreadable"}}
    for split in ("train", "val"):
        url = (stores or {}).get(split) or paths.store_url(config, workdir, split)
        extras[f"features-{split}"] = {"store": url, "schema": SCHEMA_VERSION}  # a new layout rebuilds stores
    online = method_of(config).online_probes(config)
    if online:  # the train stage also trains the evaluation probes (protocol paper, docs/hp.md §8)
        extras["train"] = {"online_probes": online}
    features_key = features_fingerprint(config)
    plan: dict[str, tuple[dict, dict]] = {}
    for name, stage in stages_of(config).items():
        if stage.level == "sub":
            continue  # a run's sub-stages: `plan` adds them per run
        own = stage.extras(config, workdir, stores or {}, listing) if stage.extras else {}
        stage_config = {**sections(config, *stage.sections), **extras.get(name, {}), **own}
        if "features" in stage.sections:
            stage_config["features"] = features_key
        if "train" in stage.sections:  # the resolved autocast dtype, as for [features] (pipeline/precision.py)
            stage_config["train"] = {**stage_config["train"], "amp": training_numerics(config["train"])}
        inputs = {up: fingerprint(*plan[up]) for up in stage.inputs}
        plan[name] = (stage_config, inputs)
    return plan


# ---------------------------------------------------------------- the plan of one command
@dataclass(frozen=True)
class Step:
    """One stage as one command runs it: its manifest name, fingerprinted config and inputs, and what runs first."""

    name: str  # the manifest's name: "features-train", "train-hp", "probe-head-hp", ...
    stage: str  # the declared stage: "features-train", "train", "probe-head", ...
    run: str | None
    config: dict[str, Any]
    inputs: dict[str, str]
    upstream: tuple[str, ...]  # manifest names of the steps that run first

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.config, self.inputs)


def step_name(stage: str, stages: dict[str, Stage], run: str | None) -> str:
    return stage if stages[stage].level == "dataset" else f"{stage}-{run}"


def plan(config: Config, workdir: Path, *, runs: Iterable[str] = (), stores: dict[str, str] | None = None,
         memo: dict[str, Any] | None = None) -> dict[str, Step]:
    """Manifest name -> Step, in dependency order: the dataset's stages, then each run's (train, its codes and
    probes, evaluate). One dataset listing, whatever the number of runs (`memo`: see `source_lists`)."""
    base, stages = stage_plan(config, workdir, stores, memo), stages_of(config)
    steps: dict[str, Step] = {}
    for name, stage in stages.items():
        if stage.level == "dataset":
            steps[name] = Step(name, name, None, *base[name], stage.inputs)
    for run in runs:
        configs = run_configs(config, workdir, base, run)
        for name, stage in stages.items():
            if name in configs:
                upstream = tuple(step_name(up, stages, run) for up in (*stage.inputs, *stage.after) if up in configs
                                 or stages[up].level == "dataset")
                steps[step_name(name, stages, run)] = Step(step_name(name, stages, run), name, run,
                                                           *configs[name], upstream)
    return steps


def run_configs(config: Config, workdir: Path, base: dict[str, tuple[dict, dict]],
                run: str) -> dict[str, tuple[dict, dict]]:
    """(config, inputs) of run `run`'s stages, exactly as their manifests have always recorded them."""
    from pipeline.evaluation.online_probes import protocol_of
    from pipeline.evaluation.probes import linear_optimizer

    method = method_of(config)
    e_cfg, online = config["evaluate"], method.online_probes(config)
    val = method.stores["val"]  # features-val, or HCL's own features-val-hcl
    train = ({**base["train"][0], "run": run}, base["train"][1])
    codes_inputs = {"train": fingerprint(*train), val: fingerprint(*base[val])}
    # what else the val codes read (STEGO: the mirrored val features of its flip averaging)
    codes_extra = {name: fingerprint(*base[name]) for name in method.val_inputs}
    # protocol paper: the head's probes were trained during `train`, only the val codes are needed
    splits = ["val"] if online else ["train", "val"]
    codes_dir = paths.codes_dir(paths.run_dir(config, workdir, run))
    codes_urls = {split: str((codes_dir / f"{split}.zarr").expanduser().resolve()) for split in splits}
    probe_cfg = {"run": run, **{k: e_cfg[k] for k in ("probes", "cluster_method", "extra_clusters",
                                                      "cluster_patches", "linear_epochs", "linear_lr",
                                                      "batch_size", "seed")},
                 "linear_optimizer": linear_optimizer(config)}
    configs = {
        "train": train,
        "codes": ({"run": run, "batch_size": e_cfg["batch_size"], **({"splits": splits} if online else {})},
                  {**codes_inputs, **codes_extra}),
        # the head's probes read the codes: their inputs name the codes stores (the URLs, as always recorded)
        "probe-head": ({"run": run, "protocol": protocol_of(config), **online} if online else probe_cfg,
                       {**codes_inputs, f"codes-{run}": fingerprint(codes_urls)}),
        "evaluate": ({**base["evaluate"][0], "run": run}, base["evaluate"][1]),
    }
    if e_cfg["baselines"]:
        configs["probe-raw"] = (probe_cfg, codes_inputs)
    return configs


# ---------------------------------------------------------------- the executor
@dataclass
class Build:
    """What a stage body gets besides its own StageContext: the command's config, plan and finished upstream."""

    config: Config
    workdir: Path
    steps: dict[str, Step]
    options: dict[str, Any] = field(default_factory=dict)  # extraction: scheduler, address, workers
    force: bool = False
    replace: bool = False
    done: dict[str, dict[str, Any]] = field(default_factory=dict)  # manifests of the steps run so far

    @property
    def sdir(self) -> Path:
        return paths.stage_dir(self.config, self.workdir)

    def upstream(self, step: Step, stage: str) -> dict[str, Any]:
        """The manifest of `stage` (a declared name: "train", "features-val", ...) as this step's run reads it."""
        return self.done[step_name(stage, stages_of(self.config), step.run)]


def targets_of(config: Config, target: str | Iterable[str]) -> list[str]:
    """Declared stage names; "features:<split>" is the configured method's store of that split."""
    stages, out = stages_of(config), []
    for name in [target] if isinstance(target, str) else target:
        if name.startswith("features:"):
            split = name.partition(":")[2]
            name = method_of(config).stores.get(split, f"features-{split}")
        if name not in stages:
            raise UserError(f"unknown stage '{name}'; one of {', '.join(stages)}")
        out.append(name)
    return out


def walk(steps: dict[str, Step], names: list[str]) -> list[str]:
    """`names` and everything upstream of them, each once, upstream first."""
    order: list[str] = []

    def visit(name: str) -> None:
        if name not in order:
            for up in steps[name].upstream:
                visit(up)
            order.append(name)

    for name in names:
        visit(name)
    return order


def build(config: Config, workdir: Path, target: str | Iterable[str], *, run: str | None = None,
          force: bool = False, replace: bool = False, stores: dict[str, str] | None = None,
          options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Bring `target` (a declared stage, or several) up to date, running what it needs first; its manifest (the
    last target's).

    `force` recomputes the targets and the sub-stages they run after (evaluate: its codes and probes); upstream
    stages are only brought up to date. `force` or `replace` lets `train` replace a run whose settings differ.
    `stores`: store URLs other than the default ({"train": url, "hcl-val": url, ...}); `options`: how features
    stages extract ({"scheduler", "address", "workers"}).
    """
    names = targets_of(config, target)
    stages = {name: implemented(name, stage) for name, stage in stages_of(config).items()}
    for name in names:  # a typo or an impossible setting fails before any work (and before the dataset is listed)
        if stages[name].check:
            stages[name].check(config)
    per_run = any(stages[name].level != "dataset" for name in names)
    run = paths.run_name(run or method_of(config).name) if per_run else None
    steps = plan(config, Path(workdir), runs=[run] if run else [], stores=stores)
    wanted = [step_name(name, stages, run) for name in names]
    forced = set(wanted) | {up for name in wanted for up in steps[name].upstream
                            if stages[steps[up].stage].level == "sub"} if force else set()
    job = Build(config, Path(workdir), steps, options or {}, force, replace)
    order = walk(steps, wanted)
    for name in reversed(order):  # the target's own checks first: a refused command changes nothing
        if stages[steps[name].stage].preflight:
            stages[steps[name].stage].preflight(job, steps[name])
    for name in order:
        job.done[name] = execute(job, steps[name], stages[steps[name].stage], name in forced)
    return job.done[wanted[-1]]


# (stage folder, step, fingerprint) of the `once` stages this process has run or reported
_SEEN: set[tuple[str, str, str]] = set()


def execute(job: Build, step: Step, stage: Stage, force: bool) -> dict[str, Any]:
    """One step through the runner: its lock(s), the up-to-date check (with its store's cheap check), its body."""
    from functools import partial

    from cache import writer
    from pipeline.orchestration.runner import manifest_path, missing_outputs, read_manifest, run_stage

    key = (str(job.sdir.resolve()), step.name, step.fingerprint)
    if stage.once and not force and key in _SEEN:  # already said by this process: still current? then say nothing
        old = read_manifest(job.sdir, step.name)
        if old and old.get("status") == "complete" and old.get("fingerprint") == key[2] and not missing_outputs(old):
            job.done[step.name] = old
            return old
    url = step.config.get("store")
    where = manifest_path(job.sdir, step.name)
    check = writer.recorded_store_check(url, str(where)) if isinstance(url, str) else None  # up to date only if ok
    config = job.config  # the body and its `then` read only the keys this step's fingerprint covers (coverage.py)
    job.config = coverage.covered_view(config, coverage.covered_keys(job.steps, step.name, config), step.name)
    try:
        manifest = run_stage(job.sdir, step.name, step.config, step.inputs, partial(stage.body, job, step),
                             force, check)
        if isinstance(url, str) and manifest["outputs"].get("store") != url:  # later stages read the store named here
            raise UserError(f"{where} names the store {manifest['outputs'].get('store')!r}, but this run's store is "
                            f"{url}: refused (an edited manifest cannot redirect hp-pipe to another store). Rerun "
                            "with --force")
        job.done[step.name] = manifest
        if stage.once:
            _SEEN.add(key)
        if stage.then:
            stage.then(job, step, manifest)
    finally:
        job.config = config
    return manifest
