"""`bench train`'s data-order figures (docs/hp.md §7): distinct images per batch and reader throughput.

Distinct images are simulated from the plan alone (cache/order.py) at the real crop counts; throughput is
measured on the bench store and on a copy of it laid out image by image (the layout before schema 2), read
side by side with the same reader, the same plan and the same number of crops.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from cache import writer
from cache.order import iid_distinct_images, plan_distinct_images
from cache.reader import FeatureStore
from pipeline.config import load_config

# Training images per dataset: COCO-Stuff-27's curated train list (Coco164kFull_Stuff_Coarse.txt, as the
# reference reads it; 49,629 images, about 248k five-crops) and Cityscapes' train split.
TRAIN_IMAGES = {"cocostuff27": 49_629, "cityscapes": 2_975}
READ_NAMES = ("feat", "feat_aug", "lhp")  # what the HP trainer reads per step


def distinct_images_figures() -> dict[str, Any]:
    """hp-pipe's plan vs an i.i.d. shuffle (exact expectation) vs the old image-by-image layout, per dataset.

    Each dataset's preset gives the batch size, chunk size, buffer, seeds and epochs; the mean is over every
    full batch of all the preset's epochs.
    """
    figures: dict[str, Any] = {}
    for dataset, n_images in TRAIN_IMAGES.items():
        config = load_config(dataset)
        f, t = config["features"], config["hp"]
        crops = 5 if config["prepare"]["five_crop"] else 1
        kw = {"n_images": n_images, "crops_per_image": crops, "chunk_size": f["chunk_size"],
              "buffer_chunks": config["train"]["buffer_chunks"], "batch_size": t["batch_size"], "seed": f["seed"],
              "shuffle_seed": t["seed"], "epochs": t["epochs"]}
        ours = plan_distinct_images(**kw)
        old = plan_distinct_images(**kw, permuted=False)
        iid = iid_distinct_images(n_images, crops, t["batch_size"])
        prefix = "" if dataset == "cocostuff27" else f"{dataset}_"
        figures.update({
            f"{prefix}distinct_images_per_batch": round(ours, 3),
            f"{prefix}iid_distinct_images_per_batch": round(iid, 3),
            f"{prefix}distinct_images_over_iid": round(ours / iid, 4),
            f"{prefix}distinct_images_per_batch_image_order": round(old, 3),
            f"{prefix}distinct_images_setup": {
                "images": n_images, "crops_per_image": crops, "batch_size": t["batch_size"],
                "chunk_size": f["chunk_size"], "buffer_chunks": config["train"]["buffer_chunks"], "epochs": t["epochs"],
                "features_seed": f["seed"], "train_seed": t["seed"]},
        })
    figures["iid_distinct_images_method"] = "exact expectation n*(1 - C(N-c,B)/C(N,B)), N = n*c crops"
    return figures


def image_order_copy(store: FeatureStore, url: str, names: tuple[str, ...] = READ_NAMES) -> FeatureStore:
    """The store's `names` arrays rewritten image by image (sample j = prepared crop j), same chunks and codecs."""
    inverse = np.argsort(store.read("crop_order", 0, len(store)))
    data = {name: store.read(name, 0, len(store))[inverse] for name in names}
    subset = SimpleNamespace(n_samples=len(store),  # a layout of just these arrays (cache/schema.py's interface)
                             arrays=lambda: {n: (v.shape[1:], str(v.dtype)) for n, v in data.items()})
    attrs = {k: v for k, v in store.attrs.items() if k not in ("record_arrays", "complete", "bad_chunks")}
    group = writer.create_store(url, subset, store.chunk_size, {**attrs, "sample_order": "image by image (bench copy)"},
                                fresh=True)  # the preset's codecs (zstd, level 3), checksums and chunk records
    for c in range(-(-len(store) // store.chunk_size)):  # whole chunks, as the features stage writes them
        start, stop = writer.chunk_range(group, c)
        writer.write_chunk(group, c, {n: v[start:stop] for n, v in data.items()})
    writer.mark_complete(group)
    return FeatureStore.open(url)


def reader_figures(store: FeatureStore, workdir: Path, batch_size: int, buffer_chunks: int, repeats: int,
                   min_crops: int = 2048) -> dict[str, Any]:
    """Reader crops/s on the store (permuted) and on its image-order copy, medians of `repeats`.

    Both sides read the same epochs of the same plan (drop_last, as training): exactly the same number of crops.
    The sides alternate epoch by epoch (who goes first alternating too), so both see the same load on a shared
    machine; CPU seconds (every thread of this process, the prefetch thread included) are reported beside the
    wall clock because they do not count other processes' load.
    """
    old = image_order_copy(store, str(Path(workdir) / "image-order.zarr"))
    per_epoch = len(store) // batch_size * batch_size
    epochs = max(1, math.ceil(min_crops / per_epoch))
    sides = {"permuted": store, "image_order": old}

    def one_epoch(s: FeatureStore, epoch: int) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in s.batches(list(READ_NAMES), batch_size, shuffle_seed=epoch, buffer_chunks=buffer_chunks,
                           drop_last=True):
            pass
        return time.perf_counter() - wall, time.process_time() - cpu

    wall_s: dict[str, list[float]] = {k: [] for k in sides}
    cpu_s: dict[str, list[float]] = {k: [] for k in sides}
    for r in range(repeats):
        wall, cpu = dict.fromkeys(sides, 0.0), dict.fromkeys(sides, 0.0)
        for epoch in range(epochs):
            for label in list(sides)[:: 1 if (r + epoch) % 2 == 0 else -1]:
                w, c = one_epoch(sides[label], epoch)
                wall[label] += w
                cpu[label] += c
        for label in sides:
            wall_s[label].append(wall[label])
            cpu_s[label].append(cpu[label])
    crops = epochs * per_epoch
    rate = {k: crops / statistics.median(v) for k, v in wall_s.items()}
    cpu_rate = {k: crops / statistics.median(v) for k, v in cpu_s.items()}
    stored = {label: sum(int(s.array(n).nbytes_stored()) for n in READ_NAMES) for label, s in sides.items()}
    return {
        "reader_crops_per_side": crops, "reader_epochs_per_side": epochs, "reader_arrays": list(READ_NAMES),
        "reader_batch_size": batch_size, "reader_buffer_chunks": buffer_chunks, "reader_chunk_size": store.chunk_size,
        "reader_store_crops": len(store),
        "reader_crops_per_s_image_order": round(rate["image_order"], 1),
        "reader_crops_per_s_permuted": round(rate["permuted"], 1),
        "reader_permuted_over_image_order": round(rate["permuted"] / rate["image_order"], 3),
        "reader_cpu_crops_per_s_image_order": round(cpu_rate["image_order"], 1),
        "reader_cpu_crops_per_s_permuted": round(cpu_rate["permuted"], 1),
        "reader_cpu_permuted_over_image_order": round(cpu_rate["permuted"] / cpu_rate["image_order"], 3),
        "reader_stored_bytes": stored,
    }
