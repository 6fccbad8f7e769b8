"""The order of the samples in a store, and what it does to training batches (docs/hp.md §7).

The reference shuffles the whole crop list every epoch, so a batch of 64 holds about 64 different source
images. The reader reads whole chunks and shuffles within a buffer of a few chunks; if crops were stored image
by image (the five crops of one image side by side) a batch would hold only about half as many images, and
overlapping crops of one image would meet in the cross-image positive sets. The training store is therefore
written in a seeded random permutation of all crops: a chunk holds unrelated crops, and a batch drawn from a
buffer of random chunks is a uniformly random subset of the crops, like the reference's.

Everything here is plain data: the features stage and the benchmark use the same functions.
"""

from __future__ import annotations

import functools

import numpy as np

from cache.reader import batch_plan


def crop_permutation(n: int, seed: int) -> np.ndarray:
    """Store sample -> prepared crop index, a seeded uniform permutation of `n` crops (`features.seed`)."""
    return np.random.default_rng(seed).permutation(n)


@functools.lru_cache(maxsize=4)
def store_order(n_crops: int, crops_per_image: int, seed: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(crop_order, source_image) of a store: the prepared crop and the source image of every sample.

    `seed` None keeps the prepared order (evaluation splits: pictures and predictions follow the dataset's
    order). Prepared crops are listed image by image, `crops_per_image` each. Cached (read-only arrays): dask
    workers call this for every chunk they write.
    """
    if crops_per_image < 1 or n_crops % crops_per_image:
        raise ValueError(f"{n_crops} prepared crops are not {crops_per_image} crops per image")
    order = np.arange(n_crops) if seed is None else crop_permutation(n_crops, seed)
    crop_order = order.astype(np.int32)
    source_image = (order // crops_per_image).astype(np.int32)
    crop_order.flags.writeable = source_image.flags.writeable = False
    return crop_order, source_image


def distinct_per_batch(source_image: np.ndarray, batches: list[np.ndarray]) -> np.ndarray:
    """Number of different source images in each batch (batches of store sample indices)."""
    return np.array([len(np.unique(source_image[b])) for b in batches], dtype=np.int64)


def plan_distinct_images(n_images: int, crops_per_image: int, chunk_size: int, buffer_chunks: int,
                         batch_size: int, seed: int = 0, shuffle_seed: int = 0, epochs: int = 1,
                         permuted: bool = True) -> float:
    """Mean distinct source images per full batch of hp-pipe's data order, simulated from the plan alone.

    The store order is the features stage's (`store_order`, permuted with `seed` = features.seed, or image by
    image when `permuted` is False, the layout before schema 2); the batches are the reader's `batch_plan` with
    the seeds `train` uses (shuffle_seed * 1000 + epoch), last partial batch dropped as in training.
    """
    n = n_images * crops_per_image
    _, source_image = store_order(n, crops_per_image, seed if permuted else None)
    counts = []
    for epoch in range(epochs):
        plan = batch_plan(n, chunk_size, batch_size, shuffle_seed * 1000 + epoch, buffer_chunks, drop_last=True)
        batches = [b for _, bs in plan for b in bs]
        if batches:
            sources = np.sort(source_image[np.stack(batches)], axis=1)
            counts.append(1 + (np.diff(sources, axis=1) != 0).sum(axis=1))
    if not counts:
        raise ValueError(f"{n} crops hold no full batch of {batch_size}")
    return float(np.concatenate(counts).mean())


def iid_distinct_images(n_images: int, crops_per_image: int, batch_size: int) -> float:
    """Expected distinct source images in a batch of an i.i.d. shuffle (the reference's), exact.

    A batch of B crops of a uniformly shuffled list of N = n·c crops is a uniform B-subset; an image is
    missing from it with probability C(N−c, B)/C(N, B) = Π_{k<c} (N−B−k)/(N−k), so the expected number of
    images present is n·(1 − that).
    """
    n = n_images * crops_per_image
    if not 0 < batch_size <= n:
        raise ValueError(f"batch of {batch_size} from {n} crops")
    missing = 1.0
    for k in range(crops_per_image):
        missing *= max(n - batch_size - k, 0) / (n - k)
    return n_images * (1.0 - missing)
