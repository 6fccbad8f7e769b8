"""A folder of one's own photos: settings derived from its size, and the whole chain with no --set at all."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.datasets import open_dataset
from pipeline.datasets.folder import MIN_ITERATIONS, UNLABELLED_CLUSTERS, small_data_settings
from tests.fixtures import picture, raw_ids, save


def flat_folder(root, n: int, classes: int | None = None):
    """n images straight in images/, labels (ids 0..classes-1 and 255) in labels/ when `classes` is given."""
    rng = np.random.default_rng(0)
    for k in range(n):
        save(root / "images" / f"{k:03d}.jpg", picture(k, 16, 16))
        if classes:
            save(root / "labels" / f"{k:03d}.png", raw_ids(rng, [*range(classes), 255], 16, 16))


def halved(batch: int, samples: int, low: int) -> int:
    """The batch, halved until four batches fit in `samples`, not below `low` (the rules' arithmetic, restated)."""
    while batch > low and 4 * batch > samples:
        batch //= 2
    return max(batch, low)


def derived(config, explicit=frozenset()) -> tuple[dict, list[str]]:
    """small_data_settings on `config`, with dataset.root, train.method and `explicit` set by the user: the lines
    by key, and the lines."""
    lines = small_data_settings(config, {"dataset.root", "train.method", *explicit})
    return {line.split(" = ")[0]: line for line in lines if " = " in line}, lines


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

    big = load_config("folder", {"dataset.root": str(tmp_path), "hp.batch_size": "32"})  # 4 x 32 > 60 crops
    small_data_settings(big, {"dataset.root", "hp.batch_size"})
    assert big["hp"]["batch_size"] == 32 and big["hp"]["epochs"] == -(-MIN_ITERATIONS // (60 // 32))  # as it runs

    for name, overrides in (("synthetic", {}), ("folder", {"dataset.root": str(tmp_path / "missing")})):
        other = load_config(name, overrides)
        assert small_data_settings(other, set()) == [] and other == load_config(name, overrides)


@pytest.mark.slow
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


def test_hcl_a_dozen_images_get_its_own_small_data_settings(tmp_path):
    """HCL: an epoch is one crop of each image (not the five-crops), so the batch halves until four batches fit in
    the 12 images and the epochs make MIN_ITERATIONS; [hp] and [stego] are not touched."""
    flat_folder(tmp_path, 12)
    base = {"dataset.root": str(tmp_path), "train.method": "hcl"}
    preset = load_config("folder", base)
    config = load_config("folder", base)
    by_key, _ = derived(config)
    h, p = config["hcl"], preset["hcl"]
    batch = halved(p["batch_size"], 12, 1)
    epochs = max(p["epochs"], -(-MIN_ITERATIONS // (12 // batch)))
    assert (h["batch_size"], h["epochs"]) == (batch, epochs) == (2, 10)
    assert (12 // h["batch_size"]) * h["epochs"] >= MIN_ITERATIONS
    assert set(by_key) == {"dataset.n_classes", "hcl.batch_size"}  # the epochs already make 60: not said
    assert "12 training images" in by_key["hcl.batch_size"]
    assert all(config[s] == preset[s] for s in ("hp", "stego", "stego_cache", "hcl_features"))

    few = tmp_path / "few"  # 4 images: batch 1, 4 iterations an epoch, so 15 epochs
    flat_folder(few, 4)
    config = load_config("folder", {**base, "dataset.root": str(few)})
    by_key, _ = derived(config)
    assert (config["hcl"]["batch_size"], config["hcl"]["epochs"]) == (1, -(-MIN_ITERATIONS // 4))
    assert "4 iterations per epoch" in by_key["hcl.epochs"]

    mine = load_config("folder", {**base, "hcl.batch_size": "3"})  # a --set wins, the epochs follow from it
    by_key, _ = derived(mine, {"hcl.batch_size"})
    assert mine["hcl"]["batch_size"] == 3 and "hcl.batch_size" not in by_key
    assert mine["hcl"]["epochs"] == -(-MIN_ITERATIONS // (12 // 3))
    mine = load_config("folder", {**base, "hcl.epochs": "2"})
    by_key, _ = derived(mine, {"hcl.epochs"})
    assert mine["hcl"]["epochs"] == 2 and "hcl.epochs" not in by_key and mine["hcl"]["batch_size"] == 2


def test_stego_a_dozen_images_get_its_own_small_data_settings(tmp_path):
    """STEGO: the batch halves until four batches fit in the 60 five-crops (>= 2), max_steps becomes at most 10
    passes over the crops, in whole epochs of at least MIN_ITERATIONS iterations; the neighbour table never keeps
    more neighbours than crops and the positive's rank stays below the table's width."""
    flat_folder(tmp_path, 12)
    base = {"dataset.root": str(tmp_path), "train.method": "stego"}
    preset = load_config("folder", base)
    config = load_config("folder", base)
    by_key, _ = derived(config)
    s, p = config["stego"], preset["stego"]
    batch = halved(p["batch_size"], 60, 2)
    per_epoch = 60 // batch
    steps = per_epoch * max(10, p["epochs"], -(-MIN_ITERATIONS // per_epoch))
    assert (s["batch_size"], s["max_steps"]) == (batch, steps) == (8, 70) and steps >= MIN_ITERATIONS
    assert (s["epochs"], s["num_neighbors"], config["stego_cache"]["knn_size"]) == (
        p["epochs"], p["num_neighbors"], preset["stego_cache"]["knn_size"])  # 60 crops: the table of 30 fits
    assert set(by_key) == {"dataset.n_classes", "stego.batch_size", "stego.max_steps"}
    assert all(config[s] == preset[s] for s in ("hp", "hcl", "hcl_features"))

    one = tmp_path / "one"  # 1 image, 5 crops: batch 2, a table of 5 neighbours, positives from ranks 1..4
    flat_folder(one, 1)
    config = load_config("folder", {**base, "dataset.root": str(one)})
    by_key, _ = derived(config)
    assert (config["stego"]["batch_size"], config["stego_cache"]["knn_size"], config["stego"]["num_neighbors"]) == (
        2, 5, 4)
    assert config["stego"]["max_steps"] == 2 * -(-MIN_ITERATIONS // 2)
    assert {"stego_cache.knn_size", "stego.num_neighbors"} <= set(by_key)

    mine = load_config("folder", {**base, "stego.batch_size": "4", "stego_cache.knn_size": "5"})
    by_key, _ = derived(mine, {"stego.batch_size", "stego_cache.knn_size"})  # a --set wins, the rest follows it
    assert (mine["stego"]["batch_size"], mine["stego_cache"]["knn_size"]) == (4, 5)
    assert not {"stego.batch_size", "stego_cache.knn_size"} & set(by_key)
    assert mine["stego"]["max_steps"] == 15 * 10 and mine["stego"]["num_neighbors"] == 4  # 10 passes of 15
    epochs = load_config("folder", {**base, "stego.max_steps": "0"})  # counted in epochs: the epochs are raised
    by_key, _ = derived(epochs, {"stego.max_steps"})
    assert epochs["stego"]["max_steps"] == 0 and epochs["stego"]["epochs"] == -(-MIN_ITERATIONS // 7)
    assert set(by_key) == {"dataset.n_classes", "stego.batch_size", "stego.epochs"}


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory):
    """18,000 images (90,000 five-crops: more than STEGO's 5000 batches of 16, and HP's warm-up fits in a quarter
    of the run), as empty files: the derivation only counts them."""
    root = tmp_path_factory.mktemp("big")
    (root / "images").mkdir()
    for k in range(18_000):
        (root / "images" / f"{k:05d}.jpg").touch()
    return root


@pytest.mark.parametrize("method", ["hp", "hcl", "stego"])
def test_a_folder_big_enough_for_the_preset_gets_no_change(big_folder, method):
    """No method setting changes; only the number of clusters, since the folder has no labels."""
    base = {"dataset.root": str(big_folder), "train.method": method}
    config = load_config("folder", base)
    by_key, lines = derived(config)
    assert list(by_key) == ["dataset.n_classes"] and "serve as train and val" in lines[-1]
    assert config == load_config("folder", {**base, "dataset.n_classes": str(UNLABELLED_CLUSTERS)})
    chosen = load_config("folder", {**base, "dataset.n_classes": "3"})
    assert derived(chosen, {"dataset.n_classes"})[0] == {} and chosen == load_config(
        "folder", {**base, "dataset.n_classes": "3"})


def test_an_unlabelled_folder_gets_clusters_to_find(tmp_path):
    """No labels: dataset.n_classes = UNLABELLED_CLUSTERS (5), said with how to choose another; a K the user set
    is kept; the reader names them clusters. An empty labels folder is no labels."""
    flat_folder(tmp_path, 3)
    (tmp_path / "labels").mkdir()
    config = load_config("folder", {"dataset.root": str(tmp_path)})
    by_key, _ = derived(config)
    assert UNLABELLED_CLUSTERS == 5 and config["dataset"]["n_classes"] == 5
    assert "no labels: 5 clusters to find" in by_key["dataset.n_classes"]
    assert "--set dataset.n_classes=K" in by_key["dataset.n_classes"]
    ds = open_dataset("folder", tmp_path, "train", n_classes=config["dataset"]["n_classes"])
    assert ds.class_names == [f"cluster {i}" for i in range(5)] and ds.labels_dir is None

    mine = load_config("folder", {"dataset.root": str(tmp_path), "dataset.n_classes": "3"})
    by_key, _ = derived(mine, {"dataset.n_classes"})
    assert mine["dataset"]["n_classes"] == 3 and "dataset.n_classes" not in by_key


@pytest.mark.parametrize("method", ["hcl", "stego"])
@pytest.mark.slow
def test_folder_train_with_another_method_and_no_set(tmp_path, method):
    """6 unlabelled photos, `hp-pipe train --method M --random-init` and nothing else: it trains MIN_ITERATIONS
    iterations at least on settings derived from the folder (5 clusters, a batch that fits)."""
    data = tmp_path / "photos"
    for k in range(6):
        save(data / "images" / f"{k:03d}.jpg", picture(k, 64, 80))
    work = tmp_path / "work"
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", "--dataset", "folder", "--data-root",
                           str(data), "--method", method, "--random-init", "--workdir", str(work)],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[folder] dataset.n_classes = 5" in proc.stderr and f"[folder] {method}.batch_size = " in proc.stderr
    manifest = json.loads((work / "folder" / "stages" / f"train-{method}.json").read_text())
    assert manifest["outputs"]["iterations"] >= MIN_ITERATIONS
