"""The stage graph's executor (pipeline/orchestration/graph.py `build`), with every stage body replaced by a
recorder: the order it
runs stages in, that it lists the dataset once per command, what --force and a changed setting rerun, and that
`status` shows a run's sub-stages (codes, probes) from the same plan."""

import dataclasses
import json
from pathlib import Path

import pytest

from cache import writer
from pipeline.config import load_config
from pipeline.orchestration import graph

TINY = {"dataset.n_train": "2", "dataset.n_val": "1", "dataset.size": "64", "evaluate.crf": "false"}
CALLS: list[str] = []


def record(job, step, ctx) -> dict:
    """A stage body that only says it ran (and creates the store a features stage names)."""
    CALLS.append(step.name)
    if "store" in step.config:
        Path(step.config["store"]).mkdir(parents=True, exist_ok=True)
        return {"store": step.config["store"]}
    return {}


def fake(stage: graph.Stage) -> graph.Stage:
    return dataclasses.replace(stage, body=record, check=None, preflight=None, then=None)


@pytest.fixture
def listings(monkeypatch):
    """The recorder in place of every body; the list of the dataset listings made."""
    real_stages = graph.method_stages
    monkeypatch.setattr(graph, "method_stages", lambda method: {name: fake(s) for name, s in
                                                                real_stages(method).items()})
    monkeypatch.setattr(writer, "recorded_store_check", lambda url, where: lambda manifest: [])
    monkeypatch.setattr(writer, "store_problems", lambda url: [])  # the fake stores are empty folders
    made, real = [], graph._list_sources
    monkeypatch.setattr(graph, "_list_sources", lambda *args: made.append(1) or real(*args))
    CALLS.clear()
    return made


def test_evaluate_runs_its_upstream_once_in_order_with_one_listing(listings, tmp_path):
    config = load_config("synthetic", TINY)
    manifest = graph.build(config, tmp_path, "evaluate", run="r")
    assert CALLS == ["prepare", "features-train", "train-r", "features-val", "codes-r", "probe-head-r",
                     "probe-raw-r", "evaluate-r"]
    assert manifest["stage"] == "evaluate-r" and len(listings) == 1  # one plan, one listing, for eight stages
    graph.build(config, tmp_path, "evaluate", run="r")
    assert len(CALLS) == 8 and len(listings) == 2  # all up to date: nothing ran again


def test_force_reruns_the_target_and_its_sub_stages_and_a_setting_reruns_its_readers(listings, tmp_path):
    config = load_config("synthetic", TINY)
    graph.build(config, tmp_path, "evaluate", run="r")
    CALLS.clear()
    graph.build(config, tmp_path, "evaluate", run="r", force=True)
    assert CALLS == ["codes-r", "probe-head-r", "probe-raw-r", "evaluate-r"]  # upstream only brought up to date
    CALLS.clear()
    graph.build(load_config("synthetic", {**TINY, "evaluate.linear_epochs": "3"}), tmp_path, "evaluate", run="r")
    assert CALLS == ["probe-head-r", "probe-raw-r", "evaluate-r"]  # the codes do not read the probes' settings
    CALLS.clear()
    fewer = {**TINY, "evaluate.linear_epochs": "3", "evaluate.baselines": "false"}
    graph.build(load_config("synthetic", fewer), tmp_path, "evaluate", run="r")
    assert CALLS == ["evaluate-r"]  # no raw-feature probes to make


def test_hcl_reads_its_own_stores_never_prepare(listings, tmp_path):
    graph.build(load_config("synthetic", {**TINY, "train.method": "hcl"}), tmp_path, "evaluate")
    assert CALLS == ["features-train-hcl", "train-hcl", "features-val-hcl", "codes-hcl", "probe-head-hcl",
                     "probe-raw-hcl", "evaluate-hcl"]


def test_features_of_both_splits_is_one_command(listings, tmp_path):
    graph.build(load_config("synthetic", TINY), tmp_path, ["features:train", "features:val"])
    assert CALLS == ["prepare", "features-train", "features-val"] and len(listings) == 1
    with pytest.raises(Exception, match="unknown stage 'features-test'"):
        graph.build(load_config("synthetic", TINY), tmp_path, "features:test")


def test_status_shows_the_sub_stages_from_the_same_plan(listings, tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    config = load_config("synthetic", TINY)
    graph.build(config, tmp_path, "evaluate")
    sets = [arg for k, v in TINY.items() for arg in ("--set", f"{k}={v}")]
    result = CliRunner().invoke(app, ["status", "--json", "--workdir", str(tmp_path), *sets])
    assert result.exit_code == 0, result.output
    rows = {row["stage"]: row for row in json.loads(result.output[result.output.index("["):])}
    assert {name: row["state"] for name, row in rows.items()} == {
        "prepare": "complete", "features-train": "complete", "features-val": "complete", "train-hp": "complete",
        "evaluate-hp": "complete"}
    assert rows["evaluate-hp"]["steps"] == [{"stage": s, "state": "complete"}
                                            for s in ("codes-hp", "probe-head-hp", "probe-raw-hp")]
    changed = CliRunner().invoke(app, ["status", "--json", "--workdir", str(tmp_path), *sets,
                                       "--set", "evaluate.linear_epochs=3"])
    rows = {row["stage"]: row for row in json.loads(changed.output[changed.output.index("["):])}
    assert rows["evaluate-hp"]["steps"] == [{"stage": "codes-hp", "state": "complete"},
                                            {"stage": "probe-head-hp", "state": "stale"},
                                            {"stage": "probe-raw-hp", "state": "stale"}]


def test_command_line_options_are_typed_overrides(monkeypatch, tmp_path):
    """--batch-size and friends reach the config as typed values (no "k=v" string parsed back); None sets nothing;
    --no-crf keeps the value evaluations have always been fingerprinted with."""
    from typer.testing import CliRunner

    from pipeline import cli

    config = cli.build_config("synthetic", options={"hp.batch_size": 4, "hp.epochs": None})
    assert config["hp"]["batch_size"] == 4 and type(config["hp"]["batch_size"]) is int
    assert config["hp"]["epochs"] == load_config("synthetic")["hp"]["epochs"]
    seen = {}
    monkeypatch.setattr(graph, "build", lambda config, *a, **k: seen.update(config=config, target=a[1], **k))
    for args, key, value in ((["train", "--batch-size", "5", "--epochs", "2"], "hp.batch_size", 5),
                             (["train", "--method", "hcl", "--batch-size", "3"], "hcl.batch_size", 3),
                             (["evaluate", "--no-crf", "--probe", "all"], "evaluate.crf", "False")):
        result = CliRunner().invoke(cli.app, [*args, "--workdir", str(tmp_path)])
        assert result.exit_code == 0, result.output
        section, _, name = key.partition(".")
        assert seen["config"][section][name] == value and seen["target"] == args[0]
    assert seen["config"]["evaluate"]["probes"] == "cluster,linear"
