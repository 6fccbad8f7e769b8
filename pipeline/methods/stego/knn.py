"""STEGO's image-level nearest neighbours, from which each training item's positive is drawn (docs/stego.md §1).

Pure computation, no I/O: the caller streams the cached features through `global_features` (in any chunking: with
one generator the dropout draws depend only on the row order) and hands the stacked result to `nearest_neighbours`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.faiss_ops import inner_product_index


def global_features(feat: np.ndarray | torch.Tensor, dropout: float, generator: torch.Generator | None) -> np.ndarray:
    """(N, h, w, C) patch features (fp16 or fp32) -> (N, C) float32 unit vectors `normalize(mean_hw f')` (§1).

    `f'` is `f` after channel dropout with probability `dropout` when a generator is given: the reference computes
    its KNN features with the head in train mode, so each image loses random channels before pooling (stego.
    knn_dropout; 0 or no generator switches the quirk off). The mask is one uniform per (image, channel) from
    `generator`, N-major. Because the mask is constant over h and w it is applied to the mean, and its 1/(1-p)
    rescale is left out: it cancels in the normalisation. Sums are taken in float32."""
    x = torch.as_tensor(feat)
    if x.ndim != 4:
        raise ValueError(f"expected (N, h, w, C) features, got shape {tuple(x.shape)}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"stego.knn_dropout must be in [0, 1), got {dropout}")
    pooled = x.sum(dim=(1, 2), dtype=torch.float32) / float(x.shape[1] * x.shape[2])  # §1 mean over h, w
    if generator is not None and dropout > 0:
        u = torch.rand(pooled.shape, generator=generator, device=generator.device)
        pooled = pooled * (u >= dropout).to(device=pooled.device, dtype=pooled.dtype)  # §1 Dropout2d quirk
    return F.normalize(pooled, dim=1).cpu().numpy().astype(np.float32, copy=False)  # §1 g = normalize(...)


def nearest_neighbours(global_feats: np.ndarray, k: int = 30, gpu_device: int | None = None) -> np.ndarray:
    """(N, C) unit rows -> (N, k) int32 indices of the k largest inner products (cosine), best first, the row
    itself included (§1; it is rank 0 unless another row has an equal or larger score).

    Exact search (faiss IndexFlatIP). Ties: among exactly equal scores faiss lists the larger index first, and when
    a group of equal scores straddles rank k, which of its members are kept is decided by faiss's heap (not by
    index). Exact ties need duplicated features."""
    x = np.ascontiguousarray(global_feats, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected (N, C) global features, got shape {x.shape}")
    n = x.shape[0]
    if k < 1:
        raise ValueError(f"stego.knn: k must be >= 1, got k={k}")
    if n < k:
        raise ValueError(f"stego.knn: k={k} nearest neighbours need at least k samples, but there are only N={n}")
    index, _resources = inner_product_index(x, gpu_device)
    _, ids = index.search(x, k)  # §1 top-k by inner product, descending
    return ids.astype(np.int32)
