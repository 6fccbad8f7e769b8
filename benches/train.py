"""`hp-pipe bench train | quality | evaluate`: the cache against the reference's way, side by side."""

from __future__ import annotations

import statistics
import time
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benches.features import bench_config, report
from benches.machine import machine
from cache.reader import FeatureStore
from pipeline.config import Config
from pipeline.evaluation.metrics import confusion_matrix, hungarian_match, remap_confusion, scores
from pipeline.evaluation.probes import assign, spherical_kmeans
from pipeline.extraction import prepared
from pipeline.extraction.extract import ExtractSettings, model_inputs
from pipeline.extraction.lhp import lhp_weights
from pipeline.extraction.workers import resolve_backbone
from pipeline.methods.hp.loss import hp_loss, positive_masks
from pipeline.methods.hp.pool import PoolIndex, pick_patches
from pipeline.methods.hp.schedule import lambda_at, renews_at
from pipeline.methods.hp.step import HPHeads, Pools, StepSettings, pool_entries, training_step
from pipeline.methods.hp.training import make_optimizers, optimize, sample_pool, step_inputs
from pipeline.orchestration import paths
from pipeline.orchestration.graph import build
from pipeline.precision import dtype_name, training_autocast
from pipeline.training.checkpoints import load_checkpoint


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class PeakLiveBytes(TorchDispatchMode):
    """Peak bytes of CPU storages created inside the mode and still referenced, op by op.

    Counted per storage, so aliases (views, detach) are not counted twice.
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.refs: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                if ptr not in self.refs:
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                self.refs[ptr] = self.refs.get(ptr, 0) + 1
                weakref.finalize(t, self._release, ptr, storage.nbytes())
        return out

    def _release(self, ptr: int, size: int) -> None:
        self.refs[ptr] -= 1
        if not self.refs[ptr]:
            del self.refs[ptr]
            self.live -= size


def loss_peak_bytes(batch: int, n: int, dim: int, seed: int = 0) -> int:
    """Peak extra memory of one hp_loss forward + backward at batch `batch` (n patches per image)."""
    g = torch.Generator().manual_seed(seed)
    unit = lambda *shape: torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)  # noqa: E731
    f, s_m = unit(batch, n, dim), unit(batch, n, dim)
    z, z_mix = unit(batch, n, dim).requires_grad_(), unit(batch, n, dim).requires_grad_()
    r, r_m = torch.full((batch, n), 0.3), torch.full((batch, n), 0.3)
    with PeakLiveBytes() as mode:
        out = hp_loss(f, s_m, z, z_mix, r, r_m, lam=0.5, tau=0.6, rho=0.02, generator=g)
        out.loss.backward()
    return mode.peak


def loss_matmul_figures(batch: int, n: int, c: int, d: int, repeats: int = 3, seed: int = 0,
                        autocast: torch.dtype | None = None) -> dict[str, float]:
    """hp_loss forward + backward in GFLOP/s against plain matmuls of its own shape in the same precision (fp32, or
    the `autocast` dtype, under which the loss runs too), same process and threads.

    The loss's products, per round (n anchors x N = batch·n patches): f (C) and s_m (D) similarities, z and z_mix
    logits (D each), and the backward of both logits (2 products of D each): N²·(C + 7D) multiply-adds in all when
    every anchor is kept (r = 0.15 on random unit vectors keeps them all; the kept share is reported). The ceiling:
    `batch` products (n x D) @ (D x N) timed the same way. Peak memory from `loss_peak_bytes`.
    """
    g = torch.Generator().manual_seed(seed)
    total = batch * n
    unit = lambda *shape: torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)  # noqa: E731
    f, s_m, z0, zm0 = unit(batch, n, c), unit(batch, n, d), unit(batch, n, d), unit(batch, n, d)
    r = torch.full((batch, n), 0.15)
    kept = []

    def loss_once() -> None:
        z, z_mix = z0.clone().requires_grad_(), zm0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=autocast or torch.float32, enabled=autocast is not None):
            out = hp_loss(f, s_m, z, z_mix, r, r, lam=0.5, tau=0.6, rho=0.02, generator=g)
        out.loss.backward()
        kept.append(out.kept_anchors)

    a, b = (x.to(autocast or torch.float32) for x in (unit(batch, n, d).reshape(total, d), unit(total, d)))

    def matmuls_once() -> None:
        for i in range(batch):
            (a[i * n:(i + 1) * n] @ b.T).sum()  # reduced so the product is used, as the loss uses its own

    loss_once()  # warm-up
    matmuls_once()
    pairs = [(_median_seconds(loss_once, 1), _median_seconds(matmuls_once, 1)) for _ in range(repeats)]  # alternating:
    loss_s, mm_s = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)  # the same load
    loss_flop = 2.0 * total * total * (c + d + 6 * d * min(kept))  # the masks for all anchors, z terms for the kept
    mm_flop = 2.0 * total * total * d
    ratio = statistics.median((loss_flop / ls) / (mm_flop / ms) for ls, ms in pairs)  # of side-by-side pairs
    return {"loss_gflops": float(f"{loss_flop / loss_s / 1e9:.4g}"),
            "matmul_gflops": float(f"{mm_flop / mm_s / 1e9:.4g}"),
            "loss_matmul_ratio": round(ratio, 3),
            "loss_matmul_dtype": dtype_name(autocast),
            "loss_seconds": round(loss_s, 4), "loss_flop": int(loss_flop), "loss_kept_anchors": round(min(kept), 4),
            "loss_peak_mib": round(loss_peak_bytes(batch, n, d, seed) / 2**20, 2),
            "loss_shape": {"batch": batch, "n": n, "C": c, "D": d}}


def renews_after(i: int, renew_interval: int) -> bool:
    """The bench renews Pool_sp once at the end of every `renew_interval` iterations (i = interval − 1, 2·interval
    − 1, ...): timed over a whole number of intervals (`timed_iterations`), each side pays exactly its amortised
    renewal cost, the reference's largest (a backbone pass over pool_size images), never none of it."""
    return renews_at(i + 1, renew_interval)


def timed_iterations(iterations: int, renew_interval: int) -> int:
    """`iterations` rounded up to whole renewal intervals."""
    return -(-iterations // renew_interval) * renew_interval


def cycle_epochs(epoch_batches, iterations: int):
    """(iteration, batch) for exactly `iterations` iterations, starting a new epoch (`epoch_batches(epoch)`)
    whenever one runs out: the cache side of a bench does as many steps as the reference side, whatever the
    store's size."""
    i, epoch = 0, 0
    while i < iterations:
        empty = True
        for batch in epoch_batches(epoch):
            empty = False
            yield i, batch
            i += 1
            if i == iterations:
                return
        if empty:
            raise ValueError(f"epoch {epoch} has no batch: the bench store is smaller than one batch")
        epoch += 1


class TrainSides:
    """The two sides of `bench train` on the same heads: HP from the cache (one of the K cached views, Pool_sp renewed
    from cached features) and the reference's way (the backbone on the image and its view every step, Pool_sp renewed
    by a backbone pass over fresh images). `done` counts the iterations and renewals each side actually did."""

    def __init__(self, config, store: FeatureStore, model, decoded: np.ndarray, iterations: int,
                 autocast: torch.dtype | None = None):
        t_cfg = config["hp"]
        self.autocast = autocast  # the cache side's step (train.amp); the reference's side runs fp32 on a CPU
        self.t_cfg, self.store, self.model, self.decoded, self.iterations = t_cfg, store, model, decoded, iterations
        self.batch_size, self.pool_size, self.renew_interval = t_cfg["batch_size"], t_cfg["pool_size"], \
            t_cfg["renew_interval"]
        torch.manual_seed(0)
        self.generator, self.rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
        self.heads = HPHeads(model.embed_dim, t_cfg["head_dim"], t_cfg["dropout"])
        self.opt_s, self.opt_p = make_optimizers(self.heads, t_cfg)
        self.scaler = torch.amp.GradScaler("cuda", enabled=False)
        self.settings = StepSettings(t_cfg["tau"], t_cfg["rho"], t_cfg["alpha"])
        self.pools = Pools(PoolIndex(self.sample(False)), PoolIndex(self.sample(True)))
        self.views = ExtractSettings(n_views=1)
        self.done = {"cache": [0, 0], "reference": [0, 0]}  # iterations and pool renewals each side actually did

    def sample(self, specific: bool) -> torch.Tensor:
        return sample_pool(self.store, self.heads, self.pool_size, specific, self.rng, self.generator,
                           torch.device("cpu"))

    def head_step(self, i: int, f, f_aug, lhp, autocast: torch.dtype | None = None) -> None:
        with torch.autocast("cpu", dtype=autocast or torch.float32, enabled=autocast is not None):
            out = training_step(self.heads, f, f_aug, lhp, self.pools, lambda_at(i, 0, self.iterations),
                                self.settings, self.generator)
        optimize(self.heads, out.loss, self.opt_s, self.opt_p, self.scaler, self.t_cfg["grad_clip"],
                 self.t_cfg["ema_m"])

    def from_cache(self) -> None:
        epochs = lambda e: self.store.batches(["feat", "feat_aug", "lhp"], self.batch_size,  # noqa: E731
                                              shuffle_seed=e, drop_last=True)
        for i, batch in cycle_epochs(epochs, self.iterations):
            if renews_after(i, self.renew_interval):
                self.pools.specific = PoolIndex(self.sample(True))
                self.done["cache"][1] += 1
            self.head_step(i, *step_inputs(batch, self.generator, torch.device("cpu")), self.autocast)
            self.done["cache"][0] += 1

    def backbone_renewal(self) -> None:
        """The reference: a backbone pass over pool_size fresh images, then one patch each through S_m."""
        decoded, pool_size, batch_size = self.decoded, self.pool_size, self.batch_size
        chosen = self.rng.choice(len(decoded), pool_size, replace=len(decoded) < pool_size)
        patches = []
        for start in range(0, pool_size, batch_size):
            x, _ = model_inputs(decoded[chosen[start:start + batch_size]], chosen, ExtractSettings(n_views=0))
            feat = self.model(x).feat
            patches.append(pick_patches(feat.reshape(len(x), -1, feat.shape[-1]), self.generator))
        self.pools.specific = PoolIndex(pool_entries(self.heads, torch.cat(patches), True))

    def reference_way(self) -> None:
        """The reference's step: backbone on the image and on its augmented view, every step."""
        model = self.model
        for i in range(self.iterations):
            if renews_after(i, self.renew_interval):
                self.backbone_renewal()
                self.done["reference"][1] += 1
            self.done["reference"][0] += 1
            idx = self.rng.choice(len(self.decoded), self.batch_size, replace=False)
            x, v = model_inputs(self.decoded[idx], idx, self.views)
            out = model(x)
            h = out.feat.shape[1]
            lhp = lhp_weights(out.attn_logits, h, h)
            self.head_step(i, out.feat.permute(0, 3, 1, 2).clone(), model(v).feat.permute(0, 3, 1, 2).clone(), lhp)


class _Clock:
    """Seconds spent inside patched callables, by name (nested calls count in both: `iteration_parts` subtracts)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
        return timed


def iteration_parts(sides: TrainSides) -> dict[str, Any]:
    """Where one cache-side iteration's time goes, from one pass of `from_cache` with its parts timed: batch read,
    step inputs, head forward (S, S_m, P, the LHP mix), positives (the two faiss lookups), the loss forward with its
    written-out gradient, the heads' backward, the optimizer steps (clipping included), the EMA update and the
    amortised Pool_sp renewal; seconds per iteration and each part's share of the whole."""
    from unittest import mock

    import benches.train as this
    import pipeline.methods.hp.step as hp_step
    import pipeline.methods.hp.training as hp_training

    clock = _Clock()
    batches = sides.store.batches

    def timed_batches(*args, **kwargs):
        it = iter(batches(*args, **kwargs))
        next_batch = clock.wrap("batch_read", lambda: next(it))
        while True:
            try:
                yield next_batch()
            except StopIteration:
                return

    patches = [mock.patch.object(this, name, clock.wrap(name, getattr(this, name)))
               for name in ("step_inputs", "training_step", "optimize")]
    patches += [mock.patch.object(hp_step, "hp_loss", clock.wrap("loss", hp_step.hp_loss)),
                mock.patch.object(PoolIndex, "max_similarity", clock.wrap("positives", PoolIndex.max_similarity)),
                mock.patch.object(hp_training, "ema_update", clock.wrap("ema", hp_training.ema_update)),
                mock.patch.object(torch.autograd, "backward", clock.wrap("backward", torch.autograd.backward)),
                mock.patch.object(sides.store, "batches", timed_batches),
                mock.patch.object(sides, "sample", clock.wrap("renewal", sides.sample))]
    for patch in patches:
        patch.start()
    try:
        t0 = time.perf_counter()
        sides.from_cache()
        total = time.perf_counter() - t0
    finally:
        for patch in reversed(patches):
            patch.stop()
    t = clock.seconds
    parts = {
        "batch_read": t.get("batch_read", 0.0), "step_inputs": t.get("step_inputs", 0.0),
        "head_forward": t["training_step"] - t["loss"] - t["positives"], "positives_faiss": t["positives"],
        "loss_forward_backward": t["loss"], "head_backward": t["backward"],
        "optimizer": t["optimize"] - t["ema"] - t["backward"], "ema": t["ema"], "renewal": t.get("renewal", 0.0),
    }
    parts["other"] = total - sum(parts.values())
    n = sides.iterations
    return {"iteration_ms": round(1000 * total / n, 2),
            "iteration_parts_ms": {k: round(1000 * v / n, 2) for k, v in parts.items()},
            "iteration_parts_share": {k: round(v / total, 3) for k, v in parts.items()},
            "non_loss_share": round(1 - parts["loss_forward_backward"] / total, 3)}


def lookup_figures(repeats: int) -> dict[str, Any]:
    """(c) faiss against the exact torch path, at the reference's sizes."""
    g = torch.Generator().manual_seed(1)
    pool = torch.nn.functional.normalize(torch.randn(2048, 384, generator=g), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(64 * 196, 384, generator=g), dim=1)
    by_faiss, by_torch = PoolIndex(pool, "faiss"), PoolIndex(pool, "torch")
    faiss_s = _median_seconds(lambda: by_faiss.max_similarity(queries), repeats)
    torch_s = _median_seconds(lambda: by_torch.max_similarity(queries), repeats)
    agree = float((by_faiss.max_similarity(queries) - by_torch.max_similarity(queries)).abs().max())
    return {"lookup_queries": len(queries), "lookup_pool": len(pool),
            "lookup_faiss_s": round(faiss_s, 4), "lookup_torch_s": round(torch_s, 4),
            "lookup_torch_over_faiss": round(torch_s / faiss_s, 2), "lookup_max_abs_diff": agree}


def loss_memory_figures(n: int = 196) -> dict[str, Any]:
    """(d) peak memory of the loss: grows with B (O(n·N)), a dense N x N float32 matrix would grow with B²."""
    peaks = {b: loss_peak_bytes(b, n, 64) for b in (4, 8, 16, 32)}
    return {"loss_peak_mib_by_batch": {b: round(p / 2**20, 2) for b, p in peaks.items()},
            "dense_NxN_float32_mib_by_batch": {b: round((b * n) ** 2 * 4 / 2**20, 1) for b in peaks}}


def train(images: int, resolution: int, backbone: str, weights: str, batch_size: int, iterations: int,
          pool_size: int, renew_interval: int, repeats: int, workdir: Path, as_json: bool, amp: str = "auto") -> None:
    """`amp` (auto | on | off, as train.amp): the cache side's autocast; the reference's side runs as the reference's
    code runs on a CPU, in fp32 (its autocast is CUDA-only)."""
    iterations = timed_iterations(iterations, renew_interval)
    config = bench_config(images, resolution, backbone, weights, 1, 8, **{
        "hp.batch_size": batch_size, "hp.pool_size": pool_size, "hp.renew_interval": renew_interval,
        "hp.head_dim": 256, "hp.warmup": 0})
    workdir = Path(workdir) / "bench-train"
    manifest = build(config, workdir, "features-train")
    store = FeatureStore.open(manifest["outputs"]["store"])
    model = resolve_backbone(config)
    t_cfg = config["hp"]
    directory = paths.prepared_dir(config, workdir, "train")
    names, _ = prepared.read_prepared(directory)
    decoded, _ = prepared.load_prepared(directory, names, False)
    autocast = training_autocast({"on": True, "off": False}.get(amp, amp), "cpu")
    sides = TrainSides(config, store, model, decoded, iterations, autocast)
    cache_s, reference_s = [], []
    for _ in range(repeats):  # side by side, alternating
        cache_s.append(_median_seconds(sides.from_cache, 1))
        reference_s.append(_median_seconds(sides.reference_way, 1))
    done = {side: list(counts) for side, counts in sides.done.items()}  # before the parts pass below
    if done["cache"] != done["reference"]:
        raise RuntimeError(f"bench train: the sides did different work (iterations, renewals): {done}")
    parts = iteration_parts(sides)  # after the check: this pass is one more of the cache side's
    renew_cache = _median_seconds(lambda: sides.sample(True), repeats)
    renew_backbone = _median_seconds(sides.backbone_renewal, repeats)
    figures = {
        "backbone": backbone + (" [random-init]" if model.random_init else ""),
        "resolution": resolution, "batch_size": batch_size, "iterations": iterations,
        "pool_size": pool_size, "renew_interval": renew_interval, "machine": machine(),
        "amp": amp, "cache_autocast": dtype_name(autocast), "reference_autocast": "float32",
        # the work each side did over all repeats: equal by construction, reported so that a script can check it
        "iterations_cache": done["cache"][0], "iterations_reference": done["reference"][0],
        "renewals_cache": done["cache"][1], "renewals_reference": done["reference"][1],
        "cache_iterations_per_s": round(iterations / statistics.median(cache_s), 3),
        "reference_iterations_per_s": round(iterations / statistics.median(reference_s), 3),
        "ratio": round(statistics.median(r / c for c, r in zip(cache_s, reference_s, strict=True)), 2),
        "ratio_spread": [round(f(r / c for c, r in zip(cache_s, reference_s, strict=True)), 2) for f in (min, max)],
        "renewal_cache_s": round(renew_cache, 4),
        "renewal_backbone_s": round(renew_backbone, 4),
        "renewal_ratio": round(renew_backbone / renew_cache, 2), **parts,
        **lookup_figures(repeats), **loss_memory_figures(),
        "threads": torch.get_num_threads(),
    }
    # (f) the loss's arithmetic rate against plain matmuls of its shape (this run's batch, grid and head width)
    grid = store.array("feat").shape[1:3]
    figures.update(loss_matmul_figures(batch_size, int(grid[0] * grid[1]), model.embed_dim, t_cfg["head_dim"],
                                       repeats, autocast=autocast))
    # (e) data order (docs/hp.md §7): distinct images per batch at the real crop counts, reader speed before/after
    from benches.order import distinct_images_figures, reader_figures

    figures.update(distinct_images_figures())
    figures.update(reader_figures(store, workdir, batch_size, config["train"]["buffer_chunks"], repeats))
    report(figures, as_json)


# ---------------------------------------------------------------- quality on the synthetic set
def cluster_probe(train_codes: np.ndarray, val_codes: list[torch.Tensor], val_labels: np.ndarray,
                  n_classes: int, seed: int = 0) -> dict[str, float]:
    """k-means on training codes, cosine assignment at label resolution, Hungarian on the whole val set (§8)."""
    centroids = torch.from_numpy(spherical_kmeans(train_codes, n_classes, seed=seed))
    conf = np.zeros((n_classes, n_classes), dtype=np.int64)
    for codes, label in zip(val_codes, val_labels, strict=True):
        pred = assign(codes[None].float(), centroids, size=label.shape)[0].numpy()
        conf += confusion_matrix(pred, label, n_classes, n_classes)
    s = scores(remap_confusion(conf, hungarian_match(conf)))
    return {"miou": round(100 * s.miou, 2), "acc": round(100 * s.acc, 2)}


def _precision(x: torch.Tensor, r: torch.Tensor, patch_label: torch.Tensor) -> tuple[float, float]:
    """(% of hidden positives sharing the anchor's label, positives per anchor) for unit x and criteria r (§5)."""
    mask = positive_masks(x, x, r, r, torch.arange(len(x)))
    valid = patch_label >= 0
    pairs = mask & valid[:, None] & valid[None, :]
    same = patch_label[:, None] == patch_label[None, :]
    precision = float(same[pairs].float().mean()) * 100 if pairs.any() else float("nan")
    return round(precision, 2), round(float(pairs.sum() / valid.sum()), 1)


def positive_precision(store: FeatureStore, pool_size: int, heads: HPHeads | None = None,
                       pool_sp: torch.Tensor | None = None, images: int = 16, seed: int = 0) -> dict[str, float]:
    """How often the hidden positives G_i (and, given the heads, H_i) share the anchor's class, against chance.

    HP can only learn what its mined positives teach. Patch labels: the majority pixel label.
    """
    rng = np.random.default_rng(seed)
    n = len(store)
    idx = np.sort(rng.choice(n, min(n, images), replace=False))
    feats = torch.from_numpy(store.gather("feat", idx)).float()
    labels = torch.from_numpy(store.gather("label", idx)).long()
    b, h, w, c = feats.shape
    patch = labels.shape[-1] // w
    votes = torch.nn.functional.one_hot(labels.clamp(max=255), 256)[..., :255]  # ignore (255) dropped
    votes = votes.reshape(b, h, patch, w, patch, -1).sum((2, 4))
    patch_label = torch.where(votes.sum(-1) > 0, votes.argmax(-1), -1).reshape(-1)
    f = torch.nn.functional.normalize(feats.reshape(-1, c), dim=1)
    pool_images = np.sort(rng.choice(n, pool_size, replace=n < pool_size))
    pool_feats = torch.from_numpy(store.gather("feat", pool_images)).float().reshape(pool_size, -1, c)
    pool = torch.nn.functional.normalize(pick_patches(pool_feats, torch.Generator().manual_seed(seed)), dim=1)
    freq = torch.bincount(patch_label[patch_label >= 0]).float()
    out = {"positives_chance": round(float(((freq / freq.sum()) ** 2).sum()) * 100, 2)}
    out["ghp_precision"], out["ghp_per_anchor"] = _precision(f, PoolIndex(pool, "torch").max_similarity(f),
                                                             patch_label)
    if heads is not None and pool_sp is not None:
        with torch.no_grad():
            s_m = torch.nn.functional.normalize(heads.S_m(feats.permute(0, 3, 1, 2)), dim=1)
        s_m = s_m.flatten(2).transpose(1, 2).reshape(-1, heads.dim)
        out["task_specific_precision"], out["task_specific_per_anchor"] = _precision(
            s_m, PoolIndex(pool_sp, "torch").max_similarity(s_m), patch_label)
    return out


def quality(config: Config, workdir: Path, as_json: bool, max_patches: int = 50_000) -> None:
    """Raw features, HP and HCL: cluster probe (Hungarian) and overclustering on val. HP and its raw-feature row
    read HP's stores, HCL and its raw-feature row (`raw_features_hcl`) HCL's own (its crops and its whole-image val
    geometry, docs/hcl.md §4-§5): each method is compared with raw features of its own geometry."""
    from pipeline.evaluation.codes import encode_range
    from pipeline.evaluation.encoders import load_encoder
    from pipeline.evaluation.overcluster import overcluster_maps

    hp_config = {**config, "train": {**config["train"], "method": "hp"}}
    hcl_config = {**config, "train": {**config["train"], "method": "hcl"}}
    manifest = build(hp_config, workdir, "train", run="quality")
    hcl_manifest = build(hcl_config, workdir, "train", run="quality-hcl")
    val = FeatureStore.open(build(hp_config, workdir, "features-val")["outputs"]["store"])
    store = FeatureStore.open(manifest["outputs"]["store"])
    hcl_val = FeatureStore.open(build(hcl_config, workdir, "features-val-hcl")["outputs"]["store"])
    hcl_store = FeatureStore.open(hcl_manifest["outputs"]["store"])
    stores = {"raw_features": (store, val), "hp": (store, val), "raw_features_hcl": (hcl_store, hcl_val),
              "hcl": (hcl_store, hcl_val)}
    state = load_checkpoint(manifest["outputs"]["checkpoint"])
    heads = HPHeads(state["in_dim"], state["head_dim"])
    heads.load_state_dict(state["heads"])
    heads.eval()
    e_cfg, n_classes = config["evaluate"], config["dataset"]["n_classes"]
    raw = lambda s: torch.from_numpy(s.read("feat", 0, len(s))).float().permute(0, 3, 1, 2)  # noqa: E731
    codes = {name: tuple(raw(s) for s in stores[name]) for name in ("raw_features", "raw_features_hcl")}
    for name, m in (("hp", manifest), ("hcl", hcl_manifest)):
        encoder = load_encoder(m["outputs"]["checkpoint"])
        codes[name] = tuple(encode_range(encoder, s, 0, len(s), 16) for s in stores[name])
    figures = {"dataset": config["dataset"]["name"], "backbone": config["features"]["backbone"]
               + (" [random-init]" if store.random_init else ""), "val_images": len(val)}
    rng = np.random.default_rng(0)
    for name, (train_codes, val_codes) in codes.items():
        labels = stores[name][1].read("label", 0, len(stores[name][1]))
        patches = train_codes.permute(0, 2, 3, 1).reshape(-1, train_codes.shape[1])
        patches = patches[rng.choice(len(patches), min(max_patches, len(patches)), replace=False)]
        probe = cluster_probe(patches.numpy(), list(val_codes), labels, n_classes)
        over = overcluster_maps(val_codes.permute(0, 2, 3, 1).numpy(), labels, n_classes, e_cfg["overcluster_k"],
                                e_cfg["overcluster_pca"], tuple(range(e_cfg["overcluster_seeds"])),
                                e_cfg["overcluster_size"], e_cfg["overcluster_iterations"],
                                e_cfg["overcluster_restarts"])
        figures.update({f"{name}_miou": probe["miou"], f"{name}_acc": probe["acc"],
                        f"{name}_overcluster_miou": round(100 * over["miou_mean"], 2),
                        f"{name}_overcluster_miou_std": round(100 * over["miou_std"], 2),
                        f"{name}_overcluster_pixel_acc": round(100 * over["pixel_acc_mean"], 2),
                        f"{name}_overcluster_acc_ref": round(100 * over["acc_ref_mean"], 2)})
    figures["overcluster_k"] = over["k"]
    figures["hp_minus_raw_miou"] = round(figures["hp_miou"] - figures["raw_features_miou"], 2)
    figures["hcl_minus_raw_miou"] = round(figures["hcl_miou"] - figures["raw_features_hcl_miou"], 2)
    figures["hcl_val_resolution"] = hcl_val.attrs["resolution"]  # whole images, HP's val: prepare.val_resolution
    figures.update(positive_precision(store, config["hp"]["pool_size"], heads, state["pool_sp"]))
    figures["train_iterations"] = manifest["outputs"]["iterations"]
    figures["hcl_train_iterations"] = hcl_manifest["outputs"]["iterations"]
    report(figures, as_json)


# ---------------------------------------------------------------- evaluate
def evaluate(config: Config, workdir: Path, run: str, crf_images: int, crf_size: int, workers: int,
             as_json: bool) -> None:
    """CRF serial vs parallel, and the evaluate stages' wall time split by step."""
    from pipeline.evaluation.crf import crf_bench
    from pipeline.orchestration.runner import read_manifest

    crf = crf_bench(crf_images, crf_size, workers)
    config["evaluate"]["crf"] = True
    build(config, workdir, "evaluate", run=run, force=True)
    sdir = paths.stage_dir(config, workdir)
    steps = [f"codes-{run}", f"probe-head-{run}", f"probe-raw-{run}", f"evaluate-{run}"]
    seconds = {s: (read_manifest(sdir, s) or {}).get("timings", {}).get("seconds") for s in steps}
    figures = {
        "crf_images": crf_images, "crf_size": crf_size, "crf_workers": workers,
        "crf_serial_images_per_s": round(crf["serial_images_per_s"], 3),
        "crf_parallel_images_per_s": round(crf["parallel_images_per_s"], 3),
        "crf_ratio": round(crf["speedup"], 3), "crf_identical": crf["identical"],
        "evaluate_seconds_by_step": seconds,
        "evaluate_seconds_total": round(sum(v for v in seconds.values() if v), 2),
        "dataset": config["dataset"]["name"],
    }
    report(figures, as_json)
