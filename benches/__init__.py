"""`hp-pipe bench …`: the benchmarks, side by side in one run (features, train, hcl, order, planted).

Outside the library: importing `pipeline` never imports this package; the CLI imports it when a bench runs. A bench
runs stages through `pipeline.orchestration.graph.build`, never a stage module's function: this package imports the
`stages` package once, so that every stage module has registered its functions (pipeline/orchestration/stage.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import stages  # noqa: F401  (the stage modules implement the graph's stages)
from pipeline.errors import UserError
from pipeline.methods.registry import REGISTERED, names


def train_bench(method: str, amp: str = "off") -> Callable[..., None]:
    """`bench train --method M --amp A`: cache vs live training of a registered method, one signature for all:
    (images, resolution, backbone, weights, batch_size, iterations, pool_size, renew_interval, repeats, workdir,
    as_json); a method reads the options it has. A bench whose `train` takes `amp` gets it; one that does not runs
    fp32, and asking it for autocast where it would apply is refused rather than ignored."""
    import functools
    import inspect

    from pipeline.precision import training_autocast

    bench = _train_bench(method)
    if "amp" in inspect.signature(bench).parameters:
        return functools.partial(bench, amp=amp)
    if training_autocast({"on": True, "off": False}.get(amp, amp), "cpu") is not None:
        raise UserError(f"bench train --method {method} times its cache side in fp32 only; use --amp off")
    return bench


def _train_bench(method: str) -> Callable[..., None]:
    from benches import hcl, train

    def hcl_bench(images: int, resolution: int, backbone: str, weights: str, batch_size: int, iterations: int,
                  pool_size: int, renew_interval: int, repeats: int, workdir: Path, as_json: bool) -> None:
        hcl.train(images, resolution, backbone, weights, batch_size, iterations, repeats, workdir, as_json)

    benches = {"hp": train.train, "hcl": hcl_bench}
    if method not in benches:  # a method's own bench, beside its package (pipeline/methods/<name>/bench.py)
        own = method_bench(method)
        if own is None:
            with_own = [n for n in names() if n in benches or method_bench(n) is not None]
            raise UserError(f"bench train has no bench for method '{method}' (benches: {', '.join(with_own)})")
        return own
    return benches[method]


def method_bench(method: str) -> Callable[..., None] | None:
    """`train` of the bench module beside a registered method's package, None when it has none. Only a missing
    bench module means none: an import error inside one is raised, not taken for its absence."""
    import importlib
    import importlib.util

    where = REGISTERED.get(method)
    if where is None:
        return None
    module = where.partition(":")[0].rpartition(".")[0] + ".bench"  # "pipeline.methods.stego.method" -> ".bench"
    return importlib.import_module(module).train if importlib.util.find_spec(module) else None
