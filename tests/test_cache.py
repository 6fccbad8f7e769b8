import shutil
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
import zarr

from cache import writer
from cache.integrity import (
    BadChunk,
    CorruptChunk,
    StoreCheck,
    chunk_key,
    finished_chunks,
    mark_bad,
    quick_check,
    summarize,
    verify_chunks,
)
from cache.reader import FeatureStore, batch_plan
from cache.schema import DONE, RECORDS, CodesLayout, HCLLayout, Layout
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


def test_every_shuffled_batch_is_the_plans_and_mixed_within_its_buffer(tmp_path):
    """Each batch, not only the epoch as a whole: its indices are the plan's batch (a reader that served half its
    batches in store order would fail here), its data the store's rows for them, its samples from the chunks its
    buffer read (or the previous buffer's carry), and no batch in store order."""
    layout = Layout(n_samples=100, resolution=32, patch_size=16, embed_dim=8, num_heads=2, n_views=1, with_lhp=False,
                    labelled=True)
    url = str(tmp_path / "s.zarr")
    writer.mark_complete(_write_all(url, layout, chunk=8))
    store = FeatureStore.open(url)
    label = store.read("label", 0, 100)
    plan = batch_plan(100, 8, 12, 7, 3, False)
    planned = [b for _, batches in plan for b in batches]
    served = list(store.batches(["label"], batch_size=12, shuffle_seed=7, buffer_chunks=3))
    assert len(served) == len(planned) == 9
    allowed, carry = [], set()
    for chunks, batches in plan:
        held = carry | {i for c in chunks for i in range(c * 8, min(c * 8 + 8, 100))}
        allowed += [held] * len(batches)
        carry = held - {int(i) for b in batches for i in b}
    for batch, expected, held in zip(served, planned, allowed, strict=True):
        idx = batch["index"].numpy()
        np.testing.assert_array_equal(idx, expected)
        np.testing.assert_array_equal(batch["label"].numpy(), label[idx])
        assert set(idx.tolist()) <= held and len(set(idx.tolist())) == len(idx)
        assert not np.all(np.diff(idx) > 0)  # 12 shuffled samples in rising order: chance 1/12!
    assert sorted(int(i) for b in served for i in b["index"]) == list(range(100))


def test_gather_reads_any_indices(tmp_path):
    url = str(tmp_path / "s.zarr")
    writer.mark_complete(_write_all(url))
    store = FeatureStore.open(url)
    idx = [10, 0, 5, 5, 3]
    np.testing.assert_array_equal(store.gather("lhp", idx), store.read("lhp", 0, 11)[idx])


def test_fsspec_url(tmp_path):
    """A store written and read through an fsspec URL holds, element for element, what the same writes give at a
    plain path."""
    url = "file://" + str(tmp_path / "s.zarr")
    writer.mark_complete(_write_all(url))
    writer.mark_complete(_write_all(str(tmp_path / "plain.zarr")))
    through, plain = FeatureStore.open(url), FeatureStore.open(str(tmp_path / "plain.zarr"))
    assert len(through) == len(plain) == 11 and through.names() == plain.names()
    for name in plain.names():
        np.testing.assert_array_equal(through.read(name, 0, 11), plain.read(name, 0, 11), err_msg=name)
        assert through.read(name, 0, 11).dtype == plain.read(name, 0, 11).dtype


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


# ---------------------------------------------------------------- integrity (cache/integrity.py, docs/cache.md)
def _chunk_file(url, name, chunk):
    return Path(url) / chunk_key(writer.open_group(url, "r")[name], chunk)


@pytest.mark.parametrize("compressor", ["zstd", "none"])
def test_every_array_ends_with_the_checksum_codec(tmp_path, compressor):
    layouts = {
        "hp": LAYOUT,
        "hcl": HCLLayout(6, 32, (16, 32), 8, 2, True, True),
        "codes": CodesLayout(6, 2, 4, 32),
    }
    for kind, layout in layouts.items():
        group = writer.create_store(str(tmp_path / f"{kind}-{compressor}.zarr"), layout, 4, ATTRS, True, compressor)
        names = list(group.array_keys())
        assert set(names) == {*layout.arrays(), DONE, RECORDS}
        for name in names:
            codecs = group[name].metadata.codecs
            assert isinstance(codecs[-1], zarr.codecs.Crc32cCodec), (kind, name, codecs)


def test_records_hold_each_chunk_objects_size_and_the_crc32c_of_its_values(tmp_path):
    url = str(tmp_path / "s.zarr")
    group = writer.create_store(url, LAYOUT, 4, ATTRS, True)
    data = {c: _chunk_data(LAYOUT, *writer.chunk_range(group, c)) for c in range(3)}
    data[1]["label"][:] = 0  # all fill value: still written, so that every finished chunk has its object
    for c in range(3):
        writer.write_chunk(group, c, data[c])
    records = np.asarray(group[RECORDS][:])
    for i, name in enumerate(group.attrs["record_arrays"]):
        dtype = LAYOUT.arrays()[name][1]
        for c in range(3):
            path = _chunk_file(url, name, c)
            assert records[c, i, 0] == path.stat().st_size > 0
            expected = google_crc32c.value(np.ascontiguousarray(data[c][name].astype(dtype)).tobytes())
            assert records[c, i, 1] == (1 << 32) | expected, (name, c)  # the high bit: "a record is here"


def test_write_chunk_refuses_a_chunk_without_every_array(tmp_path):
    group = writer.create_store(str(tmp_path / "s.zarr"), LAYOUT, 4, ATTRS, True)
    data = _chunk_data(LAYOUT, 0, 4)
    del data["lhp"]
    with pytest.raises(ValueError, match="the store holds"):
        writer.write_chunk(group, 0, data)
    assert not writer.finished_chunks(group).any()


def _flip(path, offset=None):
    raw = bytearray(path.read_bytes())
    at = len(raw) // 2 if offset is None else offset
    raw[at] ^= 0x01
    path.write_bytes(bytes(raw))


def test_reader_stops_on_a_damaged_chunk_naming_array_chunk_and_store(tmp_path):
    url = str(tmp_path / "s.zarr")
    writer.mark_complete(_write_all(url))
    _flip(_chunk_file(url, "lhp", 1))
    store = FeatureStore.open(url)
    expected = r"store .*s\.zarr: array 'lhp' chunk 1 is damaged \(checksum mismatch.*hp-pipe verify --store"
    with pytest.raises(CorruptChunk, match=expected):
        list(store.batches(["feat", "lhp"], batch_size=3, shuffle_seed=1))
    with pytest.raises(CorruptChunk, match=expected):
        store.gather("lhp", [5])
    with pytest.raises(CorruptChunk, match=expected):
        store.dask("lhp").compute()
    intact = np.stack([_chunk_data(LAYOUT, 0, 4)["lhp"][0], _chunk_data(LAYOUT, 8, 11)["lhp"][2]])
    np.testing.assert_array_equal(store.gather("lhp", [0, 10]), intact)  # the other chunks still read


def test_quick_check_sees_sizes_and_verify_sees_contents(tmp_path):
    url = str(tmp_path / "s.zarr")
    group = _write_all(url)
    writer.mark_complete(group)
    path = _chunk_file(url, "feat", 0)
    path.write_bytes(path.read_bytes()[:-3])  # truncated
    _flip(_chunk_file(url, "image", 2))  # same size: only a full read sees it
    _chunk_file(url, "crop_order", 1).unlink()
    quick = quick_check(group, url)
    assert [(b.array, b.chunk) for b in quick.bad] == [("feat", 0), ("crop_order", 1)]
    assert "chunk object missing" in quick.bad[1].reason
    full = verify_chunks(group, url, threads=2)
    assert {(b.array, b.chunk) for b in full.bad} == {("feat", 0), ("crop_order", 1), ("image", 2)}
    size = path.stat().st_size
    assert writer.store_problems(url) == [f"store {url}: 2 bad chunk(s): feat chunk 0 ({size} B stored, {size + 3} B "
                                          "recorded), crop_order chunk 1 (chunk object missing)"]


def test_chunks_verify_records_as_bad_are_recomputed_exactly(tmp_path):
    url = str(tmp_path / "s.zarr")
    writer.mark_complete(_write_all(url))
    _flip(_chunk_file(url, "feat_aug", 1))
    group = writer.open_group(url, "r")
    check = verify_chunks(group, url)
    assert [str(b) for b in check.bad] == ["feat_aug chunk 1 (checksum mismatch: the chunk object is damaged)"]
    mark_bad(writer.open_group(url, "r+"), check.bad)
    with pytest.raises(UserError, match=r"1 damaged chunk\(s\) found by `hp-pipe verify` \(feat_aug chunk 1 "):
        FeatureStore.open(url)
    lines = []
    again = writer.create_store(url, LAYOUT, 4, ATTRS, fresh=False, log=lines.append)
    assert writer.finished_chunks(again).tolist() == [True, False, True]
    assert any("feat_aug chunk 1" in line for line in lines)
    writer.write_chunk(again, 1, _chunk_data(LAYOUT, 4, 8))
    writer.mark_complete(again)
    store = FeatureStore.open(url)
    assert "bad_chunks" not in store.attrs
    np.testing.assert_array_equal(store.read("feat_aug", 4, 8), _chunk_data(LAYOUT, 4, 8)["feat_aug"])


def test_missing_array_is_recreated_and_every_chunk_redone(tmp_path):
    url = str(tmp_path / "s.zarr")
    writer.mark_complete(_write_all(url))
    shutil.rmtree(Path(url) / "lhp")
    with pytest.raises(UserError, match=r"no array 'lhp' .*\(deleted\?\): run `hp-pipe features`"):
        FeatureStore.open(url).array("lhp")
    lines = []
    group = writer.create_store(url, LAYOUT, 4, ATTRS, fresh=False, log=lines.append)
    assert "lhp" in group and not writer.finished_chunks(group).any()
    assert lines[0] == "array 'lhp' is missing: recreated; all 3 chunks are recomputed"


def test_half_created_store_is_rebuilt_and_a_foreign_group_refused(tmp_path):
    url = str(tmp_path / "s.zarr")
    half = zarr.open_group(url, mode="w")  # created before schema 3: attributes were written last
    half.create_array("feat", shape=(11, 2, 2, 8), chunks=(4, 2, 2, 8), dtype="float16")
    writer.mark_complete(_write_all(url))  # neither fresh nor forced: rebuilt all the same
    assert len(FeatureStore.open(url)) == 11
    foreign = str(tmp_path / "foreign.zarr")
    zarr.open_group(foreign, mode="w").create_array("weights", shape=(3,), dtype="float32")
    for fresh in (False, True):
        with pytest.raises(UserError, match="not an hp-pipe feature store"):
            writer.create_store(foreign, LAYOUT, 4, ATTRS, fresh)
    assert list(zarr.open_group(foreign, mode="r").array_keys()) == ["weights"]


def test_a_folder_of_other_files_at_the_store_url_is_refused_and_left_intact(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    for fresh in (False, True):
        with pytest.raises(UserError, match="not an hp-pipe feature store"):
            writer.create_store(str(folder), LAYOUT, 4, ATTRS, fresh)
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]
    remains = tmp_path / "killed.zarr"  # a store whose metadata was deleted first when it was being replaced
    (remains / "feat" / "c").mkdir(parents=True)
    (remains / DONE).mkdir()
    writer.mark_complete(_write_all(str(remains)))
    assert len(FeatureStore.open(str(remains))) == 11


# ------------------------------------------------------- integrity: each outcome pinned to hand-computed values
def test_a_torn_done_flag_reads_as_unfinished_and_every_other_flag_as_written(tmp_path):
    """A kill mid-write tears one flag object: the fallback reads flags one by one, as booleans, and only the torn
    one counts as unfinished (a fallback that lost the others would recompute the whole store)."""
    url = str(tmp_path / "s.zarr")
    group = _write_all(url)
    _flip(_chunk_file(url, DONE, 1), offset=0)
    with pytest.raises(Exception):  # noqa: B017 - the premise: the whole-array read fails on the torn flag
        group[DONE][:]
    flags = finished_chunks(group)
    assert flags.dtype == np.bool_ and flags.tolist() == [True, False, True]
    check = quick_check(group, url)
    assert (check.chunks, check.unfinished, check.bad) == (3, [1], [])


def test_quick_check_names_a_missing_record_and_the_unwritten_chunks(tmp_path):
    """A finished chunk whose record is zeros is "no record" (not a size mismatch against 0 B), named by array and
    chunk; the unwritten chunk is listed; the check carries the store's URL."""
    url = str(tmp_path / "s.zarr")
    group = _write_all(url, chunks=[0, 2])
    lhp = list(group.attrs["record_arrays"]).index("lhp")
    group[RECORDS][2, lhp, :] = 0
    check = quick_check(group, url)
    assert check.url == url and check.chunks == 3 and check.unfinished == [1]
    assert check.bad == [BadChunk("lhp", 2, "no record")]
    assert check.problems() == ["1 bad chunk(s): lhp chunk 2 (no record)", "1 of 3 chunks not written"]


def test_a_store_without_its_records_array_is_reported_not_read(tmp_path):
    """Without `_records` nothing per chunk can be checked: both checks report the missing array and stop, rather
    than fail reading it."""
    url = str(tmp_path / "s.zarr")
    group = _write_all(url)
    shutil.rmtree(Path(url) / RECORDS)
    group = writer.open_group(url, "r")
    for check in (quick_check(group, url), verify_chunks(group, url, threads=1)):
        assert (check.url, check.missing_arrays, check.chunks, check.bad) == (url, [RECORDS], 0, [])


def test_a_missing_array_is_skipped_and_every_later_array_still_checked(tmp_path):
    """An array missing (second in record order) must not stop the checks of the arrays after it, in the same
    chunk or other chunks; a chunk quick_check already found bad is reported once, not again by verify."""
    url = str(tmp_path / "s.zarr")
    group = _write_all(url)
    names = list(group.attrs["record_arrays"])
    assert names.index("cls_attn") < names.index("lhp") < names.index("label")
    shutil.rmtree(Path(url) / "cls_attn")
    path = _chunk_file(url, "lhp", 0)
    recorded = path.stat().st_size
    path.write_bytes(path.read_bytes()[:-3])
    _flip(_chunk_file(url, "label", 0))
    group = writer.open_group(url, "r")
    truncated = BadChunk("lhp", 0, f"{recorded - 3} B stored, {recorded} B recorded")
    quick = quick_check(group, url)
    assert quick.missing_arrays == ["cls_attn"] and quick.bad == [truncated]
    full = verify_chunks(group, url, threads=1)
    assert full.url == url
    assert full.bad == [BadChunk("label", 0, "checksum mismatch: the chunk object is damaged"), truncated]
    assert full.problems() == ["array cls_attn missing", f"1 bad chunk(s): {summarize(full.bad)}"]  # one chunk


def test_mark_bad_adds_to_what_verify_recorded_before_and_clears_complete(tmp_path):
    """Two verify runs: the second's chunks are added to the first's (not replacing them), their flags cleared,
    and the store no longer complete."""
    url = str(tmp_path / "s.zarr")
    writer.mark_complete(_write_all(url))
    mark_bad(writer.open_group(url, "r+"), [BadChunk("feat", 1, "x")])
    mark_bad(writer.open_group(url, "r+"), [BadChunk("lhp", 2, "y"), BadChunk("image", 2, "z")])
    group = writer.open_group(url, "r")
    expected = sorted(["feat chunk 1 (x)", "lhp chunk 2 (y)", "image chunk 2 (z)"])
    assert group.attrs["bad_chunks"] == expected and group.attrs["complete"] is False
    flags = finished_chunks(group)
    assert flags.dtype == np.bool_ and flags.tolist() == [True, False, False]
    assert np.asarray(group[DONE][:]).tolist() == [True, False, False]
    assert quick_check(group, url).recorded_bad == expected


def test_summarize_lists_six_and_counts_the_rest():
    """At most `limit` (6) chunks by name, then "and N more" with N the exact remainder; none at exactly six."""
    bad = [BadChunk("feat", c, "r") for c in range(9)]
    named = ", ".join(f"feat chunk {c} (r)" for c in range(6))
    assert summarize(bad[:6]) == named
    assert summarize(bad[:7]) == named + " and 1 more"
    assert summarize(bad) == named + " and 3 more"
    assert summarize(bad, limit=2) == "feat chunk 0 (r), feat chunk 1 (r) and 7 more"


def test_problems_phrases_name_the_arrays_and_the_recorded_chunks():
    """Exact phrases: every missing array by name, verify's recorded chunks (six, then "..."; recorded chunks
    take the place of the unwritten count), the unwritten count out of all chunks."""
    assert StoreCheck("u", missing_arrays=["lhp", "label"]).problems() == ["array lhp, label missing"]
    recorded = [f"feat chunk {c} (r)" for c in range(7)]
    prefix = "`hp-pipe verify` recorded bad chunk(s): "
    six = StoreCheck("u", chunks=3, recorded_bad=recorded[:6], unfinished=[1])
    assert six.problems() == [prefix + ", ".join(recorded[:6])]
    seven = StoreCheck("u", chunks=3, recorded_bad=recorded)
    assert seven.problems() == [prefix + ", ".join(recorded[:6]) + " ..."]
    assert StoreCheck("u", chunks=3, unfinished=[1, 2]).problems() == ["2 of 3 chunks not written"]
    assert StoreCheck("u", chunks=3).problems() == []


def test_intact_done_flags_are_read_in_one_request(tmp_path):
    """The one-by-one read is only the fallback for a torn flag: an intact `_done` is read whole (one request, not
    one per chunk; a COCO-scale store has thousands of chunks)."""
    url = str(tmp_path / "s.zarr")
    group = _write_all(url, chunks=[0, 2])
    reads = []

    class Counted:
        def __init__(self, array):
            self.array, self.shape = array, array.shape

        def __getitem__(self, key):
            reads.append(key)
            return self.array[key]

    assert finished_chunks({DONE: Counted(group[DONE])}).tolist() == [True, False, True]
    assert reads == [slice(None)]
