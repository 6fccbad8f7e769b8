"""What the evaluation says about itself: row names, counts in words, paths relative to metrics.json, and one line
(not a faiss warning per k-means run) when overclustering has too few val patches."""

import numpy as np
import pytest

from pipeline.evaluation.overcluster import FAISS_MIN_POINTS, few_points_note, overcluster_maps
from pipeline.reporting.report import raw_features_label, relative_path, write_report
from pipeline.wording import plural


@pytest.mark.parametrize(("backbone", "random_init", "expected"), [
    ("vit_small_patch16_224.dino", True, "ViT-S/16 features (random init)"),
    ("vit_small_patch8_224.dino", False, "DINO ViT-S/8"),
    ("vit_base_patch16_224.dino", True, "ViT-B/16 features (random init)"),
    ("vit_base_patch8_224", False, "ViT-B/8 features"),
    ("vit_small_patch14_reg4_dinov2.lvd142m", False, "DINOv2 ViT-S/14 reg4"),
    ("vit_small_patch14_dinov2.lvd142m", True, "ViT-S/14 features (random init)"),
    ("vit_base_patch16_dinov3.lvd1689m", False, "DINOv3 ViT-B/16"),
])
def test_raw_rows_are_named_by_what_they_are(backbone, random_init, expected):
    assert raw_features_label(backbone, random_init) == expected
    assert "DINO" not in raw_features_label(backbone, True)  # random weights are never called DINO


@pytest.mark.parametrize(("n", "noun", "expected"), [
    (1, "image", "1 image"), (2, "image", "2 images"), (0, "crop", "0 crops"), (1, "val crop", "1 val crop"),
    (16, "val crop", "16 val crops"), (3, "patch", "3 patches"), (1, "patch", "1 patch"),
    (2, "backbone pass", "2 backbone passes"),
])
def test_plural(n, noun, expected):
    assert plural(n, noun) == expected


def test_prepare_summary_counts_in_words():
    from stages.prepare import summary

    one = {"train": {"samples": 1, "source_images": 1}, "val": {"samples": 2, "source_images": 2}}
    assert summary(one) == "train: 1 crop from 1 image, val: 2 crops from 2 images"
    five = {"train": {"samples": 5, "source_images": 1}}
    assert summary(five) == "train: 5 crops from 1 image"


def test_few_points_note_only_when_k_is_capped_or_faiss_would_warn():
    assert few_points_note(FAISS_MIN_POINTS * 64, 64, 64) is None
    capped = few_points_note(400, 400, 500)
    assert "K capped at 400 (evaluate.overcluster_k = 500)" in capped and "400 val patches" in capped
    assert "not meaningful" in capped and "\n" not in capped
    thin = few_points_note(FAISS_MIN_POINTS * 64 - 1, 64, 64)
    assert thin is not None and "K = 64" in thin and "capped" not in thin


def test_capped_overclustering_prints_no_faiss_warning_and_keeps_the_result(capfd):
    """K capped at a tiny val set: faiss's "WARNING clustering ... please provide at least" (once per k-means
    run) is gone, the result is the one faiss gives with its default settings, and the note says it once."""
    import faiss

    rng = np.random.default_rng(0)
    features = rng.normal(size=(2, 3, 3, 6)).astype(np.float32)
    labels = rng.integers(0, 3, size=(2, 6, 6)).astype(np.uint8)
    capfd.readouterr()
    out = overcluster_maps(features, labels, 3, k=500, pca=4, seeds=(0, 1, 2), size=6, iterations=5, restarts=2)
    printed = "".join(capfd.readouterr())
    assert "WARNING clustering" not in printed and out["k"] == 18
    assert out["note"] == few_points_note(18, 18, 500)
    x = rng.normal(size=(40, 4)).astype(np.float32)  # min_points_per_centroid only silences the warning
    from pipeline.evaluation.overcluster import kmeans_assign

    plain = faiss.Kmeans(4, 8, niter=5, nredo=2, seed=3, verbose=False)
    plain.train(x)
    np.testing.assert_array_equal(kmeans_assign(x, 8, 3, 5, 2), plain.index.search(x, 1)[1][:, 0])
    assert "WARNING clustering" in "".join(capfd.readouterr())  # faiss's default does warn: the test can fail


def test_relative_paths_and_a_report_written_from_them(tmp_path):
    out = tmp_path / "run" / "eval"
    (out / "pics").mkdir(parents=True)
    (out / "pics" / "iou.png").write_bytes(b"png")
    (tmp_path / "run" / "checkpoints").mkdir()
    assert relative_path(out / "pics" / "iou.png", out) == "pics/iou.png"
    assert relative_path(tmp_path / "run" / "checkpoints" / "last.pt", out) == "../checkpoints/last.pt"
    metrics = {"results": [], "pictures": {"iou": "pics/iou.png"}}
    write_report(metrics, metrics["pictures"], out / "report.md")  # as `hp-pipe report` does, from metrics.json
    assert "![iou](pics/iou.png)" in (out / "report.md").read_text()
