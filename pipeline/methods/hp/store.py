"""HP's feature store, chunk by chunk (docs/cache.md, "Computing a store"): what one chunk holds and how chunks are
computed, locally (decode | backbone | write overlapped) or on dask workers. The `features` stage (stages/features.py)
creates the store and calls these.

The training store holds the crops in a seeded random permutation (cache/order.py, docs/hp.md §7): sample i
is prepared crop `crop_order[i]`, so the reader's chunk-buffer shuffle yields i.i.d.-like batches. The order is
a pure function of (crop count, crops per image, features.seed): every process and every resumed run agrees.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from cache import writer
from cache.order import store_order
from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.extraction import prepared
from pipeline.extraction.backbone import Backbone
from pipeline.extraction.extract import ExtractSettings, extract_chunk, model_inputs
from pipeline.extraction.workers import feature_backbone, feature_batch_size, in_batches, overlapped, split_samples


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
