import numpy as np
import pytest

from cache import writer
from cache.reader import FeatureStore, batch_plan
from cache.schema import Layout
from pipeline.errors import UserError

LAYOUT = Layout(n_samples=11, resolution=32, patch_size=16, embed_dim=8, num_heads=2, n_views=2, with_lhp=True,
                labelled=True)
ATTRS = {"dataset": "synthetic", "split": "train", "backbone": "vit_small_patch16_224.dino", "patch_size": 16,
         "resolution": 32, "weights_hash": "abc", "weights": "random-init", "fingerprint": "f1"}


def _chunk_data(layout, start, stop):
    rng = np.random.default_rng(start)
    return {name: rng.integers(0, 200, size=(stop - start, *shape)).astype(dtype)
            for name, (shape, dtype) in layout.arrays().items()}


def _write_all(url, layout=LAYOUT, attrs=ATTRS, chunk=4, fresh=False, chunks=None):
    group = writer.create_store(url, layout, chunk, attrs, fresh)
    for c in chunks if chunks is not None else range(-(-layout.n_samples // chunk)):
        writer.write_chunk(group, c, _chunk_data(layout, *writer.chunk_range(group, c)))
    return group


def test_round_trip_through_reader_and_dask(tmp_path):
    url = str(tmp_path / "s.zarr")
    group = _write_all(url)
    writer.mark_complete(group)
    store = FeatureStore.open(url, expect={"backbone": ATTRS["backbone"]})
    expected = np.concatenate([_chunk_data(LAYOUT, s, min(s + 4, 11))["feat"] for s in range(0, 11, 4)])
    np.testing.assert_array_equal(store.read("feat", 0, 11), expected)
    np.testing.assert_array_equal(store.dask("feat").compute(), expected)
    assert store.dask("feat").chunks[0] == (4, 4, 3)
    seen = []
    for batch in store.batches(["feat", "label"], batch_size=3, shuffle_seed=5):
        idx = batch["index"].numpy()
        np.testing.assert_array_equal(batch["feat"].numpy(), expected[idx])
        seen += idx.tolist()
    assert sorted(seen) == list(range(11)) and seen != list(range(11))


@pytest.mark.parametrize("start", [0, 1, 2, 3, 4])
def test_start_batch_resumes_the_same_order(tmp_path, start):
    url = str(tmp_path / "s.zarr")
    writer.mark_complete(_write_all(url))
    store = FeatureStore.open(url)
    full = [b["index"].tolist() for b in store.batches(["feat"], batch_size=3, shuffle_seed=2, buffer_chunks=1)]
    rest = [b for b in store.batches(["feat"], batch_size=3, shuffle_seed=2, buffer_chunks=1, start_batch=start)]
    assert [b["index"].tolist() for b in rest] == full[start:]
    expected = store.read("feat", 0, 11)
    for b in rest:
        np.testing.assert_array_equal(b["feat"].numpy(), expected[b["index"].numpy()])


def test_gather_reads_any_indices(tmp_path):
    url = str(tmp_path / "s.zarr")
    writer.mark_complete(_write_all(url))
    store = FeatureStore.open(url)
    idx = [10, 0, 5, 5, 3]
    np.testing.assert_array_equal(store.gather("lhp", idx), store.read("lhp", 0, 11)[idx])


def test_fsspec_url(tmp_path):
    url = "file://" + str(tmp_path / "s.zarr")
    writer.mark_complete(_write_all(url))
    assert len(FeatureStore.open(url)) == 11


@pytest.mark.parametrize("batch_size,chunk,buffer,drop_last", [(3, 4, 1, False), (5, 2, 2, True), (16, 4, 8, False)])
def test_batch_plan_visits_every_sample_once(batch_size, chunk, buffer, drop_last):
    plan = batch_plan(23, chunk, batch_size, 1, buffer, drop_last)
    batches = [b for _, bs in plan for b in bs]
    flat = np.concatenate(batches)
    assert len(set(flat.tolist())) == len(flat)
    assert len(flat) == (23 // batch_size * batch_size if drop_last else 23)
    assert all(len(b) == batch_size for b in batches[:-1])
    seen: set[int] = set()
    for chunks, bs in plan:  # a batch only uses samples of its buffer's chunks or leftovers of earlier buffers
        seen |= set(chunks)
        for b in bs:
            assert {int(i) // chunk for i in b} <= seen
    other = [b.tolist() for _, bs in batch_plan(23, chunk, batch_size, 2, buffer, drop_last) for b in bs]
    assert other != [b.tolist() for b in batches]  # the order comes from the seed


def test_finished_chunks_resume_only_the_rest(tmp_path):
    url = str(tmp_path / "s.zarr")
    group = _write_all(url, chunks=[0, 2])
    assert writer.finished_chunks(group).tolist() == [True, False, True]
    again = writer.create_store(url, LAYOUT, 4, ATTRS, fresh=False)  # same fingerprint: keeps its chunks
    assert writer.finished_chunks(again).tolist() == [True, False, True]
    with pytest.raises(UserError, match=r"incomplete \(2 of 3 chunks\)"):
        FeatureStore.open(url)


def test_store_of_another_backbone_is_refused_and_left_intact(tmp_path):
    url = str(tmp_path / "s.zarr")
    writer.mark_complete(_write_all(url))
    before = FeatureStore.open(url).read("feat", 0, 11).copy()
    other = {**ATTRS, "backbone": "vit_base_patch8_224.dino", "patch_size": 8}
    with pytest.raises(UserError, match="differs in: backbone, patch_size"):
        writer.create_store(url, LAYOUT, 4, other, fresh=True)
    np.testing.assert_array_equal(FeatureStore.open(url).read("feat", 0, 11), before)
    with pytest.raises(UserError, match="its resolution is 32, this run asks for 64"):
        FeatureStore.open(url, expect={"resolution": 64})


def test_reader_refuses_missing_store_and_other_schema(tmp_path):
    with pytest.raises(UserError, match="no feature store at"):
        FeatureStore.open(str(tmp_path / "missing.zarr"))
    url = str(tmp_path / "s.zarr")
    group = _write_all(url)
    writer.mark_complete(group)
    group.attrs["schema_version"] = 99
    with pytest.raises(UserError, match="schema version 99"):
        FeatureStore.open(url)
