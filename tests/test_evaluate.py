"""The evaluate stages on a tiny synthetic run, and the linear probe on separable codes."""

import json

import numpy as np
import pytest
import torch

from cache import writer
from cache.reader import FeatureStore
from cache.schema import CodesLayout
from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.evaluation import scoring as evaluation
from pipeline.evaluation.metrics import confusion_matrix, scores
from pipeline.methods.hp.step import HPHeads
from pipeline.orchestration import paths
from stages import evaluate
from stages import train as train_stage
from tests.fixtures import TINY_EVALUATE

TINY = TINY_EVALUATE
RAW = "ViT-S/16 features (random init)"  # the raw-feature rows' name: what they are (random weights here), not "DINO"


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("work")
    config = load_config("synthetic", TINY)
    return config, workdir, evaluate.run(config, workdir, "hp")


@pytest.mark.slow
def test_metrics_json_has_every_row_and_the_protocol(evaluated):
    config, workdir, manifest = evaluated
    out = paths.eval_dir(config, workdir, "hp")
    metrics = json.loads((out / "metrics.json").read_text())
    names = {r["name"] for r in metrics["results"]}
    for features in (RAW, "HP"):
        for probe in ("cluster", "linear"):
            assert {f"{features} {probe}", f"{features} {probe} + CRF"} <= names
    for row in metrics["results"]:
        assert 0 <= row["miou"] <= 100 and 0 <= row["acc"] <= 100 and len(row["iou"]) == 8
    assert "last one" in metrics["protocol"]["checkpoint"] and metrics["random_init"] is True
    # the precision every number was computed in (the suite pins a CPU without native bf16: auto is fp32)
    assert metrics["protocol"]["precision"] == ("training autocast float32 (train.amp = auto); features: float32 "
                                                "forward (features.amp = auto), stored as float16")
    assert "training autocast float32" in (out / "report.md").read_text()
    for picture in ("overlays", "confusion", "iou"):
        assert (out / f"{picture}.png").stat().st_size > 0
    assert "Random-initialized backbone" in (out / "report.md").read_text()


def test_codes_store_holds_the_head_output(evaluated):
    config, workdir, _ = evaluated
    run_dir = paths.run_dir(config, workdir, "hp")
    codes = FeatureStore.open(str(run_dir / "codes" / "val.zarr"))
    val = FeatureStore.open(json.loads((workdir / "synthetic" / "stages" / "features-val.json").read_text())
                            ["outputs"]["store"])
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    heads = HPHeads(state["in_dim"], state["head_dim"])
    heads.load_state_dict(state["heads"])
    heads.eval()
    f = torch.from_numpy(val.read("feat", 0, 3)).float().permute(0, 3, 1, 2)
    expected = heads.codes(f).permute(0, 2, 3, 1).detach().numpy()
    np.testing.assert_allclose(codes.read("feat", 0, 3).astype(np.float32), expected, atol=2e-2, rtol=1e-2)
    np.testing.assert_array_equal(codes.read("label", 0, 3), val.read("label", 0, 3))


def test_evaluate_skips_when_done(evaluated, capsys):
    config, workdir, manifest = evaluated
    again = evaluate.run(config, workdir, "hp")
    assert again["finished"] == manifest["finished"]
    out = capsys.readouterr().out
    for stage in ("codes-hp", "probe-head-hp", "probe-raw-hp", "evaluate-hp"):
        assert f"[{stage}] up to date" in out


def test_evaluate_resumes_the_linear_probe(evaluated, capsys):
    config, workdir, _ = evaluated
    longer = load_config("synthetic", {**TINY, "evaluate.linear_epochs": "3"})
    evaluate.run(longer, workdir, "hp")
    out = capsys.readouterr().out
    assert "[codes-hp] up to date" in out  # the codes are not recomputed for a probe setting
    assert "resuming after epoch 2" in out  # the probe continues from its checkpoint
    probe = torch.load(paths.run_dir(config, workdir, "hp") / "probe-head" / "linear.pt", weights_only=True)
    assert probe["epoch"] == 3


def test_linear_probe_separates_separable_codes(tmp_path):
    rng = np.random.default_rng(0)
    n, grid, dim, classes = 16, 4, 6, 3
    label_grid = rng.integers(0, classes, size=(n, grid, grid))
    codes = np.eye(dim)[label_grid] * 3 + rng.normal(0, 0.1, size=(n, grid, grid, dim))
    labels = label_grid.astype(np.uint8)  # one label per patch: separability is the only difficulty
    url = str(tmp_path / "codes.zarr")
    group = writer.create_store(url, CodesLayout(n, grid, dim, grid), 4, {"fingerprint": "x", "split": "train"}, True)
    for c in range(4):
        writer.write_chunk(group, c, {"feat": codes[4 * c:4 * c + 4].astype(np.float16),
                                      "label": labels[4 * c:4 * c + 4]})
    writer.mark_complete(group)
    cfg = {"seed": 0, "linear_lr": 0.05, "linear_epochs": 30, "batch_size": 4}
    probe = evaluation.train_linear(FeatureStore.open(url), classes, cfg, tmp_path / "probe.pt", print)
    with torch.no_grad():
        pred = probe(torch.from_numpy(codes).float().permute(0, 3, 1, 2), (grid, grid)).argmax(1).numpy()
    assert scores(confusion_matrix(pred, labels, classes, classes)).acc >= 0.99


def test_model_size_keeps_aspect_and_patch_multiples():
    from stages.predict import model_size

    assert model_size(480, 640, 320, 16) == ((320, 427), (320, 416))
    assert model_size(100, 50, 64, 8) == ((128, 64), (128, 64))


def test_predict_matches_evaluation_and_keeps_image_sizes(evaluated, tmp_path):
    from PIL import Image

    from pipeline.evaluation.probes import cosine_scores
    from stages import predict

    config, workdir, _ = evaluated
    metrics = json.loads((paths.eval_dir(config, workdir, "hp") / "metrics.json").read_text())
    val = FeatureStore.open(json.loads((workdir / "synthetic" / "stages" / "features-val.json").read_text())
                            ["outputs"]["store"])
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(val.read("image", 0, 1)[0]).save(folder / "val0.png")  # 64 px: the evaluation geometry
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(folder / "odd.png")
    predict.run(config, workdir, "hp", folder, tmp_path / "out", "cluster", crf=False)
    odd = np.asarray(Image.open(tmp_path / "out" / "odd.png"))
    assert odd.shape == (70, 90) and set(np.unique(odd)) <= set(range(8)) | {255}
    assert (tmp_path / "out" / "odd_overlay.png").exists()
    # label PNGs are palette PNGs: ids as pixel values, class colours (those of the overlays) in the colour table
    from pipeline.reporting.plots import palette

    label_png = Image.open(tmp_path / "out" / "odd.png")
    assert label_png.mode == "P"
    table = np.asarray(label_png.getpalette(), np.uint8).reshape(-1, 3)
    np.testing.assert_array_equal(table[:8], palette(8))
    assert table[255].tolist() == [0, 0, 0]
    legend = json.loads((tmp_path / "out" / "legend.json").read_text())
    assert [c["name"] for c in legend["classes"]] == metrics["class_names"] and len(metrics["class_names"]) == 8
    assert legend["classes"][3]["rgb"] == palette(8)[3].tolist() and legend["random_init_backbone"] is True
    # the live path (backbone -> head -> probe) agrees with the evaluation's cached path on a val image
    codes = FeatureStore.open(str(paths.run_dir(config, workdir, "hp") / "codes" / "val.zarr"))
    row = next(r for r in metrics["results"] if r["name"] == "HP cluster")
    centroids = torch.from_numpy(np.load(paths.eval_dir(config, workdir, "hp") / metrics["probes"]["centroids"]))
    f = torch.from_numpy(codes.read("feat", 0, 1)).float().permute(0, 3, 1, 2)
    cached = np.asarray(row["cluster_to_class"])[cosine_scores(f, centroids, (64, 64)).argmax(1)[0].numpy()]
    live = np.asarray(Image.open(tmp_path / "out" / "val0.png"))
    assert (live == np.where(cached >= 0, cached, 255)).mean() > 0.97


@pytest.mark.slow
def test_main_job_commands_end_to_end(tmp_path):
    """`make run`'s commands (features -> train -> evaluate) on the synthetic default, shrunk by --set."""
    import os
    import subprocess
    import sys

    sets = sum((["--set", f"{k}={v}"] for k, v in {**TINY, "evaluate.crf": "false"}.items()), [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for command in ("features", "train", "evaluate"):
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", command, "--dataset", "synthetic",
                               "--workdir", str(tmp_path), *sets], capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr
    assert "RANDOM-INIT" in proc.stdout  # a run on random weights says so
    metrics = json.loads((tmp_path / "synthetic" / "runs" / "hp" / "eval" / "metrics.json").read_text())
    names = {r["name"] for r in metrics["results"]}
    assert {n for n in names if "overcluster" not in n} == {f"{RAW} cluster", f"{RAW} linear", "HP cluster",
                                                            "HP linear"}
    assert {n.split(" K=")[0] for n in names if "overcluster" in n} == {f"{RAW} overcluster", "HP overcluster"}
    status = subprocess.run([sys.executable, "-m", "pipeline.cli", "status", "--dataset", "synthetic",
                             "--workdir", str(tmp_path), *sets], capture_output=True, text=True, env=env).stdout
    assert [line.split()[1] for line in status.splitlines()[1:]] == ["complete"] * 5, status


# ---------------------------------------------------------------- evaluate.protocol = paper (docs/hp.md §8)
PAPER = {**{k: v for k, v in TINY.items() if k != "evaluate.crf"}, "evaluate.protocol": "paper",
         "evaluate.overcluster": "false"}  # crf = auto: on under the paper protocol
PAPER_ROWS = [  # stand-ins for the paper's numbers, for the synthetic preset's backbone
    {"backbone": "vit_small_patch16_224.dino", "features": "head", "probe": "cluster", "acc": 50.0, "miou": 20.0,
     "head_dim": 256},
    {"backbone": "vit_small_patch16_224.dino", "features": "raw", "probe": "linear", "acc": 60.0, "miou": 30.0},
]


def paper_config(**extra):
    config = load_config("synthetic", {**PAPER, **extra})
    config["paper"].update(source="a test's numbers", epochs=2, results=PAPER_ROWS)
    return config


@pytest.fixture(scope="module")
def paper_evaluated(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("paper")
    config = paper_config()
    evaluate.run(config, workdir, "hp")
    return config, workdir, json.loads((paths.eval_dir(config, workdir, "hp") / "metrics.json").read_text())


def naive_scores(pred: np.ndarray, labels: np.ndarray, n_classes: int, hungarian: bool) -> tuple[float, float]:
    """mIoU and Acc (%) from scratch: confusion counts, optional one-to-one Hungarian matching, IoU per class."""
    from scipy.optimize import linear_sum_assignment

    keep = labels < n_classes
    conf = np.zeros((n_classes, n_classes), dtype=np.int64)  # class x cluster (or predicted class)
    np.add.at(conf, (labels[keep], pred[keep]), 1)
    if hungarian:
        rows, cols = linear_sum_assignment(conf, maximize=True)
        order = np.empty(n_classes, dtype=np.int64)
        order[rows] = cols
        conf = conf[:, order]  # column c: the cluster matched to class c
    tp = np.diag(conf).astype(float)
    union = conf.sum(0) + conf.sum(1) - tp
    return 100 * float(np.mean(tp[union > 0] / union[union > 0])), 100 * float(tp.sum() / conf.sum())


@pytest.mark.slow
def test_paper_protocol_metrics_equal_a_recomputation_from_the_stored_probes(paper_evaluated):
    from tests.test_online_probes import bilinear_matrix

    config, workdir, metrics = paper_evaluated
    assert metrics["protocol"]["name"].startswith("paper")
    settings = metrics["protocol_settings"]
    assert settings["name"] == "paper" and settings["checkpoint"] == "last"
    cluster, linear = settings["cluster_probe"], settings["linear_probe"]
    assert (cluster["optimizer"], cluster["lr"], cluster["iterations"], cluster["centroids"]) == ("Adam", 5e-3, 10, 8)
    assert "standard normal" in cluster["init"] and "max_k cos" in cluster["loss"]
    assert (linear["optimizer"], linear["lr"], linear["iterations"]) == ("Adam", 1e-3, 10)
    assert "label size [64, 64]" in linear["loss"]
    assert settings["crf"]["enabled"] is True and settings["crf"]["iterations"] == 10
    assert {(r["features"], r["protocol"]) for r in metrics["results"]} == {("head", "paper"), ("raw", "kmeans")}

    run_dir = paths.run_dir(config, workdir, "hp")
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["online_probes"]
    centroids = np.load(run_dir / "probe-head" / "centroids.npy").astype(np.float64)
    clusters = state["clusters"].double().numpy()
    np.testing.assert_allclose(centroids, clusters / np.linalg.norm(clusters, axis=1, keepdims=True), atol=1e-6)
    probe = torch.load(run_dir / "probe-head" / "linear.pt", weights_only=True)
    assert probe["online"] is True and probe["iterations"] == 10
    for key, value in state["linear"].items():
        assert torch.equal(probe["probe"][key], value), key

    codes_store = FeatureStore.open(str(run_dir / "codes" / "val.zarr"))
    codes = codes_store.read("feat", 0, len(codes_store)).astype(np.float64)  # (n, h, w, D)
    labels = codes_store.read("label", 0, len(codes_store)).astype(np.int64)
    my, mx = bilinear_matrix(labels.shape[1], codes.shape[1]), bilinear_matrix(labels.shape[2], codes.shape[2])
    up = np.einsum("Yi,nijd,Xj->nYXd", my, codes, mx)  # codes upsampled to the label size (§8)
    up /= np.linalg.norm(up, axis=-1, keepdims=True)
    cluster_pred = np.einsum("nYXd,kd->nYXk", up, centroids).argmax(-1)
    w, b = state["linear"]["conv.weight"][:, :, 0, 0].double().numpy(), state["linear"]["conv.bias"].double().numpy()
    low = np.einsum("nijd,cd->nijc", codes, w) + b  # a 1x1 conv commutes with bilinear upsampling
    linear_pred = np.einsum("Yi,nijc,Xj->nYXc", my, low, mx).argmax(-1)
    rows = {r["name"]: r for r in metrics["results"]}
    for name, pred, hungarian in (("HP cluster", cluster_pred, True), ("HP linear", linear_pred, False)):
        miou, acc = naive_scores(pred, labels, 8, hungarian)
        assert rows[name]["miou"] == pytest.approx(miou, abs=0.02), name  # reported to 2 decimals
        assert rows[name]["acc"] == pytest.approx(acc, abs=0.02), name


@pytest.mark.slow
def test_paper_protocol_stages_report_and_switching_back(paper_evaluated, capsys):
    config, workdir, metrics = paper_evaluated
    run_dir = paths.run_dir(config, workdir, "hp")
    assert (run_dir / "codes" / "val.zarr").exists() and not (run_dir / "codes" / "train.zarr").exists()
    report = (paths.eval_dir(config, workdir, "hp") / "report.md").read_text()
    assert "## Compared with the paper" in report and "a test's numbers" in report
    assert "random-initialized backbone weights" in report and "head width D = 32 (the paper: 256)" in report
    assert "batch 4 (the paper: 64)" in report and "training epochs" not in report  # 2 epochs, as the stand-in
    table = [[c.strip() for c in line.strip("|").split("|")] for line in report.splitlines() if line.startswith("| ")]
    header, body = table[0], {row[0]: dict(zip(table[0], row, strict=True)) for row in table[2:]}
    assert header[-2:] == ["paper mIoU (%)", "paper Acc (%)"] and "protocol" in header
    assert (body["HP cluster + CRF"]["paper mIoU (%)"], body["HP cluster + CRF"]["paper Acc (%)"]) == ("20.0", "50.0")
    assert (body[f"{RAW} linear"]["paper mIoU (%)"], body[f"{RAW} linear"]["paper Acc (%)"]) == ("30.0", "60.0")
    assert body["HP linear"]["paper mIoU (%)"] == "–" and body["HP cluster"]["protocol"] == "paper"
    assert {r["name"]: r["paper_miou"] for r in metrics["results"]}["HP cluster"] == 20.0

    capsys.readouterr()
    evaluate.run(config, workdir, "hp")
    out = capsys.readouterr().out
    for stage in ("train-hp", "codes-hp", "probe-head-hp", "probe-raw-hp", "evaluate-hp"):
        assert f"[{stage}] up to date" in out, stage
    paper_centroids = np.load(run_dir / "probe-head" / "centroids.npy")
    kmeans = paper_config(**{"evaluate.protocol": "kmeans"})
    with pytest.raises(UserError, match=r"run 'hp' exists with other settings .*--run NEW.*--force"):
        evaluate.run(kmeans, workdir, "hp")  # the run's training changes with the protocol: never replaced silently
    assert paths.checkpoint_path(run_dir).exists() and (paths.eval_dir(config, workdir, "hp") / "metrics.json").exists()
    train_stage.run(kmeans, workdir, "hp", force=True)
    evaluate.run(kmeans, workdir, "hp")
    out = json.loads((paths.eval_dir(config, workdir, "hp") / "metrics.json").read_text())
    assert out["protocol_settings"]["name"] == "kmeans" and out["protocol_settings"]["crf"] == {"enabled": False}
    assert not np.allclose(np.load(run_dir / "probe-head" / "centroids.npy"), paper_centroids)  # refitted
    assert "evaluation protocol kmeans" in (paths.eval_dir(config, workdir, "hp") / "report.md").read_text()


def test_kmeans_protocol_metrics_equal_a_recomputation_with_and_without_crf(evaluated):
    """Every head and raw row of metrics.json (cluster, linear; CRF off and on) recomputed from the stored
    centroids, linear probes, codes and labels with plain numpy (the CRF itself is the tested
    pipeline.evaluation.crf)."""
    from pipeline.evaluation.crf import dense_crf
    from tests.test_online_probes import bilinear_matrix

    config, workdir, _ = evaluated
    run_dir = paths.run_dir(config, workdir, "hp")
    metrics = json.loads((paths.eval_dir(config, workdir, "hp") / "metrics.json").read_text())
    rows = {r["name"]: r for r in metrics["results"]}
    val = FeatureStore.open(json.loads((workdir / "synthetic" / "stages" / "features-val.json").read_text())
                            ["outputs"]["store"])
    labels = val.read("label", 0, len(val)).astype(np.int64)
    images = val.read("image", 0, len(val))
    sources = {"head": FeatureStore.open(str(run_dir / "codes" / "val.zarr")), "raw": val}
    checked = 0
    for kind, label in (("head", "HP"), ("raw", RAW)):
        codes = sources[kind].read("feat", 0, len(val)).astype(np.float64)
        my, mx = bilinear_matrix(labels.shape[1], codes.shape[1]), bilinear_matrix(labels.shape[2], codes.shape[2])
        up = np.einsum("Yi,nijd,Xj->nYXd", my, codes, mx)  # §8: codes upsampled bilinearly to the label size
        centroids = np.load(run_dir / f"probe-{kind}" / "centroids.npy").astype(np.float64)
        centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
        cos = np.einsum("nYXd,kd->nYXk", up / np.linalg.norm(up, axis=-1, keepdims=True), centroids)
        linear = torch.load(run_dir / f"probe-{kind}" / "linear.pt", weights_only=True)["probe"]
        w, b = linear["conv.weight"][:, :, 0, 0].double().numpy(), linear["conv.bias"].double().numpy()
        logits = {"cluster": 2 * cos, "linear": np.einsum("nYXd,cd->nYXc", up, w) + b}  # §8: 2·cos as logits
        for probe, z in logits.items():
            crf_pred = np.stack([dense_crf(images[i], z[i].transpose(2, 0, 1).astype(np.float32)).argmax(0)
                                 for i in range(len(z))])
            for pred, suffix in ((z.argmax(-1), ""), (crf_pred, " + CRF")):
                miou, acc = naive_scores(pred, labels, 8, hungarian=probe == "cluster")
                row = rows[f"{label} {probe}{suffix}"]
                assert row["miou"] == pytest.approx(miou, abs=0.02), row["name"]  # reported to 2 decimals
                assert row["acc"] == pytest.approx(acc, abs=0.02), row["name"]
                checked += 1
    assert checked == 8


@pytest.mark.slow
def test_a_deleted_output_makes_the_stage_incomplete_and_it_is_recomputed(evaluated, capsys):
    """A manifest alone never proves a stage done: metrics.json deleted -> `status` says incomplete and names it,
    and the next `evaluate` recomputes it instead of saying "up to date"."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    config, workdir, _ = evaluated
    evaluate.run(config, workdir, "hp")  # the fixture's settings again (other tests of this module change them)
    metrics = paths.eval_dir(config, workdir, "hp") / "metrics.json"
    metrics.unlink()
    sets = [arg for k, v in TINY.items() for arg in ("--set", f"{k}={v}")]
    result = CliRunner().invoke(app, ["status", "--json", "--workdir", str(workdir), *sets])
    assert result.exit_code == 0, result.output
    states = {row["stage"]: row for row in json.loads(result.output[result.output.index("["):])}
    assert states["evaluate-hp"]["state"] == "incomplete" and states["evaluate-hp"]["missing"] == [str(metrics)]
    assert states["train-hp"]["state"] == "complete" and states["train-hp"]["missing"] == []
    capsys.readouterr()
    evaluate.run(config, workdir, "hp")
    out = capsys.readouterr().out
    assert "no longer exists: recomputing" in out and metrics.exists()
    assert "[train-hp] up to date" in out and "[codes-hp] up to date" in out  # only the stage that lost its output


# ---------------------------------------------------------------- what metrics.json and report.md say (#14)
def _strings(value):
    """Every string inside nested dicts and lists (keys included)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def test_metrics_json_paths_are_relative_to_its_folder(evaluated):
    """No absolute path anywhere in metrics.json; the checkpoint, probes and pictures it names resolve from its
    folder; `hp-pipe report` rebuilds report.md from it with links that resolve."""
    import re

    from typer.testing import CliRunner

    from pipeline.cli import app

    config, workdir, _ = evaluated
    evaluate.run(config, workdir, "hp")  # the fixture's settings again (other tests of this module change them)
    out = paths.eval_dir(config, workdir, "hp")
    text = (out / "metrics.json").read_text()
    assert str(workdir) not in text and str(workdir.resolve()) not in text
    metrics = json.loads(text)
    absolute = [s for s in _strings(metrics) if re.search(r"(^|[\s\"'(])(/|[A-Za-z]:\\)\w", s)]
    assert absolute == []
    run_dir = paths.run_dir(config, workdir, "hp")
    checkpoint = metrics["protocol"]["checkpoint"].split(" (")[0]
    assert (out / checkpoint).resolve() == paths.checkpoint_path(run_dir).resolve()
    assert (out / metrics["probes"]["centroids"]).resolve() == (run_dir / "probe-head" / "centroids.npy").resolve()
    assert (out / metrics["probes"]["linear"]).resolve() == (run_dir / "probe-head" / "linear.pt").resolve()
    assert metrics["pictures"] == {"overlays": "overlays.png", "confusion": "confusion.png", "iou": "iou.png"}
    (out / "report.md").unlink()
    result = CliRunner().invoke(app, ["report", "--dataset", "synthetic", "--workdir", str(workdir)])
    assert result.exit_code == 0, result.output
    links = re.findall(r"!\[.*?\]\((.*?)\)", (out / "report.md").read_text())
    assert len(links) == 3 and all((out / link).is_file() for link in links)


@pytest.mark.slow
def test_rows_and_protocol_say_what_ran(evaluated):
    """Raw rows named by what they are, the overclustering K as used (capped at the 48 val patches) and the
    protocol listing only the probes that ran."""
    config, workdir, _ = evaluated
    out = paths.eval_dir(config, workdir, "hp")
    metrics = json.loads((out / "metrics.json").read_text())
    raw = [r["name"] for r in metrics["results"] if r["features"] == "raw"]
    assert raw and all(name.startswith(RAW) for name in raw) and not any("DINO" in n for n in raw)
    patches = 3 * (64 // 16) ** 2  # 3 val images, 4 x 4 patches each
    assert {r["k"] for r in metrics["results"] if r["probe"] == "overcluster"} == {patches}
    line = metrics["protocol"]["overcluster"]
    assert f"K = {patches} (evaluate.overcluster_k = 64, capped" in line and "K = 64" not in line
    assert {"cluster_probe", "linear_probe"} <= set(metrics["protocol"])
    cluster_only = load_config("synthetic", {**TINY, "evaluate.probes": "cluster"})
    evaluate.run(cluster_only, workdir, "hp")
    metrics = json.loads((out / "metrics.json").read_text())
    assert "cluster_probe" in metrics["protocol"] and "linear_probe" not in metrics["protocol"]
    assert metrics["protocol_settings"]["linear_probe"] is None
    assert "linear" not in metrics["protocol"]["raw_features"]
    assert {r["probe"] for r in metrics["results"]} == {"cluster", "overcluster"}
    report = (out / "report.md").read_text()
    assert "**linear_probe**" not in report and "**cluster_probe**" in report
    evaluate.run(config, workdir, "hp")  # back to the fixture's settings


def test_capped_overclustering_is_said_once_without_faiss_warnings(evaluated, capfd):
    """K capped on the tiny val set: one line says the figure is not meaningful, no faiss warning wall (the
    unpatched faiss call printed one per seed and feature kind)."""
    config, workdir, _ = evaluated
    evaluate.run(config, workdir, "hp")
    (paths.eval_dir(config, workdir, "hp") / "metrics.json").unlink()  # evaluate-hp runs again, nothing before it
    capfd.readouterr()
    evaluate.run(config, workdir, "hp")
    printed = "".join(capfd.readouterr())
    assert printed.count("overclustering: K capped at 48 (evaluate.overcluster_k = 64)") == 1, printed
    assert "not meaningful" in printed and "WARNING clustering" not in printed


@pytest.mark.slow
def test_a_command_says_prepare_once_and_counts_in_words(tmp_path):
    """One training image, one val image: every stage summary counts in words ("1 image", "5 crops", "1 iteration")
    and a command that reaches `prepare` several times says "[prepare] up to date" once."""
    import os
    import re
    import subprocess
    import sys

    one = {**TINY, "dataset.n_train": "1", "dataset.n_val": "1", "hp.epochs": "1", "hp.pool_size": "4",
           "evaluate.crf": "false", "evaluate.overcluster": "false"}
    sets = [arg for k, v in one.items() for arg in ("--set", f"{k}={v}")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    outputs = {}
    for command in ("features", "train", "evaluate"):
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", command, "--workdir", str(tmp_path), *sets],
                              capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr
        outputs[command] = proc.stdout
    assert outputs["features"].count("[prepare] train: 5 crops from 1 image, val: 1 crop from 1 image") == 1
    assert "[prepare] up to date" not in outputs["features"]  # computed once, not announced again for val
    for command in ("train", "evaluate"):
        assert outputs[command].count("[prepare] up to date") == 1, outputs[command]
    summaries = [line for text in outputs.values() for line in text.splitlines() if re.match(r"\[[\w-]+\] ", line)]
    assert "[train-hp] HP: 1 iteration" in "\n".join(summaries)
    assert "codes of 5 train crops and 1 val crop" in "\n".join(summaries)
    wrong = [line for line in summaries if re.search(r"(?<![\d.])1 (?!is\b)[a-z]+s\b", line)]
    assert wrong == []


def test_predict_names_a_wrong_input_path_before_loading_any_model(evaluated, tmp_path, monkeypatch):
    from stages import predict

    config, workdir, _ = evaluated
    monkeypatch.setattr(predict, "load_encoder", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(predict, "resolve_backbone", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(UserError, match="nowhere"):
        predict.run(config, workdir, "hp", tmp_path / "nowhere", None, "cluster", False)
