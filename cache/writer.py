"""Resumable, multi-writer-safe writing of a feature store.

Resume works at chunk granularity: a chunk counts as finished only once its `_done` flag is
set, and the flag is written after every array's chunk. A kill at any moment therefore leaves
at worst one half-written chunk without a flag, which the next run recomputes. Writes are
always whole chunks, so several processes writing disjoint chunks never touch the same object.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr

from cache.schema import DONE, IDENTITY_KEYS, SCHEMA_VERSION, CodesLayout, HCLLayout, Layout
from pipeline.errors import UserError


def _compressors(name: str, level: int) -> Any:
    if name == "none":
        return None
    return zarr.codecs.BloscCodec(cname=name, clevel=level, shuffle="shuffle")


def describe(attrs: dict[str, Any]) -> str:
    return f"backbone {attrs.get('backbone')} at {attrs.get('resolution')} px ({attrs.get('weights')})"


def storage_options(url: str) -> dict[str, Any] | None:
    """fsspec's local filesystem does not create folders unless asked to."""
    return {"auto_mkdir": True} if url.startswith("file://") else None


def open_group(url: str, mode: str) -> zarr.Group | None:
    """The zarr group at `url` (a path or any fsspec URL), or None when there is none."""
    try:
        return zarr.open_group(url, mode=mode, storage_options=storage_options(url))
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
        return None


def create_store(
    url: str,
    layout: Layout | CodesLayout | HCLLayout,
    chunk_size: int,
    attrs: dict[str, Any],
    fresh: bool,
    compressor: str = "zstd",
    clevel: int = 3,
) -> zarr.Group:
    """Open the store for writing, creating it (or starting over when `fresh`).

    An existing store with another identity (backbone, resolution, ...) is refused rather than
    overwritten: it is someone's finished work. One with the same identity but an older
    fingerprint is rebuilt only when `fresh` (the stage runner decides that).
    """
    existing = open_group(url, mode="r")
    if existing is not None and "schema_version" in existing.attrs:
        old = dict(existing.attrs)
        clash = [k for k in IDENTITY_KEYS if k in attrs and old.get(k) != attrs[k]]
        if clash:
            raise UserError(
                f"store {url} holds {describe(old)} for {old.get('dataset')}/{old.get('split')}, "
                f"but this run writes {describe(attrs)} for {attrs.get('dataset')}/{attrs.get('split')} "
                f"(differs in: {', '.join(clash)}). Pass another --store, or delete that store to rebuild it."
            )
        if not fresh and old.get("fingerprint") == attrs["fingerprint"]:
            return zarr.open_group(url, mode="r+", storage_options=storage_options(url))
    elif existing is not None and list(existing.keys()):
        raise UserError(f"{url} exists and is not an hp-pipe feature store; choose another --store")
    group = zarr.open_group(url, mode="w", storage_options=storage_options(url))
    _create_arrays(group, layout, chunk_size, DONE, compressor, clevel)
    group.attrs.update({**attrs, "schema_version": SCHEMA_VERSION, "chunk_size": chunk_size, "complete": False})
    return group


def _create_arrays(group: zarr.Group, layout: Layout | CodesLayout | HCLLayout, chunk_size: int, done: str,
                   compressor: str, clevel: int) -> None:
    """Every array chunked along the sample axis alone (one writer per chunk), plus its done flags."""
    for name, (shape, dtype) in layout.arrays().items():
        group.create_array(
            name,
            shape=(layout.n_samples, *shape),
            chunks=(chunk_size, *shape),
            dtype=dtype,
            compressors=_compressors(compressor, clevel),
            fill_value=0,
            overwrite=True,
        )
    n_chunks = -(-layout.n_samples // chunk_size)
    group.create_array(done, shape=(n_chunks,), chunks=(1,), dtype="bool", compressors=None, fill_value=False,
                       overwrite=True)


def finished_chunks(group: zarr.Group, done_name: str = DONE) -> np.ndarray:
    """Boolean flags per chunk; a flag torn by a kill mid-write reads as unfinished."""
    done = group[done_name]
    try:
        return np.asarray(done[:], dtype=bool)
    except Exception:  # a torn flag object: read flags one by one
        flags = np.zeros(done.shape[0], dtype=bool)
        for i in range(done.shape[0]):
            try:
                flags[i] = bool(done[i])
            except Exception:
                flags[i] = False
        return flags


def chunk_range(group: zarr.Group, chunk: int) -> tuple[int, int]:
    size = group.attrs["chunk_size"]
    n = group["feat"].shape[0]
    return chunk * size, min((chunk + 1) * size, n)


def write_chunk(group: zarr.Group, chunk: int, data: dict[str, np.ndarray], done: str = DONE) -> None:
    """Write one whole chunk of every array, then its done flag (the commit point)."""
    start, stop = chunk_range(group, chunk)
    for name, values in data.items():
        if values.shape[0] != stop - start:
            raise ValueError(f"chunk {chunk} of {name}: {values.shape[0]} samples, expected {stop - start}")
        group[name][start:stop] = values
    group[done][chunk] = True


def mark_complete(group: zarr.Group) -> None:
    group.attrs["complete"] = True


def stored_bytes(group: zarr.Group) -> dict[str, int]:
    """Compressed bytes per array, as the store reports them."""
    return {name: int(group[name].nbytes_stored()) for name in group.array_keys()}
