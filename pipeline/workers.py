"""What the stages that run the frozen backbone share: the backbone loaded once per process, store chunks computed
locally with decode | compute | write overlapped, or on dask workers.

Both `features` (HP's store) and `features --method hcl` (HCL's own stores) split their work by store chunk; a
chunk is computed and written as a unit by one writer, then flagged done (cache/writer.py).
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Callable
from typing import Any

import torch

from pipeline.backbone import Backbone, load_backbone
from pipeline.dask_client import dask_client
from pipeline.config import Config
from pipeline.errors import UserError

RANDOM_INIT_WARNING = (
    "WARNING: random-initialized backbone (no DINO weights): these features are NOT DINO features; "
    "use them to test the pipeline, not to judge the method"
)


def resolve_backbone(config: Config, device: str = "cpu") -> Backbone:
    """The configured backbone, loaded once per process (both splits, every chunk a dask worker runs)."""
    f = config["features"]
    return _load(f["backbone"], f["weights"], device, f["trust_weights"])


@functools.lru_cache(maxsize=2)
def _load(name: str, weights: str, device: str, trust: bool) -> Backbone:
    """`weights = "auto"` falls back to random init, loudly."""
    if weights != "auto":
        backbone = load_backbone(name, weights, device, trust=trust)
    else:
        try:
            backbone = load_backbone(name, "pretrained", device)
        except UserError as exc:
            print(f"[features] {exc}\n[features] weights=auto: falling back to a random-initialized backbone")
            backbone = load_backbone(name, "random", device)
    if backbone.random_init:
        print(RANDOM_INIT_WARNING, flush=True)
    return backbone


def overlapped(pending: list[int], load: Callable[[int], Any], compute: Callable[[Any], tuple[int, dict]],
               write: Callable[[int, dict], None]) -> None:
    """`write(*compute(load(chunk)))` for every pending chunk: a loader thread decodes chunk i+1 and a writer thread
    writes chunk i-1 while the calling thread computes chunk i (the backbone keeps the cores).

    The first error (of any of the three) ends the run with that error once both threads have stopped; never a
    hang: after a failure the writer keeps draining and the loader is drained, so no thread blocks on a full queue.
    """
    loads: queue.Queue = queue.Queue(maxsize=2)
    writes: queue.Queue = queue.Queue(maxsize=2)
    errors: list[BaseException] = []

    def loader() -> None:
        torch.set_num_threads(1)  # OpenMP's limit is per thread: the backbone keeps every core
        try:
            for chunk in pending:
                if errors:  # the writer failed: stop decoding
                    break
                loads.put(load(chunk))
        except BaseException as exc:
            errors.append(exc)
        loads.put(None)

    def writer() -> None:
        while (item := writes.get()) is not None:
            if errors:
                continue  # after a failure keep draining (unwritten): the producer must never block on a full queue
            try:
                write(*item)
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=loader, daemon=True), threading.Thread(target=writer, daemon=True)]
    for t in threads:
        t.start()
    try:
        while (inputs := loads.get()) is not None and not errors:
            writes.put(compute(inputs))
    except BaseException as exc:  # the computation failed (or Ctrl-C): stop both threads, then raise it
        errors.insert(0, exc)
    writes.put(None)
    if errors:  # unblock the loader (it may wait on a full queue) so that both threads end here
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
