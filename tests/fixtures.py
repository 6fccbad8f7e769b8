"""Tiny dataset folders in the real layouts, for tests: each builder returns what it wrote.

Images are smooth, distinct per sample (so a mix-up between files shows), labels are raw ids
exactly as the real dataset stores them (before any mapping to class ids).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy.io import savemat

H, W = 40, 60


def picture(k: int, h: int = H, w: int = W) -> np.ndarray:
    """A smooth (h, w, 3) uint8 picture that differs per k (survives JPEG nearly unchanged)."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.array([(37 * k) % 200, (91 * k + 50) % 200, (53 * k + 100) % 200])
    img = base + np.stack([yy * 40 // h, xx * 40 // w, (yy + xx) * 20 // (h + w)], -1)
    return img.astype(np.uint8)


def raw_ids(rng: np.random.Generator, values, h: int = H, w: int = W) -> np.ndarray:
    """(h, w) uint8 labels using every value in `values` at least once."""
    values = np.asarray(values, np.uint8)
    lab = rng.choice(values, size=(h, w))
    lab.flat[: len(values)] = values
    return lab


def save(path: Path, array: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(array)
    if palette:   # VOC-style palette PNG: the pixel values are palette indices
        im.putpalette([v for i in range(256) for v in ((i * 7) % 256, (i * 13) % 256, (i * 29) % 256)])
    im.save(path, quality=95) if path.suffix == ".jpg" else im.save(path)


def make_cityscapes(root: Path, split: str = "train", cities=(("aachen", 2), ("bremen", 1)), seed: int = 0):
    rng = np.random.default_rng(seed)
    written = {}
    for c, (city, n) in enumerate(cities):
        for i in range(n):
            stem = f"{city}_{i:06d}_000019"
            img, lab = picture(10 * c + i), raw_ids(rng, list(range(34)) + [255])
            save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", img)
            save(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", lab)
            written[stem] = (img, lab)
    return written


def make_coco(root: Path, split_dir: str = "val2017", ids=("000000000139", "000000000285", "000000000632"),
              listed=None, list_name: str = "Coco164kFull_Stuff_Coarse_7.txt", fine_ids=(0, 2, 24, 156, 255),
              seed: int = 0):
    rng = np.random.default_rng(seed)
    written = {}
    for k, i in enumerate(ids):
        img, lab = picture(k), raw_ids(rng, fine_ids)
        save(root / "images" / split_dir / f"{i}.jpg", img)
        save(root / "annotations" / split_dir / f"{i}.png", lab)
        written[i] = (img, lab)
    lst = root / "curated" / split_dir / list_name
    lst.parent.mkdir(parents=True, exist_ok=True)
    lst.write_text("".join(f"{i}\n" for i in (listed if listed is not None else ids)))
    return written


def make_potsdam(root: Path, labelled=("0", "1"), unlabelled=("7",), test=("2",), seed: int = 0,
                 fine_ids=(0, 1, 2, 3, 4, 5, 255)):
    rng = np.random.default_rng(seed)
    written = {}
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    (root / "gt").mkdir(parents=True, exist_ok=True)
    for k, i in enumerate([*labelled, *unlabelled, *test]):
        rgb = picture(k)
        ir = np.full((H, W, 1), 200 - k, np.uint8)
        savemat(root / "imgs" / f"{i}.mat", {"img": np.concatenate([rgb, ir], -1)})
        lab = None
        if i not in unlabelled:
            lab = raw_ids(rng, fine_ids)
            savemat(root / "gt" / f"{i}.mat", {"gt": lab})
        written[i] = (rgb, lab)
    for name, ids in (("labelled_train.txt", labelled), ("unlabelled_train.txt", unlabelled),
                      ("labelled_test.txt", test)):
        (root / name).write_text("".join(f"{i}\n" for i in ids))
    return written


def make_voc(root: Path, train=("2007_000032", "2007_000039"), val=("2007_000033",), aug=(), seed: int = 0):
    """VOCdevkit/VOC2012 with palette labels; `aug` ids get SegmentationClassAug labels + train_aug.txt."""
    rng = np.random.default_rng(seed)
    voc = root / "VOCdevkit" / "VOC2012"
    written = {}
    for k, i in enumerate(dict.fromkeys([*train, *val, *aug])):
        img, lab = picture(k), raw_ids(rng, list(range(21)) + [255])
        save(voc / "JPEGImages" / f"{i}.jpg", img)
        if i in train or i in val:
            save(voc / "SegmentationClass" / f"{i}.png", lab, palette=True)
        if i in aug:
            save(voc / "SegmentationClassAug" / f"{i}.png", lab)
        written[i] = (img, lab)
    sets = voc / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True, exist_ok=True)
    (sets / "train.txt").write_text("".join(f"{i}\n" for i in train))
    (sets / "val.txt").write_text("".join(f"{i}\n" for i in val))
    if aug:
        (sets / "train_aug.txt").write_text("".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n"
                                                    for i in aug))
    return written


def kill_training_when(workdir: Path, run: str, sets: dict, ckpt: Path, should_kill, timeout: float = 180) -> dict:
    """Start `hp-pipe train --run RUN` in a subprocess (same torch thread count as this process, so that float
    reductions match) and SIGKILL it as soon as its checkpoint satisfies `should_kill(state)`; return that state."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import torch

    args = [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]
    child = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "train", "--dataset", "synthetic", "--run", run,
         "--workdir", str(workdir), *args],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen, deadline = None, time.monotonic() + timeout
    while time.monotonic() < deadline and child.poll() is None:
        if ckpt.exists():
            try:
                state = torch.load(ckpt, weights_only=True)
            except Exception:  # being renamed into place
                continue
            if should_kill(state):
                child.send_signal(signal.SIGKILL)
                seen = state
                break
        time.sleep(0.005)
    child.wait()
    assert child.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    return seen


# ---------------------------------------------------------------- tiny runs shared by several test files
TINY_TRAIN = {  # an HP run that trains in seconds and checkpoints every 2 iterations (tests/test_train.py, TensorBoard)
    "dataset.n_train": "4", "dataset.n_val": "1", "dataset.size": "128",
    "prepare.resolution": "64", "prepare.val_resolution": "64",
    "features.backbone": "vit_small_patch16_224.dino", "features.weights": "random",
    "features.n_views": "2", "features.chunk_size": "4",
    "hp.batch_size": "4", "hp.epochs": "3", "hp.head_dim": "32", "hp.pool_size": "16",
    "hp.renew_interval": "2", "hp.warmup": "4", "train.log_interval": "1", "train.checkpoint_interval": "2",
}
TINY_EVALUATE = {  # a run small enough to evaluate in seconds, CRF on (tests/test_evaluate.py, the HTML report)
    "dataset.n_train": "4", "dataset.n_val": "3", "dataset.size": "128",
    "prepare.resolution": "64", "prepare.val_resolution": "64",
    "features.backbone": "vit_small_patch16_224.dino", "features.weights": "random",
    "features.n_views": "1", "features.chunk_size": "4",
    "hp.batch_size": "4", "hp.epochs": "2", "hp.head_dim": "32", "hp.pool_size": "16",
    "hp.renew_interval": "2", "hp.warmup": "2",
    "evaluate.linear_epochs": "2", "evaluate.cluster_patches": "2000", "evaluate.crf": "true",
    "evaluate.crf_workers": "1", "evaluate.pictures": "2",
}


def random_store(url: str, layout, chunk_size: int, attrs: dict):
    """A complete feature store of `layout` whose chunk c holds standard-normal values seeded by c."""
    from cache import writer
    from cache.reader import FeatureStore

    group = writer.create_store(url, layout, chunk_size, attrs, False)
    for c in range(-(-layout.n_samples // chunk_size)):
        start, stop = writer.chunk_range(group, c)
        rng = np.random.default_rng(c)
        writer.write_chunk(group, c, {name: rng.standard_normal((stop - start, *shape)).astype(dtype)
                                      for name, (shape, dtype) in layout.arrays().items()})
    writer.mark_complete(group)
    return FeatureStore.open(url)
