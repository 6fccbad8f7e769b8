"""STEGO through the stages on the tiny synthetic set, from HP's stores (docs/stego.md): its neighbour table and
mirrored val features as stages of their own, training with positives from the table, evaluation with the jointly
trained probes and flip averaging, an exact resume after kill -9, and `compare` listing every method."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import stages as stage_modules  # noqa: F401  (graph.build runs their functions)
from cache.reader import FeatureStore
from pipeline.cli import app
from pipeline.config import load_config
from pipeline.extraction.backbone import normalize
from pipeline.extraction.workers import resolve_backbone
from pipeline.methods.stego.method import STEGO
from pipeline.methods.stego.stages import read_table
from pipeline.methods.stego.training import positives
from pipeline.orchestration import graph
from pipeline.orchestration.runner import read_manifest
from pipeline.training.checkpoints import load_checkpoint
from tests.fixtures import kill_training_when

TINY = {
    "dataset.n_train": "4", "dataset.n_val": "2", "dataset.size": "128",
    "prepare.resolution": "64", "prepare.val_resolution": "64",
    "features.backbone": "vit_small_patch16_224.dino", "features.weights": "random",
    "features.n_views": "1", "features.chunk_size": "4",
    "train.log_interval": "1", "train.checkpoint_interval": "2",
    "stego.batch_size": "4", "stego.max_steps": "6", "stego.head_dim": "16", "stego.feature_samples": "3",
    "stego_cache.knn_size": "5", "stego.num_neighbors": "3",
    "evaluate.crf": "false", "evaluate.cluster_patches": "2000", "evaluate.linear_epochs": "1",
    "evaluate.overcluster_k": "6", "evaluate.overcluster_seeds": "1", "evaluate.pictures": "1",
}


def sets(extra: dict | None = None) -> list[str]:
    return [arg for k, v in {**TINY, **(extra or {})}.items() for arg in ("--set", f"{k}={v}")]


def cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """`hp-pipe train` then `evaluate` with --method stego on a fresh work folder."""
    path = tmp_path_factory.mktemp("stego")
    for command in ("train", "evaluate"):
        cli(command, "--dataset", "synthetic", "--method", "stego", "--workdir", str(path), *sets())
    return path


def tiny_config(**extra) -> dict:
    return load_config("synthetic", {**TINY, "train.method": "stego", **extra})


def test_stego_trains_and_evaluates_from_hp_stores_and_its_own_stages(workdir):
    sdir = workdir / "synthetic"
    stages = {p.stem for p in (sdir / "stages").glob("*.json")}
    assert {"prepare", "features-train", "features-val", "knn-train", "features-val-flip", "train-stego",
            "codes-stego", "probe-head-stego", "evaluate-stego"} <= stages
    assert not any(name.endswith("-hcl") for name in stages)  # HCL's stores are not read
    state = load_checkpoint(sdir / "runs" / "stego" / "checkpoints" / "last.pt")
    assert state["method"] == "stego" and state["iteration"] == 6  # max_steps counts batches
    metrics = json.loads((sdir / "runs" / "stego" / "eval" / "metrics.json").read_text())
    head = {r["probe"] for r in metrics["results"] if r["features"] == "head"}
    assert metrics["method"] == "stego" and {"cluster", "linear"} <= head
    assert metrics["protocol_settings"]["name"] == "paper"  # the probes trained with the head (§3)
    assert "mirrored" in metrics["protocol"]["flip_averaging"]
    assert [r["name"] for r in metrics["results"] if r["features"] == "head"][0].startswith("STEGO")


def test_the_neighbour_table_is_the_brute_force_top_k_of_the_stored_features(tmp_path):
    config = tiny_config(**{"stego_cache.knn_dropout": 0.0})
    manifest = graph.build(config, tmp_path, "knn-train")
    store = FeatureStore.open(read_manifest(tmp_path / "synthetic", "features-train")["outputs"]["store"])
    table = read_table(manifest, len(store))
    feat = store.read("feat", 0, len(store)).astype(np.float64)
    g = feat.mean(axis=(1, 2))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    sims = g @ g.T
    expected = np.argsort(-sims, axis=1, kind="stable")[:, :5]
    assert table.shape == (len(store), 5) and (table[:, 0] == np.arange(len(store))).all()  # itself first
    np.testing.assert_array_equal(table, expected)


def test_the_knn_dropout_changes_the_table_and_is_its_own_stage(tmp_path):
    plain = graph.plan(tiny_config(**{"stego_cache.knn_dropout": 0.0}), tmp_path, runs=["stego"])
    dropped = graph.plan(tiny_config(), tmp_path, runs=["stego"])
    assert plain["knn-train"].fingerprint != dropped["knn-train"].fingerprint
    assert plain["features-train"].fingerprint == dropped["features-train"].fingerprint
    assert plain["features-val-flip"].fingerprint == dropped["features-val-flip"].fingerprint
    flip_off = graph.plan(tiny_config(**{"stego_cache.flip_tta": False}), tmp_path, runs=["stego"])
    assert flip_off["train-stego"].fingerprint == dropped["train-stego"].fingerprint  # an evaluation setting
    assert flip_off["codes-stego"].fingerprint != dropped["codes-stego"].fingerprint


def test_positives_come_from_ranks_one_to_num_neighbors():
    table = np.arange(20 * 6).reshape(20, 6)
    generator = torch.Generator().manual_seed(0)
    index = torch.arange(20).repeat(50)
    drawn = positives(table, index, 3, generator)
    ranks = drawn - 6 * index.numpy()
    assert set(ranks.tolist()) == {1, 2, 3}  # never rank 0 (itself), never past num_neighbors


def test_the_mirrored_val_features_are_the_backbone_on_mirrored_images(workdir):
    sdir = workdir / "synthetic"
    val = FeatureStore.open(read_manifest(sdir, "features-val")["outputs"]["store"])
    flip = FeatureStore.open(read_manifest(sdir, "features-val-flip")["outputs"]["store"])
    backbone = resolve_backbone(tiny_config())
    images = torch.from_numpy(np.ascontiguousarray(val.read("image", 0, len(val))[:, :, ::-1]))
    with torch.no_grad():
        expected = backbone(normalize(images)).feat.numpy()
    np.testing.assert_allclose(flip.read("feat", 0, len(flip)).astype(np.float32), expected, rtol=2e-3, atol=2e-3)
    assert not np.allclose(val.read("feat", 0, len(val)).astype(np.float32), expected, atol=1e-2)


def test_val_codes_average_each_image_with_its_mirror(workdir):
    sdir = workdir / "synthetic"
    val = FeatureStore.open(read_manifest(sdir, "features-val")["outputs"]["store"])
    flip = FeatureStore.open(read_manifest(sdir, "features-val-flip")["outputs"]["store"])
    codes = FeatureStore.open(read_manifest(sdir, "codes-stego")["outputs"]["val"])
    state = load_checkpoint(sdir / "runs" / "stego" / "checkpoints" / "last.pt")
    from pipeline.methods.stego.head import StegoHead

    head = StegoHead(state["in_dim"], state["head_dim"])
    head.load_state_dict(state["head"])
    head.eval()
    with torch.no_grad():
        c = head(torch.from_numpy(val.read("feat", 0, len(val))).float().permute(0, 3, 1, 2), None)[1]
        m = head(torch.from_numpy(flip.read("feat", 0, len(flip))).float().permute(0, 3, 1, 2), None)[1]
    expected = ((c + m.flip(-1)) / 2).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(codes.read("feat", 0, len(codes)).astype(np.float32), expected, rtol=1e-2, atol=2e-3)


@pytest.mark.slow
def test_a_killed_stego_run_resumes_to_the_same_weights(tmp_path):
    extra = {"train.method": "stego"}
    cli("train", "--dataset", "synthetic", "--workdir", str(tmp_path), "--run", "straight", *sets(extra))
    ckpt = tmp_path / "synthetic" / "runs" / "killed" / "checkpoints" / "last.pt"
    seen = kill_training_when(tmp_path, "killed", {**TINY, **extra}, ckpt, lambda s: s["iteration"] >= 2)
    assert 2 <= seen["iteration"] < 6
    cli("train", "--dataset", "synthetic", "--workdir", str(tmp_path), "--run", "killed", *sets(extra))
    straight = load_checkpoint(tmp_path / "synthetic" / "runs" / "straight" / "checkpoints" / "last.pt")
    resumed = load_checkpoint(ckpt)
    assert resumed["iteration"] == straight["iteration"] == 6
    for key in ("head", "optimizer"):
        flat_a, flat_b = torch.utils._pytree.tree_flatten(straight[key])[0], torch.utils._pytree.tree_flatten(
            resumed[key])[0]
        assert all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b for a, b in zip(flat_a, flat_b,
                                                                                                  strict=True))
    assert torch.equal(straight["online_probes"]["clusters"], resumed["online_probes"]["clusters"])


def test_flip_averaging_off_is_said_and_protocol_kmeans_works(workdir):
    """Without flip averaging the mirrored features are not written and metrics.json says so; protocol kmeans (a
    training setting: the probes are then not trained with the head) is a run of its own."""
    extra = {"stego_cache.flip_tta": "false", "evaluate.protocol": "kmeans"}
    for command in ("train", "evaluate"):
        cli(command, "--dataset", "synthetic", "--method", "stego", "--run", "km", "--workdir", str(workdir),
            *sets(extra))
    metrics = json.loads((workdir / "synthetic" / "runs" / "km" / "eval" / "metrics.json").read_text())
    assert "no flip averaging" in metrics["protocol"]["flip_averaging"]
    assert metrics["protocol_settings"]["name"] == "kmeans"
    assert read_manifest(workdir / "synthetic", "features-val-flip")["outputs"]["store"] is None


@pytest.mark.slow
def test_compare_lists_every_method_on_the_dataset(workdir):
    from tests.fixtures import TINY_EVALUATE

    hp = {**TINY_EVALUATE, "evaluate.crf": "false", "evaluate.overcluster": "false"}
    for command in ("train", "evaluate"):
        cli(command, "--dataset", "synthetic", "--method", "hp", "--workdir", str(workdir),
            *[a for k, v in hp.items() for a in ("--set", f"{k}={v}")])
    hcl = {"dataset.n_train": "4", "dataset.n_val": "2", "dataset.size": "128",
           "features.backbone": "vit_small_patch16_224.dino", "features.weights": "random",
           "features.chunk_size": "4", "hcl_features.resolution": "64", "hcl_features.crop_resolution": "128",
           "hcl_features.val_resolution": "64", "hcl.batch_size": "2", "hcl.epochs": "1", "hcl.dim": "32",
           "hcl.hidden": "64", "hcl.out_dim": "16", "hcl.heads": "2", "hcl.clusters": "4",
           "hcl.kmeans_min_points": "1", "evaluate.overcluster": "false", "evaluate.linear_epochs": "1",
           "evaluate.crf": "false"}
    for command in ("train", "evaluate"):
        cli(command, "--dataset", "synthetic", "--method", "hcl", "--workdir", str(workdir),
            *[a for k, v in hcl.items() for a in ("--set", f"{k}={v}")])
    out = cli("compare", "--dataset", "synthetic", "--workdir", str(workdir))
    rows = [line.split()[0:2] for line in out.splitlines()[1:] if line and not line.startswith("[compare]")]
    # a second STEGO run ("km", protocol kmeans) exists when the test above it in this file ran (not with -m slow)
    km = (workdir / "synthetic" / "runs" / "km" / "eval").is_dir()
    runs = sorted(["hcl", "hp", "stego"] + (["km"] if km else []))
    assert sorted(run for run, _ in rows) == runs
    assert all(method.endswith("[random-init]") or "[random-init]" in line for (_, method), line in
               zip(rows, out.splitlines()[1:], strict=False))
    table = (workdir / "synthetic" / "compare.md").read_text()
    assert table.count("\n| ") == 1 + len(runs) and "[random-init]" in table  # header + a row per run
    metrics = {m: json.loads((workdir / "synthetic" / "runs" / m / "eval" / "metrics.json").read_text())
               for m in runs}
    for line in table.splitlines()[-len(runs):]:
        run = line.split("|")[1].strip()
        cluster = next(r for r in metrics[run]["results"] if r["features"] == "head" and r["probe"] == "cluster"
                       and not r["crf"])
        assert f"| {cluster['miou']:.1f} |" in line  # the run's own cluster mIoU, read back from its metrics
        trained = json.loads((workdir / "synthetic" / "stages" / f"train-{run}.json").read_text())
        seconds = trained["timings"]["train_seconds"]  # the runner's timings, at the manifest's top level
        rate = trained["outputs"]["iterations"] / seconds
        assert line.rstrip(" |").endswith(f"| {seconds:.1f} | {rate:.2f}")  # train s, it/s: never "–"


def test_stego_registers_its_paper_numbers():
    config = load_config("cocostuff27", {"train.method": "stego"})
    assert config["features"]["backbone"] == "vit_base_patch8_224.dino" and config["stego"]["head_dim"] == 90
    rows = STEGO.paper_rows(config)
    assert {"backbone": "vit_base_patch8_224.dino", "features": "head", "probe": "cluster", "acc": 56.9,
            "miou": 28.2} in rows
    small = load_config("cocostuff27", {"train.method": "stego", "features.backbone": "vit_small_patch8_224.dino"})
    assert small["stego"]["head_dim"] == 70 and small["stego"]["b_neg"] == 0.66  # the ViT-S/8 column
    assert load_config("cityscapes", {"train.method": "stego"})["stego"]["pointwise"] is False
    assert load_config("cocostuff27")["features"]["backbone"] == "vit_small_patch8_224.dino"  # HP's own preset
    off = load_config("cocostuff27", {"train.method": "stego", "stego_cache.flip_tta": "false"})
    assert any("no flip averaging" in d for d in STEGO.paper_differences(off, "paper"))
    assert not any("no flip averaging" in d for d in STEGO.paper_differences(config, "paper"))
