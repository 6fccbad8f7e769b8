"""The cluster probe of specs/HP.md §8: spherical k-means (faiss) and cosine-argmax assignment. No I/O."""

from __future__ import annotations

import faiss
import numpy as np
import torch
import torch.nn.functional as F


def spherical_kmeans(codes: np.ndarray, k: int, seed: int = 0, iterations: int = 50) -> np.ndarray:
    """(M, D) codes -> (k, D) unit centroids, k-means on the unit sphere (faiss, fixed seed)."""
    x = np.ascontiguousarray(codes, dtype=np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    kmeans = faiss.Kmeans(x.shape[1], k, niter=iterations, spherical=True, seed=seed, verbose=False,
                          max_points_per_centroid=max(256, len(x) // k + 1))
    kmeans.train(x)
    centroids = kmeans.centroids
    return centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)


def assign(codes: torch.Tensor, centroids: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """(B, D, h, w) codes -> (B, H, W) cluster ids: bilinear upsampling to `size`, then argmax cosine (§8)."""
    if size is not None and tuple(codes.shape[-2:]) != tuple(size):
        codes = F.interpolate(codes, size=size, mode="bilinear", align_corners=False)
    codes = F.normalize(codes, dim=1)
    return torch.einsum("bdhw,kd->bkhw", codes, F.normalize(centroids, dim=1)).argmax(1)
