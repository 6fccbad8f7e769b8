"""The reader's lazy data order (cache/reader.py `iter_batch_plan`, `iter_skip_batches`) against the eager plan it
replaced, kept here verbatim: the same batches, in the same order, for every seed, keep mask and resume point."""

import itertools

import numpy as np
import pytest

from cache.reader import FeatureStore, batch_plan, iter_batch_plan, iter_skip_batches, skip_batches
from cache.schema import Layout
from tests.fixtures import random_store


def eager_plan(n, chunk_size, batch_size, seed, buffer_chunks, drop_last, keep=None):
    """batch_plan as it was before it was made lazy (the whole epoch's plan as one list)."""
    if keep is not None:
        keep = np.asarray(keep, dtype=bool)
    n_chunks = -(-n // chunk_size)
    buffer_chunks = max(buffer_chunks, -(-batch_size // chunk_size))
    rng = np.random.default_rng(seed) if seed is not None else None
    chunk_order = rng.permutation(n_chunks) if rng is not None else np.arange(n_chunks)
    plan = []
    carry = np.empty(0, dtype=np.int64)
    for b in range(0, n_chunks, buffer_chunks):
        chunks = sorted(int(c) for c in chunk_order[b : b + buffer_chunks])
        idx = np.concatenate([np.arange(c * chunk_size, min((c + 1) * chunk_size, n)) for c in chunks])
        if keep is not None:
            idx = idx[keep[idx]]
            chunks = sorted({int(c) for c in idx // chunk_size})
        if rng is not None:
            idx = rng.permutation(idx)
        idx = np.concatenate([carry, idx])
        full = len(idx) // batch_size * batch_size
        batches = [idx[i : i + batch_size] for i in range(0, full, batch_size)]
        carry = idx[full:]
        plan.append((chunks, batches))
    if len(carry) and not drop_last:
        plan[-1][1].append(carry)
    return plan


def eager_skip(plan, n):
    """skip_batches as it was (on a list)."""
    out, dropped_chunks = [], []
    for chunks, batches in plan:
        k = min(n, len(batches))
        n -= k
        if batches[k:]:
            out.append((sorted(set(dropped_chunks) | set(chunks)), batches[k:]))
            dropped_chunks = []
        elif batches:
            dropped_chunks = chunks
        else:
            dropped_chunks = sorted(set(dropped_chunks) | set(chunks))
    return out


def as_lists(plan):
    return [(list(chunks), [b.tolist() for b in batches]) for chunks, batches in plan]


CASES = list(itertools.product([1, 23, 64, 67], [1, 4, 8], [1, 3, 16, 20], [None, 0, 5], [1, 3], [False, True]))


@pytest.mark.parametrize("n,chunk,batch,seed,buffer,drop_last", CASES)
def test_the_lazy_plan_is_the_eager_plan(n, chunk, batch, seed, buffer, drop_last):
    want = as_lists(eager_plan(n, chunk, batch, seed, buffer, drop_last))
    assert as_lists(iter_batch_plan(n, chunk, batch, seed, buffer, drop_last)) == want
    assert as_lists(batch_plan(n, chunk, batch, seed, buffer, drop_last)) == want


@pytest.mark.parametrize("n,chunk,batch,seed,buffer,drop_last", CASES[::7])
def test_the_lazy_plan_with_keep_is_the_eager_plan(n, chunk, batch, seed, buffer, drop_last):
    keep = np.random.default_rng(n + chunk + batch).random(n) < 0.4
    want = as_lists(eager_plan(n, chunk, batch, seed, buffer, drop_last, keep))
    assert as_lists(iter_batch_plan(n, chunk, batch, seed, buffer, drop_last, keep)) == want


@pytest.mark.parametrize("n,chunk,batch,seed,buffer,drop_last", CASES[::5])
def test_skipping_lazily_drops_the_same_batches_and_keeps_the_same_chunks(n, chunk, batch, seed, buffer, drop_last):
    plan = eager_plan(n, chunk, batch, seed, buffer, drop_last)
    for skip in range(sum(len(b) for _, b in plan) + 2):
        want = as_lists(eager_skip(plan, skip))
        assert as_lists(iter_skip_batches(iter_batch_plan(n, chunk, batch, seed, buffer, drop_last), skip)) == want
        assert as_lists(skip_batches(plan, skip)) == want


def test_a_bad_keep_is_refused_at_the_call_and_a_changed_one_is_not_read():
    with pytest.raises(ValueError, match="keep has shape"):
        iter_batch_plan(10, 4, 2, 0, 1, False, np.ones(9, bool))  # before any batch is asked for
    keep = np.ones(40, bool)
    plan = iter_batch_plan(40, 4, 3, 1, 2, False, keep)
    keep[:] = False  # the caller's array changed after the call: the plan is the one asked for
    assert as_lists(plan) == as_lists(eager_plan(40, 4, 3, 1, 2, False, np.ones(40, bool)))


LAYOUT = Layout(n_samples=37, resolution=32, patch_size=16, embed_dim=8, num_heads=2, n_views=0, with_lhp=False,
                labelled=False)
ATTRS = {"dataset": "synthetic", "split": "train", "backbone": "vit_small_patch16_224.dino", "patch_size": 16,
         "resolution": 32, "weights_hash": "abc", "weights": "random-init", "fingerprint": "f1"}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> FeatureStore:
    return random_store(str(tmp_path_factory.mktemp("plan") / "s.zarr"), LAYOUT, 4, ATTRS)


@pytest.mark.parametrize("seed,drop_last", [(None, False), (3, False), (3, True)])
def test_the_stores_batches_and_every_resume_follow_the_eager_plan(store, seed, drop_last):
    """The batches a store hands out (indices and values), from the start and resumed at every batch, are the
    eager plan's."""
    want = [b.tolist() for _, bs in eager_plan(len(store), 4, 5, seed, 2, drop_last) for b in bs]
    values = store.read("feat", 0, len(store))
    for start in range(len(want) + 1):
        got = list(store.batches(["feat"], 5, shuffle_seed=seed, buffer_chunks=2, drop_last=drop_last,
                                 start_batch=start))
        assert [b["index"].tolist() for b in got] == want[start:]
        for b in got:
            np.testing.assert_array_equal(b["feat"].numpy(), values[b["index"].numpy()])
