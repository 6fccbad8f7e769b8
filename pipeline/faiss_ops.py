"""Every use of faiss in one place: k-means (three protocols) and exact inner-product nearest neighbours. No I/O.

Each caller states the faiss settings its protocol needs (docs/hp.md §4, §8; docs/hcl.md §3, §5); faiss's own
defaults hold for anything it leaves out, so the results are those of calling faiss directly.
"""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np


def kmeans(x: np.ndarray, k: int, *, iterations: int, seed: int, spherical: bool = False, restarts: int = 1,
           min_points: int | None = None, max_points: int | None = None) -> faiss.Kmeans:
    """Train faiss k-means on the rows of `x` (float32, C-contiguous); the trained object keeps `centroids` and
    its `index` (L2, or inner product when spherical)."""
    options: dict[str, Any] = {}
    if min_points is not None:
        options["min_points_per_centroid"] = int(min_points)
    if max_points is not None:
        options["max_points_per_centroid"] = int(max_points)
    km = faiss.Kmeans(x.shape[1], int(k), niter=int(iterations), nredo=int(restarts), spherical=spherical,
                      seed=int(seed), verbose=False, **options)
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    return km


def inner_product_index(vectors: np.ndarray, gpu_device: int | None = None) -> tuple[Any, Any]:
    """An exact inner-product index over `vectors` -> (index, resources); on that GPU when faiss has GPU support.

    `resources` must outlive the index (None on the CPU)."""
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    if gpu_device is not None and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        resources = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(resources, gpu_device, index), resources
    return index, None
