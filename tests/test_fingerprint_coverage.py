"""No unfingerprinted value can change a result: a stage body reads only the config keys its fingerprint covers
(pipeline/orchestration/coverage.py; `graph.execute` hands every body that view of the config).

Every test of the suite that runs a stage runs under the guard, so any path a test takes that reads an uncovered key
fails there. Here: each method's tiny run end to end under it, a read outside the fingerprint stopped with the stage
and key named, and the view itself (what counts as a read, records of the whole config, pickling).
"""

from __future__ import annotations

import copy
import pickle

import pytest

import stages  # noqa: F401  (the stage modules implement the graph's stages)
from pipeline.config import load_config
from pipeline.orchestration import coverage, graph
from pipeline.orchestration.stage import IMPLEMENTATIONS

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



@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_runs_with_every_stage_under_the_guard(tmp_path, monkeypatch, method):
    config = load_config("synthetic", {**TINY, **METHODS[method], "train.method": method})
    guarded: dict[str, frozenset[str]] = {}
    view = coverage.covered_view

    def recorded(config, allowed, stage):
        guarded[stage] = frozenset(allowed)
        return view(config, allowed, stage)

    monkeypatch.setattr(coverage, "covered_view", recorded)
    graph.build(config, tmp_path, "evaluate")  # an uncovered read anywhere raises UncoveredRead

    steps = graph.plan(config, tmp_path, runs=[method])
    assert {f"train-{method}", f"evaluate-{method}", f"codes-{method}"} <= set(guarded) <= set(steps)
    train = guarded[f"train-{method}"]
    assert any(key.startswith(f"{method}.") for key in train)  # its method's section is covered, ...
    assert "dataset.name" in train  # ... and the stores' settings through its inputs
    assert not any(key.startswith("evaluate.") and key[9:] in {"pictures", "crf"} for key in train)


def test_a_stage_reading_an_uncovered_key_is_stopped_naming_it(tmp_path, monkeypatch):
    config = load_config("synthetic", {**TINY, **METHODS["hp"], "train.method": "hp"})
    real = IMPLEMENTATIONS["train"]["body"]

    def body(job, step, ctx):
        job.config["evaluate"]["pictures"]  # an evaluation setting cannot change what training computes
        return real(job, step, ctx)

    monkeypatch.setitem(IMPLEMENTATIONS, "train", {**IMPLEMENTATIONS["train"], "body": body})
    with pytest.raises(coverage.UncoveredRead, match=r"stage train-hp read the config key evaluate\.pictures"):
        graph.build(config, tmp_path, "train")
    assert not (tmp_path / "synthetic" / "runs" / "hp" / "checkpoint.pt").exists()


def test_the_view_lets_read_only_covered_and_neutral_keys():
    config = {"hp": {"tau": 0.1, "lr": 1.0}, "train": {"method": "hp", "seed": 0}, "name": "x"}
    view = coverage.covered_view(config, {"hp.tau"}, "train-hp")
    assert view["hp"]["tau"] == 0.1 and view["train"]["method"] == "hp"  # covered, NEUTRAL
    assert view["hp"].get("absent", 3) == 3 and "lr" in view["hp"] and len(view["hp"]) == 2  # no value read
    for read in (lambda: view["hp"]["lr"], lambda: view["hp"].get("lr"), lambda: view["train"]["seed"],
                 lambda: dict(view["hp"]), lambda: list(view["hp"].items()), lambda: {**view["train"]},
                 lambda: copy.deepcopy(view), lambda: view["hp"].copy()):
        with pytest.raises(coverage.UncoveredRead, match="train-hp"):
            read()
    assert coverage.whole(view) == config and type(coverage.whole(view)["hp"]) is dict  # a record reads it all
    assert pickle.loads(pickle.dumps(view)) == config  # a worker process gets plain sections
    # a dask worker gets the readable keys as plain data: an uncovered read there is a KeyError
    assert coverage.covered_only(view) == {"hp": {"tau": 0.1}, "train": {"method": "hp"}, "name": "x"}
    assert coverage.covered_only(config) == config
    assert config["hp"] == {"tau": 0.1, "lr": 1.0}  # the config itself is untouched


def test_covered_keys_follow_sections_derived_values_and_upstream_steps(tmp_path):
    config = load_config("synthetic", {**TINY, **METHODS["hp"], "train.method": "hp"})
    steps = graph.plan(config, tmp_path, runs=["hp"])
    train, probe = (coverage.covered_keys(steps, name, config) for name in ("train-hp", "probe-head-hp"))
    assert {f"hp.{k}" for k in config["hp"]} <= train and {f"prepare.{k}" for k in config["prepare"]} <= train
    assert "features.device" not in train  # where a store is computed is outside it (NEUTRAL instead)
    assert train <= probe  # a probe of the head covers everything the head's training does
