"""The prepare and features stages end to end on a tiny synthetic set (ViT-S/16, random init)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cache.reader import FeatureStore
from cache.writer import finished_chunks, open_group
from pipeline.config import load_config
from pipeline.extraction.backbone import load_backbone, normalize
from pipeline.extraction.lhp import lhp_weights
from pipeline.methods.hp import store as hp_store
from pipeline.orchestration import paths
from pipeline.orchestration.runner import read_manifest
from stages import features, prepare

TINY = {
    "dataset.n_train": "2", "dataset.n_val": "1", "dataset.size": "96",
    "prepare.resolution": "48", "prepare.val_resolution": "64",
    "features.backbone": "vit_small_patch16_224.dino", "features.weights": "random",
    "features.n_views": "1", "features.chunk_size": "2",
}
CLI = [sys.executable, "-m", "pipeline.cli"]


def tiny_config(**extra):
    return load_config("synthetic", {**TINY, **extra})


def arrays_of(url):
    store = FeatureStore.open(url)
    return {name: store.array(name)[:] for name in store.names()}


def hp(*args, workdir, check=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([*CLI, *args, "--workdir", str(workdir)], capture_output=True, text=True, env=env)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One complete run of both splits, shared by the read-only tests."""
    workdir = tmp_path_factory.mktemp("work")
    config = tiny_config()
    manifests = {s: features.run(config, workdir, s) for s in ("train", "val")}
    return config, workdir, manifests


def test_store_holds_the_backbone_outputs(built):
    config, workdir, manifests = built
    url = manifests["train"]["outputs"]["store"]
    data = arrays_of(url)
    n = 2 * 5
    assert data["feat"].shape == (n, 3, 3, 384) and data["feat"].dtype == np.float16
    assert data["feat_aug"].shape == (n, 1, 3, 3, 384)
    assert data["lhp"].shape == (n, 3, 3, 9) and data["cls_attn"].shape == (n, 6, 3, 3)
    assert data["image"].shape == (n, 48, 48, 3) and data["label"].shape == (n, 48, 48)
    # recompute two samples straight from the prepared crops: the store must agree
    backbone = load_backbone("vit_small_patch16_224.dino", "random")
    out = backbone(normalize(torch.from_numpy(data["image"][5:7])))
    np.testing.assert_allclose(data["feat"][5:7], out.feat.numpy(), atol=2e-2, rtol=1e-2)
    lhp = lhp_weights(out.attn_logits, 3, 3).numpy()
    np.testing.assert_allclose(data["lhp"][5:7].astype(np.float32), lhp, atol=2e-2, rtol=1e-2)
    assert not np.array_equal(data["feat_aug"][:, 0], data["feat"])  # views differ from the clean image
    store = FeatureStore.open(url)
    assert store.random_init and store.attrs["weights"] == "random-init"
    assert store.attrs["backbone"] == "vit_small_patch16_224.dino" and store.attrs["resolution"] == 48
    val = arrays_of(manifests["val"]["outputs"]["store"])
    assert val["feat"].shape == (1, 4, 4, 384) and "feat_aug" not in val and "lhp" not in val


def test_prepared_crops_follow_the_five_crop_geometry(built):
    config, workdir, _ = built
    from pipeline.datasets import dataset_options, open_dataset

    source = open_dataset("synthetic", workdir / "data" / "synthetic", "train", **dataset_options(config))
    sample = source[0]
    directory = paths.prepared_dir(config, workdir, "train")
    crop = np.asarray(Image.open(directory / "labels" / f"{sample.name}_1.png"))  # top-right quarter
    quarter = sample.label[:48, 48:]  # 96 px image, ratio 0.5 -> 48 px crops, already at 48: no resize
    np.testing.assert_array_equal(crop, quarter)


def tree_state(root):
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(Path(root).rglob("*"))}


@pytest.mark.slow
def test_status_writes_nothing(built, tmp_path):
    _, workdir, _ = built
    before = tree_state(workdir)
    sets = sum((["--set", f"{k}={v}"] for k, v in TINY.items()), [])
    assert hp("status", "--dataset", "synthetic", *sets, workdir=workdir).returncode == 0
    assert tree_state(workdir) == before  # not a file touched in a finished workdir
    fresh = tmp_path / "fresh"
    out = hp("status", "--dataset", "synthetic", *sets, workdir=fresh).stdout
    assert not fresh.exists()  # a fresh workdir: no synthetic data generated, no folder created
    assert [line.split()[1] for line in out.splitlines()[1:]] == ["missing"] * 5


@pytest.mark.slow
def test_second_run_skips_and_status_reports_complete(built, capsys):
    config, workdir, manifests = built
    again = features.run(config, workdir, "train")
    assert again["finished"] == manifests["train"]["finished"]
    assert "up to date" in capsys.readouterr().out
    out = hp("status", "--dataset", "synthetic", *sum((["--set", f"{k}={v}"] for k, v in TINY.items()), []),
             workdir=workdir).stdout
    assert [line.split()[1] for line in out.splitlines()[1:]] == ["complete"] * 3 + ["missing"] * 2
    changed = hp("status", "--dataset", "synthetic", *sum((["--set", f"{k}={v}"] for k, v in TINY.items()), []),
                 "--set", "features.n_views=2", workdir=workdir).stdout
    states = [line.split()[1] for line in changed.splitlines()[1:]]
    assert states == ["complete", "stale", "stale", "missing", "missing"]


@pytest.mark.slow
def test_killed_run_resumes_to_identical_arrays(tmp_path, built):
    _, _, manifests = built
    reference = arrays_of(manifests["train"]["outputs"]["store"])
    workdir = tmp_path / "work"
    config = tiny_config()
    prepare.run(config, workdir)  # so the child starts straight on the backbone
    args = ["features", "--dataset", "synthetic", "--split", "train",
            *sum((["--set", f"{k}={v}"] for k, v in TINY.items()), [])]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    child = subprocess.Popen([*CLI, *args, "--workdir", str(workdir)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = paths.store_url(config, workdir, "train")
    done_dir = Path(url) / "_done" / "c"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and child.poll() is None:
        if done_dir.exists() and finished_chunks(open_group(url, "r")).any():
            child.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    child.wait()
    assert child.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    partial = finished_chunks(open_group(url, "r"))
    assert 0 < partial.sum() < partial.size
    assert read_manifest(paths.stage_dir(config, workdir), "features-train")["status"] == "running"
    manifest = features.run(config, workdir, "train")
    assert manifest["outputs"]["computed"] < manifest["outputs"]["samples"]  # finished chunks were kept
    resumed = arrays_of(url)
    assert resumed.keys() == reference.keys()
    for name in reference:
        np.testing.assert_array_equal(resumed[name], reference[name], err_msg=name)


def test_local_cluster_equals_single_process(tmp_path, built):
    _, _, manifests = built
    reference = arrays_of(manifests["train"]["outputs"]["store"])
    config = tiny_config()
    url = "file://" + str(tmp_path / "dist.zarr")
    features.run(config, tmp_path / "work", "train", store=url, scheduler="local-cluster", workers=2)
    distributed = arrays_of(url)
    for name in reference:
        np.testing.assert_array_equal(distributed[name], reference[name], err_msg=name)


@pytest.mark.parametrize("failing", ["writer", "loader", "first load"])
def test_a_failing_thread_stops_the_stage_with_its_error(monkeypatch, failing):
    """A writer (or loader) that raises while chunks are queued ends run_local with that error, never a hang."""
    import threading

    class Boom(RuntimeError):
        pass

    computed = []

    def load_chunk(group, chunk, *args):
        if (failing, chunk) in {("loader", 2), ("first load", 0)}:  # first load: the error comes with the end
            raise Boom(f"cannot decode chunk {chunk}")
        return hp_store.ChunkInputs(chunk, *([None] * (len(hp_store.ChunkInputs._fields) - 1)))

    def chunk_arrays(backbone, inputs, settings, batch_size=0):
        computed.append(inputs.chunk)
        return {"feat": np.zeros((2, 1), np.float16)}

    def write_chunk(group, chunk, data, *args):
        raise Boom(f"disk full at chunk {chunk}")

    monkeypatch.setattr(hp_store, "load_chunk", load_chunk)
    monkeypatch.setattr(hp_store, "chunk_arrays", chunk_arrays)
    if failing == "writer":
        monkeypatch.setattr(hp_store.writer, "write_chunk", write_chunk)
    else:
        monkeypatch.setattr(hp_store.writer, "write_chunk", lambda *args: None)
    raised = []

    def run():
        try:
            hp_store.run_local(None, None, list(range(12)), None, [], None, False, None,
                               type("Progress", (), {"update": lambda self, n: None})())
        except Boom as exc:
            raised.append(exc)

    before = set(threading.enumerate())
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(60)  # a hang detector, not a speed check: the stage returns within milliseconds
    assert not thread.is_alive(), "run_local hung after a failing thread"
    left = [t.name for t in threading.enumerate() if t not in before and t is not thread]
    assert left == []  # its loader and writer threads ended too (none left blocked); other tests' threads ignored
    assert len(raised) == 1 and ("disk full" if failing == "writer" else "cannot decode") in str(raised[0])
    assert len(computed) < 12  # it stopped early instead of computing every chunk


def test_cached_views_are_the_backbone_on_the_seeded_photometric_transform(built):
    """feat_aug[i, k] = backbone(reference transform of image i, torch seeded with the recorded view seed)."""
    import torchvision.transforms as T

    config, _, manifests = built
    data = arrays_of(manifests["train"]["outputs"]["store"])
    backbone = load_backbone("vit_small_patch16_224.dino", "random")
    seed = config["features"]["seed"]
    for i in (0, 7):
        x = normalize(torch.from_numpy(data["image"][i : i + 1]))[0]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((seed * 1_000_003 + i) * 97 + 0)  # (run seed, store index, view 0)
            transform = T.Compose([T.ColorJitter(0.3, 0.3, 0.3, 0.1), T.RandomGrayscale(0.2),  # docs/hp.md §3
                                   T.RandomApply([T.GaussianBlur((5, 5))], p=0.5)])
            view = transform(x)  # the reference's quirk: on the normalized tensor
        expected = backbone(view[None]).feat[0].numpy()
        np.testing.assert_allclose(data["feat_aug"][i, 0].astype(np.float32), expected, atol=2e-2, rtol=1e-2)
        assert np.abs(data["feat_aug"][i, 0].astype(np.float32) - data["feat"][i]).max() > 0.1  # not the plain crop


def _naive_store(config, workdir) -> dict[str, np.ndarray]:
    """The train store computed the plainest way, chunk after chunk in this thread, from the prepared PNGs and the
    reference's own torchvision views: what the stage's overlapped path (loader and writer threads, the fast hue
    shift) must store, bit for bit. Forwards cover one chunk each, as the stage's (batch_size = chunk_size)."""
    import torchvision.transforms as T

    f = config["features"]
    directory = paths.prepared_dir(config, workdir, "train")
    names = (directory / "samples.txt").read_text().split()
    crop_order, source_image = hp_store.sample_order(config, "train", len(names))
    backbone = load_backbone(f["backbone"], "random")
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(names), f["chunk_size"]):
        picked = crop_order[start : start + f["chunk_size"]]
        images = np.stack([np.asarray(Image.open(directory / "images" / f"{names[i]}.png").convert("RGB"))
                           for i in picked])
        x = normalize(torch.from_numpy(images))
        views = []
        for i in range(len(x)):
            for k in range(f["n_views"]):
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed((f["seed"] * 1_000_003 + start + i) * 97 + k)
                    views.append(T.Compose([T.ColorJitter(0.3, 0.3, 0.3, 0.1), T.RandomGrayscale(0.2),
                                            T.RandomApply([T.GaussianBlur((5, 5))], p=0.5)])(x[i]))
        out, aug = backbone(x), backbone(torch.stack(views)).feat
        g = out.feat.shape[1]
        chunk = {
            "feat": out.feat.half().numpy(), "cls_attn": out.cls_attn.half().numpy(),
            "lhp": lhp_weights(out.attn_logits.float(), g, g, f["lhp_sigma"]).half().numpy(),
            "feat_aug": aug.half().numpy().reshape(len(x), f["n_views"], *aug.shape[1:]),
            "image": images, "crop_order": picked, "source_image": source_image[start : start + len(picked)],
            "label": np.stack([np.asarray(Image.open(directory / "labels" / f"{names[i]}.png")) for i in picked]),
        }
        for name, values in chunk.items():
            parts.setdefault(name, []).append(values)
    return {name: np.concatenate(values) for name, values in parts.items()}


def test_stored_arrays_are_a_naive_sequential_computation_bit_for_bit(built):
    config, workdir, manifests = built
    stored = arrays_of(manifests["train"]["outputs"]["store"])
    expected = _naive_store(config, workdir)
    assert set(expected) <= set(stored)
    for name, values in expected.items():
        got = stored[name]
        assert got.dtype == values.dtype and got.shape == values.shape, name
        assert got.tobytes() == values.tobytes(), name  # the bytes: float16 signed zeros and NaNs count


def test_the_stage_records_where_its_time_goes(tmp_path):
    """Every part of a local run is timed (pipeline/extraction/timing.py): once per chunk, or per forward."""
    from pipeline.extraction import timing

    config = tiny_config()
    prepare.run(config, tmp_path)
    timing.reset()
    manifest = features.run(config, tmp_path, "train")
    parts = timing.snapshot()
    chunks = -(-manifest["outputs"]["samples"] // int(TINY["features.chunk_size"]))
    for part in ("decode", "augment", "write", "wait_decode"):
        assert parts[part]["calls"] == chunks + (part == "wait_decode"), part  # the last wait meets the end
    assert parts["forward"]["calls"] == parts["lhp"]["calls"] == 2 * chunks  # the crops, then their views
    assert all(p["wall_s"] >= 0 and p["cpu_s"] >= 0 for p in parts.values())
