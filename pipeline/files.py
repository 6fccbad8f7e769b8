"""Atomic file writes: every file the pipeline writes appears whole or not at all."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write` on a temporary sibling, then rename it onto `path`: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk or a Ctrl-C leaves neither a torn file nor a stray temporary
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_png(path: Path, array: np.ndarray, compress_level: int = 6) -> None:
    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG", compress_level=compress_level))


def atomic_write_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:  # a file object: np.save would append ".npy" to a path
            np.save(f, array)

    atomic_write(path, write)
