"""The stage runner: `make` semantics for the pipeline's stages.

A stage is identified by name (e.g. `features-train`) inside a dataset's work folder. Its
fingerprint hashes the config sections it reads plus the fingerprints of the stages it reads
from, so a changed config invalidates the stage and, through the chain, every later stage.
The manifest (`<workdir>/<dataset>/stages/<name>.json`) records status, fingerprint, config,
inputs, outputs, timings and versions; it is always written atomically. A stage runs holding its lock
(`stages/<name>.lock`) and, when it writes a store, the store's lock (pipeline/orchestration/locks.py): one runner
per stage,
one writer per store.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.config import fingerprint
from pipeline.files import atomic_write_text
from pipeline.log import log
from pipeline.orchestration.locks import current_holder, hold, stage_lock, store_lock


def versions() -> dict[str, str]:
    import numpy
    import timm
    import torch
    import zarr

    import pipeline

    return {
        "hp-pipe": pipeline.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "zarr": zarr.__version__,
        "numpy": numpy.__version__,
    }


def manifest_path(stage_dir: Path, name: str) -> Path:
    return stage_dir / "stages" / f"{name}.json"


def read_manifest(stage_dir: Path, name: str) -> dict[str, Any] | None:
    path = manifest_path(stage_dir, name)
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        manifest = None  # a torn manifest (should not happen: writes are atomic)
    if not _well_formed(manifest):
        log.warning(f"[{name}] warning: {path} is not a valid manifest (corrupt or edited); the stage counts as not "
                    "run")
        return None
    return manifest


def _well_formed(manifest: Any) -> bool:
    """The shape every reader of a manifest relies on."""
    return (isinstance(manifest, dict) and isinstance(manifest.get("status"), str)
            and isinstance(manifest.get("fingerprint"), str) and isinstance(manifest.get("outputs", {}), dict)
            and isinstance(manifest.get("config", {}), dict) and isinstance(manifest.get("inputs", {}), dict))


@dataclass
class StageContext:
    """What a stage body gets: whether to start over, and where to report progress."""

    name: str
    fingerprint: str
    fresh: bool  # True: discard any partial output (forced, or the config changed)
    manifest: dict[str, Any]
    forced: bool = False  # --force: recompute even what the stage could reuse

    def log(self, message: str) -> None:
        log.info(f"[{self.name}] {message}")


def changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


OUTPUT_KEYS = ("store", "checkpoint", "metrics", "report", "run_dir", "dir", "train", "val", "centroids", "linear")


def missing_outputs(manifest: dict[str, Any]) -> list[str]:
    """The stage's recorded local output paths that no longer exist: a manifest alone never proves a stage done."""
    missing = []
    for key in OUTPUT_KEYS:
        value = manifest.get("outputs", {}).get(key)
        if not isinstance(value, str) or ("://" in value and not value.startswith("file://")):
            continue  # not a path, or a remote store (checked when it is opened)
        if not Path(value.removeprefix("file://")).exists():
            missing.append(value)
    return missing


def run_stage(
    stage_dir: Path,
    name: str,
    config: dict[str, Any],
    inputs: dict[str, str],
    body: Callable[[StageContext], dict[str, Any]],
    force: bool = False,
    check: Callable[[dict[str, Any]], list[str]] | None = None,
) -> dict[str, Any]:
    """Run `body` unless a complete manifest with the same fingerprint exists; return the manifest.

    `body` returns the stage's outputs (plain data) plus an optional "summary" line; it must be
    resumable: when `fresh` is False it continues whatever a previous attempt left behind. The whole of it, the
    up-to-date check included, holds the stage's lock, and the lock of the store it writes when its config names
    one (`store`); a live holder refuses the run (locks.LockHeld, exit 1) before anything is written.
    `check(manifest)` (e.g. a store's cheap integrity check) lists what is wrong with the recorded outputs: the
    stage is up to date only when it finds nothing; otherwise `body` runs (not fresh) to repair them.
    """
    locks = [(stage_lock(stage_dir, name), f"stage {name}")]
    if isinstance(config.get("store"), str):
        locks.append((store_lock(stage_dir, config["store"]), f"the store {config['store']}"))
    with hold(locks, lambda message: log.warning(f"[{name}] {message}")):
        return _run_stage(stage_dir, name, config, inputs, body, force, check)


def _run_stage(stage_dir: Path, name: str, config: dict[str, Any], inputs: dict[str, str],
               body: Callable[[StageContext], dict[str, Any]], force: bool,
               check: Callable[[dict[str, Any]], list[str]] | None = None) -> dict[str, Any]:
    fp = fingerprint(config, inputs)
    old = read_manifest(stage_dir, name)
    gone = missing_outputs(old) if old else []
    current = bool(old and old.get("status") == "complete" and old.get("fingerprint") == fp and not force and not gone)
    problems = check(old) if current and check is not None else []
    if problems:
        log.info(f"[{name}] complete, but {'; '.join(problems)}: repairing")
    if current and not problems:
        note = " [built with a RANDOM-INIT backbone]" if old.get("outputs", {}).get("random_init") else ""
        log.info(f"[{name}] up to date (fingerprint {fp}), skipped; --force recomputes{note}")
        return old
    if gone and old.get("fingerprint") == fp:
        log.info(f"[{name}] complete, but {', '.join(gone)} no longer exists: recomputing")
    fresh = force
    if old and old.get("fingerprint") != fp:
        keys = changed_keys({"config": old.get("config", {}), "inputs": old.get("inputs", {})},
                            {"config": config, "inputs": inputs})
        log.info(f"[{name}] changed since the last run ({', '.join(keys) or 'fingerprint'}): recomputing")
        fresh = True
    elif old and old.get("status") != "complete" and not force:
        log.info(f"[{name}] resuming an interrupted run")
    manifest = {
        "stage": name,
        "status": "running",
        "fingerprint": fp,
        "config": config,
        "inputs": inputs,
        "outputs": {},
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": versions(),
        "argv": sys.argv,
    }
    path = manifest_path(stage_dir, name)
    atomic_write_text(path, json.dumps(manifest, indent=2))
    t0 = time.perf_counter()
    try:
        outputs = body(StageContext(name, fp, fresh, manifest, force))
    except BaseException as exc:
        manifest["status"] = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        manifest["error"] = f"{type(exc).__name__}: {exc}"
        manifest["timings"] = {"seconds": round(time.perf_counter() - t0, 3)}
        try:
            atomic_write_text(path, json.dumps(manifest, indent=2))
        except OSError:
            pass  # e.g. the disk is full: the original error is the one to report; the manifest stays "running"
        raise
    summary = outputs.pop("summary", None)
    manifest.update(
        status="complete",
        outputs=outputs,
        finished=datetime.now(UTC).isoformat(timespec="seconds"),
        timings={"seconds": round(time.perf_counter() - t0, 3), **outputs.pop("timings", {})},
    )
    atomic_write_text(path, json.dumps(manifest, indent=2))
    if summary:
        log.info(f"[{name}] {summary}")
    return manifest


def stage_state(stage_dir: Path, name: str, config: dict[str, Any], inputs: dict[str, str]) -> str:
    """One word for `hp-pipe status`: missing | complete | incomplete | stale | running | interrupted | failed.

    "running" only while a live runner holds the stage's lock: a manifest left "running" by a killed runner reads
    "interrupted". Reads only: a stale lock is left for the next runner to take over.
    """
    if current_holder(stage_lock(stage_dir, name)):
        return "running"
    manifest = read_manifest(stage_dir, name)
    if manifest is None:
        return "missing"
    if manifest.get("fingerprint") != fingerprint(config, inputs):
        return "stale"
    if manifest.get("status") == "running":
        return "interrupted"  # its runner is gone (killed): the next run resumes it
    if manifest.get("status") == "complete" and missing_outputs(manifest):
        return "incomplete"  # complete once, but an output has been deleted since
    return manifest.get("status", "missing")


def runner_of(stage_dir: Path, name: str) -> str | None:
    """Who runs the stage now ("pid N on HOST since T (command)"), None when nobody; for `status`, reads only."""
    holder = current_holder(stage_lock(stage_dir, name))
    return holder.describe() if holder else None
