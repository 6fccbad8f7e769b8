"""Overclustering evaluation (specs/HCL.md §5): PCA + k-means with many clusters, many-to-one matching. No I/O."""

from __future__ import annotations

import faiss
import numpy as np

from pipeline.metrics import confusion_matrix, remap_confusion, scores


def many_to_one_match(confusion: np.ndarray) -> np.ndarray:
    """(classes x clusters) -> cluster -> class: each cluster goes to the class most of its pixels belong to."""
    return np.asarray(confusion).argmax(axis=0).astype(np.int64)


def standardize_pca(features: np.ndarray, dims: int) -> np.ndarray:
    """Zero-mean unit-variance per channel, then projection on the top `dims` principal axes (SVD of the covariance)."""
    x = np.asarray(features, dtype=np.float64)
    x = (x - x.mean(0)) / np.maximum(x.std(0), 1e-8)
    u, _, _ = np.linalg.svd(x.T @ x / max(len(x) - 1, 1), hermitian=True)
    return np.ascontiguousarray(x @ u[:, : min(dims, x.shape[1])], dtype=np.float32)


def overcluster_scores(features: np.ndarray, labels: np.ndarray, n_classes: int, k: int = 500, pca: int = 100,
                       seeds: tuple[int, ...] = (0, 1, 2, 3, 4), iterations: int = 20) -> dict:
    """k-means (K clusters, one run per seed) on the given features, many-to-one matched, mIoU/Acc per seed.

    features (M, D), one row per evaluated pixel/patch; labels (M,), 255 (any id outside 0..n_classes-1) ignored.
    """
    labels = np.asarray(labels).ravel()
    if len(features) != len(labels):
        raise ValueError(f"overcluster_scores: {len(features)} feature rows but {len(labels)} labels")
    x = standardize_pca(features, pca)
    per_seed = []
    for seed in seeds:
        km = faiss.Kmeans(x.shape[1], k, niter=iterations, seed=int(seed), verbose=False)
        km.train(x)
        _, assign = km.index.search(x, 1)
        conf = confusion_matrix(assign[:, 0], labels, k, n_classes)
        s = scores(remap_confusion(conf, many_to_one_match(conf)))
        per_seed.append({"seed": int(seed), "miou": s.miou, "acc": s.acc})
    miou, acc = np.array([r["miou"] for r in per_seed]), np.array([r["acc"] for r in per_seed])
    return {"miou_mean": float(miou.mean()), "miou_std": float(miou.std()), "acc_mean": float(acc.mean()),
            "acc_std": float(acc.std()), "per_seed": per_seed}
