"""What the stages that run the frozen backbone share: the backbone loaded once per process on `features.device`
(autocast under `features.amp`), store chunks computed locally with decode (a DataLoader of `features.workers`
processes) | compute (forwards of `features.batch_size` crops) | write overlapped, or on dask workers.

Both `features` (HP's store) and `features --method hcl` (HCL's own stores) split their work by store chunk; a
chunk is computed and written as a unit by one writer, then flagged done (cache/writer.py).
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.utils.data

from pipeline import precision
from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.extraction import timing
from pipeline.extraction.backbone import Backbone, load_backbone
from pipeline.log import log
from pipeline.orchestration.dask_client import dask_client

RANDOM_INIT_WARNING = (
    "WARNING: random-initialized backbone (no DINO weights): these features are NOT DINO features; "
    "use them to test the pipeline, not to judge the method"
)


def resolve_backbone(config: Config, device: str = "cpu", amp: bool = False) -> Backbone:
    """The configured backbone, loaded once per process and (device, amp) (both splits, every chunk a dask
    worker runs). The feature stages pass `feature_device(config)` and `feature_amp(config)`; other callers get
    the CPU without autocast, as before."""
    f = config["features"]
    return _load(f["backbone"], f["weights"], str(device), f["trust_weights"], bool(amp))


def feature_device(config: Config) -> torch.device:
    """`features.device`: auto -> cuda when available, else cpu; cpu | cuda | cuda:N as given (a CUDA device this
    machine lacks is refused with the fix, never a CUDA traceback deep in the forward)."""
    name = str(config["features"].get("device", "auto"))
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise UserError(f"features.device = {name!r}, but this machine has "
                            f"{count or 'no'} CUDA device{'s' if count != 1 else ''}; "
                            "use --set features.device=auto (or cpu)")
    return device


def feature_amp(config: Config, device: torch.device | None = None) -> bool:
    """`features.amp`: true | false | auto (on for CUDA and for CPUs with native bf16, pipeline/precision.py; off on
    other CPUs, where emulated bf16 is slower than fp32 and the store stays exact fp32)."""
    device = device if device is not None else feature_device(config)
    return precision.extraction_autocast(config["features"].get("amp", "auto"), device.type) is not None


def extraction_numerics(config: Config) -> str:
    """What the stored values depend on beyond the weights: the forward's autocast dtype ("float32" without amp).

    Read by the stage fingerprint (pipeline/orchestration/graph.py) instead of the literal `features.amp`, so that
    `amp = "auto"` run on a GPU or a bf16 CPU (bf16) and on another CPU (fp32) are told apart. Never raises: a CUDA
    device this machine lacks is assumed to have bf16 (the stage itself then refuses the device)."""
    f = config["features"]
    return precision.dtype_name(precision.extraction_autocast(f.get("amp", "auto"),
                                                              precision.device_type(f.get("device", "auto"))))


def feature_backbone(config: Config) -> Backbone:
    """The feature stages' backbone: on `features.device`, autocast under `features.amp`, once per process."""
    device = feature_device(config)
    return resolve_backbone(config, str(device), feature_amp(config, device))


def feature_batch_size(config: Config) -> int:
    """Images per backbone forward (`features.batch_size`, 0: one chunk)."""
    f = config["features"]
    return int(f.get("batch_size", 0)) or int(f["chunk_size"])


def extraction_attrs(backbone: Backbone, config: Config) -> dict[str, Any]:
    """What a store records of how it was computed: device, the forward's dtype, amp, batch and decode workers."""
    dtype = backbone.autocast_dtype
    return {"device": str(backbone.device), "amp": dtype is not None,
            "dtype": str(dtype or torch.float32).removeprefix("torch."),
            "batch_size": feature_batch_size(config), "workers": int(config["features"].get("workers", 0))}


@functools.lru_cache(maxsize=2)
def _load(name: str, weights: str, device: str, trust: bool, amp: bool = False) -> Backbone:
    """`weights = "auto"` falls back to random init, loudly."""
    if weights != "auto":
        backbone = load_backbone(name, weights, device, amp=amp, trust=trust)
    else:
        try:
            backbone = load_backbone(name, "pretrained", device, amp=amp)
        except UserError as exc:
            log.info(f"[features] {exc}\n[features] weights=auto: falling back to a random-initialized backbone")
            backbone = load_backbone(name, "random", device, amp=amp)
    if backbone.random_init:
        log.info(RANDOM_INIT_WARNING)
    return backbone


def in_batches(compute: Callable[[int, int], dict[str, np.ndarray]], n: int, batch_size: int) -> dict[str, np.ndarray]:
    """`compute(start, stop)` over slices of at most `batch_size` samples, outputs joined along the sample axis:
    one forward per device batch whatever the chunk size."""
    parts = [compute(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    if len(parts) == 1:
        return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def split_samples(data: dict[str, np.ndarray], lengths: list[int]) -> list[dict[str, np.ndarray]]:
    """The inverse of joining chunks: consecutive slices of every array (sample axis first)."""
    bounds = np.cumsum([0, *lengths])
    return [{k: v[a:b] for k, v in data.items()} for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


class _Pending(torch.utils.data.Dataset):
    """The pending chunks as a map-style dataset: item i is `load(pending[i])`, decoded in a DataLoader worker."""

    def __init__(self, pending: list[int], load: Callable[[int], Any]):
        self.pending, self.load = pending, load

    def __len__(self) -> int:
        return len(self.pending)

    def __getitem__(self, i: int) -> Any:
        return self.load(self.pending[i])


def _as_is(item: Any) -> Any:
    return item  # no collation: an item is a whole chunk already (numpy arrays stay numpy)


def chunk_loader(pending: list[int], load: Callable[[int], Any], workers: int = 0,
                 pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """Decode + views of the pending chunks, in order, in `workers` processes (0: in the calling thread).

    Everything random in a chunk is seeded by its samples, never by the worker, so the items are the same for any
    number of workers (tested bit for bit)."""
    return torch.utils.data.DataLoader(
        _Pending(pending, load), batch_size=None, shuffle=False, num_workers=workers, collate_fn=_as_is,
        pin_memory=pin_memory, prefetch_factor=2 if workers else None)


def _load_groups(pending: list[int], load: Callable[[int], Any], workers: int, pin_memory: bool, group: int,
                 loads: queue.Queue, errors: list[BaseException]) -> None:
    """`overlapped`'s loader thread: groups of `group` loaded chunks onto `loads`, then None (always, even after an
    error, which it records)."""
    torch.set_num_threads(1)  # OpenMP's limit is per thread: the backbone keeps every core
    try:
        batch: list[Any] = []
        for item in chunk_loader(pending, load, workers, pin_memory):
            if errors:  # the writer failed: stop decoding
                break
            batch.append(item)
            if len(batch) == group:
                loads.put(batch)
                batch = []
        if batch and not errors:
            loads.put(batch)
    except BaseException as exc:
        errors.append(exc)
    loads.put(None)


def overlapped(pending: list[int], load: Callable[[int], Any],
               compute: Callable[[list[Any]], list[tuple[int, dict]]], write: Callable[[int, dict], None],
               workers: int = 0, pin_memory: bool = False, group: int = 1) -> None:
    """`write(chunk, data)` for every `(chunk, data)` of `compute([load(c) for c in group of pending])`: a loader
    thread decodes the next chunks (through `chunk_loader`, in `workers` processes) and a writer thread writes the
    previous ones while the calling thread computes (the backbone keeps the cores, or the GPU).

    `group` consecutive chunks are handed to one `compute` call (one device batch spanning several chunks); every
    chunk is still written whole, by one writer.

    The first error (of any of the three) ends the run with that error once both threads have stopped; never a
    hang: after a failure the writer keeps draining and the loader is drained, so no thread blocks on a full queue.
    """
    loads: queue.Queue = queue.Queue(maxsize=2)
    writes: queue.Queue = queue.Queue(maxsize=2)
    errors: list[BaseException] = []

    def writer() -> None:
        while (items := writes.get()) is not None:
            if errors:
                continue  # after a failure keep draining (unwritten): the producer must never block on a full queue
            try:
                for item in items:
                    with timing.timed("write"):  # encode (compression, digests) and store
                        write(*item)
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=_load_groups, args=(pending, load, workers, pin_memory, group, loads, errors),
                                daemon=True), threading.Thread(target=writer, daemon=True)]
    for t in threads:
        t.start()
    loader_done = False  # the loader's final None has been taken off the queue
    try:
        while not errors:
            with timing.timed("wait_decode"):  # the loader is behind: the compute waits for inputs
                inputs = loads.get()
            if inputs is None:
                loader_done = True
                break
            outputs = compute(inputs)
            with timing.timed("wait_write"):  # the writer is behind: its queue is full
                writes.put(outputs)
    except BaseException as exc:  # the computation failed (or Ctrl-C): stop both threads, then raise it
        errors.insert(0, exc)
    writes.put(None)
    if not loader_done:  # unblock the loader (it may wait on a full queue) so that both threads end here
        while loads.get() is not None:
            pass
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def run_dask(task: Callable[..., int], args: tuple, pending: list[int], progress, address: str | None,
             workers: int) -> None:
    """`task(*args, chunk)` for every pending chunk on dask workers; each returns the samples it wrote."""
    from dask.distributed import as_completed

    with dask_client(address, workers) as client:
        futures = [client.submit(task, *args, c, pure=False) for c in pending]
        for future in as_completed(futures):
            progress.update(future.result())


SCHEDULERS = ("local", "local-cluster", "distributed")


def fill_chunks(group: Any, url: str, options: dict[str, Any], local: Callable[[list[int], Any], None],
                task: Callable[..., int], args: tuple, progress: dict[str, Any],
                log: Callable[[str], None] | None = None) -> tuple[int, float]:
    """Compute every chunk of a store not yet done (cache/writer.py `fill_store`: resumable, then flagged complete)
    under `options["scheduler"]`: `local(pending, progress_bar)` in this process, or `task(*args, chunk)` on dask
    workers (local-cluster: `options["workers"]` of them; distributed: the scheduler at `options["address"]`).
    `progress`: the tqdm bar's settings (total, desc, unit, ...). Returns (samples found done, seconds)."""
    import time

    from tqdm import tqdm

    from cache import writer

    scheduler = options.get("scheduler", "local")
    if scheduler not in SCHEDULERS:
        raise UserError(f"--scheduler must be local, local-cluster or distributed, got '{scheduler}'")

    def compute(pending: list[int], finished: int) -> None:
        with tqdm(initial=finished, **progress) as bar:
            if scheduler == "local":
                local(pending, bar)
            else:
                run_dask(task, args, pending, bar, options.get("address") if scheduler == "distributed" else None,
                         options.get("workers", 2))

    t0 = time.perf_counter()
    finished = writer.fill_store(group, url, compute, log)
    return finished, time.perf_counter() - t0
