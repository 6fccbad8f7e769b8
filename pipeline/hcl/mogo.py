"""MoGoClustering (specs/HCL.md §3): token sampling, memory banks and the per-epoch k-means centroids. No I/O."""

from __future__ import annotations

import faiss
import numpy as np
import torch


def _f32(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def nearest(queries: np.ndarray | torch.Tensor, centroids: np.ndarray | torch.Tensor) -> np.ndarray:
    """argmax_j queries_i · centroids_j with a faiss inner-product index (unit vectors: nearest centroid)."""
    q, c = _f32(queries), _f32(centroids)
    index = faiss.IndexFlatIP(c.shape[1])
    index.add(c)
    _, idx = index.search(q, 1)
    return idx[:, 0].astype(np.int64)


def sample_tokens(tokens: torch.Tensor, mask: torch.Tensor, fraction: float,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """A random `fraction` (rounded, ≥ 1 when any) of the tokens of one image where mask is True: (n, d) -> (m, d)."""
    picked = tokens.reshape(-1, tokens.shape[-1])[mask.reshape(-1).bool()]
    n = picked.shape[0]
    m = min(n, max(1, round(fraction * n))) if n else 0
    perm = torch.randperm(n, generator=generator, device="cpu")[:m].to(picked.device)
    return picked[perm]


class MemoryBank:
    """Token bank: filled at epoch 0, then a random 50% of its entries replaced each later epoch (seeded)."""

    def __init__(self, seed: int = 0, replace_fraction: float = 0.5):
        self.rng = np.random.default_rng(seed)
        self.replace_fraction = replace_fraction
        self.data: np.ndarray | None = None

    def fill(self, x: np.ndarray | torch.Tensor) -> None:
        self.data = _f32(x).copy()

    def replace(self, x: np.ndarray | torch.Tensor) -> None:
        """Overwrite a random replace_fraction of the rows with rows of x (a random subset when x is larger)."""
        if self.data is None:
            raise ValueError("MemoryBank.replace before fill")
        x = _f32(x)
        n = self.data.shape[0]
        m = min(int(round(self.replace_fraction * n)), x.shape[0])
        slots = self.rng.choice(n, size=m, replace=False)
        rows = self.rng.choice(x.shape[0], size=m, replace=False)
        self.data[slots] = x[rows]

    def state_dict(self) -> dict:
        """Plain data for a checkpoint (a tensor, not an ndarray: checkpoints load with weights_only=True)."""
        return {"data": None if self.data is None else torch.from_numpy(self.data), "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.data = None if state["data"] is None else np.asarray(state["data"], dtype=np.float32).copy()
        self.rng.bit_generator.state = state["rng"]

    def update(self, x: np.ndarray | torch.Tensor, epoch: int) -> np.ndarray:
        """fill at epoch 0, replace afterwards; returns the bank."""
        (self.fill if epoch == 0 or self.data is None else self.replace)(x)
        return self.data


def kmeans_centroids(x: np.ndarray, k: int = 500, iterations: int = 20, min_points: int = 100,
                     seed: int = 0) -> np.ndarray:
    """faiss k-means (L2) with a fixed seed; returns (k, d) L2-normalized centroids."""
    x = _f32(x)
    km = faiss.Kmeans(x.shape[1], k, niter=iterations, seed=seed, min_points_per_centroid=min_points, verbose=False)
    km.train(x)
    c = km.centroids.astype(np.float32)
    return c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
