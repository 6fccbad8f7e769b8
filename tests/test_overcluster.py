"""The overclustering protocol (docs/hcl.md §5) against a naive recomputation of the HCL reference's evaluation:
standardize + PCA, faiss k-means (niter 100, nredo 5 per seed), torch-nearest (floor index) masks, many-to-one by
precision, IoU over all classes, and its "Acc" Σtp / Σ(tp + fp + fn) beside pixel accuracy."""

import faiss
import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.evaluation import scoring as evaluation
from pipeline.evaluation.overcluster import nearest_index, nearest_resize, overcluster_maps, reference_scores
from pipeline.reporting.report import ACC_REF_HEADER, results_table


class RecordingKmeans(faiss.Kmeans):
    """faiss's own k-means, recording how it was built and what it was trained on."""

    runs: list = []

    def __init__(self, d, k, **kwargs):
        super().__init__(d, k, **kwargs)
        self.kwargs = kwargs
        RecordingKmeans.runs.append(self)

    def train(self, x, *args, **kwargs):
        self.x = np.array(x, copy=True)
        return super().train(x, *args, **kwargs)


@pytest.fixture
def recording(monkeypatch):
    RecordingKmeans.runs = []
    monkeypatch.setattr(faiss, "Kmeans", RecordingKmeans)
    return RecordingKmeans.runs


def naive_floor_resize(maps: np.ndarray, size: int) -> np.ndarray:
    """Output pixel (i, j) reads input (floor(i * H / size), floor(j * W / size)), exact integer arithmetic."""
    n, h, w = maps.shape
    out = np.zeros((n, size, size), dtype=maps.dtype)
    for i in range(size):
        for j in range(size):
            out[:, i, j] = maps[:, min(i * h // size, h - 1), min(j * w // size, w - 1)]
    return out


def naive_row(assign: np.ndarray, labels: np.ndarray, k: int, n_classes: int) -> dict:
    """The reference's scoring, written out with loops: many-to-one by precision over the labelled pixels (255
    ignored), then per class tp / max(tp + fp + fn, 1e-8), averaged over all classes."""
    keep = labels != 255
    pred, gt = assign[keep], labels[keep]
    to_class = {}
    for cluster in range(k):
        best, best_score = None, None
        for cls in range(n_classes):
            tp = np.sum((pred == cluster) & (gt == cls))
            fp = np.sum((pred == cluster) & (gt != cls))
            precision = tp / max(tp + fp, 1e-8)
            if best is None or precision > best_score:
                best, best_score = cls, precision
        to_class[cluster] = best
    remapped = np.array([to_class[c] for c in pred])
    tps, fps, fns, ious = [], [], [], []
    for cls in range(n_classes):
        tp = np.sum((gt == cls) & (remapped == cls))
        fp = np.sum((gt != cls) & (remapped == cls))
        fn = np.sum((gt == cls) & (remapped != cls))
        tps, fps, fns = tps + [tp], fps + [fp], fns + [fn]
        ious.append(tp / max(tp + fp + fn, 1e-8))
    return {"miou": float(np.mean(ious)), "acc_ref": sum(tps) / (sum(tps) + sum(fps) + sum(fns)),
            "pixel_acc": sum(tps) / len(gt), "iou": ious}


def test_overcluster_maps_equal_a_naive_recomputation_with_the_same_kmeans(recording):
    rng = np.random.default_rng(0)
    n, grid, dim, n_classes, k, size = 3, 7, 12, 6, 8, 10
    patch_labels = rng.integers(0, 4, size=(n, grid, grid))  # classes 4 and 5 absent: they score 0, still counted
    centres = rng.normal(0, 1, size=(4, dim)) * 2
    features = (centres[patch_labels] + rng.normal(0, 1, size=(n, grid, grid, dim))).astype(np.float16)
    labels = rng.integers(0, 4, size=(n, 20, 20)).astype(np.uint8)
    labels[:, :, :3] = 255  # ignored
    out = overcluster_maps(features, labels, n_classes, k=k, pca=5, seeds=(0, 1), size=size)

    assert len(recording) == 2
    flat = features.reshape(-1, dim).astype(np.float64)
    z = (flat - flat.mean(0)) / flat.std(0)  # standardize (population std, as sklearn's StandardScaler)
    _, _, vt = np.linalg.svd(z, full_matrices=False)
    pca = z @ vt[:5].T
    target = naive_floor_resize(labels, size)
    for run, got in zip(recording, out["per_seed"], strict=True):
        sign = np.sign(np.sum(pca * run.x, axis=0))  # principal axes are defined up to sign
        np.testing.assert_allclose(run.x, pca * sign, atol=2e-4)
        x = pca * sign
        dist = ((x[:, None, :] - run.centroids[None, :, :].astype(np.float64)) ** 2).sum(-1)
        assign = naive_floor_resize(dist.argmin(1).reshape(n, grid, grid), size)
        expected = naive_row(assign, target, k, n_classes)
        assert got["miou"] == pytest.approx(expected["miou"], abs=1e-12)
        assert got["acc_ref"] == pytest.approx(expected["acc_ref"], abs=1e-12)
        assert got["pixel_acc"] == pytest.approx(expected["pixel_acc"], abs=1e-12)
        np.testing.assert_allclose(got["iou"], expected["iou"], atol=1e-12)
        assert got["iou"][4] == got["iou"][5] == 0.0 and got["acc_ref"] < got["pixel_acc"]
    for key in ("miou", "acc_ref", "pixel_acc"):
        values = [r[key] for r in out["per_seed"]]
        assert out[f"{key}_mean"] == pytest.approx(np.mean(values))
        assert out[f"{key}_std"] == pytest.approx(np.std(values))


def test_nearest_resize_takes_the_floor_index_like_torch_nearest():
    # 3 -> 4: torch's nearest reads rows floor(i * 3/4) = 0, 0, 1, 2; pixel centres (nearest-exact): 0, 1, 1, 2
    assert nearest_index(3, 1, 4).reshape(4, 4)[:, 0].tolist() == [0, 0, 1, 2]
    maps = np.arange(1, 10).reshape(1, 3, 3)
    assert nearest_resize(maps, 4)[0].tolist() == [[1, 1, 2, 3], [1, 1, 2, 3], [4, 4, 5, 6], [7, 7, 8, 9]]
    # 5 -> 2: rows floor(0 * 2.5) = 0 and floor(1 * 2.5) = 2 (nearest-exact: 1 and 3)
    assert nearest_resize(np.arange(25).reshape(1, 5, 5), 2)[0].tolist() == [[0, 2], [10, 12]]
    for h in (28, 56, 448):  # the VOC grids (S/16, S/8 at 448) and labels, to 100
        rows, cols = np.divmod(nearest_index(h, h, 100).reshape(100, 100), h)  # flat index = row * W + col
        assert rows[:, 0].tolist() == cols[0].tolist() == [i * h // 100 for i in range(100)]


def test_reference_acc_and_pixel_acc_on_a_hand_made_confusion():
    conf = np.array([[5, 1, 0, 0],   # rows: true class, columns: predicted (after matching)
                     [2, 3, 1, 0],
                     [0, 0, 0, 0],   # class 2: predicted once, never labelled -> IoU 0
                     [0, 0, 0, 0]])  # class 3: absent from both -> IoU 0, still in the mean (as the reference)
    got = reference_scores(conf)
    # tp = 5, 3, 0, 0; fp = 2, 1, 1, 0; fn = 1, 3, 0, 0
    assert got["pixel_acc"] == pytest.approx(8 / 12)
    assert got["acc_ref"] == pytest.approx(8 / 16)
    assert got["iou"] == pytest.approx([5 / 8, 3 / 7, 0.0, 0.0])
    assert got["miou"] == pytest.approx((5 / 8 + 3 / 7) / 4)


class ArrayStore:
    """The two reads overcluster_row makes of a FeatureStore."""

    def __init__(self, **arrays):
        self.arrays = arrays

    def __len__(self):
        return len(next(iter(self.arrays.values())))

    def read(self, name, start, stop):
        return self.arrays[name][start:stop]


def test_overcluster_row_passes_iterations_and_restarts_to_faiss(recording):
    rng = np.random.default_rng(1)
    feat = ArrayStore(feat=rng.normal(0, 1, size=(2, 4, 4, 8)).astype(np.float16))
    val = ArrayStore(label=rng.integers(0, 3, size=(2, 16, 16)).astype(np.uint8))
    config = load_config("synthetic", {"evaluate.overcluster_k": "5", "evaluate.overcluster_pca": "4",
                                       "evaluate.overcluster_seeds": "2", "evaluate.overcluster_restarts": "5"})
    assert load_config("voc")["evaluate"]["overcluster_restarts"] == 5  # the reference's (synthetic: 2, for a CPU)
    row = evaluation.overcluster_row("head", feat, val, config, "HCL")
    assert [(r.kwargs["niter"], r.kwargs["nredo"], r.kwargs["seed"]) for r in recording] == [(100, 5, 0), (100, 5, 1)]
    assert [(r.cp.niter, r.cp.nredo) for r in recording] == [(100, 5)] * 2  # reached faiss's ClusteringParameters
    assert "max_points_per_centroid" not in recording[0].kwargs  # faiss's default, as the reference's k-means
    assert row["acc_ref"] < row["acc"] and row["seeds"] == 2 and len(row["iou"]) == config["dataset"]["n_classes"]

    recording.clear()
    config["evaluate"].update(overcluster_iterations=7, overcluster_restarts=2)
    evaluation.overcluster_row("head", feat, val, config, "HCL")
    assert [(r.cp.niter, r.cp.nredo) for r in recording] == [(7, 2)] * 2


def test_report_names_both_accuracies():
    rows = [{"name": "HCL overcluster K=5", "probe": "overcluster", "features": "head", "crf": False, "miou": 40.0,
             "miou_std": 1.0, "acc": 70.0, "acc_std": 2.0, "acc_ref": 53.85, "acc_ref_std": 0.5},
            {"name": "HCL linear", "probe": "linear", "features": "head", "crf": False, "miou": 50.0, "acc": 80.0}]
    lines = results_table(rows)
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert header[-3:] == ["mIoU (%)", "Acc (%)", ACC_REF_HEADER]
    assert cells[0][-2:] == ["70.0 ± 2.0", "53.9 ± 0.5"] and cells[1][-1] == "–"
