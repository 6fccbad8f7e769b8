"""Bad input ends with one clear message (file or key + fix), exit code 2, no traceback, nothing damaged."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

GEOMETRY = ["--set", "prepare.resolution=32", "--set", "prepare.val_resolution=32",
            "--set", "features.n_views=1", "--set", "features.chunk_size=4"]
TINY = ["--set", "dataset.n_train=1", "--set", "dataset.n_val=1", "--set", "dataset.size=64", *GEOMETRY]


def hp(*args, workdir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args, "--workdir", str(workdir)],
                          capture_output=True, text=True, env=env, timeout=300)


def assert_clean_error(proc, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    message = proc.stderr[proc.stderr.index("error: "):]  # one message, possibly several lines
    assert message.count("error: ") == 1
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and "stages" not in p.parts):
        h.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return h.hexdigest()


def test_missing_dataset_folder(tmp_path):
    proc = hp("prepare", "--dataset", "cityscapes", "--data-root", str(tmp_path / "nowhere"), workdir=tmp_path)
    assert_clean_error(proc, str(tmp_path / "nowhere"))


@pytest.mark.slow
def test_unreadable_image_names_the_file_and_keeps_earlier_work(tmp_path):
    root = tmp_path / "pictures"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "images" / f"ok{i}.png")
    args = ["prepare", "--dataset", "folder", "--data-root", str(root), *GEOMETRY]
    assert hp(*args, workdir=tmp_path / "work").returncode == 0
    before = tree_digest(tmp_path / "work")
    (root / "images" / "zz_broken.png").write_bytes(b"not a png at all")
    proc = hp(*args, workdir=tmp_path / "work")
    assert_clean_error(proc, "zz_broken.png")
    assert tree_digest(tmp_path / "work") == before


def test_label_id_out_of_range_names_the_label_file(tmp_path):
    root = tmp_path / "cityscapes"
    for split in ("train", "val"):
        img_dir = root / "leftImg8bit" / split / "aachen"
        gt_dir = root / "gtFine" / split / "aachen"
        img_dir.mkdir(parents=True)
        gt_dir.mkdir(parents=True)
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(img_dir / "aachen_000000_000019_leftImg8bit.png")
        label = np.full((64, 64), 40 if split == "train" else 7, np.uint8)
        Image.fromarray(label).save(gt_dir / "aachen_000000_000019_gtFine_labelIds.png")
    proc = hp("prepare", "--dataset", "cityscapes", "--data-root", str(root), *GEOMETRY, workdir=tmp_path / "work")
    assert_clean_error(proc, "aachen_000000_000019_gtFine_labelIds.png")


@pytest.mark.slow
def test_store_of_another_backbone_is_refused_and_intact(tmp_path):
    store = tmp_path / "shared.zarr"
    base = ["features", "--dataset", "synthetic", "--split", "val", "--random-init", "--store", str(store), *TINY]
    assert hp(*base, workdir=tmp_path / "work").returncode == 0
    before = tree_digest(store)
    proc = hp(*base, "--backbone", "vit_small_patch8_224.dino", workdir=tmp_path / "work")
    assert_clean_error(proc, str(store), "vit_small_patch16_224.dino", "vit_small_patch8_224.dino")
    assert tree_digest(store) == before


@pytest.mark.parametrize("args,fragments", [
    (["--set", "train.tua=0.5"], ["train.tua", "did you mean 'hp.tau'"]),
    (["--set", "features.n_views=two"], ["features.n_views", "int"]),
])
@pytest.mark.slow
def test_unknown_or_mistyped_key(tmp_path, args, fragments):
    assert_clean_error(hp("features", "--dataset", "synthetic", *args, workdir=tmp_path), *fragments)


@pytest.mark.slow
def test_offline_pretrained_weights_say_what_to_do(tmp_path):
    proc = hp("features", "--dataset", "synthetic", "--weights", "pretrained", *TINY, workdir=tmp_path)
    assert_clean_error(proc, "--weights", "--random-init")


@pytest.mark.slow
def test_missing_checkpoint_file(tmp_path):
    proc = hp("features", "--dataset", "synthetic", "--weights", str(tmp_path / "dino.pth"), *TINY, workdir=tmp_path)
    assert_clean_error(proc, str(tmp_path / "dino.pth"))
