"""A folder of one's own photos: settings derived from its size, and the whole chain with no --set at all."""

import json
import os
import subprocess
import sys

import numpy as np

from pipeline.config import load_config
from pipeline.datasets.folder import MIN_ITERATIONS, small_data_settings
from tests.fixtures import picture, raw_ids, save


def flat_folder(root, n: int, classes: int | None = None):
    """n images straight in images/, labels (ids 0..classes-1 and 255) in labels/ when `classes` is given."""
    rng = np.random.default_rng(0)
    for k in range(n):
        save(root / "images" / f"{k:03d}.jpg", picture(k, 16, 16))
        if classes:
            save(root / "labels" / f"{k:03d}.png", raw_ids(rng, [*range(classes), 255], 16, 16))


def test_a_dozen_images_get_small_data_settings(tmp_path):
    """12 images, 60 crops: batch 8 (four batches fit), 7 iterations per epoch, 9 epochs (>= 60 iterations), one
    pool entry per crop, renewal each epoch, warm-up a quarter, classes read from the labels, and a line each."""
    flat_folder(tmp_path, 12, classes=5)
    config = load_config("folder", {"dataset.root": str(tmp_path)})
    lines = small_data_settings(config, {"dataset.root"})
    t = config["hp"]
    per_epoch = 60 // 8
    assert (t["batch_size"], t["epochs"], t["pool_size"], t["renew_interval"], t["warmup"]) == (
        8, -(-MIN_ITERATIONS // per_epoch), 60, per_epoch, per_epoch * 9 // 4)
    assert per_epoch * t["epochs"] >= MIN_ITERATIONS and config["dataset"]["n_classes"] == 5
    keys = [line.split(" = ")[0] for line in lines]
    assert keys[:6] == ["dataset.n_classes", "hp.batch_size", "hp.epochs", "hp.pool_size",
                        "hp.renew_interval", "hp.warmup"]
    assert "the same 12 images serve as train and val" in lines[-1]

    mine = load_config("folder", {"dataset.root": str(tmp_path), "hp.batch_size": "4", "dataset.n_classes": "7"})
    lines = small_data_settings(mine, {"dataset.root", "hp.batch_size", "dataset.n_classes"})
    assert mine["hp"]["batch_size"] == 4 and mine["dataset"]["n_classes"] == 7  # a --set always wins
    assert not any(line.startswith(("hp.batch_size", "dataset.n_classes")) for line in lines)
    assert mine["hp"]["epochs"] == -(-MIN_ITERATIONS // 15)  # derived from the batch the user chose

    for name, overrides in (("synthetic", {}), ("folder", {"dataset.root": str(tmp_path / "missing")})):
        other = load_config(name, overrides)
        assert small_data_settings(other, set()) == [] and other == load_config(name, overrides)


def test_folder_without_any_set_runs_features_train_evaluate(tmp_path):
    """A tiny labelled folder (train/ and val/), `--data-root` and nothing else: every stage succeeds."""
    rng = np.random.default_rng(1)
    data = tmp_path / "photos"
    for split, n in (("train", 3), ("val", 1)):
        for k in range(n):
            save(data / split / "images" / f"{split}{k}.jpg", picture(k + 10 * (split == "val"), 96, 128))
            save(data / split / "labels" / f"{split}{k}.png", raw_ids(rng, [0, 1, 2, 255], 96, 128))
    work = tmp_path / "work"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    errors = {}
    for command in ("features", "train", "evaluate"):
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", command, "--dataset", "folder", "--data-root",
                               str(data), "--workdir", str(work)], capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        errors[command] = proc.stderr
    assert "[folder] dataset.n_classes = 3" in errors["features"]
    assert "[folder] hp.batch_size = 2" in errors["train"] and "serve as train and val" not in errors["train"]
    manifest = json.loads((work / "folder" / "stages" / "train-hp.json").read_text())
    assert manifest["outputs"]["iterations"] >= MIN_ITERATIONS and manifest["config"]["hp"]["batch_size"] == 2
    metrics = json.loads((work / "folder" / "runs" / "hp" / "eval" / "metrics.json").read_text())
    assert metrics["class_names"] == ["class 0", "class 1", "class 2"] and metrics["random_init"] is True
    assert {r["probe"] for r in metrics["results"]} == {"cluster", "linear", "overcluster"}
