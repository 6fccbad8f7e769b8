"""One stage of the graph, as data (pipeline/orchestration/graph.py assembles them; methods declare their own), and
the registry through which the modules of stages/ implement the stages the library declares.

The library never imports stages/ (the command line is their entry point), so a stage declared here or in
graph.py holds no function of stages/: each stage module, when imported, registers its functions for the stages it
implements (`implement("train", body=body, preflight=preflight, then=then)` at its end, as timm's
`register_model`), and `stages/__init__.py` imports them all, so importing any of them implements the whole graph.
A method's own stage may hold its callables itself (STEGO's neighbour table).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Body = Callable[..., dict[str, Any]]  # (build, step, ctx) -> outputs
Hook = Callable[..., Any] | None


@dataclass(frozen=True)
class Stage:
    """`level`: "dataset" (one manifest per dataset, named after the stage), "run" (one per run, `<stage>-<run>`)
    or "sub" (a run's sub-stage, `<stage>-<run>`)."""

    body: Body | None = None  # None: implemented by a module of stages/ (`implement`)
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


# stage name -> the functions a module of stages/ registered for it ({"body": f, "then": g, ...})
IMPLEMENTATIONS: dict[str, dict[str, Callable[..., Any]]] = {}


def implement(*names: str, body: Body, check: Hook = None, preflight: Hook = None, then: Hook = None) -> None:
    """Register the functions of the stages `names` (a stage module calls this once per stage it implements)."""
    functions = {"body": body, "check": check, "preflight": preflight, "then": then}
    for name in names:
        IMPLEMENTATIONS[name] = {key: f for key, f in functions.items() if f is not None}


def implemented(name: str, stage: Stage) -> Stage:
    """`stage` with its functions: its own, or those stages/ registered for `name`."""
    if stage.body is not None:
        return stage
    if name not in IMPLEMENTATIONS:
        raise RuntimeError(f"stage {name!r} has no implementation: import the `stages` package first (the command "
                           "line and the benches do; it registers every stage module's functions)")
    return dataclasses.replace(stage, **IMPLEMENTATIONS[name])
