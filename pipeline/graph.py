"""The stage graph: which config sections each stage reads, and which stages it reads from.

A stage's fingerprint covers its sections and its inputs' fingerprints, so changing a value
invalidates exactly the stages that read it and everything downstream of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import Config, fingerprint, sections

# stage -> (config sections it reads, stages it reads from)
STAGES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "prepare": (("dataset", "prepare"), ()),
    "features-train": (("dataset", "prepare", "features"), ("prepare",)),
    "features-val": (("dataset", "prepare", "features"), ("prepare",)),
}


def stage_dir(config: Config, workdir: Path) -> Path:
    """Where a dataset's stage outputs and manifests live."""
    return Path(workdir) / config["dataset"]["name"]


def default_store_url(config: Config, workdir: Path, split: str) -> str:
    """One store per (dataset, split, backbone, resolution), as DESIGN.md's cache section asks."""
    res = config["prepare"]["resolution" if split == "train" else "val_resolution"]
    backbone = config["features"]["backbone"]
    return str(stage_dir(config, workdir) / "features" / f"{split}-{backbone}-{res}.zarr")


def stage_plan(config: Config, extras: dict[str, dict[str, Any]] | None = None) -> dict[str, tuple[dict, dict]]:
    """stage -> (its config, its inputs {upstream: fingerprint}), in dependency order.

    `extras` adds per-stage values that are not config sections (e.g. the store URL).
    """
    plan: dict[str, tuple[dict, dict]] = {}
    for name, (names, upstream) in STAGES.items():
        stage_config = {**sections(config, *names), **(extras or {}).get(name, {})}
        inputs = {up: fingerprint(*plan[up]) for up in upstream}
        plan[name] = (stage_config, inputs)
    return plan
