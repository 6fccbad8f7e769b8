"""STEGO's KNN table (docs/stego.md §1) against numpy brute force."""

import numpy as np
import pytest
import torch

from pipeline.methods.stego.knn import global_features, nearest_neighbours


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def feats(n: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, 4, 8)).astype(np.float16)


def test_global_features_without_dropout():
    x = feats()
    got = global_features(x, 0.0, None)
    pooled = x.astype(np.float64).mean(axis=(1, 2))
    expected = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    assert got.dtype == np.float32 and got.shape == (6, 8)
    assert np.allclose(got, expected, atol=1e-6)
    assert np.allclose(global_features(torch.from_numpy(x), 0.1, None), expected, atol=1e-6)  # no generator: off


def test_global_features_dropout_drops_channels_before_pooling():
    x = feats(n=20)
    got = global_features(x, 0.3, gen(4))
    keep = (torch.rand(20, 8, generator=gen(4)) >= 0.3).numpy()
    dropped = x.astype(np.float64) * keep[:, None, None, :] / 0.7  # Dropout2d on (N, C, h, w), with its rescale
    pooled = dropped.mean(axis=(1, 2))
    expected = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    assert np.allclose(got, expected, atol=1e-6)
    assert (got == 0).any()  # some channels were dropped
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-6)


def test_global_features_chunking_does_not_change_the_draws():
    x = feats(n=10, seed=1)
    whole = global_features(x, 0.2, gen(0))
    g = gen(0)
    parts = np.concatenate([global_features(x[:3], 0.2, g), global_features(x[3:], 0.2, g)])
    assert np.array_equal(whole, parts)


def brute_force_topk(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sims = x.astype(np.float64) @ x.astype(np.float64).T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(sims, order, axis=1)


def test_nearest_neighbours_match_brute_force():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    got = nearest_neighbours(x, k=30)
    assert got.dtype == np.int32 and got.shape == (200, 30)
    order, scores = brute_force_topk(x, 30)
    got_scores = np.einsum("nc,nkc->nk", x.astype(np.float64), x[got].astype(np.float64))
    assert np.allclose(got_scores, scores, atol=1e-5)  # the right similarities, descending
    assert np.array_equal(got[:, 0], np.arange(200))  # self first
    separated = np.abs(np.diff(scores, axis=1, prepend=2.0)) > 1e-5
    separated &= np.abs(np.diff(scores, axis=1, append=-2.0)) > 1e-5
    assert np.array_equal(got[separated], order[separated])


def test_nearest_neighbours_ties_list_larger_index_first():
    x = np.tile(np.array([[1.0, 0.0]], np.float32), (8, 1))  # all scores equal
    got = nearest_neighbours(x, k=8)
    assert np.all(np.diff(got, axis=1) < 0)


def test_nearest_neighbours_needs_k_samples():
    with pytest.raises(ValueError, match=r"k=30.*N=5"):
        nearest_neighbours(np.eye(5, dtype=np.float32), k=30)
