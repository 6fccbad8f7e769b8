"""The fault catalogue (README, "Reliability"): each fault injected, and what hp-pipe must do about it.

Every test asserts the four things the catalogue promises: nothing finished is lost, the result equals an
uninterrupted run (here: the store's files byte for byte), one clear `error:` line naming what is wrong and the
fix, and the documented exit code (0 done, 1 runtime failure or "verify found bad chunks", 2 bad input).

Store integrity (a tiny HP training store: 5 crops in chunks of 2, 2 and 1, ViT-S/16 random init, 32 px)
- a chunk object truncated, emptied, deleted; a chunk's record deleted   -> `features` finds it by its cheap check
  (objects present with their recorded size) and recomputes exactly those chunks; `verify` finds exactly them
- a chunk overwritten with random bytes, 8 bytes flipped inside it, a valid chunk copied over another
                                        -> the reader stops with one line naming array, chunk, store and the fix
                                           (`hp-pipe train`: exit 2); `verify` exits 1 naming exactly those chunks
                                           and records them; `features` then recomputes exactly them
- an array deleted (`lhp`, `feat`)      -> `verify` exits 1 naming it; the reader names it and the fix; `features`
                                           recreates it and recomputes the store
- a kill while the store is created (new and pre-schema-3 order), a foreign group at the store's URL
                                        -> `features` and `features --force` both recover; a foreign group is
                                           refused (exit 2) and left untouched, `--force` included
- the store deleted, its path edited in the manifest
                                        -> `features` never says "up to date": it rebuilds, or refuses a redirect
                                           to another store (exit 2)
- an HCL store with a flipped chunk    -> the same verify / repair cycle

Each section below holds one fault family; tests of other families (locks, run settings) go in sections of their own.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from cache import writer
from cache.integrity import CorruptChunk, chunk_key
from cache.reader import FeatureStore
from cache.schema import DONE, RECORDS
from pipeline import cli
from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.orchestration import paths
from pipeline.orchestration.runner import manifest_path
from stages import features

TINY = {
    "dataset.n_train": "1", "dataset.n_val": "1", "dataset.size": "64",
    "prepare.resolution": "32", "prepare.val_resolution": "32",
    "features.backbone": "vit_small_patch16_224.dino", "features.weights": "random",
    "features.n_views": "1", "features.chunk_size": "2",
}
SETS = [arg for k, v in TINY.items() for arg in ("--set", f"{k}={v}")]
N_CHUNKS = 3  # 1 image x 5 crops, 2 per chunk: [0, 1], [2, 3], [4]
CHUNK_SAMPLES = {0: 2, 1: 2, 2: 1}


def hp(capsys, *args: str) -> tuple[int, str, str]:
    """`hp-pipe ARGS` in this process, through the real entry point (exit code, stdout, stderr)."""
    capsys.readouterr()
    saved, sys.argv = sys.argv, ["hp-pipe", *args]
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved
    out = capsys.readouterr()
    return code, out.out, out.err


def error_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("error:")]


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in Path(root).rglob("*") if p.is_file()}


def chunk_file(url: str, name: str, chunk: int) -> Path:
    return Path(url) / chunk_key(writer.open_group(url, "r")[name], chunk)


def data_arrays(url: str) -> list[str]:
    return list(writer.open_group(url, "r").attrs["record_arrays"])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread (a busy 2-core machine); every run in this module uses the same count, so
    recomputed chunks are bit-identical to the reference."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def built(tmp_path_factory, one_thread):
    """One uninterrupted run of the training store; its files, byte for byte, are every test's reference."""
    workdir = tmp_path_factory.mktemp("faults")
    config = load_config("synthetic", TINY)
    manifest = features.run(config, workdir, "train")
    url = manifest["outputs"]["store"]
    saved = tmp_path_factory.mktemp("pristine") / "store.zarr"
    shutil.copytree(url, saved)
    mpath = manifest_path(paths.stage_dir(config, workdir), "features-train")
    return {"config": config, "workdir": workdir, "url": url, "saved": saved, "mpath": mpath,
            "manifest": mpath.read_text(), "reference": tree(saved)}


@pytest.fixture
def store(built):
    """The reference store and manifest back in place before each test."""
    shutil.rmtree(built["url"], ignore_errors=True)
    shutil.copytree(built["saved"], built["url"])
    built["mpath"].write_text(built["manifest"])
    return built


def features_cli(store, capsys, *extra: str) -> tuple[int, str, str]:
    return hp(capsys, "features", "--dataset", "synthetic", "--split", "train", "--workdir", str(store["workdir"]),
              *SETS, *extra)


def verify_cli(store, capsys, *extra: str) -> tuple[int, str, str]:
    return hp(capsys, "verify", "--dataset", "synthetic", "--split", "train", "--workdir", str(store["workdir"]),
              *SETS, *extra)


def reported_bad(out: str) -> set[tuple[str, int]]:
    """(array, chunk) of every `[verify] URL: bad: ARRAY chunk C (reason)` line."""
    found = set()
    for line in out.splitlines():
        if ": bad: " in line:
            array, _, chunk = line.split(": bad: ")[1].split(" (")[0].split()
            found.add((array, int(chunk)))
    return found


def assert_repaired(store, capsys, bad_chunks: set[int], before: dict[str, int]) -> None:
    """`features` recomputes exactly `bad_chunks`: the store equals the uninterrupted run byte for byte, and no
    other chunk's objects were touched."""
    code, out, err = features_cli(store, capsys)
    assert code == 0, err
    assert "up to date" not in out
    manifest = store["mpath"].read_text()
    computed = json.loads(manifest)["outputs"]["computed"]
    assert computed == sum(CHUNK_SAMPLES[c] for c in bad_chunks)  # exactly the bad chunks, nothing else
    assert tree(store["url"]) == store["reference"]
    after = mtimes(store["url"])
    url = store["url"]
    for name in data_arrays(url):
        for c in set(range(N_CHUNKS)) - bad_chunks:
            key = str(chunk_file(url, name, c).relative_to(url))
            assert after[key] == before[key], f"{key} was rewritten"
    code, out, err = verify_cli(store, capsys)
    assert code == 0 and f"all {N_CHUNKS} chunks of {len(data_arrays(url))} arrays verify" in out, out + err


# ---------------------------------------------------------------- store integrity: damaged chunk objects
def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def empty(path: Path) -> None:
    path.write_bytes(b"")


def random_bytes(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, path.stat().st_size, dtype=np.uint8).tobytes())


def flip8(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    path.write_bytes(bytes(data))


# fault -> (array, chunk, does the cheap check see it?)
DAMAGE = {
    "truncated": (truncate, "feat", 2, True),
    "emptied": (empty, "lhp", 1, True),
    "random bytes": (random_bytes, "feat_aug", 0, False),
    "8 bytes flipped": (flip8, "feat", 1, False),
}


@pytest.mark.parametrize("fault", list(DAMAGE))
def test_damaged_chunk_is_named_verified_and_recomputed_exactly(store, capsys, fault):
    damage, name, chunk, cheap = DAMAGE[fault]
    url = store["url"]
    before = mtimes(url)
    damage(chunk_file(url, name, chunk))
    # the reader: one line naming array, chunk, store and the fix, never a codec traceback or wrong data
    with pytest.raises(CorruptChunk) as caught:
        FeatureStore.open(url).read(name, 0, 5)
    assert (caught.value.array, caught.value.chunk) == (name, chunk)
    message = str(caught.value)
    assert url in message and f"'{name}' chunk {chunk}" in message and "checksum" in message
    assert "hp-pipe verify" in message and "hp-pipe features" in message and "\n" not in message
    # features before verify: the cheap check sees a changed size (not same-size damage, verify's job)
    if not cheap:
        code, out, _ = features_cli(store, capsys)
        assert code == 0 and "up to date" in out
    # verify: exit 1, exactly this chunk, one error line; recorded in the store
    code, out, err = verify_cli(store, capsys)
    assert code == 1
    assert reported_bad(out) == {(name, chunk)}
    errors = error_lines(err)
    assert len(errors) == 1 and url in errors[0] and f"{name} chunk {chunk}" in errors[0]
    group = writer.open_group(url, "r")
    assert np.flatnonzero(~writer.finished_chunks(group)).tolist() == [chunk]
    with pytest.raises(UserError, match=rf"found by `hp-pipe verify` \({name} chunk {chunk} "):
        FeatureStore.open(url)
    assert_repaired(store, capsys, {chunk}, before)


def test_status_reports_a_damaged_store_incomplete_and_writes_nothing(store, capsys):
    damage, name, chunk, _ = DAMAGE["truncated"]
    damage(chunk_file(store["url"], name, chunk))
    before = tree(store["workdir"])
    code, out, _ = hp(capsys, "status", "--dataset", "synthetic", "--workdir", str(store["workdir"]), *SETS, "--json")
    assert code == 0
    row = next(r for r in json.loads(out) if r["stage"] == "features-train")
    assert row["state"] == "incomplete"
    assert any(f"{name} chunk {chunk}" in problem for problem in row["missing"])
    assert tree(store["workdir"]) == before  # status reads, never writes


@pytest.mark.parametrize("fault", ["truncated", "emptied"])
def test_cheap_check_repairs_without_verify(store, capsys, fault):
    damage, name, chunk, _ = DAMAGE[fault]
    before = mtimes(store["url"])
    damage(chunk_file(store["url"], name, chunk))
    code, out, _ = features_cli(store, capsys)
    assert code == 0 and "up to date" not in out
    assert f"{name} chunk {chunk}" in out and "repairing" in out
    assert tree(store["url"]) == store["reference"]
    assert {k: v for k, v in mtimes(store["url"]).items() if f"/c/{chunk}" not in k and "zarr.json" != k} == \
        {k: v for k, v in before.items() if f"/c/{chunk}" not in k and "zarr.json" != k}


def test_valid_chunk_copied_over_another_is_caught_by_its_digest(store, capsys):
    url = store["url"]
    before = mtimes(url)
    target = chunk_file(url, "feat", 1)
    target.write_bytes(chunk_file(url, "feat", 0).read_bytes())  # decodes fine: only the digest can tell
    with pytest.raises(CorruptChunk, match=r"'feat' chunk 1 is damaged \(values differ from the recorded digest"):
        for _ in FeatureStore.open(url).batches(["feat", "lhp"], batch_size=4, shuffle_seed=0):
            pass
    code, out, err = verify_cli(store, capsys)
    assert code == 1 and reported_bad(out) == {("feat", 1)}
    assert len(error_lines(err)) == 1
    assert_repaired(store, capsys, {1}, before)


def test_deleted_chunk_objects_read_as_fill_values_are_caught(store, capsys):
    url = store["url"]
    before = mtimes(url)
    names = data_arrays(url)
    for name in names:
        chunk_file(url, name, 1).unlink()
    with pytest.raises(CorruptChunk, match=r"chunk 1 is damaged \(values differ from the recorded digest"):
        FeatureStore.open(url).gather("feat", [3, 2])  # zarr would return zeros
    code, out, err = verify_cli(store, capsys)
    assert code == 1 and reported_bad(out) == {(n, 1) for n in names}
    assert all("chunk object missing" in line for line in out.splitlines() if ": bad: " in line)
    assert_repaired(store, capsys, {1}, before)


def test_deleted_chunk_record_is_recomputed(store, capsys):
    url = store["url"]
    before = mtimes(url)
    (Path(url) / chunk_key(writer.open_group(url, "r")[RECORDS], 2)).unlink()
    code, out, err = verify_cli(store, capsys)
    assert code == 1 and {c for _, c in reported_bad(out)} == {2} and "no record" in out
    assert_repaired(store, capsys, {2}, before)


def test_two_faults_the_cheap_check_repairs_one_and_names_the_other(store, capsys):
    """A truncated chunk (cheap check) and a same-size flip in a chunk the stage reads back for its preview: the
    first is recomputed, the second stops the stage with one line (not a codec traceback); verify + features end
    the store byte for byte equal to an uninterrupted run."""
    url = store["url"]
    before = mtimes(url)
    truncate(chunk_file(url, "lhp", 2))
    flip8(chunk_file(url, "feat", 0))
    code, out, err = features_cli(store, capsys)
    assert code == 2 and "lhp chunk 2" in out
    errors = error_lines(err)
    assert len(errors) == 1 and "'feat' chunk 0 is damaged (checksum mismatch" in errors[0]
    code, out, err = verify_cli(store, capsys)
    assert code == 1 and reported_bad(out) == {("feat", 0)}  # chunk 2 was recomputed already
    code, out, err = features_cli(store, capsys)
    assert code == 0 and "up to date" not in out, err
    assert tree(url) == store["reference"]
    after = mtimes(url)
    assert all(after[k] == v for k, v in before.items() if "/c/1/" in k and not k.startswith("_"))  # untouched


def test_train_stops_with_one_line_on_a_damaged_chunk(store, capsys):
    """The training read path: exit 2 (a damaged input store, like an unreadable image), one line, no traceback."""
    flip8(chunk_file(store["url"], "feat", 1))
    sets = ["--set", "hp.batch_size=4", "--set", "hp.epochs=1", "--set", "hp.head_dim=32",
            "--set", "hp.pool_size=4", "--set", "hp.warmup=0"]
    code, out, err = hp(capsys, "train", "--dataset", "synthetic", "--run", "damaged", "--workdir",
                        str(store["workdir"]), *SETS, *sets)
    assert code == 2
    errors = error_lines(err)
    assert len(errors) == 1
    assert store["url"] in errors[0] and "'feat' chunk 1" in errors[0] and "hp-pipe verify" in errors[0]


# ---------------------------------------------------------------- store integrity: a whole array deleted
@pytest.mark.parametrize("name", ["lhp", "feat"])
def test_deleted_array_is_named_and_recomputed(store, capsys, name):
    url = store["url"]
    shutil.rmtree(Path(url) / name)
    with pytest.raises(UserError, match=rf"has no array '{name}' \(.*\) \(deleted\?\): run `hp-pipe features`"):
        FeatureStore.open(url).array(name)
    code, out, err = verify_cli(store, capsys)
    assert code == 1 and len(error_lines(err)) == 1 and f"'{name}' missing" in error_lines(err)[0]
    code, out, err = features_cli(store, capsys)
    assert code == 0, err
    assert f"array '{name}' is missing: recreated; all {N_CHUNKS} chunks are recomputed" in out
    assert tree(url) == store["reference"]


def test_deleted_done_flags_recompute_the_store(store, capsys):
    shutil.rmtree(Path(store["url"]) / DONE)
    code, out, err = features_cli(store, capsys)
    assert code == 0 and "up to date" not in out
    assert tree(store["url"]) == store["reference"]


# ---------------------------------------------------------------- store integrity: creation killed, foreign groups
# Real kills: the child is the real command line, started by a launcher that wraps one of the writer's functions to
# signal "here" (a file) and wait; the test SIGKILLs the whole process there, as a kill -9 or an OOM kill would.
LAUNCHER = """
import os, sys, time, pathlib
from cache import writer
ready, pause = pathlib.Path(os.environ["HP_TEST_READY"]), os.environ["HP_TEST_PAUSE"]
def wait_here():
    ready.touch()
    time.sleep(600)
if pause.startswith("arrays:"):  # the group's metadata and N arrays written, the rest not yet
    made, create = [], writer._create_array
    def _create_array(group, name, *args):
        if len(made) == int(pause.split(":")[1]):
            wait_here()
        made.append(name)
        return create(group, name, *args)
    writer._create_array = _create_array
else:  # every array created (the store folder complete), no chunk written yet
    def write_chunk(*args, **kwargs):
        wait_here()
    writer.write_chunk = write_chunk
from pipeline import cli
sys.argv = ["hp-pipe", *sys.argv[1:]]
cli.main()
"""


def kill_when_paused(args: list[str], pause: str, ready: Path, timeout: float = 180) -> None:
    """Run `hp-pipe ARGS` in a child process that stops at `pause`; SIGKILL it there."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HP_TEST_READY": str(ready),
           "HP_TEST_PAUSE": pause}
    child = subprocess.Popen([sys.executable, "-c", LAUNCHER, *args], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while not ready.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if child.poll() is not None:
        pytest.fail(f"the child ended before the moment to kill it ({pause}): {child.stderr.read()[-2000:]}")
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL


@pytest.mark.parametrize("pause", ["arrays:2", "first-chunk"])
@pytest.mark.slow
def test_features_killed_during_store_creation_is_rebuilt(store, capsys, tmp_path, pause):
    """Killed with the group and two arrays written, or with every array created and no chunk: the next
    `features` (without --force) rebuilds the store, byte for byte the uninterrupted run's."""
    args = ["features", "--dataset", "synthetic", "--split", "train", "--workdir", str(store["workdir"]), *SETS,
            "--force"]
    kill_when_paused(args, pause, tmp_path / "ready")
    assert Path(store["url"]).exists() and tree(store["url"]) != store["reference"]  # a half-made store is there
    code, out, err = features_cli(store, capsys)
    assert code == 0, err
    assert "up to date" not in out
    assert tree(store["url"]) == store["reference"]


@pytest.mark.slow
def test_stego_neighbour_table_killed_before_its_first_chunk_is_rebuilt(tmp_path, capsys):
    """STEGO's `knn-train` killed with its store created and no chunk written: the next `train --method stego`
    builds the table again and never reads a partial one; the table equals an uninterrupted build's."""
    import numpy as np

    from cache.reader import FeatureStore
    from pipeline.orchestration.runner import read_manifest
    from tests.test_faults import hp

    sets = [*SETS, "--set", "stego_cache.knn_size=3", "--set", "stego.num_neighbors=2", "--set",
            "stego.max_steps=1", "--set", "stego.batch_size=2", "--set", "stego.head_dim=8", "--set",
            "stego.feature_samples=3"]
    work = tmp_path / "work"
    code, _, err = hp(capsys, "features", "--dataset", "synthetic", "--split", "train", "--workdir", str(work), *sets)
    assert code == 0, err
    kill_when_paused(["train", "--dataset", "synthetic", "--method", "stego", "--workdir", str(work), *sets],
                     "first-chunk", tmp_path / "ready")
    code, out, err = hp(capsys, "train", "--dataset", "synthetic", "--method", "stego", "--workdir", str(work), *sets)
    assert code == 0, err
    assert "[knn-train] up to date" not in out
    again = tmp_path / "again"  # an uninterrupted build of the same table
    code, _, err = hp(capsys, "train", "--dataset", "synthetic", "--method", "stego", "--workdir", str(again), *sets)
    assert code == 0, err
    stores = [read_manifest(w / "synthetic", "knn-train")["outputs"]["store"] for w in (work, again)]
    tables = [FeatureStore.open(url).read("feat", 0, len(FeatureStore.open(url))) for url in stores]
    assert len(tables[0]) == 5  # 1 image x 5 crops
    np.testing.assert_array_equal(tables[0], tables[1])


@pytest.mark.parametrize("force", [False, True])
def test_store_half_created_without_attributes_is_recovered(store, capsys, force):
    """The order stores were created in before schema 3: group metadata without attributes, then the arrays."""
    url = store["url"]
    shutil.rmtree(url)
    group = zarr.open_group(url, mode="w")
    group.create_array("feat", shape=(5, 2, 2, 384), chunks=(2, 2, 2, 384), dtype="float16")
    group.create_array("image", shape=(5, 32, 32, 3), chunks=(2, 32, 32, 3), dtype="uint8")
    code, out, err = features_cli(store, capsys, *(["--force"] if force else []))
    assert code == 0, err
    assert "up to date" not in out
    assert tree(url) == store["reference"]


@pytest.mark.parametrize("force", [False, True])
def test_foreign_group_at_the_store_url_is_refused_and_left_intact(store, capsys, force):
    url = store["url"]
    shutil.rmtree(url)
    group = zarr.open_group(url, mode="w")
    group.create_array("weights", shape=(4,), dtype="float32")[:] = np.arange(4)
    before = tree(url)
    code, out, err = features_cli(store, capsys, *(["--force"] if force else []))
    assert code == 2
    errors = error_lines(err)
    assert len(errors) == 1 and url in errors[0] and "not an hp-pipe feature store" in errors[0]
    assert tree(url) == before


# ---------------------------------------------------------------- store integrity: store gone, manifest edited
def test_deleted_store_is_rebuilt_never_up_to_date(store, capsys):
    shutil.rmtree(store["url"])
    code, out, err = features_cli(store, capsys)
    assert code == 0, err
    assert "up to date" not in out
    assert tree(store["url"]) == store["reference"]


def test_manifest_naming_a_missing_store_rebuilds_this_runs_store(store, capsys):
    text = store["manifest"].replace(store["url"], store["url"] + "-moved")
    store["mpath"].write_text(text)
    code, out, err = features_cli(store, capsys)
    assert code == 0, err
    assert "up to date" not in out
    assert tree(store["url"]) == store["reference"]


def test_manifest_naming_another_existing_store_is_refused_before_up_to_date(store, capsys, tmp_path):
    other = tmp_path / "other.zarr"
    shutil.copytree(store["url"], other)
    store["mpath"].write_text(store["manifest"].replace(f'"store": "{store["url"]}"', f'"store": "{other}"'))
    code, out, err = features_cli(store, capsys)
    assert code == 2 and "up to date" not in out
    errors = error_lines(err)
    assert len(errors) == 1 and "cannot redirect" in errors[0] and "--force" in errors[0]
    code, out, err = features_cli(store, capsys, "--force")
    assert code == 0, err
    assert tree(store["url"]) == store["reference"]


def test_store_option_verifies_any_store(store, capsys):
    code, out, err = hp(capsys, "verify", "--store", store["url"])
    assert code == 0 and out.count("\n") == 1 and f"all {N_CHUNKS} chunks" in out, out + err
    code, out, err = hp(capsys, "verify", "--store", str(store["workdir"] / "nothing.zarr"))
    assert code == 2 and len(error_lines(err)) == 1 and "no feature store at" in err


# ---------------------------------------------------------------- store integrity: HCL stores
HCL = {
    "dataset.n_train": "2", "dataset.n_val": "2", "dataset.size": "96",
    "features.backbone": "vit_small_patch16_224.dino", "features.weights": "random", "features.chunk_size": "1",
    "hcl_features.val_resolution": "64", "train.method": "hcl",
}


def test_hcl_store_damage_is_verified_and_recomputed_exactly(tmp_path, capsys):
    sets = [arg for k, v in HCL.items() for arg in ("--set", f"{k}={v}")]
    args = ["--dataset", "synthetic", "--split", "val", "--method", "hcl", "--workdir", str(tmp_path), *sets]
    code, _, err = hp(capsys, "features", *args)
    assert code == 0, err
    url = paths.hcl_store_url(load_config("synthetic", HCL), tmp_path, "val")
    reference = tree(url)
    names = data_arrays(url)
    assert {"feat", "hcl_cls", "image", "label", "source_image"} <= set(names)
    flip8(chunk_file(url, "hcl_cls", 1))
    code, out, err = hp(capsys, "verify", *args)
    assert code == 1 and reported_bad(out) == {("hcl_cls", 1)}
    code, out, err = hp(capsys, "features", *args)
    assert code == 0 and "hcl_cls chunk 1" in out, out + err
    assert tree(url) == reference
