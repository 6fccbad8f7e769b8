"""`features`: run the frozen DINO backbone once per crop and store what training needs.

Work is split by store chunk: each chunk is computed and written as a unit and then flagged done.
Locally, a loader thread decodes the next chunks (in `features.workers` DataLoader processes) and a
writer thread compresses the previous ones while the backbone runs on `features.device` in forwards
of `features.batch_size` crops (a slice of a chunk or several whole chunks); with dask, workers each
load the backbone once and write disjoint chunks straight into the store (docs/cache.md, "Computing a store").

The training store holds the crops in a seeded random permutation (cache/order.py, docs/hp.md §7): sample i
is prepared crop `crop_order[i]`, so the reader's chunk-buffer shuffle yields i.i.d.-like batches. The order is
a pure function of (crop count, crops per image, features.seed): every process and every resumed run agrees.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from cache import writer
from cache.order import store_order
from cache.reader import FeatureStore
from cache.schema import Layout
from cache.writer import stored_bytes
from pipeline import paths, prepared
from pipeline.backbone import Backbone
from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.extract import ExtractSettings, extract_chunk, model_inputs
from pipeline.graph import stage_plan
from pipeline.plots import feature_preview
from pipeline.runner import StageContext, manifest_path, run_stage
from pipeline.wording import plural
from pipeline.workers import (
    extraction_attrs,
    feature_backbone,
    feature_batch_size,
    in_batches,
    overlapped,
    run_dask,
    split_samples,
)
from stages import prepare


def sample_order(config: Config, split: str, n_crops: int) -> tuple[np.ndarray, np.ndarray]:
    """(crop_order, source_image) of the split's store: permuted for training, the dataset's order otherwise."""
    cpi = prepared.crops_per_image(config, split)
    if n_crops % cpi:
        raise UserError(f"prepared/{split}/samples.txt lists {n_crops} crops, not {cpi} per image; "
                        "rerun `hp-pipe prepare --force`")
    return store_order(n_crops, cpi, config["features"]["seed"] if split == "train" else None)


def settings_for(config: Config, split: str) -> ExtractSettings:
    f = config["features"]
    train = split == "train"
    return ExtractSettings(
        n_views=f["n_views"] if train else 0,
        with_lhp=train,
        photometric_on_normalized=f["photometric_on_normalized"],
        lhp_sigma=f["lhp_sigma"],
        seed=f["seed"],
    )


class ChunkInputs(NamedTuple):
    """One chunk, decoded and ready for the backbone."""

    chunk: int
    images: np.ndarray
    labels: np.ndarray | None
    x: torch.Tensor
    views: torch.Tensor | None
    ids: dict[str, np.ndarray]  # crop_order and source_image of the chunk's samples


def load_chunk(group, chunk: int, directory: str, names: list[str], order: tuple[np.ndarray, np.ndarray],
               labelled: bool, settings: ExtractSettings) -> ChunkInputs:
    """Decode a chunk's prepared crops (sample i is crop `crop_order[i]` of `names`) and build its model inputs.

    Photometric views are seeded by the store index, as before: a chunk is the same whoever computes it.
    """
    start, stop = writer.chunk_range(group, chunk)
    crop_order, source_image = order
    picked = crop_order[start:stop]
    images, labels = prepared.load_prepared(directory, [names[i] for i in picked], labelled)
    ids = {"crop_order": picked.copy(), "source_image": source_image[start:stop].copy()}
    return ChunkInputs(chunk, images, labels, *model_inputs(images, np.arange(start, stop), settings), ids)


def merge_inputs(items: list[ChunkInputs]) -> ChunkInputs:
    """Consecutive chunks as one device batch (features.batch_size a multiple of chunk_size); `chunk` is the first."""
    if len(items) == 1:
        return items[0]
    cat = np.concatenate
    return ChunkInputs(
        items[0].chunk, cat([i.images for i in items]),
        None if items[0].labels is None else cat([i.labels for i in items]),
        torch.cat([i.x for i in items]), None if items[0].views is None else torch.cat([i.views for i in items]),
        {k: cat([i.ids[k] for i in items]) for k in items[0].ids})


def chunk_arrays(backbone: Backbone, inputs: ChunkInputs, settings: ExtractSettings,
                 batch_size: int = 0) -> dict[str, np.ndarray]:
    """Everything one store chunk (or several merged ones) holds, in forwards of `batch_size` crops (0: all at
    once; each crop's K views go through in the same slice, K x batch_size images)."""
    k, views = settings.n_views, inputs.views
    data = in_batches(lambda a, b: extract_chunk(backbone, inputs.x[a:b], None if views is None else views[a * k:b * k],
                                                 settings), len(inputs.x), batch_size or len(inputs.x))
    data["image"] = inputs.images
    data.update(inputs.ids)
    if inputs.labels is not None:
        data["label"] = inputs.labels
    return data


def compute_chunks(backbone: Backbone, items: list[ChunkInputs], settings: ExtractSettings,
                   batch_size: int = 0) -> list[tuple[int, dict[str, np.ndarray]]]:
    """One device batch of consecutive chunks -> (chunk, arrays) of each, every chunk whole (the writer's unit)."""
    if len(items) == 1:
        return [(items[0].chunk, chunk_arrays(backbone, items[0], settings, batch_size))]
    data = chunk_arrays(backbone, merge_inputs(items), settings, batch_size)
    return [(i.chunk, part) for i, part in zip(items, split_samples(data, [len(i.images) for i in items]), strict=True)]


# ---------------------------------------------------------------- local: read | compute | write overlap
def run_local(backbone, group, pending, directory, names, order, labelled, settings, progress, workers: int = 0,
              batch_size: int = 0) -> None:
    """Decode the next chunks (in `workers` DataLoader processes) and write the previous ones while the backbone
    computes the current ones: `batch_size` crops per forward, chunks merged when it spans several."""

    def write(chunk: int, data: dict[str, np.ndarray]) -> None:
        writer.write_chunk(group, chunk, data)
        progress.update(len(data["feat"]))

    chunk_size = group.attrs["chunk_size"] if group is not None and batch_size else 0
    per_batch = max(1, batch_size // chunk_size) if chunk_size else 1
    pin = backbone is not None and backbone.device.type == "cuda"
    overlapped(pending, lambda chunk: load_chunk(group, chunk, directory, names, order, labelled, settings),
               lambda items: compute_chunks(backbone, items, settings, batch_size), write, workers=workers,
               pin_memory=pin, group=per_batch)


# ---------------------------------------------------------------- dask: chunk ranges over workers
def worker_chunk(url: str, config: Config, split: str, directory: str, names: list[str], chunk: int) -> int:
    """Runs on a dask worker: load the backbone once per process, compute and write one chunk.

    The sample order is recomputed from the config (a pure function, cached per process), not shipped.
    """
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # one thread per worker process
    backbone = feature_backbone(config)
    group = writer.open_group(url, mode="r+")
    settings = settings_for(config, split)
    order = sample_order(config, split, len(names))
    inputs = load_chunk(group, chunk, directory, names, order, "label" in group, settings)
    data = chunk_arrays(backbone, inputs, settings, feature_batch_size(config))  # one chunk per task: a batch
    writer.write_chunk(group, chunk, data)                                    # never spans chunks here
    return len(data["feat"])


# ---------------------------------------------------------------- the stage
def run(
    config: Config,
    workdir: Path,
    split: str,
    store: str | None = None,
    force: bool = False,
    scheduler: str = "local",
    address: str | None = None,
    workers: int = 2,
) -> dict[str, Any]:
    if split not in prepare.SPLITS:
        raise UserError(f"--split must be one of {', '.join(prepare.SPLITS)}, got '{split}'")
    prepare.run(config, workdir)
    url = store or paths.store_url(config, workdir, split)
    name = f"features-{split}"
    stage_config, inputs = stage_plan(config, workdir, {split: url})[name]

    def body(ctx: StageContext) -> dict[str, Any]:
        directory = str(paths.prepared_dir(config, workdir, split))
        names, labelled = prepared.read_prepared(directory)
        order = sample_order(config, split, len(names))
        backbone = feature_backbone(config)
        settings = settings_for(config, split)
        f = config["features"]
        res = config["prepare"]["resolution" if split == "train" else "val_resolution"]
        if res % backbone.patch_size:
            raise UserError(f"resolution {res} is not a multiple of the patch size {backbone.patch_size} "
                            f"of {backbone.name}; set prepare.resolution / prepare.val_resolution accordingly")
        layout = Layout(len(names), res, backbone.patch_size, backbone.embed_dim, backbone.num_heads,
                        settings.n_views, settings.with_lhp, labelled, f["dtype"])
        attrs = {
            "dataset": config["dataset"]["name"], "split": split, "backbone": backbone.name,
            "patch_size": backbone.patch_size, "resolution": res, "weights": backbone.weights,
            "weights_hash": backbone.weights_hash, "random_init": backbone.random_init,
            "n_views": settings.n_views, "fingerprint": ctx.fingerprint, "n_classes": config["dataset"]["n_classes"],
            "preprocessing": {"prepare": config["prepare"], "normalize": "imagenet",
                              "photometric_on_normalized": settings.photometric_on_normalized},
            "sample_order": f"permuted (features.seed={f['seed']})" if split == "train" else "dataset",
            "samples": [names[i] for i in order[0]],  # in store order
            "class_names": list(prepare.open_split(config, workdir, split).class_names),
            "extraction": extraction_attrs(backbone, config),
        }
        group = writer.create_store(url, layout, f["chunk_size"], attrs, ctx.fresh, f["compressor"], f["clevel"],
                                    log=ctx.log)  # a kept store is repaired first: exactly its bad chunks redone
        done = writer.finished_chunks(group)
        pending = [int(c) for c in np.flatnonzero(~done)]
        finished = int(sum(np.diff(writer.chunk_range(group, int(c)))[0] for c in np.flatnonzero(done)))
        if finished:
            ctx.log(f"resuming: {int(done.sum())} of {done.size} chunks already in {url}")
        t0 = time.perf_counter()
        with tqdm(total=len(names), initial=finished, desc=name, unit="img", smoothing=0.1) as progress:
            if scheduler == "local":
                run_local(backbone, group, pending, directory, names, order, labelled, settings, progress,
                          f["workers"], feature_batch_size(config))
            elif scheduler in ("local-cluster", "distributed"):
                run_dask(worker_chunk, (url, config, split, directory, names), pending, progress,
                         address if scheduler == "distributed" else None, workers)
            else:
                raise UserError(f"--scheduler must be local, local-cluster or distributed, got '{scheduler}'")
        if not writer.finished_chunks(group).all():
            raise RuntimeError(f"some chunks of {url} were not written; rerun to finish them")
        writer.mark_complete(group)
        seconds = time.perf_counter() - t0
        preview = paths.stage_dir(config, workdir) / "features" / f"{split}-preview.png"
        preview.parent.mkdir(parents=True, exist_ok=True)
        k = min(4, len(names))
        done_store = FeatureStore.open(url)  # checked reads: a damaged chunk is named, never a codec traceback
        feature_preview(*(done_store.read(n, 0, k) for n in ("image", "feat", "cls_attn")), preview,
                        title=f"{backbone.name} {'[RANDOM-INIT]' if backbone.random_init else ''} {split}")
        array_bytes = stored_bytes(group)
        stored = sum(array_bytes.values())
        raw = layout.raw_fp16_bytes_per_sample() * len(names)
        note = " [RANDOM-INIT backbone]" if backbone.random_init else ""
        rate = (len(names) - finished) / seconds if seconds > 0 else 0.0
        return {
            "store": url, "samples": len(names), "computed": len(names) - finished, "store_bytes": stored,
            "array_bytes": array_bytes,
            "raw_fp16_feature_bytes": raw, "preview": str(preview),
            "random_init": backbone.random_init, "weights": backbone.weights,
            "timings": {"extract_seconds": round(seconds, 3)},
            "summary": f"{plural(len(names), 'sample')} ({len(names) - finished} computed, {rate:.1f} img/s, "
                       f"{plural(1 + settings.n_views, 'backbone pass', 'backbone passes')} each), "
                       f"{stored / 2**20:.1f} MiB -> {url}{note}",
        }

    sdir = paths.stage_dir(config, workdir)
    check = writer.recorded_store_check(url, str(manifest_path(sdir, name)))  # up to date only if it passes
    manifest = run_stage(sdir, name, stage_config, inputs, body, force, check)
    if manifest["outputs"].get("store") != url:  # every later stage reads (and HCL writes) the store named here
        raise UserError(f"{manifest_path(paths.stage_dir(config, workdir), name)} names the store "
                        f"{manifest['outputs'].get('store')!r}, but this run's store is {url}: refused (an edited "
                        "manifest cannot redirect hp-pipe to another store). Rerun with --force")
    return manifest
