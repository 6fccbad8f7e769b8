"""`hp-pipe bench scale`: training from stores of growing size (docs/cache.md, "Read path"; docs/hp.md §4).

Stores of random features are written directly through the writer (no backbone), at ViT-S/16 shapes by default
(224 px: a 14 x 14 grid of 384 channels, K = 2 views, LHP), then each is trained from for the same iterations in a
fresh process: training iterations/s (pool renewals included, at their interval), the time of one Pool_sp renewal,
the chunks a renewal decodes, and the process's peak RSS. Nothing of this should grow with the store.

Disk and time: random values do not compress (≈ 455 kB per crop at float16), so a 50k-crop store would be 23 GB
and take most of an hour to write here. Each store therefore writes `unique_chunks` chunks of its own (128 by
default: the 2k-crop store is all its own) and its other chunks are hard links to those, with the same records:
every chunk is still read, decoded and checked like any other, but disk reads come from the page cache (the
templates are ≈ 0.9 GB), as they would on a machine whose store fits in memory.

Iterations/s is the median of `rounds` fresh processes per size, the sizes taking turns in a rotated order: on a
shared machine the load drifts over minutes, and one process per size in a row turned that drift into a trend
(1.83 -> 1.73 -> 1.62 iterations/s from 2k to 50k crops, before the reader's plan was made lazy).

The features are not white noise: each patch is one of `classes` random directions plus noise, so that the loss
finds hidden positives (with white noise no anchor has any, and the loss would skip most of its work).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import resource
import statistics
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from benches.features import report
from cache import writer
from cache.integrity import chunk_key
from cache.reader import FeatureStore
from cache.schema import DONE, RECORDS, Layout

SIZES = (2_000, 20_000, 50_000, 500_000)  # up to COCO scale (118k images x 5 crops: ~600k)
ROUNDS = 3  # fresh processes per size for iterations/s, the sizes taking turns (module docstring)
READ_NAMES = ("feat", "feat_aug", "lhp")  # what the HP trainer reads per step
FLAT = 1.10  # the targets: largest / smallest within 10 %
STORE_VERSION = 1  # of the bench stores' content: a store of another version (or settings) is rewritten


def bench_layout(n: int, resolution: int, patch: int, dim: int, views: int, dtype: str) -> SimpleNamespace:
    """The arrays HP's trainer reads (feat, feat_aug, lhp; int8 adds their scales), as cache/schema.py's Layout has
    them, without the pictures and attention the bench does not read."""
    full = Layout(n_samples=n, resolution=resolution, patch_size=patch, embed_dim=dim, num_heads=6, n_views=views,
                  with_lhp=True, labelled=False, dtype=dtype).arrays()
    arrays = {k: v for k, v in full.items() if k.split("_scale")[0] in READ_NAMES}
    return SimpleNamespace(n_samples=n, arrays=lambda: arrays)


def _chunk_values(c: int, rows: int, grid: int, dim: int, views: int, classes: int) -> dict[str, np.ndarray]:
    """Chunk `c`'s float16 values: a random class direction per patch plus noise (views: the same classes, new
    noise); LHP weights uniform in [0, 1)."""
    centers = np.random.default_rng(12345).standard_normal((classes, dim)).astype(np.float32)
    rng = np.random.default_rng(c)
    cls = rng.integers(0, classes, (rows, grid, grid))
    noise = lambda *shape: 0.6 * rng.standard_normal(shape, dtype=np.float32)  # noqa: E731
    feat = centers[cls] + noise(rows, grid, grid, dim)
    aug = centers[cls][:, None] + noise(rows, views, grid, grid, dim)
    lhp = rng.random((rows, grid, grid, 9), dtype=np.float32)
    return {"feat": feat.astype(np.float16), "feat_aug": aug.astype(np.float16), "lhp": lhp.astype(np.float16)}


def write_random_store(url: str, n: int, chunk_size: int = 16, resolution: int = 224, patch: int = 16,
                       dim: int = 384, views: int = 2, dtype: str = "float16", unique_chunks: int = 128,
                       classes: int = 27) -> FeatureStore:
    """A complete store of `n` random crops through cache/writer.py; chunks past `unique_chunks` are hard links to
    chunk c % unique_chunks (module docstring). Kept and reused when it holds exactly these settings."""
    spec = {"n": n, "chunk_size": chunk_size, "resolution": resolution, "patch": patch, "dim": dim, "views": views,
            "dtype": dtype, "unique_chunks": unique_chunks, "classes": classes, "version": STORE_VERSION}
    existing = writer.open_group(url, mode="r")
    if existing is not None and existing.attrs.get("bench_scale") == spec and existing.attrs.get("complete"):
        return FeatureStore.open(url)
    attrs = {"dataset": "bench-scale", "split": "train", "backbone": f"random vit_small_patch{patch}", "patch_size":
             patch, "resolution": resolution, "weights_hash": "random", "weights": "random-init", "random_init": True,
             "fingerprint": json.dumps(spec, sort_keys=True), "bench_scale": spec, "feature_dtype": dtype}
    layout = bench_layout(n, resolution, patch, dim, views, dtype)
    group = writer.create_store(url, layout, chunk_size, attrs, fresh=True)
    grid, n_chunks = resolution // patch, -(-n // chunk_size)
    last_full = n // chunk_size  # chunks [0, last_full) are full
    own = sorted(set(range(min(unique_chunks, n_chunks))) | set(range(last_full, n_chunks)))  # a short last one too
    for c in own:
        start, stop = writer.chunk_range(group, c)
        writer.write_chunk(group, c, _chunk_values(c, stop - start, grid, dim, views, classes))
    root = Path(url.removeprefix("file://"))
    names = [*layout.arrays(), RECORDS, DONE]
    for c in range(min(unique_chunks, n_chunks), last_full):  # the rest: links to a template chunk
        template = c % unique_chunks
        for name in names:
            src, dst = root / chunk_key(group[name], template), root / chunk_key(group[name], c)
            dst.parent.mkdir(parents=True, exist_ok=True)
            if dst.exists():
                dst.unlink()
            os.link(src, dst)
    writer.mark_complete(group)
    return FeatureStore.open(url)


class PeakRSS:
    """Peak resident memory of this process: ru_maxrss (a fresh process per size) and, for in-process runs, the
    largest RSS sampled every 5 ms while inside the context."""

    def __init__(self):
        self.sampled = 0
        self._stop = threading.Event()

    @staticmethod
    def current() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.sampled = max(self.sampled, self.current())

    def __enter__(self) -> PeakRSS:
        self.sampled = self.current()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sampled = max(self.sampled, self.current())


def _old_sample_pool(store: FeatureStore, heads, size: int, specific: bool, rng: np.random.Generator,
                     generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Renewal as it was before (for comparison, `--renewal gather`): `size` random crops, every chunk they fall in
    decoded, so a renewal reads up to min(size, chunks) chunks: a large share of a big store."""
    from pipeline.methods.hp.pool import pick_patches
    from pipeline.methods.hp.step import pool_entries

    crops = rng.choice(len(store), size, replace=len(store) < size)
    feats = torch.from_numpy(store.gather("feat", np.sort(crops)))
    patches = pick_patches(feats.reshape(size, -1, feats.shape[-1]), generator).to(device).float()
    return pool_entries(heads, patches, specific)


def renewal_function(renewal: str):
    """hp-pipe's renewal (`chunks`) or the old one (`gather`), as `sample_pool(store, heads, size, specific, ...)`."""
    from pipeline.methods.hp import training as hp_training

    return _old_sample_pool if renewal == "gather" else hp_training.sample_pool


def measure_size(url: str, iterations: int, batch_size: int, head_dim: int, pool_size: int, renew_interval: int,
                 repeats: int, renewal: str, isolated: bool) -> dict[str, Any]:
    """Train from the store at `url` for `iterations` (renewals at their interval), then count the chunks that
    `repeats` renewals read and the bytes they decode."""
    from benches.train import cycle_epochs
    from pipeline.methods.hp import training as hp_training
    from pipeline.methods.hp.pool import PoolIndex
    from pipeline.methods.hp.schedule import renews_at
    from pipeline.methods.hp.step import HPHeads, Pools, StepSettings, training_step

    sample_pool = renewal_function(renewal)
    with PeakRSS() as rss:
        store = FeatureStore.open(url)
        reads: list[int] = []
        decoded = [0]  # bytes of the feature chunks those reads decoded
        real_read = store.read_chunk

        def counted(name: str, chunk: int) -> np.ndarray:
            values = real_read(name, chunk)
            if name == "feat":
                reads.append(chunk)
                decoded[0] += values.nbytes
            return values

        torch.manual_seed(0)
        generator, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
        cpu = torch.device("cpu")
        heads = HPHeads(store.array("feat").shape[-1], head_dim, 0.1)
        opt_s, opt_p = hp_training.make_optimizers(heads, {"lr": 5e-4, "weight_decay": 0.1})
        scaler = torch.amp.GradScaler("cuda", enabled=False)
        settings = StepSettings(0.6, 0.02, 0.05)
        renew = lambda: sample_pool(store, heads, pool_size, True, rng, generator, cpu)  # noqa: E731
        pools = Pools(PoolIndex(sample_pool(store, heads, pool_size, False, rng, generator, cpu)), PoolIndex(renew()))
        done = {"iterations": 0, "renewals": 0}

        def epoch(e: int):
            return store.batches(list(READ_NAMES), batch_size, shuffle_seed=e, drop_last=True)

        t0 = time.perf_counter()
        for i, batch in cycle_epochs(epoch, iterations):
            if renews_at(i, renew_interval):
                pools.specific = PoolIndex(renew())
                done["renewals"] += 1
            f, f_aug, lhp = hp_training.step_inputs(batch, generator, cpu)
            out = training_step(heads, f, f_aug, lhp, pools, 0.5, settings, generator)
            hp_training.optimize(heads, out.loss, opt_s, opt_p, scaler, 10.0, 0.999)
            done["iterations"] += 1
        train_s = time.perf_counter() - t0
        store.read_chunk = counted  # type: ignore[method-assign]
        for _ in range(repeats):  # chunks read per renewal (their time: renewal_times, all sizes taking turns)
            renew()
        store.read_chunk = real_read  # type: ignore[method-assign]
    return {
        "crops": len(store), "iterations": done["iterations"], "renewals": done["renewals"],
        "iterations_per_s": iterations / train_s,
        "renewal_chunks_read": len(reads) / repeats, "renewal_mb_decoded": decoded[0] / 1e6 / repeats,
        "store_chunks": -(-len(store) // store.chunk_size),
        "peak_rss_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if isolated
                         else rss.sampled / 2**20),
        "threads": torch.get_num_threads(),
    }


def renewal_times(urls: dict[str, str], head_dim: int, pool_size: int, repeats: int, renewal: str) -> dict[str, list]:
    """Seconds of `repeats` Pool_sp renewals per store, in one process, the stores taking turns after one untimed
    renewal each: every size sees the same load and a warm page cache (a first renewal pays the cold reads and
    was 2-5x the rest here), so what remains is the renewal's own work."""
    from pipeline.methods.hp.step import HPHeads

    sample_pool = renewal_function(renewal)
    stores = {size: FeatureStore.open(url) for size, url in urls.items()}
    torch.manual_seed(0)
    heads = HPHeads(next(iter(stores.values())).array("feat").shape[-1], head_dim, 0.1)
    rng, generator, cpu = np.random.default_rng(0), torch.Generator().manual_seed(0), torch.device("cpu")
    times: dict[str, list] = {size: [] for size in stores}
    for turn in range(repeats + 1):
        for size, store in stores.items():
            t0 = time.perf_counter()
            sample_pool(store, heads, pool_size, True, rng, generator, cpu)
            if turn:  # turn 0 warms the page cache and the thread pool
                times[size].append(time.perf_counter() - t0)
    return times


def reader_throughput(store: FeatureStore, threads: int, crops: int, batch_size: int = 64) -> dict[str, float]:
    """Crops/s and MB/s of decoded values (checked, as training reads them) through `batches` with `threads`
    decoding threads and no prefetch thread; the whole of one pass over min(crops, store) crops."""
    per_crop = sum(int(np.prod(store.array(n).shape[1:])) * store.dtype(n).itemsize for n in READ_NAMES)
    seen = 0
    cpu0, t0 = time.process_time(), time.perf_counter()
    for batch in store.batches(list(READ_NAMES), batch_size, shuffle_seed=0, prefetch=0, threads=threads):
        seen += len(batch["index"])
        if seen >= crops:
            break
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"crops": seen, "crops_per_s": seen / wall, "mb_per_s": seen * per_crop / 1e6 / wall,
            "cpu_s_per_wall_s": cpu / wall, "crops_per_cpu_s": seen / cpu if cpu > 0 else float("nan")}


def _flat(values: dict[str, float]) -> bool:
    low, high = min(values.values()), max(values.values())
    return high <= FLAT * low if low > 0 else high == low


def scale(sizes: list[int], workdir: Path, iterations: int = 40, batch_size: int = 16, head_dim: int = 256,
          pool_size: int = 2048, renew_interval: int = 20, chunk_size: int = 16, resolution: int = 224,
          patch: int = 16, dim: int = 384, views: int = 2, dtype: str = "float16", unique_chunks: int = 128,
          repeats: int = 5, renewal: str = "chunks", reader_crops: int = 2048, isolate: bool = True,
          as_json: bool = False, rounds: int = ROUNDS) -> dict[str, Any]:
    """Write (or reuse) one store per size, measure each `rounds` times in a fresh process (`isolate`), the sizes
    taking turns, and report the figures (iterations/s: the median of the rounds)."""
    if renewal not in ("chunks", "gather"):
        raise ValueError(f"renewal must be chunks or gather, got {renewal!r}")
    root = Path(workdir) / "bench-scale"
    root.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Any] = {
        "sizes": list(sizes), "shapes": {"resolution": resolution, "patch": patch, "grid": resolution // patch,
                                         "dim": dim, "views": views, "dtype": dtype},
        "batch_size": batch_size, "head_dim": head_dim, "pool_size": pool_size, "renew_interval": renew_interval,
        "chunk_size": chunk_size, "renewal": renewal, "unique_chunks": unique_chunks,
        "renewal_chunks_bound": math.ceil(pool_size / chunk_size) if renewal == "chunks" else None,
    }
    per_size: dict[str, dict[str, Any]] = {}
    stores = {}
    write_s = {}
    for n in sizes:
        t0 = time.perf_counter()
        stores[n] = write_random_store(str(root / f"store-{n}-{dtype}.zarr"), n, chunk_size, resolution, patch,
                                       dim, views, dtype, unique_chunks)
        write_s[str(n)] = round(time.perf_counter() - t0, 2)
    args = (iterations, batch_size, head_dim, pool_size, renew_interval, repeats, renewal)
    runs: dict[str, list[dict[str, Any]]] = {str(n): [] for n in sizes}
    for r in range(max(1, rounds)):
        for n in sizes[r % len(sizes):] + sizes[:r % len(sizes)]:  # rotated: no size always runs first
            load = os.getloadavg()[0]
            if isolate:  # a fresh process per size: its peak RSS is its own, not the largest so far
                with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                    run = pool.submit(measure_size, stores[n].url, *args, True).result()
            else:
                run = measure_size(stores[n].url, *args, False)
            runs[str(n)].append({**run, "load_average_1min": load})
    for size, size_runs in runs.items():
        rates = [run["iterations_per_s"] for run in size_runs]
        per_size[size] = {**size_runs[0], "iterations_per_s": statistics.median(rates),
                          "iterations_per_s_min": min(rates), "iterations_per_s_max": max(rates),
                          "peak_rss_mib": max(run["peak_rss_mib"] for run in size_runs),
                          "load_average_1min": statistics.median(run["load_average_1min"] for run in size_runs)}
    timed = renewal_times({str(n): stores[n].url for n in sizes}, head_dim, pool_size, repeats, renewal)
    for size, seconds in timed.items():  # the renewal time from the interleaved turns, not from each process
        per_size[size].update(renewal_s=statistics.median(seconds), renewal_s_min=min(seconds),
                              renewal_s_max=max(seconds), renewals_timed=len(seconds))
    for key, digits in (("iterations_per_s", 3), ("iterations_per_s_min", 3), ("iterations_per_s_max", 3),
                        ("renewal_s", 4), ("peak_rss_mib", 1), ("renewal_chunks_read", 1),
                        ("renewal_mb_decoded", 3), ("renewal_s_min", 4), ("renewal_s_max", 4), ("renewals_timed", 0),
                        ("iterations", 0), ("renewals", 0), ("store_chunks", 0), ("load_average_1min", 2)):
        figures[key] = {s: round(v[key], digits) if digits else int(v[key]) for s, v in per_size.items()}
    figures["flat"] = {key: _flat(figures[key]) for key in ("iterations_per_s", "renewal_s", "peak_rss_mib",
                                                            "renewal_chunks_read", "renewal_mb_decoded")}
    figures["flat_bound"] = FLAT
    figures["rounds"] = max(1, rounds)
    rates = figures["iterations_per_s"].values()
    figures["iterations_per_s_largest_over_smallest"] = round(max(rates) / min(rates), 3) if min(rates) > 0 else None
    figures["store_write_s"] = write_s
    figures["peak_rss_method"] = "ru_maxrss of a fresh process per size" if isolate else "sampled every 5 ms"
    # the read path (docs/cache.md, "Read path"): decoding threads 1 and 2 on the first store
    first = stores[sizes[0]]
    reader = {t: reader_throughput(first, t, reader_crops) for t in (1, 2)}
    figures["reader_crops"] = reader[1]["crops"]
    figures["reader_crops_per_s_by_threads"] = {str(t): round(r["crops_per_s"], 1) for t, r in reader.items()}
    figures["reader_mb_per_s_by_threads"] = {str(t): round(r["mb_per_s"], 1) for t, r in reader.items()}
    figures["reader_cpu_per_wall_by_threads"] = {str(t): round(r["cpu_s_per_wall_s"], 2) for t, r in reader.items()}
    # per CPU-second of the process (all its threads): what one core decodes, whatever else runs on the machine
    figures["reader_crops_per_cpu_s_by_threads"] = {str(t): round(r["crops_per_cpu_s"], 1) for t, r in reader.items()}
    figures["reader_mb_per_crop"] = round(reader[1]["mb_per_s"] / reader[1]["crops_per_s"], 4)
    figures["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    figures["cpu_count"] = os.cpu_count()
    report(figures, as_json)
    return figures
