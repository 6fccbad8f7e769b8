"""The read path (docs/cache.md, "Read path"): chunks decoded in threads give the same batches; pool renewal reads
O(pool size) chunks and still samples crops uniformly (docs/hp.md §4)."""

import math

import numpy as np
import pytest
import torch

from cache import writer
from cache.integrity import CorruptChunk, chunk_key
from cache.reader import FeatureStore
from cache.schema import Layout

ATTRS = {"dataset": "synthetic", "split": "train", "backbone": "vit_small_patch16_224.dino", "patch_size": 16,
         "resolution": 32, "weights_hash": "abc", "weights": "random-init", "fingerprint": "f1"}


def _store(tmp_path, n: int, chunk: int, dtype: str = "float16", name: str = "s.zarr") -> FeatureStore:
    layout = Layout(n_samples=n, resolution=32, patch_size=16, embed_dim=8, num_heads=2, n_views=2, with_lhp=True,
                    labelled=False, dtype=dtype)
    url = str(tmp_path / name)
    group = writer.create_store(url, layout, chunk, ATTRS, fresh=True)
    for c in range(-(-n // chunk)):
        start, stop = writer.chunk_range(group, c)
        rng = np.random.default_rng(c)
        data = {k: rng.standard_normal((stop - start, *shape)).astype(dt if dt != "int8" else "float16")
                for k, (shape, dt) in layout.arrays().items() if not k.endswith("_scale")}
        data["crop_order"] = np.arange(start, stop, dtype=np.int32)  # sample s holds the value s: checkable
        data["source_image"] = np.arange(start, stop, dtype=np.int32)
        writer.write_chunk(group, c, data)
    writer.mark_complete(group)
    return FeatureStore.open(url)


def _all_batches(store, threads, **kw):
    return list(store.batches(["feat", "feat_aug", "lhp"], 3, threads=threads, **kw))


@pytest.mark.parametrize("dtype", ["float16", "int8"])
@pytest.mark.parametrize("kw", [{"shuffle_seed": 4}, {"shuffle_seed": 9, "buffer_chunks": 2, "start_batch": 3},
                                {"shuffle_seed": None, "drop_last": True, "prefetch": 0}])
def test_threads_give_the_same_batches_bit_for_bit(tmp_path, dtype, kw):
    store = _store(tmp_path, 37, 4, dtype)
    one, two, four = (_all_batches(store, t, **kw) for t in (1, 2, 4))
    assert len(one) == len(two) == len(four) > 3
    for a, b, c in zip(one, two, four, strict=True):
        assert a.keys() == b.keys() == c.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]), k
    expected = store.read("feat", 0, len(store))  # and they are the store's samples, independently read
    for batch in two:
        np.testing.assert_array_equal(batch["feat"].numpy(), expected[batch["index"].numpy()])


def test_threads_stop_on_the_first_damaged_chunk_in_order(tmp_path):
    store = _store(tmp_path, 24, 4)
    array = store.array("feat")
    path = tmp_path / "s.zarr" / chunk_key(array, 3)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    for threads in (1, 3):
        with pytest.raises(CorruptChunk, match="'feat' chunk 3"):
            _all_batches(FeatureStore.open(store.url), threads, shuffle_seed=None)


def _count_reads(store, monkeypatch) -> list[tuple[str, int]]:
    reads: list[tuple[str, int]] = []
    real = store.read_chunk

    def counted(name, chunk):
        reads.append((name, chunk))
        return real(name, chunk)

    monkeypatch.setattr(store, "read_chunk", counted)
    return reads


@pytest.mark.parametrize("pool,chunk", [(16, 4), (10, 4), (7, 8), (1, 4)])
def test_sample_chunks_reads_at_most_ceil_pool_over_chunk_chunks(tmp_path, monkeypatch, pool, chunk):
    store = _store(tmp_path, 96, chunk)  # whole chunks only
    reads = _count_reads(store, monkeypatch)
    expected_feat = store.read("feat", 0, len(store))
    rng = np.random.default_rng(0)
    for _ in range(5):
        before = len(reads)
        idx, values = store.sample_chunks("feat", pool, rng)
        chunks = {c for _, c in reads[before:]}
        assert len(reads) - before == len(chunks) <= math.ceil(pool / chunk)  # each chunk read once, O(pool)
        assert len(idx) == pool and len(set(idx.tolist())) == pool  # distinct crops
        assert {int(i) // chunk for i in idx} <= chunks
        np.testing.assert_array_equal(values, expected_feat[idx])  # the samples it names


def test_sample_chunks_with_a_short_last_chunk_and_a_small_store(tmp_path, monkeypatch):
    store = _store(tmp_path, 30, 8)  # chunks of 8, 8, 8, 6
    reads = _count_reads(store, monkeypatch)
    rng = np.random.default_rng(1)
    for _ in range(40):  # 16 crops: two chunks, three when the short one is drawn and the two hold 14
        before = len(reads)
        idx, _ = store.sample_chunks("feat", 16, rng)
        assert len(set(idx.tolist())) == 16 and len(reads) - before <= 3
    idx, values = store.sample_chunks("feat", 50, rng)  # more than the store holds: all of it, with replacement
    assert len(idx) == 50 and set(idx.tolist()) <= set(range(30)) and len(set(idx.tolist())) < 50
    np.testing.assert_array_equal(values, store.read("feat", 0, 30)[idx])


def test_renewals_spread_uniformly_over_the_crops(tmp_path):
    """Pearson's chi-square of how often each crop is drawn over many renewals (seeded, so deterministic): a sampler
    stuck on some chunks or crops (e.g. always the first of each chunk) gives a statistic far above the bound."""
    n, chunk, pool, renewals = 128, 4, 12, 800
    store = _store(tmp_path, n, chunk)
    rng = np.random.default_rng(0)
    counts = np.zeros(n)
    for _ in range(renewals):
        idx, _ = store.sample_chunks("crop_order", pool, rng)
        counts[idx] += 1
    expected = renewals * pool / n  # 75 per crop
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    dof = n - 1
    # mean dof, sd sqrt(2 dof) ~ 16 for a multinomial; whole chunks add some correlation: a generous bound of 5 sd
    assert chi2 < dof + 5 * math.sqrt(2 * dof), chi2
    assert counts.min() > 0.5 * expected and counts.max() < 1.5 * expected
    first_of_chunk = counts.reshape(-1, chunk)[:, 0].sum() / counts.sum()
    assert abs(first_of_chunk - 1 / chunk) < 0.02  # every position within a chunk as likely


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_a_renewal_reads_single_patches_equal_to_the_whole_crops_patch(tmp_path, dtype):
    """sample_chunks(patches=...) keeps patch k of each crop: the same values, in the same order, as reading the
    whole crops and indexing them, for the same draws; and the pool renewal built on it equals the whole-crop one."""
    from pipeline.methods.hp.pool import pick_patches
    from pipeline.methods.hp.step import HPHeads, pool_entries
    from pipeline.methods.hp.training import sample_pool

    store = _store(tmp_path, 70, 8, dtype)
    h, w, c = store.array("feat").shape[1:]
    pick = np.random.default_rng(3).integers(0, h * w, 20)
    idx_a, whole = store.sample_chunks("feat", 20, np.random.default_rng(5))
    idx_b, single = store.sample_chunks("feat", 20, np.random.default_rng(5), patches=pick)
    assert single.shape == (20, c) and np.array_equal(idx_a, idx_b)
    np.testing.assert_array_equal(single, whole.reshape(20, h * w, c)[np.arange(20), pick])
    torch.manual_seed(0)
    heads = HPHeads(c, 8, 0.1)
    torch.manual_seed(9)  # Pool_sp's dropout draws from torch's global generator
    got = sample_pool(store, heads, 20, True, np.random.default_rng(5), torch.Generator().manual_seed(2), "cpu")
    patches = pick_patches(torch.from_numpy(whole).reshape(20, h * w, c), torch.Generator().manual_seed(2)).float()
    torch.manual_seed(9)
    torch.testing.assert_close(got, pool_entries(heads, patches, True), rtol=0, atol=0)
