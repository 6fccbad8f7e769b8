"""Reference pools and their 1-nearest-neighbour criterion (docs/hp.md §4).

r_i = max_p cos(x_i, Pool_p): the pool and the queries are unit vectors, so this is a max inner product.
Two interchangeable backends: faiss (IndexFlatIP, on the GPU when faiss has GPU support) and plain torch.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from pipeline.errors import UserError

_TORCH_CHUNK = 1 << 24  # query-by-pool products per torch matmul: bounds the backend's memory


def _faiss_search(index, keep_alive: object, queries: torch.Tensor) -> torch.Tensor:
    best, _ = index.search(queries.detach().float().cpu().contiguous().numpy(), 1)
    return torch.from_numpy(best[:, 0]).to(queries.device)


def _faiss_index(pool: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Exact inner-product index; a GPU copy when the pool is on CUDA and faiss was built with GPU support."""
    from pipeline.faiss_ops import inner_product_index

    gpu = (pool.device.index or 0) if pool.is_cuda else None
    index, resources = inner_product_index(pool.detach().float().cpu().numpy(), gpu)
    return partial(_faiss_search, index, resources)  # the partial holds the GPU resources as long as the index


def _torch_index(pool: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Brute force max inner product in chunks of queries, on the pool's device."""
    pool = pool.detach().float()

    def search(queries: torch.Tensor) -> torch.Tensor:
        q = queries.detach().float().to(pool.device)
        rows = max(1, _TORCH_CHUNK // pool.shape[0])
        best = [(chunk @ pool.T).amax(dim=1) for chunk in q.split(rows)]
        return torch.cat(best).to(queries.device)

    return search


BACKENDS: dict[str, Callable[[torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]] = {
    "faiss": _faiss_index,
    "torch": _torch_index,
}


class PoolIndex:
    """1-NN max inner product of unit queries against a unit-normalized pool."""

    def __init__(self, pool: torch.Tensor, backend: str = "faiss"):
        if backend not in BACKENDS:
            raise UserError(f"hp.pool_backend = '{backend}' is unknown; use one of: {', '.join(BACKENDS)}")
        if pool.ndim != 2 or pool.shape[0] == 0:
            raise ValueError(f"PoolIndex: pool must be a non-empty (P, d) matrix, got {tuple(pool.shape)}")
        self.size, self.dim, self.backend = pool.shape[0], pool.shape[1], backend
        self._search = BACKENDS[backend](pool)

    def max_similarity(self, queries: torch.Tensor) -> torch.Tensor:
        """(M, d) unit queries -> (M,) float32 max_p q·pool_p, on the queries' device."""
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"PoolIndex: queries {tuple(queries.shape)} do not match a pool of width {self.dim}")
        if queries.shape[0] == 0:
            return torch.zeros(0, dtype=torch.float32, device=queries.device)
        return self._search(queries)


def pick_patches(features: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One random patch per pool entry from (P, n, d) (one image per entry) -> (P, d) (§4).

    Not normalized: Pool_ag and Pool_sp apply dropout (and S_m) to the patch before normalizing.
    """
    p, n, _ = features.shape
    pick = patch_choices(p, n, generator).to(features.device)
    return features[torch.arange(p, device=features.device), pick]


def patch_choices(entries: int, patches: int, generator: torch.Generator) -> torch.Tensor:
    """The random patch (flat index over the grid) of each pool entry (§4), as `pick_patches` draws it."""
    return torch.randint(0, patches, (entries,), generator=generator, device=generator.device)
