"""MoGoClustering (docs/hcl.md §3): token sampling, memory banks and the per-epoch k-means centroids. No I/O."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.faiss_ops import kmeans


def _f32(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def nearest_l2(queries: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """argmin_j ||queries_i - centroids_j||² (computed as ||c_j||² - 2 q_i·c_j), on the queries' device.

    §4's a(i): the reference searches its trained faiss L2 index, which holds the raw k-means centroids.
    """
    c = centroids.to(queries)
    return ((c * c).sum(1)[None, :] - 2.0 * queries @ c.T).argmin(1)


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


MAX_POINTS_PER_CENTROID = 10_000_000  # §3: the whole bank is clustered; faiss's default 256 subsamples above 256·K


def kmeans_seed(seed: int, epoch: int) -> int:
    """§3: a new k-means seed each epoch, derived from the run seed and the epoch (so a resumed run reuses it)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0] >> 1)  # faiss takes a C int


def unit_rows(c: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    return c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)


def kmeans_centroids(x: np.ndarray, k: int = 500, iterations: int = 20, min_points: int = 100,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """faiss k-means (L2) on the whole of `x` (never subsampled) -> (raw, unit) centroids, each (k, d) float32.

    §3-§4: the raw centroids choose each token's positive a(i) (nearest in L2), their unit copies give the logits.
    """
    x = _f32(x)
    km = kmeans(x, k, iterations=iterations, seed=seed, min_points=min_points, max_points=MAX_POINTS_PER_CENTROID)
    raw = np.ascontiguousarray(km.centroids, dtype=np.float32)
    return raw, unit_rows(raw).astype(np.float32)
