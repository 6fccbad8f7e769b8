"""Reading a feature store: checked on open, torch batches with a prefetch thread, dask arrays."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import dask.array as da
import numpy as np
import torch
import zarr

from cache.schema import SCHEMA_VERSION
from cache.writer import describe, finished_chunks, open_group
from pipeline.errors import UserError


class FeatureStore:
    """A finished feature store, opened read-only after checking it is what the caller expects."""

    def __init__(self, url: str, group: zarr.Group):
        self.url = url
        self.group = group
        self.attrs: dict[str, Any] = dict(group.attrs)

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
        if not attrs.get("complete"):
            done = finished_chunks(group)
            raise UserError(
                f"store {url} is incomplete ({int(done.sum())} of {done.size} chunks); "
                "rerun `hp-pipe features` to finish it"
            )
        for key, want in (expect or {}).items():
            if attrs.get(key) != want:
                raise UserError(
                    f"store {url} does not match this run: its {key} is {attrs.get(key)!r}, "
                    f"this run asks for {want!r} (the store holds {describe(attrs)}). "
                    "Rebuild it with `hp-pipe features` using this run's settings, or point --store at the right one."
                )
        return cls(url, group)

    def __len__(self) -> int:
        return self.group["feat"].shape[0]

    @property
    def random_init(self) -> bool:
        return bool(self.attrs.get("random_init"))

    @property
    def chunk_size(self) -> int:
        return int(self.attrs["chunk_size"])

    def array(self, name: str) -> zarr.Array:
        if name not in self.group:
            raise UserError(f"store {self.url} has no array '{name}' (it has: {', '.join(self.names())})")
        return self.group[name]

    def names(self) -> list[str]:
        return sorted(k for k in self.group.array_keys() if not k.startswith("_"))

    def dask(self, name: str) -> da.Array:
        """The array as a lazy dask array chunked like the store (for out-of-core work)."""
        return da.from_zarr(self.array(name))

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        return self.array(name)[start:stop]

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
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of torch tensors (plus "index"), read in whole chunks by a background thread.

        Without a seed the order is the store's. With one, the chunk order is shuffled and
        samples are shuffled within a buffer of `buffer_chunks` chunks: large sequential reads,
        a well-mixed order, and the same order for the same seed. `start_batch` skips that many
        batches without reading them (resuming mid-epoch). `keep` (bool per sample) leaves the
        other samples out (e.g. HCL's one crop per image and epoch); chunks are still read whole.
        """
        arrays = [self.array(n) for n in names]
        plan = batch_plan(len(self), self.chunk_size, batch_size, shuffle_seed, buffer_chunks, drop_last, keep)
        plan = skip_batches(plan, start_batch)  # also with 0: buffers without a batch travel with the next one
        return _prefetched(_read_batches(arrays, names, plan), prefetch)

    def gather(self, name: str, indices: Sequence[int]) -> np.ndarray:
        """Samples `indices` (any order, repeats allowed), decoding each chunk they touch once."""
        array = self.array(name)
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(indices), *array.shape[1:]), dtype=array.dtype)
        size = self.chunk_size
        for chunk in np.unique(indices // size):
            block = array.blocks[int(chunk)]
            hits = np.flatnonzero(indices // size == chunk)
            out[hits] = block[indices[hits] - chunk * size]
        return out


def skip_batches(plan: list[tuple[list[int], list[np.ndarray]]], n: int) -> list[tuple[list[int], list[np.ndarray]]]:
    """The plan without its first `n` batches; buffers left with no batch are not read at all.

    A batch may start with the previous buffer's leftovers, so the chunks of a buffer dropped
    whole travel with the next buffer that is kept.
    """
    out, dropped_chunks = [], []
    for chunks, batches in plan:
        k = min(n, len(batches))
        n -= k
        if batches[k:]:
            out.append((sorted(set(dropped_chunks) | set(chunks)), batches[k:]))
            dropped_chunks = []
        elif batches:  # its batches took the leftovers before it: only its own samples can be left over
            dropped_chunks = chunks
        else:  # a buffer without a batch passes all leftovers on, its own and those before it
            dropped_chunks = sorted(set(dropped_chunks) | set(chunks))
    return out


def batch_plan(
    n: int, chunk_size: int, batch_size: int, seed: int | None, buffer_chunks: int, drop_last: bool,
    keep: np.ndarray | None = None,
) -> list[tuple[list[int], np.ndarray]]:
    """[(chunks to read, sample indices of each batch within them)] — the data order, as plain data.

    `keep` (bool per sample): only those samples are batched; a chunk without one is not read. Without it the
    plan is exactly the one it always was (resumed runs depend on that).
    """
    if keep is not None:
        keep = np.asarray(keep, dtype=bool)
        if keep.shape != (n,):
            raise ValueError(f"keep has shape {keep.shape}, expected ({n},)")
    n_chunks = -(-n // chunk_size)
    buffer_chunks = max(buffer_chunks, -(-batch_size // chunk_size))  # a buffer holds >= one batch
    rng = np.random.default_rng(seed) if seed is not None else None
    chunk_order = rng.permutation(n_chunks) if rng is not None else np.arange(n_chunks)
    plan = []
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
        plan.append((chunks, batches))
    if len(carry) and not drop_last:
        plan[-1][1].append(carry)
    return plan


def _read_batches(arrays, names, plan) -> Iterator[dict[str, torch.Tensor]]:
    """Decode each planned chunk once; a batch may also use the previous buffer's leftovers (`skip_batches` has
    merged every buffer without a batch into the next one)."""
    size = arrays[0].chunks[0]
    previous: dict[int, dict[str, np.ndarray]] = {}
    for chunks, batches in plan:
        current = {c: {n: a.blocks[c] for n, a in zip(names, arrays, strict=True)} for c in chunks}
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
