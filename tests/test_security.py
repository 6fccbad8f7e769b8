"""Files a user was handed never run code, manifests cannot point outside the work folder, and distributed
extraction over mutual TLS equals the single-process store while a client without the certificate is refused."""

import datetime
import ipaddress
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys

import numpy as np
import pytest
import torch

from cache.reader import FeatureStore
from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.orchestration import paths
from pipeline.orchestration.dask_client import client_security, dask_client
from pipeline.orchestration.runner import manifest_path
from pipeline.training.checkpoints import check_plain, load_checkpoint, save_checkpoint
from stages import evaluate, features
from stages import train as train_stage

TINY = {
    "dataset.n_train": "2", "dataset.n_val": "2", "dataset.size": "64",
    "prepare.resolution": "32", "prepare.val_resolution": "32",
    "features.backbone": "vit_small_patch16_224.dino", "features.weights": "random",
    "features.n_views": "1", "features.chunk_size": "2",
    "hp.batch_size": "4", "hp.epochs": "1", "hp.head_dim": "16", "hp.pool_size": "8",
    "hp.renew_interval": "2", "hp.warmup": "1",
    "evaluate.linear_epochs": "1", "evaluate.cluster_patches": "500", "evaluate.overcluster": "false",
    "evaluate.baselines": "false", "evaluate.pictures": "1",
}
SETS = [arg for key, value in TINY.items() for arg in ("--set", f"{key}={value}")]


class Payload:
    """Unpickling this creates `marker`: what a crafted checkpoint would do to a user's machine."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def craft(path, marker, **plain):
    torch.save({**plain, "trainer": Payload(marker)}, path)


def hp(*args, workdir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args, "--workdir", str(workdir)],
                          capture_output=True, text=True, env=env)


def assert_refused(proc, marker, *words):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("error:") == 1, proc.stderr
    for word in words:
        assert word in proc.stderr, proc.stderr
    assert not marker.exists()


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A tiny run, trained and evaluated (cluster and linear probes)."""
    workdir = tmp_path_factory.mktemp("work")
    config = load_config("synthetic", TINY)
    evaluate.run(config, workdir, "hp")
    return config, workdir


def test_crafted_backbone_weights_are_refused(tmp_path):
    marker, weights = tmp_path / "pwned", tmp_path / "dino.pth"
    craft(weights, marker, model={"x": torch.zeros(1)})
    proc = hp("features", "--split", "train", "--weights", str(weights), *SETS, workdir=tmp_path / "w")
    assert_refused(proc, marker, str(weights), "open", "--trust-weights")


class Opaque:  # any harmless Python object a third-party training script may pickle beside its weights
    pass


@pytest.mark.slow
def test_trust_weights_unpickles_only_when_asked_and_is_recorded(tmp_path):
    """--trust-weights is the one way to load a checkpoint that needs Python classes; the manifest records it."""
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        state = timm.create_model("vit_small_patch16_224", num_classes=0).state_dict()
    weights = tmp_path / "their-run.pth"
    torch.save({"model": state, "trainer": Opaque()}, weights)
    args = ["features", "--split", "val", "--weights", str(weights), *SETS]
    refused = hp(*args, workdir=tmp_path / "w")
    assert refused.returncode == 2 and "Opaque" in refused.stderr and "--trust-weights" in refused.stderr
    trusted = hp(*args, "--trust-weights", workdir=tmp_path / "w")
    assert trusted.returncode == 0, trusted.stderr
    manifest = json.loads(manifest_path(tmp_path / "w" / "synthetic", "features-val").read_text())
    assert manifest["config"]["features"]["trust_weights"] is True
    assert manifest["outputs"]["weights"] == f"file:{weights}" and manifest["outputs"]["random_init"] is False


@pytest.mark.parametrize("target", ["run-checkpoint", "probe"])
@pytest.mark.slow
def test_crafted_run_files_are_refused_by_evaluate_and_predict(evaluated, tmp_path, target):
    config, workdir = evaluated
    rdir = paths.run_dir(config, workdir, "hp")
    path = rdir / "checkpoints" / "last.pt" if target == "run-checkpoint" else rdir / "probe-head" / "linear.pt"
    # evaluate reads the run checkpoint when it recomputes the codes (--force), the probe when it resumes it
    stage, again = ("codes-hp", ["--force"]) if target == "run-checkpoint" else ("probe-head-hp", [])
    mpath = manifest_path(paths.stage_dir(config, workdir), stage)
    original, manifest = path.read_bytes(), mpath.read_text()
    marker = tmp_path / "pwned"
    try:  # a run folder copied from someone else: same layout, one file crafted
        craft(path, marker, **load_checkpoint(path))
        image = tmp_path / "photo.png"
        from PIL import Image

        Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(image)
        proc = hp("predict", str(image), "--probe", "linear", *SETS, workdir=workdir)
        assert_refused(proc, marker, str(path), "open")
        mpath.write_text(json.dumps({**json.loads(manifest), "status": "interrupted"}))
        proc = hp("evaluate", *again, *SETS, workdir=workdir)
        assert_refused(proc, marker, str(path), "open")
    finally:
        path.write_bytes(original)
        mpath.write_text(manifest)


@pytest.mark.slow
def test_crafted_checkpoint_is_refused_on_resume(evaluated, tmp_path):
    config, workdir = evaluated
    sdir = paths.stage_dir(config, workdir)
    mpath = manifest_path(sdir, "train-hp")
    ckpt = paths.run_dir(config, workdir, "hp") / "checkpoints" / "last.pt"
    saved = mpath.read_text(), ckpt.read_bytes()
    marker = tmp_path / "pwned"
    try:
        manifest = json.loads(saved[0])
        mpath.write_text(json.dumps({**manifest, "status": "interrupted"}))  # as after a kill: train resumes
        craft(ckpt, marker, **load_checkpoint(ckpt))
        assert_refused(hp("train", *SETS, workdir=workdir), marker, str(ckpt), "open")
    finally:
        mpath.write_text(saved[0])
        ckpt.write_bytes(saved[1])


def test_manifest_pointing_outside_the_work_folder_is_refused(evaluated, tmp_path):
    config, workdir = evaluated
    mpath = manifest_path(paths.stage_dir(config, workdir), "train-hp")
    saved = mpath.read_text()
    outside = tmp_path / "elsewhere" / "last.pt"
    outside.parent.mkdir()
    outside.write_bytes((paths.run_dir(config, workdir, "hp") / "checkpoints" / "last.pt").read_bytes())
    try:
        manifest = json.loads(saved)
        manifest["outputs"]["checkpoint"] = str(workdir / os.path.relpath(outside, workdir))  # "../..": exists
        mpath.write_text(json.dumps(manifest))
        with pytest.raises(UserError, match="outside the work folder"):
            evaluate.run(config, workdir, "hp", force=True)
    finally:
        mpath.write_text(saved)


def test_manifest_naming_another_store_is_refused(evaluated, tmp_path):
    config, workdir = evaluated
    mpath = manifest_path(paths.stage_dir(config, workdir), "features-train")
    saved = mpath.read_text()
    try:
        manifest = json.loads(saved)
        other = tmp_path / "someone-elses.zarr"  # a real store elsewhere (a missing one is simply rebuilt)
        shutil.copytree(manifest["outputs"]["store"], other)
        manifest["outputs"]["store"] = str(other)
        mpath.write_text(json.dumps(manifest))
        with pytest.raises(UserError, match="cannot redirect"):
            train_stage.run(config, workdir, "hp")
    finally:
        mpath.write_text(saved)


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", ""])
def test_run_names_cannot_leave_the_runs_folder(name, tmp_path):
    with pytest.raises(UserError, match="not a plain name"):
        paths.run_dir(load_config("synthetic"), tmp_path, name)


def test_checkpoints_hold_plain_data_only(tmp_path):
    with pytest.raises(TypeError, match="Payload"):
        save_checkpoint(tmp_path / "x.pt", {"ok": torch.zeros(2), "bad": [Payload(tmp_path / "m")]})
    assert not (tmp_path / "x.pt").exists()
    state = {"w": torch.arange(3), "rng": np.random.default_rng(1).bit_generator.state, "sizes": (16, 32),
             "config": {"a": {"b": 0.5, "c": None, "d": [1, "x"]}}}
    check_plain(state)
    save_checkpoint(tmp_path / "ok.pt", state)
    back = torch.load(tmp_path / "ok.pt", weights_only=True)  # the strict loader reads it back whole
    assert back["rng"] == state["rng"] and back["sizes"] == (16, 32) and back["config"] == state["config"]
    torch.testing.assert_close(back["w"], state["w"])


def test_run_checkpoints_load_with_weights_only(evaluated):
    config, workdir = evaluated
    state = torch.load(paths.run_dir(config, workdir, "hp") / "checkpoints" / "last.pt", weights_only=True)
    assert state["backbone"]["backbone"] == "vit_small_patch16_224.dino" and state["config"] == config


# ---------------------------------------------------------------- distributed over TLS
def make_certificate(folder, name="hp-pipe test"):
    """A self-signed certificate for 127.0.0.1 (it is its own CA), as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                       serialization.PrivateFormat.TraditionalOpenSSL,
                                                       serialization.NoEncryption()))
    return str(folder / "cert.pem"), str(folder / "key.pem")


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory):
    pytest.importorskip("cryptography", reason="the TLS test makes its certificates with `cryptography` (dev extra)")
    from distributed import LocalCluster
    from distributed.security import Security

    cert, key = make_certificate(tmp_path_factory.mktemp("tls"))
    security = Security(tls_ca_file=cert, tls_scheduler_cert=cert, tls_scheduler_key=key, tls_worker_cert=cert,
                        tls_worker_key=key, tls_client_cert=cert, tls_client_key=key, require_encryption=True)
    saved = dict(os.environ)
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, protocol="tls://", host="127.0.0.1",
                           security=security, dashboard_address=None)
    os.environ.clear()
    os.environ.update(saved)  # dask's pre-spawn thread settings would leak into later tests
    yield cluster, cert, key
    cluster.close()


def test_tls_cluster_extraction_equals_single_process(tls_cluster, tmp_path, one_thread):
    import dask

    cluster, cert, key = tls_cluster  # one torch thread here as on each worker: the same float reductions
    assert cluster.scheduler_address.startswith("tls://127.0.0.1:")
    config = load_config("synthetic", TINY)
    reference = FeatureStore.open(features.run(config, tmp_path / "one", "train")["outputs"]["store"])
    url = str(tmp_path / "tls.zarr")
    with dask.config.set({"distributed.comm.tls.ca-file": cert, "distributed.comm.tls.client.cert": cert,
                          "distributed.comm.tls.client.key": key}):
        features.run(config, tmp_path / "two", "train", store=url, scheduler="distributed",
                     address=cluster.scheduler_address)
    distributed = FeatureStore.open(url)
    assert distributed.names() == reference.names()
    for name in reference.names():
        np.testing.assert_array_equal(distributed.array(name)[:], reference.array(name)[:], err_msg=name)


def test_tls_scheduler_refuses_clients_without_the_certificate(tls_cluster, tmp_path):
    from distributed import Client
    from distributed.security import Security

    cluster, cert, key = tls_cluster
    with pytest.raises(UserError, match="--tls-cert"):  # hp-pipe itself: no certificate configured
        with dask_client(cluster.scheduler_address, 1):
            pass
    other_cert, other_key = make_certificate(tmp_path / "other", "intruder")
    with pytest.raises((OSError, TimeoutError)):  # a certificate the cluster's CA never signed
        Client(cluster.scheduler_address, timeout="3s", security=Security(
            tls_ca_file=cert, tls_client_cert=other_cert, tls_client_key=other_key, require_encryption=True))
    # a TLS client that trusts the scheduler but has no certificate: the scheduler ends the connection, while
    # the same exchange with the certificate is served
    host, port = cluster.scheduler_address.removeprefix("tls://").rsplit(":", 1)

    def exchange(context) -> str:
        with socket.create_connection((host, int(port)), timeout=2) as raw:
            try:
                with context.wrap_socket(raw, server_hostname=host) as tls:
                    tls.sendall(b"\0" * 8)
                    return "served" if tls.recv(1) else "closed"
            except TimeoutError:
                return "served"  # handshake done, the scheduler waits for a real message
            except (ssl.SSLError, ConnectionError):
                return "closed"

    assert exchange(ssl.create_default_context(cafile=cert)) == "closed"
    trusted = ssl.create_default_context(cafile=cert)
    trusted.load_cert_chain(cert, key)
    assert exchange(trusted) == "served"
    with pytest.raises((OSError, TimeoutError, TypeError, ValueError)):  # plain TCP to the TLS port
        Client(cluster.scheduler_address.replace("tls://", "tcp://"), timeout="3s")


def test_plain_tcp_off_this_machine_is_warned_about(capsys):
    assert client_security("tcp://127.0.0.1:8786") is None
    assert "unauthenticated" not in capsys.readouterr().err
    assert client_security("tcp://192.0.2.7:8786") is None  # TEST-NET address: nothing connects to it here
    assert "plain, unauthenticated TCP" in capsys.readouterr().err
