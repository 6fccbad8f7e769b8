"""Reading a feature store: checked on open, torch batches with a prefetch thread, dask arrays.

Every chunk read is checked (cache/integrity.py): its checksum codec on decoding, its values against the
digest recorded when it was written. A chunk that fails stops the reader with one line naming the array,
the chunk, the store and the fix (`CorruptChunk`), never a codec traceback or silently wrong data.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dask.array as da
import numpy as np
import torch
import zarr

from cache.integrity import (
    DIGEST,
    ChunkError,
    CorruptChunk,
    check_values,
    read_chunk,
    read_records,
    record_arrays,
)
from cache.schema import FEATURE_DTYPES, QUANTIZED, RECORDS, SCHEMA_VERSION, scale_array
from cache.writer import describe, finished_chunks, open_group
from pipeline.errors import UserError

# Chunk decoding runs in this many threads by default (docs/cache.md, "Read path"): blosc and crc32c release the
# GIL, so reads scale with cores; more than 8 rarely pays for a training reader that shares the cores with torch.
DEFAULT_READ_THREADS = max(1, min(8, os.cpu_count() or 1))


class FeatureStore:
    """A finished feature store, opened read-only after checking it is what the caller expects."""

    def __init__(self, url: str, group: zarr.Group):
        self.url = url
        self.group = group
        self.attrs: dict[str, Any] = dict(group.attrs)
        self._digests: dict[str, np.ndarray] | None = None  # name -> recorded digest per chunk, read on first use
        self._arrays: dict[str, zarr.Array] = {}
        # int8 stores (docs/cache.md, "Compact cache"): these arrays are decoded back to float16 in read_chunk
        self.quantized = ({n for n in QUANTIZED if scale_array(n) in record_arrays(group)}
                          if self.attrs.get("feature_dtype") == "int8" else set())

    @classmethod
    def open(cls, url: str, expect: dict[str, Any] | None = None) -> FeatureStore:
        """Open `url`, refusing a store of another schema, identity or fingerprint with the reason."""
        group = open_group(url, mode="r")
        if group is None:
            raise UserError(f"no feature store at {url}; run `hp-pipe features` for this dataset and split first")
        attrs = dict(group.attrs)
        if attrs.get("schema_version") != SCHEMA_VERSION:
            raise UserError(
                f"store {url} has schema version {attrs.get('schema_version')}, this hp-pipe reads "
                f"{SCHEMA_VERSION}; rebuild it with `hp-pipe features --force`"
            )
        if attrs.get("bad_chunks"):
            bad = attrs["bad_chunks"]
            fix = ("rerun `hp-pipe evaluate --force` for its run to rewrite the codes" if attrs.get("kind") == "codes"
                   else "run `hp-pipe features` (same options as when the store was built) to recompute them")
            raise UserError(f"store {url} has {len(bad)} damaged chunk(s) found by `hp-pipe verify` "
                            f"({', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}); {fix}")
        if not attrs.get("complete"):
            done = finished_chunks(group)
            raise UserError(
                f"store {url} is incomplete ({int(done.sum())} of {done.size} chunks); "
                "rerun `hp-pipe features` to finish it"
            )
        if attrs.get("feature_dtype", "float16") not in FEATURE_DTYPES:
            raise UserError(f"store {url} holds its features as {attrs.get('feature_dtype')!r}, this hp-pipe "
                            f"reads {' or '.join(FEATURE_DTYPES)}; rebuild it with `hp-pipe features --force`")
        for key, want in (expect or {}).items():
            if attrs.get(key) != want:
                raise UserError(
                    f"store {url} does not match this run: its {key} is {attrs.get(key)!r}, "
                    f"this run asks for {want!r} (the store holds {describe(attrs)}). "
                    "Rebuild it with `hp-pipe features` using this run's settings, or point --store at the right one."
                )
        return cls(url, group)

    def __len__(self) -> int:
        return self.array("feat").shape[0]

    @property
    def random_init(self) -> bool:
        return bool(self.attrs.get("random_init"))

    @property
    def chunk_size(self) -> int:
        return int(self.attrs["chunk_size"])

    def array(self, name: str) -> zarr.Array:
        """The zarr array `name`, opened once (every chunk read goes through here)."""
        if name in self._arrays:
            return self._arrays[name]
        if name not in self.group:
            fix = (" (deleted?): run `hp-pipe features` (same options as when the store was built) to recompute it"
                   if name in record_arrays(self.group) else "")
            raise UserError(f"store {self.url} has no array '{name}' (it has: {', '.join(self.names())}){fix}")
        self._arrays[name] = self.group[name]
        return self._arrays[name]

    def digests(self) -> dict[str, np.ndarray]:
        """name -> the digest recorded for each chunk (one read of the records, on first use)."""
        if self._digests is None:
            if RECORDS not in self.group:
                raise UserError(f"store {self.url} has no chunk records ('{RECORDS}' is missing), so its chunks cannot "
                                "be checked: run `hp-pipe features` (same options as when the store was built) to "
                                "recompute them")
            records = read_records(self.group)
            self._digests = {name: records[:, i, DIGEST] for i, name in enumerate(record_arrays(self.group))}
        return self._digests

    def dtype(self, name: str) -> np.dtype:
        """What reads of `name` return: float16 for an int8 array with scales, else the array's own dtype."""
        return np.dtype(np.float16) if name in self.quantized else self.array(name).dtype

    def read_chunk(self, name: str, chunk: int) -> np.ndarray:
        """Chunk `chunk` of array `name`, decoded and checked against its checksum and recorded digest.

        The one place arrays are decoded: an int8 array is handed back as float16 q·s (cache/quant.py) from its
        chunk and its scales' chunk, each checked; every other array exactly as stored.
        """
        if name in self.quantized:
            return dequantize_f16(self._stored_chunk(name, chunk), self._stored_chunk(scale_array(name), chunk))
        return self._stored_chunk(name, chunk)

    def _stored_chunk(self, name: str, chunk: int) -> np.ndarray:
        array = self.array(name)
        recorded = self.digests().get(name)
        try:
            if recorded is None:
                raise ChunkError("no record")
            values = read_chunk(array, chunk)
            check_values(values, int(recorded[chunk]))
        except ChunkError as exc:
            raise CorruptChunk(self.url, name, chunk, str(exc), self.attrs.get("kind")) from None
        return values

    def names(self) -> list[str]:
        return sorted(k for k in self.group.array_keys() if not k.startswith("_"))

    def dask(self, name: str) -> da.Array:
        """The array as a lazy dask array chunked like the store (for out-of-core work)."""
        import dask

        array, size = self.array(name), self.chunk_size
        blocks = [da.from_delayed(dask.delayed(self.read_chunk)(name, c), (min(size, len(self) - c * size),
                                  *array.shape[1:]), self.dtype(name)) for c in range(array.cdata_shape[0])]
        return da.concatenate(blocks, axis=0)

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Samples [start, stop) of `name`, read chunk by chunk (each checked)."""
        start, stop = max(0, start), min(stop, len(self))
        size, array = self.chunk_size, self.array(name)
        parts = [self.read_chunk(name, c)[max(start - c * size, 0) : stop - c * size]
                 for c in range(start // size, -(-stop // size))]
        return np.concatenate(parts) if parts else np.empty((0, *array.shape[1:]), self.dtype(name))

    def batches(
        self,
        names: Sequence[str],
        batch_size: int,
        shuffle_seed: int | None = None,
        buffer_chunks: int = 8,
        prefetch: int = 2,
        drop_last: bool = False,
        start_batch: int = 0,
        keep: np.ndarray | None = None,
        threads: int | None = None,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of torch tensors (plus "index"), read in whole chunks by a background thread.

        Without a seed the order is the store's. With one, the chunk order is shuffled and
        samples are shuffled within a buffer of `buffer_chunks` chunks: large sequential reads,
        a well-mixed order, and the same order for the same seed. `start_batch` skips that many
        batches without reading them (resuming mid-epoch). `keep` (bool per sample) leaves the
        other samples out (e.g. HCL's one crop per image and epoch); chunks are still read whole.
        `threads` (default DEFAULT_READ_THREADS) decode a buffer's chunks in parallel; the batches are the same
        bytes in the same order whatever the number.
        """
        for n in names:
            self.array(n)  # a missing array or records: refused here, not in the prefetch thread
            if n in self.quantized:
                self.array(scale_array(n))
        self.digests()
        plan = iter_batch_plan(len(self), self.chunk_size, batch_size, shuffle_seed, buffer_chunks, drop_last, keep)
        plan = iter_skip_batches(plan, start_batch)  # also with 0: buffers without a batch travel with the next one
        threads = DEFAULT_READ_THREADS if threads is None else max(1, int(threads))
        return _prefetched(_read_batches(self.read_chunk, self.chunk_size, names, plan, threads), prefetch)

    def read_chunks(self, jobs: Iterable[tuple[str, int]], threads: int | None = None) -> list[np.ndarray]:
        """`read_chunk(name, chunk)` for every (name, chunk) of `jobs`, in that order, `threads` at a time."""
        return list(_decode_map(self.read_chunk, list(jobs),
                                DEFAULT_READ_THREADS if threads is None else max(1, int(threads))))

    def sample_chunks(self, name: str, n: int, rng: np.random.Generator,
                      patches: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(indices, values) of `n` random samples of `name`, reading ceil(n / chunk_size) random whole chunks.

        Pool renewal (docs/hp.md §4) without reading the store at large: a training store holds its crops in a
        seeded random permutation (cache/order.py), so a few random whole chunks are a uniformly random set of
        crops, and a renewal decodes O(n) samples whatever the store's size. The samples are distinct while the
        store holds at least `n`; a smaller store is read whole and sampled with replacement. One more chunk is
        read only when the store's short last chunk was among those drawn and they hold fewer than `n` samples.
        `patches`: keep only patch `patches[i]` (flat over the grid) of the i-th sample (see `gather`).
        """
        size, total = self.chunk_size, len(self)
        if n <= 0:
            return np.empty(0, np.int64), np.empty((0, *self.array(name).shape[1:]), self.dtype(name))
        n_chunks = -(-total // size)
        order = rng.permutation(n_chunks)
        take = min(-(-n // size), n_chunks)
        if take < n_chunks and sum(min(size, total - int(c) * size) for c in order[:take]) < n:
            take += 1  # the short last chunk was drawn
        chunks = np.sort(order[:take])
        held = np.concatenate([np.arange(c * size, min((c + 1) * size, total)) for c in chunks])
        indices = held[np.sort(rng.choice(len(held), n, replace=len(held) < n))]
        return indices, self.gather(name, indices, patches)  # only those chunks, a few at a time

    def gather(self, name: str, indices: Sequence[int], patches: np.ndarray | None = None) -> np.ndarray:
        """Samples `indices` (any order, repeats allowed), decoding each chunk they touch once. With `patches`
        ((len(indices),) flat positions over an (h, w, C) grid) only patch `patches[i]` of sample i is kept,
        (len(indices), C): a pool renewal then holds 2,048 patches, not 2,048 whole crops (300 MB at ViT-S/16,
        whose fresh allocation at every renewal stalled on page compaction here)."""
        array = self.array(name)
        indices = np.asarray(indices, dtype=np.int64)
        shape = array.shape[1:] if patches is None else array.shape[-1:]
        out = np.empty((len(indices), *shape), dtype=self.dtype(name))
        size = self.chunk_size
        chunks = np.unique(indices // size)
        step = 2 * DEFAULT_READ_THREADS  # chunks decoded at a time: bounded memory, parallel decoding
        for group in (chunks[i:i + step] for i in range(0, len(chunks), step)):
            for chunk, block in zip(group, self.read_chunks([(name, int(c)) for c in group]), strict=True):
                hits = np.flatnonzero(indices // size == chunk)
                rows = indices[hits] - chunk * size
                if patches is None:
                    out[hits] = block[rows]
                else:  # (rows, h, w, C) seen as (rows, h·w, C)
                    out[hits] = block.reshape(len(block), -1, block.shape[-1])[rows, patches[hits]]
        return out


def dequantize_f16(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """cache.quant.dequantize rounded to float16, in numpy: the product is exact in float32 (8 x 11 bits), so this
    is that float32 q·s rounded once. numpy, not torch: a reader thread must not wake torch's intra-op pool while
    training uses it (on a busy CPU that made reads 20x slower here)."""
    out = np.empty(q.shape, np.float16)
    np.multiply(q, scale.astype(np.float32)[..., None], out=out, casting="unsafe")  # float32 loop, cast once
    return out


Plan = Iterable[tuple[list[int], list[np.ndarray]]]  # (chunks to read, sample indices of each batch), per buffer


def skip_batches(plan: Plan, n: int) -> list[tuple[list[int], list[np.ndarray]]]:
    """The plan without its first `n` batches; buffers left with no batch are not read at all.

    A batch may start with the previous buffer's leftovers, so the chunks of a buffer dropped
    whole travel with the next buffer that is kept.
    """
    return list(iter_skip_batches(plan, n))


def iter_skip_batches(plan: Plan, n: int) -> Iterator[tuple[list[int], list[np.ndarray]]]:
    """`skip_batches`, one buffer at a time: what `batches` reads, so that an epoch starts without walking the
    whole plan (a 500k-crop store has 4k buffers)."""
    dropped_chunks: list[int] = []
    for chunks, batches in plan:
        k = min(n, len(batches))
        n -= k
        if batches[k:]:
            yield sorted(set(dropped_chunks) | set(chunks)), batches[k:]
            dropped_chunks = []
        elif batches:  # its batches took the leftovers before it: only its own samples can be left over
            dropped_chunks = chunks
        else:  # a buffer without a batch passes all leftovers on, its own and those before it
            dropped_chunks = sorted(set(dropped_chunks) | set(chunks))


def batch_plan(
    n: int, chunk_size: int, batch_size: int, seed: int | None, buffer_chunks: int, drop_last: bool,
    keep: np.ndarray | None = None,
) -> list[tuple[list[int], list[np.ndarray]]]:
    """[(chunks to read, sample indices of each batch within them)] — the data order, as plain data.

    `keep` (bool per sample): only those samples are batched; a chunk without one is not read. Without it the
    plan is exactly the one it always was (resumed runs depend on that).
    """
    return list(iter_batch_plan(n, chunk_size, batch_size, seed, buffer_chunks, drop_last, keep))


def iter_batch_plan(
    n: int, chunk_size: int, batch_size: int, seed: int | None, buffer_chunks: int, drop_last: bool,
    keep: np.ndarray | None = None,
) -> Iterator[tuple[list[int], list[np.ndarray]]]:
    """`batch_plan`, one buffer at a time, each made when it is asked for: the same random draws in the same
    order, so the same plan, but an epoch's first batch no longer waits for the whole plan (O(store): a second
    at 500k crops here). Only the chunk order, one int per chunk, is drawn up front, with the arguments checked
    at the call, not at the first batch."""
    if keep is not None:
        keep = np.array(keep, dtype=bool)  # a copy: the caller may change its array while this plan is read
        if keep.shape != (n,):
            raise ValueError(f"keep has shape {keep.shape}, expected ({n},)")
    n_chunks = -(-n // chunk_size)
    buffer_chunks = max(buffer_chunks, -(-batch_size // chunk_size))  # a buffer holds >= one batch
    rng = np.random.default_rng(seed) if seed is not None else None
    chunk_order = rng.permutation(n_chunks) if rng is not None else np.arange(n_chunks)
    return _buffers(n, chunk_size, batch_size, rng, chunk_order, buffer_chunks, drop_last, keep)


def _buffers(n: int, chunk_size: int, batch_size: int, rng: np.random.Generator | None, chunk_order: np.ndarray,
             buffer_chunks: int, drop_last: bool, keep: np.ndarray | None,
             ) -> Iterator[tuple[list[int], list[np.ndarray]]]:
    """The buffers of `iter_batch_plan`, the rest of its draws from `rng` made as each buffer is made."""
    n_chunks = len(chunk_order)
    carry = np.empty(0, dtype=np.int64)
    for b in range(0, n_chunks, buffer_chunks):
        chunks = sorted(int(c) for c in chunk_order[b : b + buffer_chunks])
        idx = np.concatenate([np.arange(c * chunk_size, min((c + 1) * chunk_size, n)) for c in chunks])
        if keep is not None:
            idx = idx[keep[idx]]
            chunks = sorted({int(c) for c in idx // chunk_size})  # chunks without a kept sample are never read
        if rng is not None:
            idx = rng.permutation(idx)
        idx = np.concatenate([carry, idx])
        full = len(idx) // batch_size * batch_size
        batches = [idx[i : i + batch_size] for i in range(0, full, batch_size)]
        carry = idx[full:]
        if b + buffer_chunks >= n_chunks and len(carry) and not drop_last:  # the last buffer
            batches.append(carry)
        yield chunks, batches


def _decode_map(read_chunk: Callable[[str, int], np.ndarray], jobs: list[tuple[str, int]], threads: int,
                pool: ThreadPoolExecutor | None = None) -> Iterator[np.ndarray]:
    """read_chunk(name, chunk) of each job, in the jobs' order; in `threads` threads when there are several
    (blosc and crc32c release the GIL). The first failing job in that order raises, as a plain loop would."""
    if threads <= 1 or len(jobs) <= 1:
        return (read_chunk(name, c) for name, c in jobs)
    if pool is not None:
        return pool.map(lambda job: read_chunk(*job), jobs)
    with ThreadPoolExecutor(min(threads, len(jobs))) as own:
        return iter(list(own.map(lambda job: read_chunk(*job), jobs)))


def _read_batches(read_chunk: Callable[[str, int], np.ndarray], size: int, names: Sequence[str],
                  plan, threads: int = 1) -> Iterator[dict[str, torch.Tensor]]:
    """Decode (and check) each planned chunk once, a buffer's chunks `threads` at a time; a batch may also use the
    previous buffer's leftovers (`skip_batches` has merged every buffer without a batch into the next one)."""
    pool = ThreadPoolExecutor(threads, thread_name_prefix="chunk-decode") if threads > 1 else None
    try:
        yield from _batches_of(read_chunk, size, names, plan, threads, pool)
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def _batches_of(read_chunk, size: int, names: Sequence[str], plan, threads: int,
                pool: ThreadPoolExecutor | None) -> Iterator[dict[str, torch.Tensor]]:
    previous: dict[int, dict[str, np.ndarray]] = {}
    for chunks, batches in plan:
        jobs = [(n, c) for c in chunks for n in names]
        values = iter(_decode_map(read_chunk, jobs, threads, pool))
        current = {c: {n: next(values) for n in names} for c in chunks}
        available = {**previous, **current}
        for idx in batches:
            out = {n: torch.from_numpy(np.stack([available[i // size][n][i % size] for i in idx])) for n in names}
            out["index"] = torch.from_numpy(np.asarray(idx))
            yield out
        previous = current


def _prefetched(iterator: Iterator[Any], depth: int) -> Iterator[Any]:
    """Run `iterator` in a daemon thread, `depth` items ahead of the consumer."""
    if depth <= 0:
        yield from iterator
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    sentinel = object()

    def work() -> None:
        try:
            for item in iterator:
                q.put(item)
        except BaseException as exc:  # handed to the consumer, raised there
            q.put(exc)
        q.put(sentinel)

    threading.Thread(target=work, daemon=True).start()
    while (item := q.get()) is not sentinel:
        if isinstance(item, BaseException):
            raise item
        yield item
