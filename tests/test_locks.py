"""Faults: concurrency (README, "Reliability"). One runner per stage and one writer per store
(pipeline/orchestration/locks.py).

- a second runner while a live process holds the stage's (or the store's) lock -> refused before anything is written,
  one `error:` line naming the holder (pid, host, since when), exit 1; `--force` does not break it
- a lock left by a process that is gone (killed) -> taken over with one line, the run completes, the lock is removed
- a lock is removed after a run, after a failing run and after Ctrl-C; several runners meeting one stale lock at
  once: exactly one gets it
- a holder on another host (cannot be checked) -> refused, naming the file to delete if it is gone
- `status` reads a lock, never takes or removes one
- Ctrl-C (SIGINT) of a running stage -> exit 130, "interrupted" in the manifest, the lock removed, the checkpoint kept
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from pipeline.orchestration import locks
from pipeline.orchestration.locks import Holder, LockHeld, acquire, release, stage_lock, store_lock
from pipeline.orchestration.runner import manifest_path, read_manifest, run_stage, stage_state

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def sleeper():
    """A real live process whose pid a lock names."""
    child = subprocess.Popen(["sleep", "300"])
    yield child
    child.kill()
    child.wait()


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def write_lock(path: Path, pid: int, **fields) -> Holder:
    """A lock file as another runner on this host would have written it."""
    holder = replace(locks.me("hp-pipe features --dataset synthetic"), **{"pid": pid, "proc_start": "", **fields})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(holder)))
    return holder


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under `root` with its size and mtime: "nothing written" compares two of these."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def test_a_live_stage_lock_refuses_the_second_runner_and_nothing_is_written(tmp_path, sleeper):
    run_stage(tmp_path, "s", {"a": 1}, {}, lambda ctx: {"value": 1})
    before = snapshot(tmp_path)
    lock = stage_lock(tmp_path, "s")
    holder = write_lock(lock, sleeper.pid)
    before[str(lock.relative_to(tmp_path))] = (lock.stat().st_size, lock.stat().st_mtime_ns)
    calls = []
    for force in (False, True):  # --force does not break a live lock
        with pytest.raises(LockHeld) as refused:
            run_stage(tmp_path, "s", {"a": 2}, {}, lambda ctx: calls.append(1) or {"value": 2}, force=force)
        message = str(refused.value)
        assert f"pid {sleeper.pid} on {socket.gethostname()} since {holder.since}" in message
        assert "locked by another runner" in message and str(lock) in message and "\n" not in message
    assert calls == [] and snapshot(tmp_path) == before  # the manifest, the lock: untouched
    assert read_manifest(tmp_path, "s")["config"] == {"a": 1}
    assert stage_state(tmp_path, "s", {"a": 1}, {}) == "running"  # status: a live holder runs it


def test_the_store_lock_is_keyed_on_the_store_not_the_work_folder(tmp_path, sleeper):
    """Two work folders writing one store: the second writer is refused by the store's own lock."""
    store = tmp_path / "shared" / "train.zarr"
    write_lock(store_lock(tmp_path / "a", str(store)), sleeper.pid)
    assert store_lock(tmp_path / "a", str(store)) == store_lock(tmp_path / "b", str(store)) == \
        tmp_path / "shared" / "train.zarr.lock"
    with pytest.raises(LockHeld, match=rf"the store {store} is locked by another runner: pid {sleeper.pid} on "):
        run_stage(tmp_path / "b", "features-train", {"store": str(store)}, {}, lambda ctx: {"store": str(store)})
    assert not manifest_path(tmp_path / "b", "features-train").exists()
    assert not stage_lock(tmp_path / "b", "features-train").exists()  # the stage lock taken first is released
    remote = "s3://bucket/train.zarr"  # no atomic create there: the lock lives in the stage dir, keyed on the URL
    assert store_lock(tmp_path / "b", remote).parent == tmp_path / "b" / "stages"
    assert store_lock(tmp_path / "b", remote) != store_lock(tmp_path / "b", "s3://bucket/val.zarr")


def test_a_stale_lock_is_taken_over_and_the_run_completes(tmp_path, capsys):
    pid = dead_pid()
    write_lock(stage_lock(tmp_path, "s"), pid)
    manifest = run_stage(tmp_path, "s", {"a": 1}, {}, lambda ctx: {"value": 7})
    assert manifest["status"] == "complete" and manifest["outputs"] == {"value": 7}
    err = capsys.readouterr().err
    assert f"[s] taking over the lock of stage s from a runner that is gone (pid {pid} on " in err
    assert not stage_lock(tmp_path, "s").exists()


@pytest.mark.parametrize("stale", [
    {"boot_id": "another-boot"},  # written before a reboot, its pid now someone else's (this test process)
    {"proc_start": "1"},  # the pid reused by another process: its start tick differs
])
def test_a_reused_pid_does_not_pass_for_the_holder(tmp_path, stale):
    lock = stage_lock(tmp_path, "s")
    holder = write_lock(lock, os.getppid(), **stale)  # a live process, but not the one that wrote the lock
    assert locks.alive(holder, lock) is False
    run_stage(tmp_path, "s", {}, {}, lambda ctx: {})
    assert not lock.exists()


def test_status_reads_a_stale_lock_and_leaves_it(tmp_path):
    """A runner killed mid-stage leaves its manifest "running" and its lock: status says interrupted and removes
    nothing (the next runner takes the lock over)."""
    run_stage(tmp_path, "s", {"a": 1}, {}, lambda ctx: {})
    manifest = manifest_path(tmp_path, "s")
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "status": "running"}))
    lock = stage_lock(tmp_path, "s")
    write_lock(lock, dead_pid())
    before = snapshot(tmp_path)
    assert stage_state(tmp_path, "s", {"a": 1}, {}) == "interrupted"
    assert snapshot(tmp_path) == before


def test_the_lock_is_removed_after_a_failing_run_and_after_ctrl_c(tmp_path):
    def fails(ctx):
        assert stage_lock(tmp_path, "s").exists()  # held while the body runs
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_stage(tmp_path, "s", {}, {}, fails)
    assert not stage_lock(tmp_path, "s").exists() and read_manifest(tmp_path, "s")["status"] == "failed"

    def ctrl_c(ctx):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_stage(tmp_path, "s", {}, {}, ctrl_c)
    assert not stage_lock(tmp_path, "s").exists() and read_manifest(tmp_path, "s")["status"] == "interrupted"


def test_release_never_removes_another_runners_lock(tmp_path, sleeper):
    lock = tmp_path / "x.lock"
    mine = acquire(lock, "x")
    theirs = write_lock(lock, sleeper.pid)  # e.g. taken over by someone who thought we were gone
    release(lock, mine)
    assert lock.exists() and locks.read_holder(lock) == theirs


def test_a_holder_on_another_host_is_refused_with_the_file_to_delete(tmp_path):
    lock = stage_lock(tmp_path, "s")
    write_lock(lock, dead_pid(), host="elsewhere.example")  # its pid means nothing here: never taken over
    with pytest.raises(LockHeld, match=r"another host: pid \d+ on elsewhere\.example since .*cannot be checked "
                                       r"from here.*delete "):
        run_stage(tmp_path, "s", {}, {}, lambda ctx: {}, force=True)
    assert lock.exists()


def test_several_runners_meeting_one_stale_lock_exactly_one_gets_it(tmp_path):
    """Four processes find the same stale lock at once; each tries once and keeps what it got until told to stop."""
    lock, stop = tmp_path / "stages" / "s.lock", tmp_path / "stop"
    write_lock(lock, dead_pid())
    script = (
        "import sys, time, pathlib\n"
        "from pipeline.orchestration.locks import acquire, release, LockHeld\n"
        "lock, stop = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])\n"
        "try:\n"
        "    mine = acquire(lock, 'stage s', log=lambda m: None)\n"
        "except LockHeld:\n"
        "    print('refused', flush=True); sys.exit(0)\n"
        "print('got', flush=True)\n"
        "while not stop.exists(): time.sleep(0.01)\n"
        "release(lock, mine)\n")
    children = [subprocess.Popen([sys.executable, "-c", script, str(lock), str(stop)], cwd=REPO,
                                 stdout=subprocess.PIPE, text=True) for _ in range(4)]
    answers = [child.stdout.readline().strip() for child in children]  # every attempt made before anyone stops
    stop.touch()
    for child in children:
        child.wait(timeout=60)
    assert sorted(answers) == ["got", "refused", "refused", "refused"]
    assert not lock.exists() and not list(lock.parent.glob("s.lock.stale-*"))


def test_an_unreadable_lock_file_is_stale_only_once_old(tmp_path):
    lock = tmp_path / "s.lock"
    lock.write_text("")  # a runner killed between creating the file and writing it
    with pytest.raises(LockHeld, match="being written by another runner"):
        acquire(lock, "stage s")
    old = time.time() - 2 * locks.UNREADABLE_GRACE_S
    os.utime(lock, (old, old))
    release(lock, acquire(lock, "stage s", log=lambda m: None))
    assert not lock.exists()


# ---------------------------------------------------------------- the command line
TINY = {
    "dataset.n_train": "4", "dataset.n_val": "2", "dataset.size": "96",
    "prepare.resolution": "48", "prepare.val_resolution": "48",
    "features.backbone": "vit_small_patch16_224.dino", "features.weights": "random",
    "features.n_views": "1", "features.chunk_size": "4",
    "hp.batch_size": "4", "hp.head_dim": "16", "hp.pool_size": "8", "hp.renew_interval": "2",
    "hp.warmup": "2", "train.checkpoint_interval": "1", "train.log_interval": "1",
}
SETS = [arg for k, v in TINY.items() for arg in ("--set", f"{k}={v}")]


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    """A work folder with the tiny training store built (in this process, once)."""
    from pipeline.config import load_config
    from stages import features as features_stage

    workdir = tmp_path_factory.mktemp("work")
    features_stage.run(load_config("synthetic", TINY), workdir, "train")
    return workdir


def cli(*args: str, workdir: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args, "--workdir", str(workdir), *SETS],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                          timeout=300, **kwargs)


def test_cli_refuses_a_second_runner_with_one_error_line_and_exit_1(features, sleeper):
    sdir = features / "synthetic"
    holder = write_lock(stage_lock(sdir, "features-train"), sleeper.pid)
    before = snapshot(sdir)
    result = cli("features", "--split", "train", "--force", workdir=features)  # --force: still refused
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert (f"stage features-train is locked by another runner: pid {sleeper.pid} on {holder.host} since "
            f"{holder.since}") in errors[0]
    assert snapshot(sdir) == before  # the store, its manifest, the lock: nothing written
    stage_lock(sdir, "features-train").unlink()


@pytest.mark.slow
def test_ctrl_c_of_a_running_stage_exits_130_and_keeps_the_checkpoint(features):
    """SIGINT while `train` runs: exit 130 with the "interrupted" line (no traceback), the manifest says interrupted,
    the lock is gone, the checkpoint written so far is kept, and `status` says interrupted."""
    sdir = features / "synthetic"
    ckpt = sdir / "runs" / "sigint" / "checkpoints" / "last.pt"
    child = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "train", "--run", "sigint", "--epochs", "400", "--workdir",
         str(features), *SETS], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        # Ctrl-C's default action, as in a terminal: a test run started in the background (nohup, `&`) ignores
        # SIGINT, and a Python started with SIGINT ignored keeps ignoring it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while not ckpt.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert child.poll() is None, "train ended before it could be interrupted"
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130, err[-2000:]
    assert "interrupted: finished work is kept" in err and "Traceback" not in err
    assert read_manifest(sdir, "train-sigint")["status"] == "interrupted"
    assert not stage_lock(sdir, "train-sigint").exists() and ckpt.exists()
    status = cli("status", "--json", workdir=features)
    rows = {r["stage"]: r for r in json.loads(status.stdout[status.stdout.index("["):])}
    assert rows["train-sigint"]["state"] == "interrupted", status.stdout
