"""Store integrity (docs/cache.md, "Integrity"): every chunk can be checked, cheaply or in full.

Two layers, because they catch different faults:

- a `crc32c` checksum codec, the last bytes-to-bytes codec of every array, so every chunk object carries the
  CRC of its own encoded bytes: a truncated, emptied, overwritten or bit-flipped chunk fails to decode;
- a per-chunk record (`_records[c]`, written just before the chunk's `_done` flag): for every array, the size of
  the chunk object as stored and the crc32c of the chunk's *decoded values*. The size makes the cheap check
  possible (one stat per chunk object, no read: a COCO-scale store is over 100 GiB); the digest catches what
  the codec cannot: a chunk that is missing (zarr reads it as the fill value) or a valid chunk of another
  position copied over it. The digest is of the values rather than of the encoded bytes because the writer
  has the values in memory (no read-back), the reader checks exactly what it hands to training, and crc32c
  runs at about 10 GB/s, so the training read path pays next to nothing (sha256: under 1 GB/s here).
  crc32c is not a cryptographic hash: it guards against accidents, not against someone who can rewrite
  the records too.

`quick_check` is what `hp-pipe features` runs before calling a store up to date (objects present with their
recorded size); `verify_chunks` is `hp-pipe verify`'s full read; `mark_bad` records what verify found so
that the next `hp-pipe features` recomputes exactly those chunks.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import google_crc32c
import numpy as np
import zarr
from zarr.core.sync import sync

from cache.schema import DONE, RECORDS
from pipeline.errors import UserError

SIZE, DIGEST = 0, 1  # the two fields of a record, per array: _records[c, i] = (stored bytes, PRESENT | crc32c)
PRESENT = 1 << 32  # set in every digest written, so that a missing record (zeros) never passes for a crc of 0


def checksum_codec() -> zarr.codecs.Crc32cCodec:
    """The codec every array ends with: each chunk object carries the CRC of its encoded bytes."""
    return zarr.codecs.Crc32cCodec()


def digest(values: np.ndarray) -> int:
    """crc32c of an array's values as stored (C order, the array's dtype)."""
    view = np.ascontiguousarray(values).view()
    view.flags.writeable = False  # google_crc32c reads read-only buffers only
    return int(google_crc32c.value(view))


def chunk_key(array: zarr.Array, chunk: int) -> str:
    """The store key of chunk `chunk` (along the sample axis) of `array`."""
    return f"{array.store_path.path}/{array.metadata.encode_chunk_key((chunk,) + (0,) * (array.ndim - 1))}"


def stored_sizes(store: Any, keys: list[str]) -> list[int | None]:
    """Size in bytes of each key's object, None where there is none: plain stats on a local store (about 20 times
    faster than a coroutine per key), one concurrent round of requests on any other."""
    if isinstance(store, zarr.storage.LocalStore):
        sizes: list[int | None] = []
        root = str(store.root)
        for key in keys:
            try:
                sizes.append(os.stat(f"{root}/{key}").st_size)
            except FileNotFoundError:
                sizes.append(None)
        return sizes

    async def one(key: str) -> int | None:
        try:
            return int(await store.getsize(key))
        except (FileNotFoundError, KeyError):
            return None

    async def every() -> list[int | None]:
        return list(await asyncio.gather(*(one(k) for k in keys)))

    return sync(every()) if keys else []


def chunk_sizes(group: zarr.Group, name: str, chunks: Iterable[int]) -> list[int | None]:
    array = group[name]
    return stored_sizes(array.store_path.store, [chunk_key(array, c) for c in chunks])


def finished_chunks(group: zarr.Group, done_name: str = DONE) -> np.ndarray:
    """Boolean flags per chunk; a flag torn by a kill mid-write (its checksum fails) reads as unfinished."""
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


def read_records(group: zarr.Group) -> np.ndarray:
    """(chunks, arrays, 2) uint64: (stored bytes, digest) per chunk and array; zeros where a record is unreadable."""
    records = group[RECORDS]
    try:
        return np.asarray(records[:], dtype=np.uint64)
    except Exception:  # a torn record: read them one by one
        out = np.zeros(records.shape, dtype=np.uint64)
        for c in range(records.shape[0]):
            try:
                out[c] = records[c]
            except Exception:
                pass
        return out


def record_arrays(group: zarr.Group) -> list[str]:
    """The arrays a chunk record covers, in record order (the store's attribute)."""
    return list(group.attrs.get("record_arrays", []))


@dataclass(frozen=True)
class BadChunk:
    array: str
    chunk: int
    reason: str

    def __str__(self) -> str:
        return f"{self.array} chunk {self.chunk} ({self.reason})"


@dataclass
class StoreCheck:
    """What a check found: arrays missing, chunks bad, chunks not written yet, chunks verify had recorded bad."""

    url: str
    chunks: int = 0
    missing_arrays: list[str] = field(default_factory=list)
    bad: list[BadChunk] = field(default_factory=list)
    unfinished: list[int] = field(default_factory=list)
    recorded_bad: list[str] = field(default_factory=list)

    @property
    def bad_chunks(self) -> list[int]:
        return sorted({b.chunk for b in self.bad})

    @property
    def ok(self) -> bool:
        return not (self.missing_arrays or self.bad or self.unfinished or self.recorded_bad)

    def problems(self) -> list[str]:
        """One short phrase per kind of problem, for a log line."""
        out = []
        if self.missing_arrays:
            out.append(f"array {', '.join(self.missing_arrays)} missing")
        if self.bad:
            out.append(f"{len(self.bad_chunks)} bad chunk(s): {summarize(self.bad)}")
        if self.recorded_bad:
            out.append(f"`hp-pipe verify` recorded bad chunk(s): {', '.join(self.recorded_bad[:6])}"
                       + (" ..." if len(self.recorded_bad) > 6 else ""))
        elif self.unfinished:
            out.append(f"{len(self.unfinished)} of {self.chunks} chunks not written")
        return out


def summarize(bad: list[BadChunk], limit: int = 6) -> str:
    text = ", ".join(str(b) for b in bad[:limit])
    return text + (f" and {len(bad) - limit} more" if len(bad) > limit else "")


def expected_arrays(group: zarr.Group) -> list[str]:
    return [*record_arrays(group), DONE, RECORDS]


def quick_check(group: zarr.Group, url: str) -> StoreCheck:
    """The cheap check: every array there, every finished chunk's objects present with their recorded size.

    Reads the flags and records and stats each chunk object; reads no chunk data.
    """
    check = StoreCheck(url)
    present = set(group.array_keys())
    check.missing_arrays = [n for n in expected_arrays(group) if n not in present]
    check.recorded_bad = list(group.attrs.get("bad_chunks", []))
    if DONE in check.missing_arrays or RECORDS in check.missing_arrays:
        return check
    done = finished_chunks(group)
    check.chunks = int(done.size)
    check.unfinished = [int(c) for c in np.flatnonzero(~done)]
    records = read_records(group)
    finished = [int(c) for c in np.flatnonzero(done)]
    for i, name in enumerate(record_arrays(group)):
        if name in check.missing_arrays:
            continue
        for c, size in zip(finished, chunk_sizes(group, name, finished), strict=True):
            recorded = int(records[c, i, SIZE])
            if recorded == 0:
                check.bad.append(BadChunk(name, c, "no record"))
            elif size is None:
                check.bad.append(BadChunk(name, c, "chunk object missing"))
            elif size != recorded:
                check.bad.append(BadChunk(name, c, f"{size} B stored, {recorded} B recorded"))
    check.bad.sort(key=lambda b: (b.chunk, b.array))
    return check


def read_chunk(array: zarr.Array, chunk: int) -> np.ndarray:
    """Decode one chunk; a chunk that fails its checksum (or cannot be decoded at all) raises ChunkError."""
    try:
        return array.blocks[chunk]
    except OSError:
        raise  # the machine (disk, network), not the data: the caller's runtime failure
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "checksum" in first.lower():
            raise ChunkError("checksum mismatch: the chunk object is damaged") from exc
        raise ChunkError(f"cannot be decoded: {first[:120]}") from exc


class ChunkError(Exception):
    """A chunk that fails its checksum or its recorded digest; the reason, without the store's names."""


def check_values(values: np.ndarray, recorded: int) -> None:
    """`values` against the digest field of their record."""
    if not recorded & PRESENT:
        raise ChunkError("no record")
    if digest(values) != recorded & 0xFFFFFFFF:
        raise ChunkError("values differ from the recorded digest: a missing chunk object or another chunk's data")


def verify_chunks(group: zarr.Group, url: str, threads: int = 8, check: StoreCheck | None = None) -> StoreCheck:
    """The full read: the quick check, then every finished chunk of every array decoded (checksum) and its values
    compared with the recorded digest, `threads` chunks at a time."""
    check = check or quick_check(group, url)
    if DONE in check.missing_arrays or RECORDS in check.missing_arrays:
        return check
    records = read_records(group)
    names = record_arrays(group)
    arrays = {n: group[n] for n in names if n not in check.missing_arrays}
    known = {(b.array, b.chunk) for b in check.bad}
    unfinished = set(check.unfinished)

    def one(c: int) -> list[BadChunk]:
        found = []
        for i, name in enumerate(names):
            if name not in arrays or (name, c) in known:
                continue
            try:
                check_values(read_chunk(arrays[name], c), int(records[c, i, DIGEST]))
            except ChunkError as exc:
                found.append(BadChunk(name, c, str(exc)))
        return found

    todo = [c for c in range(check.chunks) if c not in unfinished]
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for found in pool.map(one, todo):
            check.bad.extend(found)
    check.bad.sort(key=lambda b: (b.chunk, b.array))
    return check


def mark_bad(group: zarr.Group, bad: list[BadChunk]) -> None:
    """Record what verify found: the chunks' done flags cleared (the next `features` recomputes exactly them),
    the list kept in the attributes for the messages, the store no longer complete."""
    done = group[DONE]
    for c in sorted({b.chunk for b in bad}):
        done[c] = False
    attrs = dict(group.attrs)
    attrs["bad_chunks"] = sorted(set(attrs.get("bad_chunks", [])) | {str(b) for b in bad})
    attrs["complete"] = False
    group.attrs.put(attrs)


class CorruptChunk(UserError):
    """A chunk met by the reader that fails its checksum or digest: one line naming array, chunk, store and fix."""

    def __init__(self, url: str, array: str, chunk: int, reason: str, kind: str | None = None):
        self.url, self.array, self.chunk, self.reason = url, array, chunk, reason
        advice = repair_advice(url, kind)
        super().__init__(f"store {url}: array '{array}' chunk {chunk} is damaged ({reason}); {advice}")


def repair_advice(url: str, kind: str | None = None) -> str:
    """What to run after a bad chunk: verify records it, the stage that wrote the store recomputes it."""
    if kind == "codes":  # head codes are written by evaluate's codes stage
        return f"run `hp-pipe verify --store {url}`, then `hp-pipe evaluate --force` for its run to rewrite the codes"
    return (f"run `hp-pipe verify --store {url}`, then `hp-pipe features` (same options as when the store was built) "
            "to recompute the bad chunks")
