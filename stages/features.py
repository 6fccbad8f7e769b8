"""`features`: run the frozen DINO backbone once per crop and store what training needs.

Work is split by store chunk: each chunk is computed and written as a unit and then flagged done.
Locally, a loader thread decodes the next chunks (in `features.workers` DataLoader processes) and a
writer thread compresses the previous ones while the backbone runs on `features.device` in forwards
of `features.batch_size` crops (a slice of a chunk or several whole chunks); with dask, workers each
load the backbone once and write disjoint chunks straight into the store (docs/cache.md, "Computing a store").
What a chunk holds and how chunks are computed is pipeline/methods/hp/store.py; this module creates the store, fills it
and says what it wrote. Its upstream (`prepare`) is run by the executor (pipeline/orchestration/graph.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cache import writer
from cache.reader import FeatureStore
from cache.schema import Layout
from cache.writer import stored_bytes
from pipeline.config import Config
from pipeline.datasets import open_split
from pipeline.datasets.base import SPLITS
from pipeline.errors import UserError
from pipeline.extraction import prepared
from pipeline.extraction.backbone import Backbone, check_resolution
from pipeline.extraction.extract import ExtractSettings
from pipeline.extraction.workers import extraction_attrs, feature_backbone, feature_batch_size, fill_chunks
from pipeline.methods.hp.store import run_local, sample_order, settings_for, worker_chunk
from pipeline.orchestration import coverage, paths
from pipeline.orchestration.graph import Build, Step, build
from pipeline.orchestration.runner import StageContext
from pipeline.orchestration.stage import implement
from pipeline.reporting.plots import feature_preview
from pipeline.wording import plural


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
    """Build (or resume, or find up to date) HP's store of `split`, `prepare` first; its manifest."""
    if split not in SPLITS:
        raise UserError(f"--split must be one of {', '.join(SPLITS)}, got '{split}'")
    return build(config, workdir, f"features-{split}", force=force, stores={split: store} if store else None,
                 options={"scheduler": scheduler, "address": address, "workers": workers})


def store_attrs(config: Config, workdir: Path, split: str, backbone: Backbone, settings: ExtractSettings,
                names: list[str], order: tuple[np.ndarray, np.ndarray], fp: str, res: int) -> dict[str, Any]:
    """What the store records about itself: where its samples come from and how they were computed."""
    f = config["features"]
    return {
        "dataset": config["dataset"]["name"], "split": split, "backbone": backbone.name,
        "patch_size": backbone.patch_size, "resolution": res, "weights": backbone.weights,
        "weights_hash": backbone.weights_hash, "random_init": backbone.random_init,
        "n_views": settings.n_views, "fingerprint": fp, "n_classes": config["dataset"]["n_classes"],
        "preprocessing": {"prepare": config["prepare"], "normalize": "imagenet",
                          "photometric_on_normalized": settings.photometric_on_normalized},
        "sample_order": f"permuted (features.seed={f['seed']})" if split == "train" else "dataset",
        "samples": [names[i] for i in order[0]],  # in store order
        "class_names": list(open_split(config, workdir, split).class_names),
        "extraction": extraction_attrs(backbone, config),
        "backbone_facts": backbone.facts.attrs(),  # arch, tag, patch, width, heads, prefix tokens
    }


def fill(job: Build, ctx: StageContext, group, url: str, split: str, backbone: Backbone, names: list[str],
         order, labelled: bool, settings: ExtractSettings) -> tuple[int, float]:
    """Compute every chunk not yet done, locally or on dask workers: (samples found done, seconds)."""
    config = job.config
    directory = str(paths.prepared_dir(config, job.workdir, split))

    def local(pending: list[int], progress) -> None:
        run_local(backbone, group, pending, directory, names, order, labelled, settings, progress,
                  config["features"]["workers"], feature_batch_size(config))

    # any --workdir; the worker gets the keys this stage may read, as plain data
    worker_args = (paths.for_workers(url), coverage.covered_only(config), split, paths.for_workers(directory), names)
    return fill_chunks(group, url, job.options, local, worker_chunk, worker_args,
                       {"total": len(names), "desc": ctx.name, "unit": "img", "smoothing": 0.1}, ctx.log)


def body(job: Build, step: Step, ctx: StageContext) -> dict[str, Any]:
    """Create (or repair and resume) the split's store, fill it, draw its preview; the stage's outputs."""
    config, split, url = job.config, step.name.removeprefix("features-"), step.config["store"]
    names, labelled = prepared.read_prepared(str(paths.prepared_dir(config, job.workdir, split)))
    order = sample_order(config, split, len(names))
    backbone = feature_backbone(config)
    settings = settings_for(config, split)
    f = config["features"]
    key = "prepare." + ("resolution" if split == "train" else "val_resolution")
    res = config["prepare"][key.partition(".")[2]]
    check_resolution(res, backbone.facts, key)  # a whole grid: names the nearest resolutions that work
    layout = Layout(len(names), res, backbone.patch_size, backbone.embed_dim, backbone.num_heads,
                    settings.n_views, settings.with_lhp, labelled, f["dtype"])
    attrs = store_attrs(config, job.workdir, split, backbone, settings, names, order, ctx.fingerprint, res)
    group = writer.create_store(url, layout, f["chunk_size"], attrs, ctx.fresh, f["compressor"], f["clevel"],
                                log=ctx.log)  # a kept store is repaired first: exactly its bad chunks redone
    finished, seconds = fill(job, ctx, group, url, split, backbone, names, order, labelled, settings)
    preview = job.sdir / "features" / f"{split}-preview.png"
    preview.parent.mkdir(parents=True, exist_ok=True)
    k = min(4, len(names))
    done_store = FeatureStore.open(url)  # checked reads: a damaged chunk is named, never a codec traceback
    feature_preview(*(done_store.read(n, 0, k) for n in ("image", "feat", "cls_attn")), preview,
                    title=f"{backbone.name} {'[RANDOM-INIT]' if backbone.random_init else ''} {split}")
    array_bytes = stored_bytes(group)
    stored = sum(array_bytes.values())
    note = " [RANDOM-INIT backbone]" if backbone.random_init else ""
    rate = (len(names) - finished) / seconds if seconds > 0 else 0.0
    return {
        "store": url, "samples": len(names), "computed": len(names) - finished, "store_bytes": stored,
        "array_bytes": array_bytes,
        "raw_fp16_feature_bytes": layout.raw_fp16_bytes_per_sample() * len(names), "preview": str(preview),
        "random_init": backbone.random_init, "weights": backbone.weights,
        "precision": {"forward": attrs["extraction"]["dtype"], "amp": f["amp"], "store_dtype": f["dtype"]},
        "timings": {"extract_seconds": round(seconds, 3)},
        "summary": f"{plural(len(names), 'sample')} ({len(names) - finished} computed, {rate:.1f} img/s, "
                   f"{plural(1 + settings.n_views, 'backbone pass', 'backbone passes')} each), "
                   f"{stored / 2**20:.1f} MiB -> {url}{note}",
    }


# this module's functions for the stages the graph declares (pipeline/orchestration/stage.py)
implement("features-train", "features-val", body=body)
