"""Dense CRF refinement of segmentation logits (docs/hp.md §8), serial or spread over processes / dask.

What follows the reference `dense_crf` (STEGO src/crf.py; HP utils/seg_utils.py has the same function):
- the image goes in as uint8 in BGR order (the reference flips its un-normalized RGB PIL array with [:, :, ::-1]),
  made C-contiguous;
- probabilities = float32 softmax over classes of the logits; unary = pydensecrf's unary_from_softmax (-log p,
  p clipped at 1e-5, float32, (K, H*W)), made C-contiguous;
- DenseCRF2D(w, h, K), Gaussian (sxy=1, compat=3) added before bilateral (sxy=67, srgb=3, compat=4), 10 mean-field
  iterations; the refined Q (K, H, W) float32 is returned, and the evaluation takes its argmax.
The channel order matters: the permutohedral lattice is not symmetric in its features (RGB instead of BGR changes
~2% of argmax labels on a noisy 320px image). Unlike the reference, the caller passes the uint8 image itself (no
un-normalize round trip) and logits already at image size (the reference's bilinear resize is then the identity).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
import pydensecrf.densecrf as dcrf
import pydensecrf.utils as dcrf_utils

from pipeline.errors import UserError
from pipeline.orchestration.dask_client import dask_client

CRF_PARAMS = dict(iterations=10, gaussian_sxy=1, gaussian_compat=3, bilateral_sxy=67, bilateral_srgb=3,
                  bilateral_compat=4)
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


# ---------------------------------------------------------------- one image
def check_pair(image: np.ndarray, logits: np.ndarray, where: str = "") -> None:
    """Raise ValueError naming the mismatch (programming errors: the pipeline upsamples logits to image size)."""
    at = f" ({where})" if where else ""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"CRF image{at} must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
    if logits.ndim != 3 or logits.shape[0] < 1:
        raise ValueError(f"CRF logits{at} must be (K, H, W) with K >= 1, got {logits.shape}")
    if logits.shape[1:] != image.shape[:2]:
        raise ValueError(f"CRF logits{at} are {logits.shape[1]}x{logits.shape[2]} but the image is "
                         f"{image.shape[0]}x{image.shape[1]}: upsample the logits to the image size first")


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over axis 0 in float32 (the reference's F.softmax(dim=0) on float32 logits)."""
    z = logits.astype(np.float32, copy=False)
    e = np.exp(z - z.max(axis=0, keepdims=True))
    return e / e.sum(axis=0, keepdims=True)


def dense_crf(image: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB + (K, H, W) logits -> (K, H, W) float32 mean-field marginals after 10 iterations."""
    check_pair(image, logits)
    if not np.isfinite(logits).all():
        raise ValueError("CRF logits contain NaN or inf: check the probe outputs before the CRF")
    k, h, w = logits.shape
    p = CRF_PARAMS
    unary = np.ascontiguousarray(dcrf_utils.unary_from_softmax(softmax(logits)))  # (K, H*W) float32, -log p
    bgr = np.ascontiguousarray(image[:, :, ::-1])  # reference: to_pil_image(...)[:, :, ::-1] then ascontiguousarray
    d = dcrf.DenseCRF2D(w, h, k)
    d.setUnaryEnergy(unary)
    d.addPairwiseGaussian(sxy=p["gaussian_sxy"], compat=p["gaussian_compat"])
    d.addPairwiseBilateral(sxy=p["bilateral_sxy"], srgb=p["bilateral_srgb"], rgbim=bgr, compat=p["bilateral_compat"])
    q = d.inference(p["iterations"])
    return np.asarray(q, dtype=np.float32).reshape(k, h, w)


def crf_chunk(images: list[np.ndarray], logits: list[np.ndarray]) -> np.ndarray:
    """The unit of parallel work: a few images -> (n, H, W) int64 labels (argmax of the refined marginals)."""
    return np.stack([dense_crf(im, lg).argmax(axis=0).astype(np.int64) for im, lg in zip(images, logits, strict=True)])


def limit_threads() -> None:
    """Worker start-up only (never the caller's process): one thread per worker. The CRF itself is single-threaded;
    this keeps anything a worker loads later (BLAS, OpenMP) from oversubscribing the cores."""
    for key in THREAD_ENV:
        os.environ[key] = "1"


def crf_chunk_remote(images: list[np.ndarray], logits: list[np.ndarray]) -> np.ndarray:
    """crf_chunk on a dask worker, which may belong to a cluster started without the thread limits."""
    limit_threads()
    return crf_chunk(images, logits)


# ---------------------------------------------------------------- many images
def chunks(images: np.ndarray, logits: Iterable[np.ndarray], size: int) -> Iterator[tuple[list, list]]:
    """Pair images with a (possibly streamed) logits iterable, validated here, `size` images at a time."""
    n = len(images)
    batch_i: list[np.ndarray] = []
    batch_l: list[np.ndarray] = []
    count = 0
    for count, lg in enumerate(logits, start=1):
        if count > n:
            raise ValueError(f"CRF got more logits than the {n} images")
        image, lg = np.asarray(images[count - 1]), np.asarray(lg)
        check_pair(image, lg, where=f"image {count - 1}")
        batch_i.append(image)
        batch_l.append(lg)
        if len(batch_i) == size:
            yield batch_i, batch_l
            batch_i, batch_l = [], []
    if count != n:
        raise ValueError(f"CRF got {count} logits for {n} images: one (K, H, W) array per image")
    if batch_i:
        yield batch_i, batch_l


def ordered(submit: Callable, work: Iterator[tuple[list, list]], in_flight: int) -> Iterator[np.ndarray]:
    """Submit chunks keeping at most `in_flight` pending (bounded memory for streamed logits), yield in order."""
    pending: deque = deque()
    for item in work:
        pending.append(submit(*item))
        if len(pending) >= in_flight:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def run_serial(work: Iterator, workers: int, address: str | None) -> Iterator[np.ndarray]:
    for images, logits in work:
        yield crf_chunk(images, logits)


def run_processes(work: Iterator, workers: int, address: str | None) -> Iterator[np.ndarray]:
    # spawn, not fork: the parent may hold torch/OpenMP/dask threads, which a forked child can deadlock on
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=limit_threads) as pool:
        yield from ordered(lambda i, lg: pool.submit(crf_chunk, i, lg), work, 2 * workers)


def run_distributed(work: Iterator, workers: int, address: str | None) -> Iterator[np.ndarray]:
    # the LocalCluster nanny already sets OMP/MKL/OPENBLAS_NUM_THREADS=1 in its workers; crf_chunk does it too
    with dask_client(address, workers) as client:
        def submit(images: list, logits: list):
            data = client.scatter([images, logits])  # large arrays: scatter rather than embed in the task graph
            return client.submit(crf_chunk_remote, *data, pure=False)

        yield from ordered(submit, work, 2 * workers)


SCHEDULERS: dict[str, Callable[[Iterator, int, str | None], Iterator[np.ndarray]]] = {
    "processes": run_processes,
    "distributed": run_distributed,
}


def crf_labels(images: np.ndarray, logits: Iterable[np.ndarray] | np.ndarray, workers: int = 1,
               scheduler: str = "processes", address: str | None = None, chunk_size: int = 2) -> np.ndarray:
    """(N, H, W, 3) uint8 images + N (K, H, W) logits -> (N, H, W) int64 CRF labels, identical for every scheduler.

    workers == 1 and no address: serial in this process. Otherwise `scheduler` ("processes" or "distributed",
    the latter on `address` or a LocalCluster of `workers` processes) runs chunks of `chunk_size` images, at most
    2 * workers chunks in flight, results in input order. `logits` may be a generator (streamed from a cache).
    """
    if scheduler not in SCHEDULERS:
        raise UserError(f"crf scheduler must be one of {', '.join(SCHEDULERS)}, got '{scheduler}'")
    if not isinstance(workers, int) or workers < 1:
        raise UserError(f"crf workers must be an integer >= 1, got {workers!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"CRF images must be (N, H, W, 3) uint8, got {images.shape}")
    if hasattr(logits, "__len__") and len(logits) != len(images):
        raise ValueError(f"CRF got {len(logits)} logits for {len(images)} images: one (K, H, W) array per image")
    run = run_serial if workers == 1 and not address else SCHEDULERS[scheduler]
    out = list(run(chunks(images, logits, chunk_size), workers, address))
    if not out:
        return np.zeros((0, *images.shape[1:3]), dtype=np.int64)
    return np.concatenate(out)


# ---------------------------------------------------------------- benchmark
def bench_inputs(n_images: int, size: int, n_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Natural-ish inputs: piecewise-constant colour regions + noise, logits = 2 * noisy one-hot of the regions."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    images = np.empty((n_images, size, size, 3), dtype=np.uint8)
    logits = np.empty((n_images, n_classes, size, size), dtype=np.float32)
    for i in range(n_images):
        centres = rng.uniform(0, size, (n_classes, 2))  # Voronoi regions, one per class
        region = np.argmin((yy[..., None] - centres[:, 0]) ** 2 + (xx[..., None] - centres[:, 1]) ** 2, axis=-1)
        colours = rng.integers(0, 256, (n_classes, 3))
        noise = rng.normal(0, 8, (size, size, 3))
        images[i] = np.clip(colours[region] + noise, 0, 255).astype(np.uint8)
        noisy = np.where(rng.random((size, size)) < 0.25, rng.integers(0, n_classes, (size, size)), region)
        logits[i] = 2.0 * (np.arange(n_classes)[:, None, None] == noisy[None])
    return images, logits


def crf_bench(n_images: int, size: int, workers: int, n_classes: int = 27, repeats: int = 3,
              scheduler: str = "processes") -> dict:
    """Serial vs parallel crf_labels: median wall time of `repeats` runs (parallel includes pool start-up)."""
    images, logits = bench_inputs(n_images, size, n_classes)

    def timed(w: int) -> tuple[float, np.ndarray, int]:
        times, out, done = [], None, 0
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = crf_labels(images, logits, workers=w, scheduler=scheduler)
            times.append(time.perf_counter() - t0)
            done += len(out)
        return statistics.median(times), out, done

    serial_s, serial, serial_done = timed(1)
    parallel_s, parallel, parallel_done = timed(workers)
    return {
        "n_images": n_images, "size": size, "n_classes": n_classes, "workers": workers, "scheduler": scheduler,
        "repeats": repeats, "cpus": os.cpu_count(),
        "images_serial": serial_done, "images_parallel": parallel_done,  # the work each side did, all repeats
        "serial_s": serial_s, "parallel_s": parallel_s,
        "serial_images_per_s": n_images / serial_s, "parallel_images_per_s": n_images / parallel_s,
        "speedup": serial_s / parallel_s if parallel_s > 0 else math.inf,
        "identical": bool(np.array_equal(serial, parallel)),
    }
