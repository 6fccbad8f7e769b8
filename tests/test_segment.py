"""Your own photos without a single label: `hp-pipe segment` end to end, the cluster report, `predict` after it, and
the same folder with labels added (scores, and the very same clusters)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pipeline.evaluation.clusters import ClusterTally, example_crop
from pipeline.reporting.plots import contact_sheet
from stages.predict import output_stems
from tests.fixtures import picture, raw_ids, save

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def hp_pipe(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], capture_output=True, text=True,
                          env=ENV, cwd=cwd)


def photo(k: int, h: int, w: int) -> np.ndarray:
    """Two flat halves (sky over ground) with noise: something a cluster probe can split."""
    rng = np.random.default_rng(k)
    image = np.empty((h, w, 3), np.uint8)
    image[: h // 2], image[h // 2:] = [60 + 9 * k, 120, 210], [90, 170 - 7 * k, 50]
    return np.clip(image + rng.integers(0, 16, image.shape), 0, 255).astype(np.uint8)


def photo_folder(root):
    """train/images: 4 photos of every kind a camera or an export gives (colour JPEG, greyscale, binary, 16-bit,
    an EXIF-rotated JPEG); val/images: 4 colour PNGs. No labels anywhere. Returns {stem: (height, width) as a viewer
    shows the image}."""
    sizes = {}
    train, val = root / "train" / "images", root / "val" / "images"
    train.mkdir(parents=True)
    val.mkdir(parents=True)
    Image.fromarray(photo(0, 60, 80)).save(train / "colour.jpg", quality=92)
    Image.fromarray(photo(1, 64, 72)).convert("L").save(train / "grey.png")
    Image.fromarray(photo(2, 56, 80)).convert("L").point(lambda v: 255 if v > 120 else 0).convert("1").save(
        train / "binary.png")
    deep = (photo(3, 64, 64)[..., 1].astype(np.uint16) * 257)
    Image.fromarray(deep).save(train / "deep.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to view": a viewer shows it 80 high and 48 wide
    Image.fromarray(photo(4, 48, 80)).save(train / "rotated.jpg", exif=exif, quality=92)
    sizes.update({"colour": (60, 80), "grey": (64, 72), "binary": (56, 80), "deep": (64, 64), "rotated": (80, 48)})
    for k in range(4):
        Image.fromarray(photo(5 + k, 64, 96)).save(val / f"val{k}.png")
        sizes[f"val{k}"] = (64, 96)
    return sizes


@pytest.fixture(scope="module")
def segmented(tmp_path_factory):
    """One `hp-pipe segment` of the unlabelled folder (no --set, no option but --workdir), shared by the tests."""
    base = tmp_path_factory.mktemp("segment")
    photos, work = base / "photos", base / "work"
    sizes = photo_folder(photos)
    proc = hp_pipe("segment", photos, "--workdir", work)
    return photos, work, sizes, proc


@pytest.mark.slow
def test_segment_writes_a_label_png_and_an_overlay_per_image(segmented):
    photos, work, sizes, proc = segmented
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[folder] dataset.n_classes = 5" in proc.stderr  # no labels: 5 clusters, said in its [folder] line
    out = work / "folder" / "runs" / "hp" / "eval" / "predictions"
    assert f"[segment] 9 images -> {out}" in proc.stdout + proc.stderr
    for stem, (h, w) in sizes.items():
        labels = np.asarray(Image.open(out / f"{stem}.png"))
        overlay = np.asarray(Image.open(out / f"{stem}_overlay.png").convert("RGB"))
        assert labels.shape == (h, w) and overlay.shape == (h, w, 3), stem  # as a viewer shows it (EXIF too)
        assert labels.max() < 5  # cluster ids 0..4, nothing unmatched
    legend = json.loads((out / "legend.json").read_text())
    assert [c["name"] for c in legend["classes"]] == [f"cluster {c}" for c in range(5)] and not legend["labelled"]
    assert Image.open(out / "contact_sheet.png").size[0] > 4 * 200


def test_the_cluster_report_matches_the_predictions(segmented):
    """metrics.json's pixel shares and image counts, recomputed from the drawn val predictions (all 4 val images
    are drawn), and the pictures the report names."""
    _, work, _, proc = segmented
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no scores: the val split has no labels (4 images)" in proc.stdout + proc.stderr
    evaluation = work / "folder" / "runs" / "hp" / "eval"
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert metrics["labelled"] is False and metrics["results"] == [] and len(metrics["clusters"]) == 5
    with np.load(evaluation / "predictions.npz") as kept:
        pred = kept["pred/cluster"]
        assert "label" not in kept.files and len(pred) == 4
    for cluster in metrics["clusters"]:
        c = cluster["id"]
        assert cluster["pixels"] == int((pred == c).sum())
        assert cluster["pixel_share"] == round(100 * (pred == c).sum() / pred.size, 2)
        assert cluster["images"] == sum(int((p == c).any()) for p in pred)
    assert abs(sum(c["pixel_share"] for c in metrics["clusters"]) - 100) < 0.05
    assert set(metrics["pictures"]) == {"clusters", "overlays"}
    for drawn in metrics["pictures"].values():
        assert (evaluation / drawn).stat().st_size > 0
    report = (evaluation / "report.md").read_text()
    assert "## Clusters" in report and "No scores" in report and "## Results" not in report


def test_segment_again_resumes_and_recomputes_nothing(segmented):
    photos, work, sizes, proc = segmented
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = work / "folder" / "runs" / "hp" / "eval" / "predictions"
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png") if not p.name.startswith("contact")}
    stages = work / "folder" / "stages"
    finished = {p.name: json.loads(p.read_text())["finished"] for p in stages.glob("*.json")}
    again = hp_pipe("segment", photos, "--workdir", work)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "9 of 9 images done before" in again.stdout + again.stderr
    assert {p.name: json.loads(p.read_text())["finished"] for p in stages.glob("*.json")} == finished  # no stage ran
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png") if not p.name.startswith("contact")} == before


@pytest.mark.slow
def test_predict_after_segment_and_the_record_wins(segmented, tmp_path):
    photos, work, _, proc = segmented
    assert proc.returncode == 0, proc.stdout + proc.stderr
    image = photos / "val" / "images" / "val0.png"
    ok = hp_pipe("predict", image, "--dataset", "folder", "--data-root", photos, "--workdir", work, "--out",
                 tmp_path / "one")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    mine = np.asarray(Image.open(tmp_path / "one" / "val0.png"))
    segment_own = np.asarray(Image.open(work / "folder" / "runs" / "hp" / "eval" / "predictions" / "val0.png"))
    np.testing.assert_array_equal(mine, segment_own)  # the same run, probe and image: the same segments
    for option, value, key in (("--backbone", "vit_base_patch16_224.dino", "features.backbone"),
                               ("--data-root", tmp_path, "dataset.root")):
        refused = hp_pipe("predict", image, "--dataset", "folder", "--workdir", work, option, value)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
        assert key in refused.stderr and str(value) in refused.stderr and "Leave the option out" in refused.stderr
    linear = hp_pipe("predict", image, "--dataset", "folder", "--workdir", work, "--probe", "linear")
    assert linear.returncode == 2 and "only the cluster probe was fitted" in linear.stderr


@pytest.mark.slow
def test_labels_added_give_scores_and_the_same_clusters(segmented, tmp_path):
    """The same photos with labels beside them: evaluate scores them, and its cluster maps are the unlabelled run's
    clusters through the Hungarian mapping (labels change the report, never the clusters)."""
    photos, work, _, proc = segmented
    assert proc.returncode == 0, proc.stdout + proc.stderr
    labelled = tmp_path / "labelled"
    shutil.copytree(photos, labelled)
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for image in (labelled / split / "images").iterdir():
            with Image.open(image) as im:
                w, h = im.size
            if image.stem == "rotated":
                w, h = h, w  # labels are drawn on the image as it is seen
            save(labelled / split / "labels" / f"{image.stem}.png", raw_ids(rng, [0, 1, 2, 3, 4, 255], h, w))
    run = hp_pipe("segment", labelled, "--workdir", tmp_path / "work")
    assert run.returncode == 0, run.stdout + run.stderr
    evaluation = tmp_path / "work" / "folder" / "runs" / "hp" / "eval"
    metrics = json.loads((evaluation / "metrics.json").read_text())
    cluster = next(r for r in metrics["results"] if r["features"] == "head" and r["probe"] == "cluster"
                   and not r["crf"])
    assert 0 <= cluster["miou"] <= 100 and "clusters" not in metrics
    with np.load(evaluation / "predictions.npz") as scored, \
            np.load(work / "folder" / "runs" / "hp" / "eval" / "predictions.npz") as unlabelled:
        mapping = np.asarray(cluster["cluster_to_class"])
        np.testing.assert_array_equal(scored["pred/cluster"], mapping[unlabelled["pred/cluster"]])


# ---------------------------------------------------------------- the pieces, against naive computations
def test_cluster_tally_against_a_naive_count():
    rng = np.random.default_rng(3)
    images = rng.integers(0, 255, (7, 9, 11, 3), dtype=np.uint8)
    maps = rng.integers(0, 4, (7, 9, 11))
    maps[2] = 1  # an image that is all cluster 1: its best example
    tally = ClusterTally(5, examples=3)
    tally.add(images[:3], maps[:3])
    tally.add(images[3:], maps[3:])  # fed in two batches: the image indices go on
    for row in tally.table():
        c = row["id"]
        assert row["pixels"] == (maps == c).sum() and row["images"] == sum((m == c).any() for m in maps)
        assert row["pixel_share"] == round(100 * (maps == c).sum() / maps.size, 2)
        counts = [(int((m == c).sum()), i) for i, m in enumerate(maps) if (m == c).any()]
        expected = sorted(counts, key=lambda e: (-e[0], e[1]))[:3]
        assert [(n, i) for n, i, _, _ in tally.best.get(c, [])] == expected
    assert tally.table()[4]["pixels"] == 0 and 4 not in tally.best  # an empty cluster: no example
    n, index, crop, mask = tally.best[1][0]
    assert (n, index) == (99, 2) and crop.shape == (9, 11, 3) and mask.all()
    np.testing.assert_array_equal(crop, images[2])


def test_example_crop_holds_the_mask_and_grows_a_thin_one():
    image = np.arange(40 * 60 * 3, dtype=np.int64).reshape(40, 60, 3)
    mask = np.zeros((40, 60), bool)
    mask[10:30, 5:50] = True
    crop, held = example_crop(image, mask)
    np.testing.assert_array_equal(crop, image[10:30, 5:50])
    assert held.all()
    thin = np.zeros((40, 60), bool)
    thin[0, 58:60] = True  # 1 x 2 pixels in a corner: grown to a quarter of each side, kept inside the image
    crop, held = example_crop(image, thin, min_fraction=0.25)
    assert crop.shape[:2] == (10, 15) and held.sum() == 2
    np.testing.assert_array_equal(crop, image[0:10, 45:60])
    with pytest.raises(ValueError):
        example_crop(image, np.zeros((40, 60), bool))


def test_contact_sheet_puts_each_picture_in_its_cell(tmp_path):
    red, blue = np.zeros((30, 60, 3), np.uint8), np.zeros((50, 50, 3), np.uint8)
    red[..., 0], blue[..., 2] = 255, 255
    contact_sheet([red, blue, red], ["a", "b", "c"], tmp_path / "sheet.png", columns=2, cell=100)
    sheet = np.asarray(Image.open(tmp_path / "sheet.png").convert("RGB"))
    gap = 4
    assert sheet[gap + 50, gap + 50].tolist() == [255, 0, 0]  # cell (0, 0): red, enlarged to 100 wide
    assert sheet[gap + 50, 2 * gap + 100 + 50].tolist() == [0, 0, 255]  # cell (0, 1): blue
    assert sheet[gap + 5, gap + 50].tolist() == [255, 255, 255]  # above the letterboxed red: white
    assert sheet.shape[0] == 2 * (100 + 16 + gap) + gap  # two rows of cell + caption


def test_output_stems_never_collide():
    from pathlib import Path

    stems = output_stems([Path("a/x.jpg"), Path("b/x.jpg"), Path("x.png"), Path("y.png"), Path("c/x.jpg")])
    assert stems[0] == "x" and stems[3] == "y" and len(set(stems)) == 5


def test_html_report_of_an_unlabelled_evaluation():
    """The page shows the cluster table instead of scores, and its prediction grid has no ground-truth column."""
    from pipeline.reporting.html_report import render

    clusters = [{"id": c, "name": f"cluster {c}", "rgb": [10 * c, 20, 30], "pixels": 5, "pixel_share": 50.0,
                 "images": 1} for c in range(2)]
    metrics = {"dataset": "folder", "run": "hp", "method": "hp", "labelled": False, "clusters": clusters,
               "class_names": ["cluster 0", "cluster 1"], "results": [], "protocol": {}}
    images = np.zeros((1, 4, 4, 3), np.uint8)
    page = render(metrics, {}, {"image": images, "pred/cluster": np.zeros((1, 4, 4), np.uint8)})
    assert '<table id="clusters">' in page and "No scores" in page and "#0a141e" in page
    assert "<th>ground truth</th>" not in page and "<th>HP cluster</th>" in page


def test_clusters_option_sets_the_number_of_classes(tmp_path, monkeypatch):
    """`segment --clusters K` (and train/evaluate's) is dataset.n_classes = K, an explicit setting the folder's
    derivation never changes; 0 is refused by the option."""
    from typer.testing import CliRunner

    import stages.predict
    from pipeline.cli import app
    from pipeline.orchestration import graph

    photos = tmp_path / "photos"
    for k in range(3):
        save(photos / "images" / f"{k}.png", picture(k, 32, 32))
    seen = {}
    monkeypatch.setattr(graph, "build", lambda config, *a, **kw: seen.update(config=config) or {"outputs": {}})
    monkeypatch.setattr(stages.predict, "run", lambda *a, **kw: {"out": "x"})
    result = CliRunner().invoke(app, ["segment", str(photos), "--workdir", str(tmp_path / "w"), "--clusters", "3"])
    assert result.exit_code == 0, result.output
    assert seen["config"]["dataset"]["n_classes"] == 3 and seen["config"]["dataset"]["root"] == str(photos)
    refused = CliRunner().invoke(app, ["segment", str(photos), "--clusters", "0"])
    assert refused.exit_code == 2 and "--clusters" in refused.output


def test_a_recorded_run_keeps_its_folder_settings(tmp_path):
    """evaluate/predict read a folder run's recorded settings: the folder's size-derived values are never derived
    again over them (a run trained with --set hp.batch_size=4 is evaluated as trained, not refused)."""
    from pipeline.cli import build_run_config
    from pipeline.config import load_config
    from pipeline.datasets.folder import small_data_settings
    from pipeline.orchestration import paths
    from pipeline.orchestration.runs import write_record

    photos = tmp_path / "photos"
    for k in range(12):
        save(photos / "images" / f"{k}.png", picture(k, 32, 32))
    trained = load_config("folder", {"dataset.root": str(photos), "hp.batch_size": "4"})
    small_data_settings(trained, {"dataset.root", "hp.batch_size"})
    write_record(paths.run_dir(trained, tmp_path, "hp"), trained)
    settings = build_run_config("folder", tmp_path, None, str(photos))
    assert settings.config["hp"] == trained["hp"] and settings.config["hp"]["batch_size"] == 4
    fresh = load_config("folder", {"dataset.root": str(photos)})
    assert small_data_settings(fresh, {"dataset.root"}) and fresh["hp"]["batch_size"] == 8  # what it would derive


SMALL = {  # every method small enough for seconds on this CPU (the folder's own derivations are tested above)
    "hcl": {"hcl_features.resolution": "64", "hcl_features.crop_resolution": "128", "hcl_features.val_resolution":
            "64", "hcl.batch_size": "2", "hcl.epochs": "1", "hcl.dim": "32", "hcl.hidden": "64", "hcl.out_dim": "16",
            "hcl.heads": "2", "hcl.clusters": "4", "hcl.kmeans_min_points": "1"},
    "stego": {"prepare.resolution": "64", "prepare.val_resolution": "64", "features.n_views": "1",
              "stego.max_steps": "6", "stego.head_dim": "16", "stego.feature_samples": "5"},
}


@pytest.mark.parametrize("method", sorted(SMALL))
@pytest.mark.slow
def test_segment_works_for_every_method(tmp_path, method):
    """`segment --method M --clusters 3`: HCL (its own stores, protocol kmeans) and STEGO (the HP stores, its probes
    trained with the head under protocol paper) segment the same unlabelled folder into 3 clusters."""
    from pipeline.methods.registry import names

    assert set(SMALL) == set(names()) - {"hp"}  # HP runs in the tests above, with no --set at all
    photos = tmp_path / "photos"
    (photos / "images").mkdir(parents=True)
    for k in range(4):
        Image.fromarray(photo(k, 48, 64)).save(photos / "images" / f"p{k}.png")
    sets = [a for key, value in {**SMALL[method], "evaluate.crf": "false"}.items() for a in ("--set", f"{key}={value}")]
    proc = hp_pipe("segment", photos, "--method", method, "--clusters", "3", "--random-init", "--workdir",
                   tmp_path / "w", *sets)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    evaluation = tmp_path / "w" / "folder" / "runs" / method / "eval"
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert metrics["method"] == method and not metrics["labelled"] and len(metrics["clusters"]) == 3
    for k in range(4):
        labels = np.asarray(Image.open(evaluation / "predictions" / f"p{k}.png"))
        assert labels.shape == (48, 64) and labels.max() < 3
        assert (evaluation / "predictions" / f"p{k}_overlay.png").exists()
