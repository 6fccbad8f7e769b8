"""`hp-pipe bench train --method stego`: STEGO's iteration from the cache against the reference's, side by side.

Both sides run the same head step (pipeline/methods/stego/training.py: two head passes, the correspondence loss, the
optimizer and the probes) on the same batches of crops and positives. The cache side reads the anchors' and the
positives' features from the store; the reference's side runs the backbone on both images every step, as its
`training_step` does. Imported only by the benches (benches/__init__.py), never by the library.

After the timed runs, `cache_<part>_ms` and `cache_<part>_share` break the cache side's iteration down (batch read,
positives, head forward, loss forward and backward, optimizer, probes): where a slower cache side spends its time.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from benches.features import bench_config, report
from cache.reader import FeatureStore
from pipeline.extraction import prepared
from pipeline.extraction.backbone import normalize
from pipeline.extraction.workers import resolve_backbone
from pipeline.methods.stego.loss import stego_loss
from pipeline.methods.stego.stages import read_table
from pipeline.methods.stego.training import StegoTraining, positives
from pipeline.orchestration import paths
from pipeline.orchestration.graph import build
from pipeline.training.trainer import RunPlan


def train(images: int, resolution: int, backbone: str, weights: str, batch_size: int, iterations: int,
          pool_size: int, renew_interval: int, repeats: int, workdir: Path, as_json: bool) -> None:
    """STEGO has no pools: `pool_size` and `renew_interval` are not read."""
    config = bench_config(images, resolution, backbone, weights, 1, 8, **{
        "train.method": "stego", "stego.batch_size": batch_size, "stego.head_dim": 70,
        "stego_cache.knn_size": min(30, max(2, (images // 5) * 5 - 1)), "stego.num_neighbors": 1})
    config["stego"]["num_neighbors"] = min(7, config["stego_cache"]["knn_size"] - 1)
    workdir = Path(workdir) / "bench-train-stego"
    knn = build(config, workdir, "knn-train")
    store = FeatureStore.open(build(config, workdir, "features-train")["outputs"]["store"])
    table = read_table(knn, len(store))
    model = resolve_backbone(config)
    names, _ = prepared.read_prepared(paths.prepared_dir(config, workdir, "train"))
    decoded, _ = prepared.load_prepared(paths.prepared_dir(config, workdir, "train"), names, False)
    sides = _Sides(config, store, table, model, decoded, iterations)
    cache_s, reference_s = [], []
    for _ in range(repeats):  # side by side, alternating
        cache_s.append(_seconds(sides.from_cache))
        reference_s.append(_seconds(sides.reference_way))
    parts = sides.cache_parts()  # after the timed runs, so that its timers do not slow them
    if sides.done["cache"] != sides.done["reference"]:
        raise RuntimeError(f"bench train --method stego: the sides did different work: {sides.done}")
    report({
        "method": "stego", "backbone": backbone + (" [random-init]" if model.random_init else ""),
        "resolution": resolution, "batch_size": batch_size, "iterations": iterations,
        "iterations_cache": sides.done["cache"], "iterations_reference": sides.done["reference"],
        "cache_iterations_per_s": round(iterations / statistics.median(cache_s), 3),
        "reference_iterations_per_s": round(iterations / statistics.median(reference_s), 3),
        "ratio": round(statistics.median(r / c for c, r in zip(cache_s, reference_s, strict=True)), 2),
        "threads": torch.get_num_threads(),
        **{f"cache_{part}_ms": round(1000 * seconds, 2) for part, seconds in parts.items()},
        **{f"cache_{part}_share": round(seconds / sum(parts.values()), 3) for part, seconds in parts.items()},
    }, as_json)


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class _Sides:
    def __init__(self, config, store, table, model, decoded, iterations):
        self.store, self.table, self.model, self.decoded, self.iterations = store, table, model, decoded, iterations
        self.hooks = StegoTraining(SimpleNamespace(log=lambda line: None), config, store, table)
        torch.manual_seed(0)
        self.hooks.build(RunPlan(torch.device("cpu"), None, 1, iterations, Path("unused")),
                         torch.Generator().manual_seed(0))
        self.hooks.start()
        self.s, self.done = config["stego"], {"cache": 0, "reference": 0}

    def batches(self):
        while True:
            yield from self.store.batches(self.hooks.names, self.s["batch_size"], shuffle_seed=0, drop_last=True)

    def from_cache(self) -> None:
        for _, batch in zip(range(self.iterations), self.batches(), strict=False):
            self.hooks.update(self.hooks.forward(self.hooks.inputs(0, 0, batch)), batch)
            self.done["cache"] += 1

    def cache_parts(self) -> dict[str, float]:
        """Median seconds per iteration of each part of the cache side's iteration, timed one part at a time on
        `iterations` more batches: the batch read (from the prefetch thread), the positives' gather (with the
        anchors' conversion to channels-first float), the two head passes, the loss forward and backward, the
        optimizer step, the probes' steps. The same calls as `from_cache` makes, in the same order."""
        times: dict[str, list[float]] = {k: [] for k in ("batch_read", "positives", "head_forward", "loss",
                                                        "optimizer", "probes")}
        batches, hooks, generator = self.batches(), self.hooks, self.hooks.generator
        for _ in range(self.iterations):
            t = [time.perf_counter()]
            batch = next(batches)
            t.append(time.perf_counter())
            f, f_pos = hooks.inputs(0, 0, batch)
            t.append(time.perf_counter())
            f_loss, c = hooks.head(f, generator)  # as StegoTraining.forward, its parts timed apart
            f_pos_loss, c_pos = hooks.head(f_pos, generator)
            t.append(time.perf_counter())
            out = stego_loss(f_loss, c, f_pos_loss, c_pos, hooks.settings, generator)
            hooks.optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            t.append(time.perf_counter())
            hooks.optimizer.step()
            t.append(time.perf_counter())
            if hooks.probes is not None:
                hooks.probes.step(c, batch.get("label"))
            t.append(time.perf_counter())
            for part, t0, t1 in zip(times, t[:-1], t[1:], strict=True):
                times[part].append(t1 - t0)
        return {part: statistics.median(seconds) for part, seconds in times.items()}

    def reference_way(self) -> None:
        """The backbone on the anchors' and the positives' crops every step, then the same head step (the crops are
        the store's count of prepared five-crops; which crop stands for which sample does not change the work)."""
        for _, batch in zip(range(self.iterations), self.batches(), strict=False):
            index = batch["index"].numpy()
            pos = positives(self.table, batch["index"], self.s["num_neighbors"], self.hooks.generator)
            crops = lambda i: np.ascontiguousarray(self.decoded[i % len(self.decoded)])  # noqa: E731
            with torch.no_grad():
                f = self.model(normalize(torch.from_numpy(crops(index)))).feat.permute(0, 3, 1, 2).contiguous()
                f_pos = self.model(normalize(torch.from_numpy(crops(pos)))).feat.permute(0, 3, 1, 2).contiguous()
            self.hooks.update(self.hooks.forward((f, f_pos)), batch)
            self.done["reference"] += 1
