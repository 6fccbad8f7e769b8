"""Paths that come from files (manifests, metrics.json, checkpoints) are data, not orders.

A manifest or a run folder may come from someone else. Any path read from one is resolved (symlinks and `..`
included) and refused unless it lies inside the work folder, so an edited or copied file can never make hp-pipe
read or delete anything elsewhere. Names that become folders (`--run`) are plain names for the same reason.
"""

from __future__ import annotations

import re
from pathlib import Path

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
