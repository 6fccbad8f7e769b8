"""Overclustering evaluation (specs/HCL.md §5): PCA + k-means with many clusters, many-to-one matching. No I/O."""

from __future__ import annotations

import faiss
import numpy as np

from pipeline.metrics import confusion_matrix, remap_confusion, scores


def many_to_one_match(confusion: np.ndarray) -> np.ndarray:
    """(classes x clusters) -> cluster -> class: each cluster goes to the class most of its pixels belong to."""
    return np.asarray(confusion).argmax(axis=0).astype(np.int64)


def standardize_pca(features: np.ndarray, dims: int) -> np.ndarray:
    """Zero-mean unit-variance per channel, then projection on the top `dims` principal axes (SVD of the covariance).

    Statistics in float64, the (M, D) matrix itself in float32: val sets have millions of patches.
    """
    x = np.asarray(features, dtype=np.float32)
    mean, std = x.mean(0, dtype=np.float64), x.std(0, dtype=np.float64)
    x = ((x - mean.astype(np.float32)) / np.maximum(std, 1e-8).astype(np.float32)).astype(np.float32)
    cov = (x.T.astype(np.float64) @ x.astype(np.float64)) / max(len(x) - 1, 1)
    u, _, _ = np.linalg.svd(cov, hermitian=True)
    return np.ascontiguousarray(x @ u[:, : min(dims, x.shape[1])].astype(np.float32), dtype=np.float32)


def nearest_resize(maps: np.ndarray, size: int) -> np.ndarray:
    """(N, H, W) integer maps -> (N, size, size), nearest neighbour (pixel centres), no interpolation of ids."""
    n, h, w = maps.shape
    rows = np.minimum(((np.arange(size) + 0.5) * h / size).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(size) + 0.5) * w / size).astype(np.int64), w - 1)
    return maps[:, rows[:, None], cols[None, :]]


def _summary(per_seed: list[dict]) -> dict:
    miou, acc = np.array([r["miou"] for r in per_seed]), np.array([r["acc"] for r in per_seed])
    return {"miou_mean": float(miou.mean()), "miou_std": float(miou.std()), "acc_mean": float(acc.mean()),
            "acc_std": float(acc.std()), "per_seed": per_seed}


def _kmeans_assign(x: np.ndarray, k: int, seed: int, iterations: int) -> np.ndarray:
    km = faiss.Kmeans(x.shape[1], k, niter=iterations, seed=int(seed), verbose=False)
    km.train(x)
    return km.index.search(x, 1)[1][:, 0]


def _scored(assign: np.ndarray, labels: np.ndarray, k: int, n_classes: int, seed: int) -> dict:
    conf = confusion_matrix(assign, labels, k, n_classes)
    s = scores(remap_confusion(conf, many_to_one_match(conf)))
    return {"seed": int(seed), "miou": s.miou, "acc": s.acc, "iou": s.iou}


def overcluster_scores(features: np.ndarray, labels: np.ndarray, n_classes: int, k: int = 500, pca: int = 100,
                       seeds: tuple[int, ...] = (0, 1, 2, 3, 4), iterations: int = 20) -> dict:
    """k-means (K clusters, one run per seed) on the given features, many-to-one matched, mIoU/Acc per seed.

    features (M, D), one row per evaluated pixel/patch; labels (M,), 255 (any id outside 0..n_classes-1) ignored.
    """
    labels = np.asarray(labels).ravel()
    if len(features) != len(labels):
        raise ValueError(f"overcluster_scores: {len(features)} feature rows but {len(labels)} labels")
    x = standardize_pca(features, pca)
    return _summary([_scored(_kmeans_assign(x, k, seed, iterations), labels, k, n_classes, seed) for seed in seeds])


def overcluster_maps(features: np.ndarray, labels: np.ndarray, n_classes: int, k: int = 500, pca: int = 100,
                     seeds: tuple[int, ...] = (0, 1, 2, 3, 4), size: int = 100, iterations: int = 20) -> dict:
    """The protocol of specs/HCL.md §5 on dense features (N, h, w, D) and labels (N, H, W).

    k-means on every val patch; each image's cluster map and its label map are resized (nearest) to size x size
    and compared there. K is capped at the number of patches (reported as "k").
    """
    n, h, w, d = features.shape
    k = min(k, n * h * w)
    x = standardize_pca(features.reshape(-1, d), pca)
    target = nearest_resize(np.asarray(labels), size)
    per_seed = []
    for seed in seeds:
        assign = nearest_resize(_kmeans_assign(x, k, seed, iterations).reshape(n, h, w), size)
        per_seed.append(_scored(assign, target, k, n_classes, seed))
    return {**_summary(per_seed), "k": k, "size": size}
