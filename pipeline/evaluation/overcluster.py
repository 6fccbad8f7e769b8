"""Overclustering evaluation (docs/hcl.md §5): PCA + k-means with many clusters, many-to-one matching. No I/O.

The protocol as the HCL reference's `overclustering_eval.py` runs it: standardize, PCA, faiss k-means with
`niter` iterations and `nredo` restarts per seed (faiss's other defaults kept, so K = 500 trains on a subsample
of 256 points per centroid as there), every val patch assigned to its nearest centroid, cluster maps and labels
resized to size x size with torch's `nearest` (floor index), clusters matched many-to-one by precision, and
per-class IoU = tp / max(tp + fp + fn, 1e-8) averaged over all classes (a class absent from both the labels and
the prediction counts as 0). Two accuracies: pixel accuracy Σtp / #pixels, and the figure the reference prints
as "Acc", Σtp / Σ(tp + fp + fn) over classes; each is reported under its own name.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.evaluation.metrics import confusion_matrix, remap_confusion
from pipeline.faiss_ops import kmeans


def many_to_one_match(confusion: np.ndarray) -> np.ndarray:
    """(classes x clusters) -> cluster -> class: each cluster goes to the class most of its pixels belong to.

    That is the reference's match by precision tp / (tp + fp): a cluster's tp + fp is its size whatever the
    class, so the highest precision is the largest count (ties and empty clusters: the lowest class id).
    """
    return np.asarray(confusion).argmax(axis=0).astype(np.int64)


def standardize_pca(features: np.ndarray, dims: int, block: int = 65_536) -> np.ndarray:
    """Zero-mean unit-variance per channel, then projection on the top `dims` principal axes (SVD of the covariance).

    Streams `block` rows at a time (statistics in float64), so a val set of millions of float16 patches never
    exists as one float32/float64 copy: only the (M, dims) result is held.
    """
    m, d = features.shape
    blocks = [slice(i, min(i + block, m)) for i in range(0, m, block)]
    total = np.zeros(d)
    for b in blocks:
        total += features[b].astype(np.float64).sum(0)
    mean = total / m
    cov = np.zeros((d, d))
    for b in blocks:
        x = features[b].astype(np.float64) - mean
        cov += x.T @ x
    std = np.maximum(np.sqrt(np.diag(cov) / m), 1e-8)
    corr = cov / max(m - 1, 1) / np.outer(std, std)  # covariance of the standardized features
    u, _, _ = np.linalg.svd(corr, hermitian=True)
    axes = (u[:, : min(dims, d)] / std[:, None]).astype(np.float32)  # standardize and project in one product
    shift = (mean.astype(np.float32) @ axes).astype(np.float32)
    out = np.empty((m, axes.shape[1]), dtype=np.float32)
    for b in blocks:
        out[b] = features[b].astype(np.float32) @ axes - shift
    return out


def nearest_index(h: int, w: int, size: int) -> np.ndarray:
    """Flat source index of each of size x size output pixels under torch's `F.interpolate(mode="nearest")`.

    Taken from torch itself (an interpolated arange, exact in float64), so the rule is torch's to the last
    rounding: row i reads input row min(floor(i * h / size), h - 1) (the scale as a float32), not the pixel-centre
    rule of `nearest-exact`. The reference resizes both its labels and its cluster maps this way (docs/hcl.md §5).
    """
    grid = torch.arange(h * w, dtype=torch.float64).reshape(1, 1, h, w)
    return F.interpolate(grid, size=(size, size), mode="nearest").reshape(-1).long().numpy()


def nearest_resize(maps: np.ndarray, size: int) -> np.ndarray:
    """(N, H, W) integer maps -> (N, size, size) with torch's nearest (floor index); ids are never interpolated."""
    maps = np.asarray(maps)
    n, h, w = maps.shape
    return maps.reshape(n, h * w)[:, nearest_index(h, w, size)].reshape(n, size, size)


def reference_scores(confusion: np.ndarray) -> dict:
    """mIoU over all classes and both accuracies from a (classes x classes) matched confusion matrix.

    IoU_c = tp / max(tp + fp + fn, 1e-8) for every class, so a class absent from labels and prediction scores 0
    and stays in the mean, as in the reference; `acc_ref` is the reference's "Acc" Σtp / Σ(tp + fp + fn),
    `pixel_acc` is Σtp / #labelled pixels.
    """
    conf = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(conf)
    fp, fn = conf.sum(0) - tp, conf.sum(1) - tp
    iou = tp / np.maximum(tp + fp + fn, 1e-8)
    total, union = conf.sum(), (tp + fp + fn).sum()
    return {"miou": float(iou.mean()), "acc_ref": float(tp.sum() / union) if union else 0.0,
            "pixel_acc": float(tp.sum() / total) if total else 0.0, "iou": [float(v) for v in iou]}


def _summary(per_seed: list[dict]) -> dict:
    out: dict = {}
    for key in ("miou", "acc_ref", "pixel_acc"):
        values = np.array([r[key] for r in per_seed])
        out.update({f"{key}_mean": float(values.mean()), f"{key}_std": float(values.std())})
    return {**out, "per_seed": per_seed}


FAISS_MIN_POINTS = 39  # faiss's default min_points_per_centroid: below it, it warns on every train call


def few_points_note(points: int, k: int, asked: int) -> str | None:
    """One line saying the overclustering figures mean little, when K had to be capped at the number of patches
    or faiss gets fewer than FAISS_MIN_POINTS patches per cluster; None otherwise."""
    if k >= asked and points >= FAISS_MIN_POINTS * k:
        return None
    capped = f"K capped at {k} (evaluate.overcluster_k = {asked})" if k < asked else f"K = {k}"
    return (f"overclustering: {capped} on only {points} val patches (k-means wants at least {FAISS_MIN_POINTS} "
            "per cluster): the overcluster rows are not meaningful on a val set this small")


def kmeans_assign(x: np.ndarray, k: int, seed: int, iterations: int, restarts: int) -> np.ndarray:
    """faiss k-means (`niter` = iterations, `nredo` = restarts, the best of the restarts kept), then every row's
    nearest centroid (L2).

    faiss's `min_points_per_centroid` only decides whether it prints "WARNING clustering ... please provide at
    least" (once per call, so seeds x feature kinds times per evaluation); it is lowered to 1 when there are few
    points, which changes no result, and `few_points_note` says it once instead."""
    quiet = 1 if len(x) < FAISS_MIN_POINTS * k else None
    km = kmeans(x, k, iterations=iterations, seed=seed, restarts=restarts, min_points=quiet)
    return km.index.search(x, 1)[1][:, 0]


def _scored(assign: np.ndarray, labels: np.ndarray, k: int, n_classes: int, seed: int) -> dict:
    conf = confusion_matrix(assign, labels, k, n_classes)
    matched = remap_confusion(conf, many_to_one_match(conf))[:, :n_classes]  # every cluster has a class
    return {"seed": int(seed), **reference_scores(matched)}


def overcluster_scores(features: np.ndarray, labels: np.ndarray, n_classes: int, k: int = 500, pca: int = 100,
                       seeds: tuple[int, ...] = (0, 1, 2, 3, 4), iterations: int = 100, restarts: int = 5) -> dict:
    """k-means (K clusters, per seed) on the given features, many-to-one matched, mIoU and both accuracies per seed.

    features (M, D), one row per evaluated pixel/patch; labels (M,), 255 (any id outside 0..n_classes-1) ignored.
    """
    labels = np.asarray(labels).ravel()
    if len(features) != len(labels):
        raise ValueError(f"overcluster_scores: {len(features)} feature rows but {len(labels)} labels")
    x = standardize_pca(features, pca)
    return _summary([_scored(kmeans_assign(x, k, seed, iterations, restarts), labels, k, n_classes, seed)
                     for seed in seeds])


def overcluster_maps(features: np.ndarray, labels: np.ndarray, n_classes: int, k: int = 500, pca: int = 100,
                     seeds: tuple[int, ...] = (0, 1, 2, 3, 4), size: int = 100, iterations: int = 100,
                     restarts: int = 5) -> dict:
    """The protocol of docs/hcl.md §5 on dense features (N, h, w, D) and labels (N, H, W).

    k-means on every val patch; each image's cluster map and its label map are resized (torch nearest, floor
    index) to size x size and compared there. K is capped at the number of patches (reported as "k"); "note" is
    `few_points_note`'s line (None when there are enough patches).
    """
    n, h, w, d = features.shape
    asked, k = k, min(k, n * h * w)
    x = standardize_pca(features.reshape(-1, d), pca)
    target = nearest_resize(np.asarray(labels), size)
    per_seed = []
    for seed in seeds:
        assign = nearest_resize(kmeans_assign(x, k, seed, iterations, restarts).reshape(n, h, w), size)
        per_seed.append(_scored(assign, target, k, n_classes, seed))
    return {**_summary(per_seed), "k": k, "size": size, "iterations": int(iterations), "restarts": int(restarts),
            "note": few_points_note(n * h * w, k, asked)}
