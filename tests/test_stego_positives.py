"""The positives' reader (pipeline/methods/stego/training.py `ChunkCache`) against plain per-sample reads."""

import numpy as np
import pytest

from cache.reader import FeatureStore
from cache.schema import Layout
from pipeline.methods.stego.training import ChunkCache
from tests.fixtures import random_store

LAYOUT = Layout(n_samples=11, resolution=32, patch_size=16, embed_dim=8, num_heads=2, n_views=0, with_lhp=False,
                labelled=False)
ATTRS = {"dataset": "synthetic", "split": "train", "backbone": "vit_small_patch16_224.dino", "patch_size": 16,
         "resolution": 32, "weights_hash": "abc", "weights": "random-init", "fingerprint": "f1"}


@pytest.fixture
def store(tmp_path) -> FeatureStore:
    return random_store(str(tmp_path / "s.zarr"), LAYOUT, 4, ATTRS)  # chunks of 4, 4 and 3 samples


def one_by_one(store: FeatureStore, indices) -> np.ndarray:
    return np.stack([store.read("feat", int(i), int(i) + 1)[0] for i in indices])


@pytest.mark.parametrize("budget_chunks", [0, 1, 2, 10])
def test_chunk_cache_gives_the_stores_samples_whatever_its_budget(store, budget_chunks):
    chunk_bytes = store.read_chunk("feat", 0).nbytes
    cache = ChunkCache(store, "feat", budget=budget_chunks * chunk_bytes)
    rng = np.random.default_rng(0)
    for _ in range(20):
        indices = rng.integers(0, len(store), rng.integers(1, 6))  # repeats and any order
        got = cache.gather(indices)
        assert got.dtype == store.dtype("feat")
        np.testing.assert_array_equal(got, one_by_one(store, indices))
        assert cache.bytes <= max(budget_chunks, 0) * chunk_bytes
        assert cache.bytes == sum(v.nbytes for v in cache.chunks.values())


def test_chunk_cache_decodes_each_chunk_once_when_the_store_fits(store, monkeypatch):
    decoded = []
    read = store.read_chunk
    monkeypatch.setattr(store, "read_chunk", lambda name, chunk: decoded.append(chunk) or read(name, chunk))
    cache = ChunkCache(store, "feat")
    for indices in ([10, 0, 5], [5, 5, 1], [9, 8, 2, 3], [0]):
        np.testing.assert_array_equal(cache.gather(indices), np.stack([read("feat", i // 4)[i % 4] for i in indices]))
    assert sorted(decoded) == [0, 1, 2]


def test_chunk_cache_drops_the_least_recently_used_chunk(store):
    chunk_bytes = store.read_chunk("feat", 0).nbytes
    cache = ChunkCache(store, "feat", budget=2 * chunk_bytes)
    cache.gather([0])  # chunk 0
    cache.gather([4])  # chunk 1
    cache.gather([1])  # chunk 0 used again
    cache.gather([8])  # chunk 2: chunk 1 goes
    assert list(cache.chunks) == [0, 2]
