"""Overclustering evaluation (specs/HCL.md §5): PCA + k-means with many clusters, many-to-one matching. No I/O."""

from __future__ import annotations

import faiss
import numpy as np

from pipeline.metrics import confusion_matrix, remap_confusion, scores


def many_to_one_match(confusion: np.ndarray) -> np.ndarray:
    """(classes x clusters) -> cluster -> class: each cluster goes to the class most of its pixels belong to."""
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
