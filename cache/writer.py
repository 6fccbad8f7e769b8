"""Resumable, multi-writer-safe, verifiable writing of a feature store.

Resume works at chunk granularity: a chunk counts as finished only once its `_done` flag is
set, and the flag is written after every array's chunk and the chunk's record (stored size and
digest per array, cache/integrity.py). A kill at any moment therefore leaves at worst one
half-written chunk without a flag, which the next run recomputes. Writes are always whole chunks,
so several processes writing disjoint chunks never touch the same object.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from cache.integrity import (
    DIGEST,
    PRESENT,
    SIZE,
    checksum_codec,
    chunk_key,
    digest,
    finished_chunks,
    quick_check,
    record_arrays,
    stored_sizes,
    summarize,
)
from cache.quant import quantize
from cache.schema import (
    DONE,
    IDENTITY_KEYS,
    QUANTIZED,
    RECORDS,
    SCHEMA_VERSION,
    CodesLayout,
    HCLLayout,
    Layout,
    scale_array,
)
from pipeline.errors import UserError

__all__ = ["create_store", "finished_chunks", "write_chunk", "mark_complete", "repair"]  # finished_chunks: re-export


def _compressors(name: str, level: int) -> list[Any]:
    if name == "none":
        return []
    return [zarr.codecs.BloscCodec(cname=name, clevel=level, shuffle="shuffle")]


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
    log: Callable[[str], None] | None = None,
) -> zarr.Group:
    """Open the store for writing, creating it (or starting over when `fresh`).

    An existing store with another identity (backbone, resolution, ...) is refused rather than
    overwritten: it is someone's finished work. One with the same identity but an older
    fingerprint is rebuilt only when `fresh` (the stage runner decides that). One kept for resuming
    is repaired first (`repair`): missing arrays recreated, chunks that fail the cheap check or that
    `hp-pipe verify` recorded as bad flagged for recomputation; `log` hears what was found.

    Creation is safe to kill at any point: the group's metadata, identity included, is the first
    object written (marked "creating" until every array exists), so a half-created store is always
    recognized as hp-pipe's and rebuilt, never refused as foreign.
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
        if (not fresh and old.get("fingerprint") == attrs["fingerprint"] and not old.get("creating")
                and old.get("schema_version") == SCHEMA_VERSION):
            group = zarr.open_group(url, mode="r+", storage_options=storage_options(url))
            for line in repair(group, url, layout, chunk_size, compressor, clevel):
                if log is not None:
                    log(line)
            return group
    elif (existing is not None and not half_created(existing, layout)) or (existing is None and foreign(url, layout)):
        raise UserError(f"{url} exists and is not an hp-pipe feature store; choose another --store")
    metadata = {**attrs, "schema_version": SCHEMA_VERSION, "chunk_size": chunk_size, "complete": False,
                "record_arrays": list(layout.arrays()), "creating": True}
    if isinstance(layout, Layout):  # how `feat`/`feat_aug` are held: write_chunk and the reader go by it
        metadata["feature_dtype"] = layout.dtype
    group = zarr.open_group(url, mode="w", storage_options=storage_options(url), attributes=metadata)
    _create_arrays(group, layout, chunk_size, DONE, compressor, clevel)
    del group.attrs["creating"]
    return group


def half_created(group: zarr.Group, layout: Layout | CodesLayout | HCLLayout) -> bool:
    """A group without attributes holding nothing but arrays a store of `layout` has: one whose creation was
    killed before its attributes were written (the order stores were created in before schema 3)."""
    return not dict(group.attrs) and set(group.keys()) <= {*layout.arrays(), DONE, RECORDS}


def foreign(url: str, layout: Layout | CodesLayout | HCLLayout) -> bool:
    """A local path holding something other than (the remains of) a store of `layout`: never overwritten."""
    if "://" in url and not url.startswith("file://"):
        return False  # a remote URL without a zarr group: nothing to protect that zarr could recognize
    path = Path(url.removeprefix("file://"))
    if not path.exists():
        return False
    if not path.is_dir():
        return True
    return not {entry.name for entry in path.iterdir()} <= {"zarr.json", *layout.arrays(), DONE, RECORDS}


def _array_spec(layout: Layout | CodesLayout | HCLLayout, chunk_size: int) -> dict[str, tuple[tuple, tuple, str]]:
    """name -> (shape, chunks, dtype) of every array of a store of `layout`, its flags and records included."""
    n_chunks = -(-layout.n_samples // chunk_size)
    arrays = layout.arrays()
    spec = {name: ((layout.n_samples, *shape), (chunk_size, *shape), dtype) for name, (shape, dtype) in arrays.items()}
    spec[DONE] = ((n_chunks,), (1,), "bool")
    spec[RECORDS] = ((n_chunks, len(arrays), 2), (1, len(arrays), 2), "uint64")
    return spec


def _create_array(group: zarr.Group, name: str, spec: tuple[tuple, tuple, str], compressor: str, clevel: int) -> None:
    """Chunked along the sample axis alone (one writer per chunk); every array ends with the checksum codec."""
    shape, chunks, dtype = spec
    compressors = [] if name in (DONE, RECORDS) else _compressors(compressor, clevel)
    group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, compressors=[*compressors, checksum_codec()],
                       fill_value=0, overwrite=True)


def _create_arrays(group: zarr.Group, layout: Layout | CodesLayout | HCLLayout, chunk_size: int, done: str,
                   compressor: str, clevel: int) -> None:
    """Every array of the layout, then the done flags and the chunk records."""
    for name, spec in _array_spec(layout, chunk_size).items():
        _create_array(group, done if name == DONE else name, spec, compressor, clevel)


def repair(group: zarr.Group, url: str, layout: Layout | CodesLayout | HCLLayout, chunk_size: int,
           compressor: str = "zstd", clevel: int = 3) -> list[str]:
    """Make a kept store safe to resume; return what was found, one line each.

    A missing (or reshaped) array is recreated and every chunk recomputed (a chunk writes all its arrays at
    once). Chunks failing the cheap check (integrity.quick_check) lose their done flag, so exactly they are
    recomputed; so do those `hp-pipe verify` recorded as bad (it cleared their flags itself).
    """
    lines, redo_all = [], False
    present = set(group.array_keys())
    for name, spec in _array_spec(layout, chunk_size).items():
        if name in present:
            array = group[name]
            if (array.shape, array.chunks, str(array.dtype)) == spec:
                continue
            lines.append(f"array '{name}' has shape {array.shape}, not {spec[0]}: recreated")
        else:
            lines.append(f"array '{name}' is missing: recreated")
        _create_array(group, name, spec, compressor, clevel)
        redo_all = name != DONE or redo_all  # a missing _done array is all flags cleared already
    if redo_all:
        group[DONE][:] = False
    if lines:
        lines[-1] += f"; all {group[DONE].shape[0]} chunks are recomputed"
    check = quick_check(group, url)
    done = group[DONE]
    for c in check.bad_chunks:
        done[c] = False
    if check.bad:
        lines.append(f"recomputing {len(check.bad_chunks)} chunk(s) that fail the cheap check: {summarize(check.bad)}")
    if check.recorded_bad:
        lines.append(f"recomputing the chunk(s) `hp-pipe verify` found bad: {', '.join(check.recorded_bad[:6])}"
                     + (" ..." if len(check.recorded_bad) > 6 else ""))
    if lines and group.attrs.get("complete"):
        group.attrs["complete"] = False
    return lines


def chunk_range(group: zarr.Group, chunk: int) -> tuple[int, int]:
    size = group.attrs["chunk_size"]
    n = group["feat"].shape[0]
    return chunk * size, min((chunk + 1) * size, n)


def write_chunk(group: zarr.Group, chunk: int, data: dict[str, np.ndarray], done: str = DONE) -> None:
    """Write one whole chunk of every array, then its record (stored size and digest per array), then its done
    flag (the commit point). Every chunk object is written, fill values included, so that "present with its
    recorded size" holds for every finished chunk."""
    start, stop = chunk_range(group, chunk)
    names = record_arrays(group)
    data = encode_chunk(group, data)
    if set(data) != set(names):
        raise ValueError(f"chunk {chunk}: data for {sorted(data)}, but the store holds {sorted(names)}")
    record = np.zeros((len(names), 2), dtype=np.uint64)
    keys = []
    for i, name in enumerate(names):
        array = group[name].with_config({"write_empty_chunks": True})
        values = np.ascontiguousarray(data[name], dtype=array.dtype)
        if values.shape[0] != stop - start:
            raise ValueError(f"chunk {chunk} of {name}: {values.shape[0]} samples, expected {stop - start}")
        array[start:stop] = values
        record[i, DIGEST] = PRESENT | digest(values)
        keys.append(chunk_key(array, chunk))
    sizes = stored_sizes(group.store_path.store, keys)
    if None in sizes:
        raise RuntimeError(f"chunk {chunk}: {keys[sizes.index(None)]} is missing right after it was written")
    record[:, SIZE] = sizes
    group[RECORDS][chunk] = record
    group[done][chunk] = True


def encode_chunk(group: zarr.Group, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The chunk as the store holds it: in an int8 store (`feature_dtype` attribute, docs/cache.md "Compact
    cache") each float array of QUANTIZED given without its scales becomes int8 plus `<name>_scale`
    (cache/quant.py); any other store's data is returned as it is."""
    if group.attrs.get("feature_dtype", "float16") != "int8":
        return data
    out = dict(data)
    for name in QUANTIZED:
        if name in out and scale_array(name) not in out and out[name].dtype.kind == "f":
            out[name], out[scale_array(name)] = quantize(out[name])
    return out


def mark_complete(group: zarr.Group) -> None:
    """Every chunk finished: complete, and whatever verify had recorded as bad has been recomputed."""
    attrs = dict(group.attrs)
    attrs.pop("bad_chunks", None)
    attrs["complete"] = True
    group.attrs.put(attrs)


def fill_store(group: zarr.Group, url: str, compute: Callable[[list[int], int], None],
               log: Callable[[str], None] | None = None) -> int:
    """The one resumable loop of every store writer (HP's and HCL's features, the codes): `compute(pending,
    finished)` writes the chunks not yet flagged done (each with `write_chunk`, so a killed run keeps every finished
    chunk); `finished` counts the samples found written (and `log` says so). Then every chunk must be done, and the
    store is flagged complete. Returns `finished`."""
    done = finished_chunks(group)
    pending = [int(c) for c in np.flatnonzero(~done)]
    finished = int(sum(np.diff(chunk_range(group, int(c)))[0] for c in np.flatnonzero(done)))
    if finished and log is not None:
        log(f"resuming: {int(done.sum())} of {done.size} chunks already in {url}")
    compute(pending, finished)
    if not finished_chunks(group).all():
        raise RuntimeError(f"some chunks of {url} were not written; rerun to finish them")
    mark_complete(group)
    return finished


def stored_bytes(group: zarr.Group) -> dict[str, int]:
    """Compressed bytes per array, as the store reports them."""
    return {name: int(group[name].nbytes_stored()) for name in group.array_keys()}


def store_problems(url: str) -> list[str]:
    """What keeps the store at `url` from being up to date, by the cheap check (no chunk is read): gone,
    another schema, an array missing, a chunk object missing or of another size than recorded, chunks that
    `hp-pipe verify` recorded as bad. Empty when it passes."""
    group = open_group(url, mode="r")
    if group is None:
        return [f"its store {url} is gone"]
    if group.attrs.get("schema_version") != SCHEMA_VERSION:
        return [f"its store {url} has schema version {group.attrs.get('schema_version')}, not {SCHEMA_VERSION}"]
    return [f"store {url}: {problem}" for problem in quick_check(group, url).problems()]


def recorded_store_check(url: str, manifest_file: str) -> Callable[[dict[str, Any]], list[str]]:
    """A features stage's check before it calls itself up to date (pipeline.orchestration.runner.run_stage `check`): its
    manifest names this run's store (an edited manifest cannot redirect hp-pipe to another store: refused),
    and that store passes the cheap check."""

    def check(manifest: dict[str, Any]) -> list[str]:
        recorded = manifest.get("outputs", {}).get("store")
        if recorded != url:
            raise UserError(f"{manifest_file} names the store {recorded!r}, but this run's store is {url}: refused (an "
                            "edited manifest cannot redirect hp-pipe to another store). Rerun with --force")
        return store_problems(url)

    return check
