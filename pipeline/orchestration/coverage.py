"""No unfingerprinted value can change a result: a stage body reads only the config keys its fingerprint covers.

A step's fingerprint covers the sections it declares (and any value its plan adds beside them) and, through its
inputs, everything upstream of it. `execute` (graph.py) hands each body the command's config as a view of exactly
those keys (`covered_view`): reading any other key stops the command with an error naming the stage and the key,
so a value that is not fingerprinted can never enter a result, on any path the tests run.

Two kinds of reads are allowed outside the fingerprint on purpose:
- `NEUTRAL` keys change where, how fast or whether something is written, never what a result is;
- records of the whole config (the run's settings file, a checkpoint's copy, TensorBoard's hparams) take
  `whole(view)`: they copy the config, they do not compute with it.
"""

from __future__ import annotations

from typing import Any

from pipeline.config import Config

# read on purpose outside every fingerprint: where and how fast a store is extracted (a store written on a GPU is
# reused on the CPU), whether a weights file may be unpickled (a permission, never a value), whether TensorBoard
# files are written, which method's graph runs (a stage of another method's graph never runs), and the protocol,
# whose change adds or removes the train stage's `online_probes` (protocol paper) and so is covered through them
NEUTRAL = frozenset({"features.device", "features.workers", "features.batch_size", "features.trust_weights",
                     "run.tensorboard", "train.method", "evaluate.protocol"})
# a fingerprinted value computed from config keys of other names
DERIVED = {"linear_optimizer": {"evaluate.linear_optimizer", "evaluate.linear_lr", "evaluate.linear_sgd_lr",
                                "evaluate.linear_sgd_momentum", "evaluate.linear_sgd_weight_decay",
                                "evaluate.linear_sgd_drop_epoch"}}


class UncoveredRead(RuntimeError):
    """A stage read a config key its fingerprint does not cover (a defect of hp-pipe, not of the user's input)."""


def named(key: str, value: Any, config: Config) -> set[str]:
    """The config keys a fingerprinted entry holds: a whole section, a value derived from keys of other names
    (DERIVED), or a key of the same name in whichever section has one (nested entries alike)."""
    if key in config and isinstance(value, dict):
        return {f"{key}.{k}" for k in value}
    out = DERIVED.get(key, set()) | {f"{section}.{key}" for section, values in config.items() if key in values}
    for inner, held in (value.items() if isinstance(value, dict) else ()):
        out |= named(inner, held, config)
    return out


def covered_keys(steps: dict[str, Any], name: str, config: Config) -> set[str]:
    """The config keys step `name`'s fingerprint covers: those its own fingerprinted config holds, then its upstream
    steps', transitively (`steps`: graph.plan's {name: Step})."""
    step = steps[name]
    out = set().union(*(named(key, value, config) for key, value in step.config.items()))
    for up in step.upstream:
        out |= covered_keys(steps, up, config)
    return out


class CoveredSection(dict):
    """One config section that lets its holder read only `allowed` keys ("section.key"); every other read raises."""

    def __init__(self, values: Any = (), section: str = "", allowed: frozenset[str] | None = None,
                 stage: str = "") -> None:
        super().__init__(values)  # no `allowed`: a copy another library made of it (a record), unguarded
        self.section, self.allowed, self.stage = section, allowed, stage

    def _read(self, key: str) -> None:
        name = f"{self.section}.{key}"
        if self.allowed is not None and name not in self.allowed:
            raise UncoveredRead(
                f"stage {self.stage} read the config key {name}, which its fingerprint does not cover: a change of "
                f"it would not recompute the stage. Add [{self.section}] to the stage's sections (graph.py, or the "
                "method's stages) or, if it changes only where or how fast, to NEUTRAL "
                "(pipeline/orchestration/coverage.py)")

    def __getitem__(self, key: str) -> Any:
        self._read(key)
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        if dict.__contains__(self, key):  # .get of a key the section does not hold reads nothing
            self._read(key)
        return super().get(key, default)

    def __iter__(self):
        for key in dict.keys(self):
            self._read(key)
        return super().__iter__()

    def items(self):
        return [(key, self[key]) for key in dict.keys(self)]

    def values(self):
        return [self[key] for key in dict.keys(self)]

    def copy(self) -> dict[str, Any]:
        return dict(self.items())

    def __deepcopy__(self, memo: dict) -> dict[str, Any]:
        import copy

        return {key: copy.deepcopy(value, memo) for key, value in self.items()}

    def __reduce__(self):  # pickled (a worker process) as the plain section: the guard stays in this process
        return dict, (dict(dict.items(self)),)


def covered_view(config: Config, allowed: set[str] | frozenset[str], stage: str) -> Config:
    """`config` as stage `stage` may read it: its `allowed` keys and the NEUTRAL ones."""
    allowed = frozenset(allowed) | NEUTRAL
    return {name: CoveredSection(dict.items(values), name, allowed, stage) if isinstance(values, dict) else values
            for name, values in config.items()}


def covered_only(config: Config) -> Config:
    """A view's readable keys as plain dicts (what a dask worker gets: it reads there, outside this guard, and a key
    left out fails with KeyError); a plain config is returned as it is."""
    def held(name: str, values: Any) -> Any:
        if not isinstance(values, CoveredSection) or values.allowed is None:
            return values
        return {key: value for key, value in dict.items(values) if f"{name}.{key}" in values.allowed}

    return {name: held(name, values) for name, values in config.items()}


def whole(config: Config) -> Config:
    """The config behind a view, every key readable: for records of the whole config, never for a computation."""
    return {name: dict(dict.items(values)) if isinstance(values, dict) else values for name, values in config.items()}
