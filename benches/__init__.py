"""`hp-pipe bench …`: the benchmarks, side by side in one run (features, train, hcl, order, planted).

Outside the library: importing `pipeline` never imports this package; the CLI imports it when a bench runs. A bench
runs stages through `pipeline.orchestration.graph.build`, never by importing `stages`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pipeline.errors import UserError


def train_bench(method: str) -> Callable[..., None]:
    """`bench train --method M`: cache vs live training of a registered method, one signature for all:
    (images, resolution, backbone, weights, batch_size, iterations, pool_size, renew_interval, repeats, workdir,
    as_json); a method reads the options it has."""
    from benches import hcl, train

    def hcl_bench(images: int, resolution: int, backbone: str, weights: str, batch_size: int, iterations: int,
                  pool_size: int, renew_interval: int, repeats: int, workdir: Path, as_json: bool) -> None:
        hcl.train(images, resolution, backbone, weights, batch_size, iterations, repeats, workdir, as_json)

    benches = {"hp": train.train, "hcl": hcl_bench, **_more_train_benches()}
    if method not in benches:
        raise UserError(f"bench train has no bench for method '{method}' (benches: {', '.join(benches)})")
    return benches[method]


def _more_train_benches() -> dict[str, Callable[..., None]]:
    """Benches a method's package provides itself (its `bench.py` with a `train` of the common signature)."""
    import importlib

    from pipeline.methods.registry import names

    out = {}
    for name in names():
        try:
            out[name] = importlib.import_module(f"pipeline.methods.{name}.bench").train
        except ModuleNotFoundError:
            continue
    return out
