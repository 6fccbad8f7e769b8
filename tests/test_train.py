"""The train stage on a tiny synthetic cache: learning, exact resume, NaN guard, pool renewal."""

import json

import pytest
import torch

from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.methods.hp import training as hp_training
from pipeline.orchestration import paths
from pipeline.orchestration.runner import read_manifest
from stages import features
from stages import train as train_stage
from tests.fixtures import TINY_TRAIN, kill_training_when

TINY = TINY_TRAIN


def tiny_config(**extra):
    return load_config("synthetic", {**TINY, **extra})


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A workdir whose feature store is already built (shared: training never writes to it)."""
    path = tmp_path_factory.mktemp("work")
    features.run(tiny_config(), path, "train")
    return path


def final_weights(config, workdir, run):
    ckpt = torch.load(paths.run_dir(config, workdir, run) / "checkpoints" / "last.pt", weights_only=True)
    return ckpt["heads"], ckpt["iteration"]


def test_short_run_lowers_the_loss_and_writes_its_outputs(workdir):
    config = tiny_config(**{"hp.epochs": "10", "hp.lr": "0.002"})
    manifest = train_stage.run(config, workdir, "learn")
    out = paths.run_dir(config, workdir, "learn")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == list(range(1, 51))
    first = sum(r["loss"] for r in records[:10]) / 10
    last = sum(r["loss"] for r in records[-10:]) / 10
    assert last < first, (first, last)
    assert (out / "curves.png").stat().st_size > 0
    assert manifest["outputs"]["iterations"] == 50 and manifest["outputs"]["random_init"] is True
    lambdas = [r["lambda"] for r in records]
    # λ uses the iteration index t = 0..T-1 (docs/hp.md §5): 0 through t = warmup = 4, then (t - 4)/(50 - 4)
    assert lambdas[:5] == [0.0] * 5
    assert lambdas[5] == pytest.approx(1 / 46, abs=1e-6) and lambdas[-1] == pytest.approx(45 / 46, abs=1e-6)


@pytest.mark.slow
def test_killed_run_resumes_to_bit_identical_weights(workdir, tmp_path):
    config = tiny_config(**{"hp.epochs": "6", "train.checkpoint_interval": "3"})
    train_stage.run(config, workdir, "straight")
    reference, iterations = final_weights(config, workdir, "straight")
    ckpt = paths.checkpoint_path(paths.run_dir(config, workdir, "killed"))
    kill_training_when(workdir, "killed", {**TINY, "hp.epochs": "6", "train.checkpoint_interval": "3"}, ckpt,
                       lambda state: 0 < state["iteration"] < iterations)
    train_stage.run(config, workdir, "killed")
    resumed, resumed_iterations = final_weights(config, workdir, "killed")
    assert resumed_iterations == iterations
    for key in reference:
        assert torch.equal(resumed[key], reference[key]), key
    log = (paths.run_dir(config, workdir, "killed") / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in log] == list(range(1, iterations + 1))


def test_a_run_is_never_replaced_silently_by_other_settings(workdir):
    config = tiny_config(**{"hp.epochs": "1"})
    train_stage.run(config, workdir, "kept")
    ckpt = paths.checkpoint_path(paths.run_dir(config, workdir, "kept"))
    before = ckpt.read_bytes()
    changed = tiny_config(**{"hp.epochs": "1", "hp.tau": "0.7"})
    with pytest.raises(UserError, match=r"run 'kept' exists with other settings \(config\.hp\.tau differ\)"):
        train_stage.run(changed, workdir, "kept")
    assert ckpt.read_bytes() == before  # nothing replaced, nothing deleted
    assert read_manifest(paths.stage_dir(config, workdir), "train-kept")["status"] == "complete"
    train_stage.run(changed, workdir, "kept-tau-0.7")  # the first way out: a new run beside it
    train_stage.run(changed, workdir, "kept", force=True)  # the second: replace it on purpose
    assert ckpt.read_bytes() != before


def test_finished_run_is_skipped(workdir, capsys):
    config = tiny_config(**{"hp.epochs": "1"})
    first = train_stage.run(config, workdir, "once")
    second = train_stage.run(config, workdir, "once")
    assert second["finished"] == first["finished"]
    assert "up to date" in capsys.readouterr().out


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(workdir, monkeypatch):
    config = tiny_config(**{"train.checkpoint_interval": "1"})
    real_step = hp_training.training_step
    calls = []

    def poisoned(*args, **kwargs):
        out = real_step(*args, **kwargs)
        calls.append(1)
        if len(calls) == 4:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(hp_training, "training_step", poisoned)
    with pytest.raises(UserError, match="training diverged.*iteration 3.*last good checkpoint"):
        train_stage.run(config, workdir, "nan")
    _, iteration = final_weights(config, workdir, "nan")
    assert iteration == 3


def test_nan_before_any_checkpoint_says_there_is_none(workdir, monkeypatch):
    config = tiny_config(**{"train.checkpoint_interval": "100"})
    real_step = hp_training.training_step

    def poisoned(*args, **kwargs):
        out = real_step(*args, **kwargs)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(hp_training, "training_step", poisoned)
    with pytest.raises(UserError, match="iteration 0.*no checkpoint was written yet") as info:
        train_stage.run(config, workdir, "nan-early")
    assert "last good" not in str(info.value)
    assert not (paths.run_dir(config, workdir, "nan-early") / "checkpoints" / "last.pt").exists()


def test_a_checkpoint_with_non_finite_weights_is_never_written(tmp_path):
    from pipeline.training.checkpoints import save_checkpoint

    weights = torch.ones(3)
    weights[1] = float("inf")
    with pytest.raises(ValueError, match=r"state\.heads\.w holds NaN or inf"):
        save_checkpoint(tmp_path / "last.pt", {"iteration": 2, "heads": {"w": weights}, "rng": torch.zeros(4)})
    assert not (tmp_path / "last.pt").exists()


def test_pool_renewal_happens_at_the_spec_iterations(workdir, monkeypatch):
    config = tiny_config(**{"hp.renew_interval": "2", "hp.epochs": "2", "dataset.n_train": "4"})
    renewals = []
    real_sample = hp_training.sample_pool

    def spy(store, heads, size, specific, *args, **kwargs):
        renewals.append(specific)
        return real_sample(store, heads, size, specific, *args, **kwargs)

    monkeypatch.setattr(hp_training, "sample_pool", spy)
    iterations_seen = []
    real_renews = hp_training.renews_at
    monkeypatch.setattr(hp_training, "renews_at", lambda i, r: iterations_seen.append(i) or real_renews(i, r))
    train_stage.run(config, workdir, "renew")
    # 20 crops / batch 4 = 5 iterations per epoch; renewals at i = 2, 4 in each epoch (never at 0)
    assert iterations_seen == [0, 1, 2, 3, 4] * 2
    assert renewals == [False, True] + [True] * 4  # Pool_ag once, Pool_sp at start, then 2 per epoch


@pytest.mark.slow
def test_paper_protocol_trains_the_probes_online_resumes_exactly_and_leaves_the_head_alone(workdir):
    """evaluate.protocol = paper (docs/hp.md §8): the probes' states are in the checkpoint, a killed run resumes
    to bit-identical head and probes, and the head is the one a kmeans-protocol run trains."""
    extra = {"hp.epochs": "6", "train.checkpoint_interval": "3", "evaluate.protocol": "paper"}
    config = tiny_config(**extra)
    manifest = train_stage.run(config, workdir, "paper-straight")
    assert manifest["config"]["online_probes"]["probes"] == ["cluster", "linear"]  # part of the fingerprint
    assert manifest["outputs"]["online_probes"]["iterations"] == 30
    assert manifest["outputs"]["online_probes"]["linear_iterations"] == 30  # the train store has labels
    straight = torch.load(paths.run_dir(config, workdir, "paper-straight") / "checkpoints" / "last.pt",
                          weights_only=True)
    assert straight["online_probes"]["clusters"].shape == (8, 32)  # synthetic: 8 classes, head_dim 32

    ckpt = paths.checkpoint_path(paths.run_dir(config, workdir, "paper-killed"))
    kill_training_when(workdir, "paper-killed", {**TINY, **extra}, ckpt, lambda state: 0 < state["iteration"] < 30)
    train_stage.run(config, workdir, "paper-killed")
    resumed = torch.load(ckpt, weights_only=True)
    for key in straight["heads"]:
        assert torch.equal(resumed["heads"][key], straight["heads"][key]), key
    a, b = straight["online_probes"], resumed["online_probes"]
    assert torch.equal(a["clusters"], b["clusters"])
    assert (a["steps"], a["linear_steps"]) == (b["steps"], b["linear_steps"]) == (30, 30)
    for key in a["linear"]:
        assert torch.equal(a["linear"][key], b["linear"][key]), key
    for opt in ("opt_cluster", "opt_linear"):
        for index, moments in a[opt]["state"].items():
            for name, value in moments.items():
                assert torch.equal(value, b[opt]["state"][index][name]), (opt, index, name)
    logs = [[json.loads(line) for line in (paths.run_dir(config, workdir, run) / "metrics.jsonl")
             .read_text().splitlines()] for run in ("paper-straight", "paper-killed")]
    assert [(r["cluster_probe"], r["linear_probe"]) for r in logs[0]] == \
        [(r["cluster_probe"], r["linear_probe"]) for r in logs[1]]

    kmeans = tiny_config(**{**extra, "evaluate.protocol": "kmeans"})
    plain = train_stage.run(kmeans, workdir, "kmeans-plain")
    assert "online_probes" not in plain["config"] and "online_probes" not in plain["outputs"]
    heads, _ = final_weights(kmeans, workdir, "kmeans-plain")
    for key in heads:  # the probes draw on no RNG the head uses: the same head under either protocol
        assert torch.equal(heads[key], straight["heads"][key]), key
