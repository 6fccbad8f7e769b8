"""Faults: runs and their settings (README, "Reliability"; pipeline/orchestration/runs.py).

- `evaluate` without repeating the options given to `train` -> evaluates that run as trained (its recorded
  config.toml); the run is untouched (checkpoint bytes and mtime), where it used to be retrained and deleted
- an option given to `evaluate` that differs from the run's training -> refused, exit 2, one line naming the key, both
  values and the two ways out (--run NEW, --force); the run, its evaluation and its stores untouched
- evaluation-only settings still come from the command line
- `status`, `predict` and `report` read the record too: no option repeated
- a training change, then reverting it, then `evaluate` -> evaluates (it used to end in "no feature store at
  runs/hp/codes/train.zarr; run hp-pipe features"), with the same results as before the change
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.orchestration import paths
from pipeline.orchestration.runs import apply_record, read_record, training_keys

# the run's settings: given once, to `train`
TRAIN = {
    "dataset.n_train": "4", "dataset.n_val": "2", "dataset.size": "96",
    "prepare.resolution": "48", "prepare.val_resolution": "48", "prepare.five_crop": "false",
    "features.backbone": "vit_small_patch8_224.dino", "features.weights": "random",  # not the preset's ViT-S/16
    "features.n_views": "1", "features.chunk_size": "4",
    "hp.batch_size": "4", "hp.head_dim": "16", "hp.pool_size": "8", "hp.renew_interval": "2",
    "hp.warmup": "2", "hp.epochs": "2",
}
# evaluation-only settings: the command line's, on every evaluate
EVAL = {"evaluate.linear_epochs": "1", "evaluate.cluster_patches": "500", "evaluate.crf": "false",
        "evaluate.overcluster": "false", "evaluate.pictures": "1"}


def sets(values: dict[str, str]) -> list[str]:
    return [arg for k, v in values.items() for arg in ("--set", f"{k}={v}")]


def hp(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """`hp-pipe ARGS` in this process (the real entry point, exit codes included): (code, stdout, stderr)."""
    from pipeline.cli import main

    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["hp-pipe", *args])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out = capsys.readouterr()
    return code, out.out, out.err


def stamp(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


def run_main(*args: str) -> tuple[int, str, str]:
    """`hp-pipe ARGS` in this process for a module fixture (no capsys there): (code, stdout, stderr)."""
    from pipeline.cli import main

    out, err = io.StringIO(), io.StringIO()
    mp = pytest.MonkeyPatch()
    mp.setattr(sys, "argv", ["hp-pipe", *args])
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as done:
            main()
    finally:
        mp.undo()
    return done.value.code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`hp-pipe train --set hp.epochs=2 ...` (in this process): a work folder with run 'hp'."""
    workdir = tmp_path_factory.mktemp("work")
    code, _, err = run_main("train", "--workdir", str(workdir), *sets(TRAIN))
    assert code == 0, err
    return workdir


@pytest.fixture(scope="module")
def evaluated(trained):
    """Then `hp-pipe evaluate` with evaluation options only: the run's checkpoint and manifest before it, and
    what evaluate said."""
    run_dir = paths.run_dir(load_config("synthetic"), trained, "hp")
    before = stamp(paths.checkpoint_path(run_dir)), (trained / "synthetic" / "stages" / "train-hp.json").read_text()
    return (trained, before, *run_main("evaluate", "--workdir", str(trained), *sets(EVAL)))


def test_the_run_records_its_whole_config(trained):
    run_dir = paths.run_dir(load_config("synthetic"), trained, "hp")
    recorded = tomllib.loads(paths.run_config_path(run_dir).read_text())
    assert recorded == load_config("synthetic", TRAIN)  # the resolved config, every section


def test_evaluate_without_repeating_the_options_evaluates_the_run_untouched(evaluated):
    trained, (before, manifest), code, out, err = evaluated
    run_dir = paths.run_dir(load_config("synthetic"), trained, "hp")
    ckpt = paths.checkpoint_path(run_dir)
    assert code == 0, err
    assert stamp(ckpt) == before and (trained / "synthetic" / "stages" / "train-hp.json").read_text() == manifest
    assert "[train-hp] up to date" in out and "recomputing" not in out
    assert "hp.epochs = 2" in err  # said once: the recorded settings are used
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert metrics["run"] == "hp" and metrics["random_init"] is True
    assert metrics["protocol_settings"]["linear_probe"]["epochs"] == 1  # evaluation settings: the command line's
    assert metrics["protocol_settings"]["crf"] == {"enabled": False}


def test_a_conflicting_option_is_refused_and_the_run_kept(evaluated, monkeypatch, capsys):
    trained = evaluated[0]
    run_dir = paths.run_dir(load_config("synthetic"), trained, "hp")
    files = [paths.checkpoint_path(run_dir), run_dir / "eval" / "metrics.json", run_dir / "config.toml"]
    files += sorted(p for p in (trained / "synthetic" / "features").rglob("*") if p.is_file())  # the stores too
    before = [stamp(f) for f in files]
    # a feature option is refused before the features stage runs: the store is not rebuilt first
    for option in (["--set", "hp.epochs=3"], ["--set", "hp.tau=0.7"], ["--set", "features.n_views=2"]):
        code, _, err = hp(monkeypatch, capsys, "evaluate", "--workdir", str(trained), *sets(EVAL), *option)
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1, err
        key, value = option[1].split("=")
        assert f"{key} is " in errors[0] and f", {value} now" in errors[0]
        assert "--run NEW" in errors[0] and "--force" in errors[0]
    assert [stamp(f) for f in files] == before


def test_status_reads_the_record(evaluated, monkeypatch, capsys):
    trained = evaluated[0]
    code, out, err = hp(monkeypatch, capsys, "status", "--json", "--workdir", str(trained), *sets(EVAL))
    assert code == 0, err
    states = {row["stage"]: row["state"] for row in json.loads(out[out.index("["):])}
    assert states == {"prepare": "complete", "features-train": "complete", "features-val": "complete",
                      "train-hp": "complete", "evaluate-hp": "complete"}
    code, out, _ = hp(monkeypatch, capsys, "status", "--json", "--workdir", str(trained), *sets(EVAL),
                      "--set", "hp.tau=0.7")  # explicitly other settings: that run would be stale
    assert {row["stage"]: row["state"] for row in json.loads(out[out.index("["):])}["train-hp"] == "stale"


def test_predict_and_report_read_the_record(evaluated, monkeypatch, capsys, tmp_path):
    trained = evaluated[0]
    image = np.random.default_rng(0).integers(0, 255, (37, 53, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "new.png")
    out = tmp_path / "predicted"
    code, _, err = hp(monkeypatch, capsys, "predict", str(tmp_path / "new.png"), "--workdir", str(trained),
                      "--out", str(out))
    assert code == 0, err  # no --backbone: the run's ViT-S/8 (the preset's ViT-S/16 is refused for this run)
    assert np.asarray(Image.open(out / "new.png")).shape == (37, 53)
    assert json.loads((out / "legend.json").read_text())["random_init_backbone"] is True

    report = paths.eval_dir(load_config("synthetic"), trained, "hp") / "report.md"
    written = report.read_text()
    report.unlink()
    code, _, err = hp(monkeypatch, capsys, "report", "--workdir", str(trained))
    assert code == 0, err
    assert report.read_text() == written


def test_training_keys_and_the_merge():
    """What is taken from a record: training keys not given on the command line; never trust_weights."""
    recorded = load_config("synthetic", {"hp.epochs": "7", "features.trust_weights": "true",
                                         "evaluate.linear_epochs": "9"})
    keys = training_keys(recorded)
    assert "hp.epochs" in keys and "evaluate.protocol" in keys and "features.trust_weights" not in keys
    assert "evaluate.linear_epochs" not in keys and "dataset.name" not in keys
    merged, taken = apply_record(load_config("synthetic", {"hp.tau": "0.7"}), recorded, {"hp.tau"}, Path("r"))
    assert merged["hp"]["epochs"] == 7 and merged["hp"]["tau"] == 0.7  # recorded; explicit wins
    assert merged["features"]["trust_weights"] is False
    assert merged["evaluate"]["linear_epochs"] == load_config("synthetic")["evaluate"]["linear_epochs"] != 9
    assert taken == {"hp.epochs": (7, load_config("synthetic")["hp"]["epochs"])}  # replaced the preset's
    paper = load_config("synthetic", {"evaluate.protocol": "paper", "evaluate.linear_lr": "0.01"})
    assert "evaluate.linear_lr" in training_keys(paper)  # protocol paper trains the probes with the head
    bad = load_config("synthetic")
    bad["hp"]["epochs"] = "two"
    with pytest.raises(UserError, match=r"r: 'hp.epochs' should be a int, got 'two'"):
        apply_record(load_config("synthetic"), bad, set(), Path("r"))
    bad["hp"]["epochs"] = -1
    with pytest.raises(UserError, match=r"^r: config key 'hp.epochs' must be"):
        apply_record(load_config("synthetic"), bad, set(), Path("r"))


def test_an_unreadable_record_is_named(tmp_path):
    (tmp_path / "config.toml").write_text("[train\nepochs = ")
    with pytest.raises(UserError, match=r"config.toml is not a readable run record .*--force"):
        read_record(tmp_path)


def test_a_training_change_reverted_then_evaluate(evaluated, monkeypatch, capsys):
    """The issue's scenario: train with a change (--force), revert it (--force), evaluate: the run's codes, probes
    and evaluation, deleted with the changed run, are recomputed and equal those from before the change."""
    trained = evaluated[0]
    run_dir = paths.run_dir(load_config("synthetic"), trained, "hp")
    first = json.loads((run_dir / "eval" / "metrics.json").read_text())["results"]
    base = ["--workdir", str(trained), *sets(TRAIN)]
    assert hp(monkeypatch, capsys, "train", *base, "--set", "hp.tau=0.7", "--force")[0] == 0
    assert read_record(run_dir)["hp"]["tau"] == 0.7 and not (run_dir / "codes").exists()
    assert hp(monkeypatch, capsys, "train", *base, "--force")[0] == 0  # reverted
    code, out, err = hp(monkeypatch, capsys, "evaluate", "--workdir", str(trained), *sets(EVAL))
    assert code == 0, err
    assert "no feature store" not in err and "[codes-hp]" in out and "no longer exists: recomputing" in out
    assert json.loads((run_dir / "eval" / "metrics.json").read_text())["results"] == first


def test_a_record_from_before_the_hp_section_keeps_its_values(tmp_path):
    """Records written when HP's settings were keys of [train] are read in today's layout, values unchanged."""
    from pipeline.config import to_toml

    config = load_config("synthetic", {"hp.tau": "0.37", "hp.epochs": "5"})
    old = {k: dict(v) for k, v in config.items() if k != "hp"}
    old["train"] = {**config["train"], **config["hp"]}  # the old layout: one [train]
    path = paths.run_config_path(tmp_path)
    path.write_text(to_toml(old))
    recorded = read_record(tmp_path)
    assert recorded["hp"] == config["hp"] and recorded["train"] == config["train"]
    merged, _ = apply_record(load_config("synthetic"), recorded, (), path)
    assert merged["hp"]["tau"] == 0.37 and merged["hp"]["epochs"] == 5
