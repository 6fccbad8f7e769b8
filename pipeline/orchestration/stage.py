"""One stage of the graph, as data (pipeline/orchestration/graph.py assembles them; methods declare their own)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# a stage's body: (build, step, ctx) -> outputs. A callable, or "stages.<module>:<function>" for the generic stages
# of stages/, which the library never imports (only the executor resolves those names)
Body = Callable[..., dict[str, Any]] | str
Hook = Callable[..., Any] | str | None


@dataclass(frozen=True)
class Stage:
    """`level`: "dataset" (one manifest per dataset, named after the stage), "run" (one per run, `<stage>-<run>`)
    or "sub" (a run's sub-stage, `<stage>-<run>`)."""

    body: Body
    sections: tuple[str, ...] = ()  # config sections in its fingerprint
    inputs: tuple[str, ...] = ()  # stages run first whose fingerprints enter this one's
    after: tuple[str, ...] = ()  # stages run first whose settings enter through `sections` instead
    level: str = "dataset"
    check: Hook = None  # (config): a target's config checks, before the plan lists anything
    preflight: Hook = None  # (build, step): checks before any stage of the command runs
    then: Hook = None  # (build, step, manifest): after it ran or was found up to date
    once: bool = False  # reached by many commands of one process (tests, benches): "up to date" said the first time
    # (config, workdir, stores, listing) -> values beside its sections in its fingerprint (the store it writes, ...)
    extras: Callable[[dict, Path, dict[str, str], dict[str, list[str]] | None], dict[str, Any]] | None = None
