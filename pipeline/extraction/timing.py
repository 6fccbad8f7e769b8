"""Where a features run spends its time: wall and CPU seconds per part (decode, augment, forward, LHP, write, ...),
summed over every chunk this process computed.

The parts run in different threads (decode and views in the loader thread, the forward on the calling thread,
compression and writes in the writer thread), so their wall seconds overlap and may add up to more than the run;
the CPU seconds are each thread's own (`time.thread_time`), which is what a part costs whatever else shares the
cores. `hp-pipe bench features` resets these before the stage and prints them after it (benches/features.py).
Recording is a pair of clock reads per part and chunk: always on.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

_lock = threading.Lock()
_totals: dict[str, list[float]] = {}  # part -> [wall seconds, CPU seconds, calls]


@contextlib.contextmanager
def timed(part: str) -> Iterator[None]:
    """Add the wall and this thread's CPU seconds of the `with` body to `part` (also when it raises)."""
    wall, cpu = time.perf_counter(), time.thread_time()
    try:
        yield
    finally:
        add(part, time.perf_counter() - wall, time.thread_time() - cpu)


def add(part: str, wall: float, cpu: float = 0.0) -> None:
    with _lock:
        total = _totals.setdefault(part, [0.0, 0.0, 0])
        total[0] += wall
        total[1] += cpu
        total[2] += 1


def reset() -> None:
    """Forget every part (before the run to be measured)."""
    with _lock:
        _totals.clear()


def snapshot() -> dict[str, dict[str, float]]:
    """part -> {"wall_s", "cpu_s", "calls"} recorded since the last `reset`."""
    with _lock:
        return {part: {"wall_s": wall, "cpu_s": cpu, "calls": int(calls)}
                for part, (wall, cpu, calls) in _totals.items()}
