"""Reference pools and the 1-NN criterion (docs/hp.md §4): faiss and torch against brute force."""

import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import UserError
from pipeline.methods.hp import pool as pool_module
from pipeline.methods.hp.pool import PoolIndex, pick_patches

pytestmark = pytest.mark.usefixtures("one_thread")


def unit_vectors(rows, dim, seed):
    return F.normalize(torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)), dim=1)


@pytest.fixture(scope="module")
def pool_and_queries():
    return unit_vectors(300, 32, 0), unit_vectors(500, 32, 1)


def brute_force(pool, queries):
    return (queries.double() @ pool.double().T).max(dim=1).values.float()


def loop_brute_force(pool, queries):
    return torch.tensor([max(float(q @ p) for p in pool.double()) for q in queries.double()])


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_max_similarity_is_brute_force(backend, pool_and_queries):
    pool, queries = pool_and_queries
    best = PoolIndex(pool, backend=backend).max_similarity(queries)
    assert best.shape == (500,) and best.dtype == torch.float32
    torch.testing.assert_close(best, brute_force(pool, queries), rtol=0, atol=1e-5)
    few = queries[:7]  # the loop form of the brute force, independent of any matmul
    torch.testing.assert_close(PoolIndex(pool, backend=backend).max_similarity(few), loop_brute_force(pool, few),
                               rtol=0, atol=1e-5)


def test_backends_agree(pool_and_queries):
    pool, queries = pool_and_queries
    a = PoolIndex(pool, backend="faiss").max_similarity(queries)
    b = PoolIndex(pool, backend="torch").max_similarity(queries)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_a_pool_member_is_its_own_nearest_neighbour(pool_and_queries):
    pool, _ = pool_and_queries
    for backend in ("faiss", "torch"):
        best = PoolIndex(pool, backend).max_similarity(pool[:50])
        torch.testing.assert_close(best, torch.ones(50), atol=1e-5, rtol=0)


def test_torch_backend_chunks_give_the_same_answer(pool_and_queries, monkeypatch):
    pool, queries = pool_and_queries
    whole = PoolIndex(pool, backend="torch").max_similarity(queries)
    monkeypatch.setattr(pool_module, "_TORCH_CHUNK", 300 * 7)  # 7 queries per matmul, a ragged last chunk
    chunked = PoolIndex(pool, backend="torch").max_similarity(queries)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)


def test_bad_arguments():
    with pytest.raises(UserError, match="pool_backend"):
        PoolIndex(unit_vectors(4, 3, 0), backend="annoy")
    with pytest.raises(ValueError, match="non-empty"):
        PoolIndex(torch.zeros(0, 3), backend="torch")
    with pytest.raises(ValueError, match="width 3"):
        PoolIndex(unit_vectors(4, 3, 0), backend="torch").max_similarity(torch.zeros(2, 5))


def test_pick_patches_takes_one_patch_per_image():
    features = torch.randn(40, 25, 8, generator=torch.Generator().manual_seed(2)) * 3
    pool = pick_patches(features, torch.Generator().manual_seed(5))
    assert pool.shape == (40, 8)
    picks = []
    for p in range(40):
        match = (features[p] - pool[p]).abs().amax(dim=1) == 0  # which patch of image p it is
        assert match.sum() == 1
        picks.append(int(match.nonzero()))
    assert len(set(picks)) > 5  # random positions, not one fixed patch
    again = pick_patches(features, torch.Generator().manual_seed(5))
    assert torch.equal(pool, again)  # reproducible from the generator
