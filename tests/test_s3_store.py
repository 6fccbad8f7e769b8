"""Stores on object storage for real: a local S3-compatible server (moto's server mode, on 127.0.0.1 only, started
and stopped here) reached through an `s3://` URL with s3fs, the way `--store s3://…` runs (docs/cache.md)."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from cache import writer  # noqa: E402
from cache.integrity import quick_check  # noqa: E402
from cache.reader import FeatureStore  # noqa: E402
from cache.schema import Layout  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from stages import features, prepare  # noqa: E402

BUCKET = "hp-pipe-test"
TINY = {
    "dataset.n_train": "3", "dataset.n_val": "1", "dataset.size": "96",
    "prepare.resolution": "48", "prepare.val_resolution": "64",
    "features.backbone": "vit_small_patch16_224.dino", "features.weights": "random",
    "features.n_views": "1", "features.chunk_size": "1",
}
CLI = [sys.executable, "-m", "pipeline.cli"]


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 (an ephemeral port), credentials and endpoint in the environment, as a user
    sets them for any S3-compatible service; everything restored afterwards."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}", "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir(BUCKET)
    try:
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


def _arrays(url):
    store = FeatureStore.open(url)
    return {name: store.array(name)[:] for name in store.names()}


def test_store_written_and_read_through_s3(s3):
    layout = Layout(n_samples=9, resolution=32, patch_size=16, embed_dim=8, num_heads=2, n_views=2, with_lhp=True,
                    labelled=True)
    attrs = {"dataset": "synthetic", "split": "train", "backbone": "vit_small_patch16_224.dino", "patch_size": 16,
             "resolution": 32, "weights_hash": "abc", "weights": "random-init", "fingerprint": "f1"}
    url = f"s3://{BUCKET}/direct.zarr"
    group = writer.create_store(url, layout, 4, attrs, fresh=True)
    rng = np.random.default_rng(0)
    data = {k: rng.integers(0, 100, (9, *shape)).astype(dt) for k, (shape, dt) in layout.arrays().items()}
    for c in range(3):
        start, stop = writer.chunk_range(group, c)
        writer.write_chunk(group, c, {k: v[start:stop] for k, v in data.items()})
    writer.mark_complete(group)
    assert quick_check(group, url).ok  # every chunk object there with its recorded size (stat over S3)
    store = FeatureStore.open(url)
    for name, values in data.items():
        np.testing.assert_array_equal(store.read(name, 0, 9), values, err_msg=name)
    one, two = (list(store.batches(["feat", "lhp"], 2, shuffle_seed=3, threads=t)) for t in (1, 2))
    for a, b in zip(one, two, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
        np.testing.assert_array_equal(a["feat"].numpy(), data["feat"][a["index"].numpy()])


@pytest.mark.slow
def test_features_killed_on_s3_resume_to_the_local_stores_arrays(s3, tmp_path):
    config = load_config("synthetic", TINY)
    reference = _arrays(features.run(config, tmp_path / "local", "train")["outputs"]["store"])
    workdir = tmp_path / "work"
    prepare.run(config, workdir)  # so the child starts straight on the backbone
    url = f"s3://{BUCKET}/killed/train.zarr"
    args = ["features", "--dataset", "synthetic", "--split", "train", "--store", url,
            *sum((["--set", f"{k}={v}"] for k, v in TINY.items()), [])]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    child = subprocess.Popen([*CLI, *args, "--workdir", str(workdir)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and child.poll() is None:
        group = writer.open_group(url, "r")
        if group is not None and "_done" in group and writer.finished_chunks(group).any():
            child.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    _, err = child.communicate()
    assert child.returncode == -signal.SIGKILL, f"the run finished before it could be killed: {err[-500:]}"
    partial = writer.finished_chunks(writer.open_group(url, "r"))
    assert 0 < partial.sum() < partial.size
    manifest = features.run(config, workdir, "train", store=url)
    assert manifest["outputs"]["store"] == url
    assert manifest["outputs"]["computed"] < manifest["outputs"]["samples"]  # the finished chunks were kept
    resumed = _arrays(url)
    assert resumed.keys() == reference.keys()
    for name in reference:
        np.testing.assert_array_equal(resumed[name], reference[name], err_msg=name)
