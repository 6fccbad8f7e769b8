"""The work folder's layout, in one place, and the rule for paths that come from files.

<workdir>/<dataset>/                      stage_dir: manifests in stages/, everything below
    prepared/<split>/                     prepare's crops (HP)
    features/<split>-<backbone>-<res>.zarr, features/hcl-<split>-<backbone>-<res>.zarr   the stores
    runs/<run>/checkpoints/last.pt        a run: checkpoint, metrics.jsonl, curves.png,
    runs/<run>/config.toml                the run's settings, recorded when it was created
    (pipeline/orchestration/runs.py)
    runs/<run>/codes/, probe-<kind>/, eval/     codes, probes, metrics.json, report.md, pictures

Paths read from files (manifests, metrics.json, checkpoints) are data, not orders: a manifest or a run folder
may come from someone else, so any path read from one is resolved (symlinks and `..` included) and refused unless
it lies inside the work folder. Names that become folders (`--run`) are plain names for the same reason.
"""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.config import Config
from pipeline.errors import UserError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def inside(path: str | Path, root: Path, source: str | Path) -> Path:
    """`path` as read from `source`, resolved; a UserError unless it is inside `root`."""
    resolved, base = Path(path).expanduser().resolve(), Path(root).expanduser().resolve()
    if resolved != base and base not in resolved.parents:
        raise UserError(f"{source} points at {path}, outside the work folder {base}: refused (a manifest or run "
                        "file cannot make hp-pipe read or delete elsewhere). Recompute it with --force")
    return resolved


def run_name(name: str) -> str:
    """A run name is one folder name: letters, digits, '.', '_', '-' (no separators, no '..')."""
    if not _NAME.fullmatch(name) or ".." in name:
        raise UserError(f"--run '{name}' is not a plain name: use letters, digits, '.', '_' and '-' only")
    return name


def stage_dir(config: Config, workdir: Path) -> Path:
    """Where a dataset's stage outputs and manifests live."""
    return Path(workdir) / config["dataset"]["name"]


def prepared_dir(config: Config, workdir: Path, split: str) -> Path:
    return stage_dir(config, workdir) / "prepared" / split


def for_workers(path_or_url: str | Path) -> str:
    """A local path as dask workers must get it: absolute (a worker's working folder is not the client's); URLs with
    a scheme (s3://, gs://, ...) unchanged. Stage fingerprints keep the path as the user gave it."""
    text = str(path_or_url)
    return text if "://" in text else str(Path(text).absolute())


def store_url(config: Config, workdir: Path, split: str) -> str:
    """HP's store per (dataset, split, backbone, resolution), docs/cache.md."""
    res = config["prepare"]["resolution" if split == "train" else "val_resolution"]
    return str(stage_dir(config, workdir) / "features" / f"{split}-{config['features']['backbone']}-{res}.zarr")


def hcl_store_url(config: Config, workdir: Path, split: str) -> str:
    """HCL's own store per (dataset, split, backbone, resolution): its geometry is not HP's (docs/hcl.md §4-§5)."""
    res = config["hcl_features"]["resolution" if split == "train" else "val_resolution"]
    return str(stage_dir(config, workdir) / "features" / f"hcl-{split}-{config['features']['backbone']}-{res}.zarr")


def run_dir(config: Config, workdir: Path, run: str) -> Path:
    return stage_dir(config, workdir) / "runs" / run_name(run)


def checkpoint_path(run_folder: Path) -> Path:
    return Path(run_folder) / "checkpoints" / "last.pt"


def run_config_path(run_folder: Path) -> Path:
    """The run's settings as TOML, written when the run is created; evaluate, predict, report and status read it."""
    return Path(run_folder) / "config.toml"


def codes_dir(run_folder: Path) -> Path:
    return Path(run_folder) / "codes"


def probe_dir(run_folder: Path, kind: str) -> Path:
    """A run's fitted probes for `kind` (head | raw): centroids.npy, linear.pt."""
    return Path(run_folder) / f"probe-{kind}"


def eval_dir(config: Config, workdir: Path, run: str) -> Path:
    return run_dir(config, workdir, run) / "eval"
