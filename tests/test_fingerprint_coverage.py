"""No unfingerprinted value can change a result: every config key a stage reads while it runs is covered by its
fingerprint (its own sections and keys, and its inputs' fingerprints, transitively), or is one of the few keys that
by design change where or how fast a result is computed, never what it is.

Each method's tiny run is executed with a config that records, per stage, every key read (a section iterated or
copied counts as all of it). Writing the run's record and TensorBoard's hparams read the whole config on purpose
(they are records of it, not results) and are not counted.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict

import pytest

import stages  # noqa: F401  (the stage modules implement the graph's stages)
from pipeline.config import load_config
from pipeline.orchestration import graph
from pipeline.orchestration.graph import EXTRACTION_ONLY_KEYS

# read by stages on purpose, outside every fingerprint: where and how fast (extraction), whether a weights file may be
# unpickled (a permission, never a value), whether TensorBoard files are written, which method's graph runs (a stage
# of another method's graph never runs), and the protocol, whose change adds or removes the train stage's
# `online_probes` (protocol paper) and so is covered through them
NEUTRAL = {*(f"features.{k}" for k in EXTRACTION_ONLY_KEYS), "features.trust_weights", "run.tensorboard",
           "train.method", "evaluate.protocol"}
# a fingerprinted value computed from config keys of other names
DERIVED = {"linear_optimizer": {"evaluate.linear_optimizer", "evaluate.linear_lr", "evaluate.linear_sgd_lr",
                                "evaluate.linear_sgd_momentum", "evaluate.linear_sgd_weight_decay",
                                "evaluate.linear_sgd_drop_epoch"}}

TINY = {"dataset.n_train": "3", "dataset.n_val": "2", "dataset.size": "96", "prepare.resolution": "48",
        "prepare.val_resolution": "48", "features.backbone": "vit_small_patch16_224.dino",
        "features.weights": "random", "features.n_views": "1", "features.chunk_size": "4", "evaluate.crf": "false",
        "evaluate.overcluster": "false", "evaluate.linear_epochs": "1", "evaluate.pictures": "1",
        "run.tensorboard": "false"}
METHODS = {
    "hp": {"hp.batch_size": "4", "hp.epochs": "1", "hp.head_dim": "16", "hp.pool_size": "8", "hp.renew_interval": "2",
           "hp.warmup": "1"},
    "hcl": {"hcl_features.resolution": "48", "hcl_features.crop_resolution": "96", "hcl_features.val_resolution":
            "48", "hcl.batch_size": "2", "hcl.epochs": "1", "hcl.dim": "16", "hcl.hidden": "32", "hcl.out_dim": "8",
            "hcl.heads": "2", "hcl.clusters": "4", "hcl.kmeans_min_points": "1"},
    "stego": {"stego.max_steps": "2", "stego.head_dim": "16", "stego.feature_samples": "4",
              "stego.batch_size": "2", "stego_cache.knn_size": "4", "stego.num_neighbors": "2"},
}


class Reads:
    """Which keys each step read: step name -> {"section.key"}; paused while a record of the config is written."""

    def __init__(self) -> None:
        self.by_step: dict[str, set[str]] = defaultdict(set)
        self.step: list[str] = []
        self.paused = 0

    def add(self, key: str) -> None:
        if self.step and not self.paused:
            self.by_step[self.step[-1]].add(key)

    @contextlib.contextmanager
    def pause(self):
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1


def recording_config(config: dict, reads: Reads) -> dict:
    """`config` whose sections note every read in `reads` (and are plain dicts to pickle and copy)."""

    class Section(dict):
        def __init__(self, *args, name: str = "") -> None:
            super().__init__(*args)
            self.name = name

        def __getitem__(self, key):
            reads.add(f"{self.name}.{key}")
            return super().__getitem__(key)

        def get(self, key, default=None):
            reads.add(f"{self.name}.{key}")
            return super().get(key, default)

        def __iter__(self):
            for key in dict.keys(self):
                reads.add(f"{self.name}.{key}")
            return super().__iter__()

        def items(self):
            return [(key, self[key]) for key in dict.keys(self)]

        def values(self):
            return [self[key] for key in dict.keys(self)]

        def __deepcopy__(self, memo):
            import copy

            return {key: copy.deepcopy(value, memo) for key, value in self.items()}

    return {name: Section(dict.items(values), name=name) if isinstance(values, dict) else values
            for name, values in config.items()}


def named(key: str, value, config: dict) -> set[str]:
    """The config keys a fingerprinted entry holds: a whole section, a value derived from keys of other names
    (DERIVED), or a key of the same name in whichever section has one (nested entries alike)."""
    if key in config and isinstance(value, dict):
        return {f"{key}.{k}" for k in value}
    out = DERIVED.get(key, set()) | {f"{section}.{key}" for section, values in config.items() if key in values}
    for inner, held in (value.items() if isinstance(value, dict) else ()):
        out |= named(inner, held, config)
    return out


def covered_keys(steps: dict[str, graph.Step], name: str, config: dict) -> set[str]:
    """The config keys step `name`'s fingerprint covers: those its own fingerprinted config holds, then its upstream
    steps', transitively."""
    step = steps[name]
    out = set().union(*(named(key, value, config) for key, value in step.config.items()))
    for up in step.upstream:
        out |= covered_keys(steps, up, config)
    return out


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_key_a_stage_reads_is_in_its_fingerprint(tmp_path, monkeypatch, method):
    from pipeline.evaluation import scoring
    from pipeline.orchestration import runs
    from pipeline.reporting import tensorboard
    from pipeline.training import trainer

    config = load_config("synthetic", {**TINY, **METHODS[method], "train.method": method})
    reads = Reads()
    execute, write_record, hparams_of = graph.execute, runs.write_record, tensorboard.hparams_of
    save = trainer.save_checkpoint

    def plain(value):  # a checkpoint holds plain data only (its loader refuses any other class)
        if isinstance(value, dict):
            return {key: plain(inner) for key, inner in dict.items(value)}
        return [plain(inner) for inner in value] if isinstance(value, list) else value

    recording = recording_config(config, reads)

    def recorded_execute(job, step, stage, force):
        reads.step.append(step.name)
        try:
            job.config = recording
            return execute(job, step, stage, force)
        finally:
            reads.step.pop()

    def paused(function):
        def call(*args, **kwargs):
            with reads.pause():
                return function(*args, **kwargs)
        return call

    monkeypatch.setattr(graph, "execute", recorded_execute)
    monkeypatch.setattr(runs, "write_record", paused(write_record))  # a record of the whole config, not a result
    monkeypatch.setattr(tensorboard, "hparams_of", paused(hparams_of))
    for module in (trainer, scoring):  # a checkpoint's copy of the config is a record too
        monkeypatch.setattr(module, "save_checkpoint", paused(lambda path, state, *a, **k: save(path, plain(state),
                                                                                               *a, **k)))
    graph.build(config, tmp_path, "evaluate")

    steps = graph.plan(config, tmp_path, runs=[method])
    assert {f"train-{method}", f"evaluate-{method}"} < set(reads.by_step) <= set(steps)  # what ran was recorded
    existing = {f"{section}.{key}" for section, values in config.items() for key in values}  # .get of no key: no read
    outside = {name: sorted((keys & existing) - covered_keys(steps, name, config) - NEUTRAL)
               for name, keys in reads.by_step.items()}
    assert {name: keys for name, keys in outside.items() if keys} == {}
    assert any(key.startswith(f"{method}.") for key in reads.by_step[f"train-{method}"])  # the recorder records
