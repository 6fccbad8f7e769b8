"""Dataset readers on tiny folders in the real layouts, the reference geometry, the synthetic set."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from pipeline.datasets import DATASETS, ensure_synthetic, open_dataset
from pipeline.datasets.cocostuff import FINE_TO_COARSE
from pipeline.datasets.geometry import five_crop, resize_shorter_center_crop
from pipeline.errors import UserError
from pipeline.extraction import prepared
from tests.fixtures import H, W, make_cityscapes, make_coco, make_potsdam, make_voc, picture, raw_ids, save


def assert_user_error(fn, *needles):
    with pytest.raises(UserError) as info:
        fn()
    for needle in needles:
        assert str(needle) in str(info.value), f"{needle!r} not in: {info.value}"
    return str(info.value)


# ---------------------------------------------------------------- registry


def test_registry_and_options():
    assert set(DATASETS) == {"cityscapes", "cocostuff27", "potsdam", "voc", "folder", "synthetic"}
    msg = assert_user_error(lambda: open_dataset("kitti", "/x", "train"), "kitti")
    assert all(name in msg for name in DATASETS)
    assert_user_error(lambda: open_dataset("cityscapes", "/x", "train", colour=1), "colour", "n_classes")


def test_bad_split_and_n_classes(tmp_path):
    make_cityscapes(tmp_path)
    assert_user_error(lambda: open_dataset("cityscapes", tmp_path, "test"), "test", "train")
    assert_user_error(lambda: open_dataset("cityscapes", tmp_path, "train", n_classes=19), "19", "27")
    assert len(open_dataset("cityscapes", tmp_path, "train", n_classes=27)) == 3


# ---------------------------------------------------------------- cityscapes


def test_cityscapes_reads_images_and_maps_ids(tmp_path):
    written = make_cityscapes(tmp_path)
    ds = open_dataset("cityscapes", tmp_path, "train")
    assert (ds.n_classes, len(ds.class_names)) == (27, 27)
    assert (ds.class_names[0], ds.class_names[10], ds.class_names[26]) == ("road", "pole", "bicycle")
    assert [s.name for s in ds] == sorted(written)
    for s in ds:
        img, raw = written[s.name]
        expected = np.where(raw < 7, 255, raw.astype(int) - 7)
        expected[raw == 255] = 255
        np.testing.assert_array_equal(s.image, img)
        np.testing.assert_array_equal(s.label, expected)
        assert s.label.dtype == np.uint8 and s.image.dtype == np.uint8
    assert ds.source(0).endswith("aachen_000000_000019_leftImg8bit.png")
    again = pickle.loads(pickle.dumps(ds))                   # datasets travel to dask workers
    np.testing.assert_array_equal(again[2].label, ds[2].label)


def test_cityscapes_layout_errors(tmp_path):
    assert_user_error(lambda: open_dataset("cityscapes", tmp_path / "nope", "train"), tmp_path / "nope",
                      "leftImg8bit/{train,val}")
    make_cityscapes(tmp_path, split="train")
    assert_user_error(lambda: open_dataset("cityscapes", tmp_path, "val"), tmp_path / "leftImg8bit" / "val")
    (tmp_path / "leftImg8bit" / "val").mkdir()
    assert_user_error(lambda: open_dataset("cityscapes", tmp_path, "val"), tmp_path / "gtFine" / "val")


def test_cityscapes_bad_files(tmp_path):
    make_cityscapes(tmp_path)
    img0 = tmp_path / "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png"
    img0.write_bytes(b"\x89PNG not really a png")
    lab1 = tmp_path / "gtFine/train/aachen/aachen_000001_000019_gtFine_labelIds.png"
    bad = raw_ids(np.random.default_rng(1), [7, 34, 40])
    save(lab1, bad)
    lab2 = tmp_path / "gtFine/train/bremen/bremen_000000_000019_gtFine_labelIds.png"
    save(lab2, np.zeros((H + 2, W), np.uint8))
    ds = open_dataset("cityscapes", tmp_path, "train")
    assert_user_error(lambda: ds[0], f"cannot read image {img0}", "re-download or delete")
    assert_user_error(lambda: ds[1], lab1, "34, 40")
    assert_user_error(lambda: ds[2], lab2, "60x42", "60x40")
    lab2.unlink()
    assert_user_error(lambda: ds[2], f"missing label {lab2}")


# ---------------------------------------------------------------- cocostuff27

# (fine stuffthingmaps id, coarse class) pairs read off STEGO's fine_to_coarse table
STEGO_PAIRS = {0: 9, 1: 11, 2: 11, 9: 8, 24: 7, 40: 10, 63: 3, 75: 0, 80: 1, 92: 17, 105: 23, 119: 26,
               123: 22, 148: 21, 156: 23, 170: 18, 179: 19, 181: 24, 255: 255}


def test_fine_to_coarse_table():
    assert sorted(FINE_TO_COARSE) == list(range(182))
    assert sorted(set(FINE_TO_COARSE.values())) == list(range(27))
    assert all(FINE_TO_COARSE[f] == c for f, c in STEGO_PAIRS.items() if f != 255)


def test_cocostuff_maps_fine_ids(tmp_path):
    written = make_coco(tmp_path, fine_ids=list(STEGO_PAIRS), listed=["000000000632", "000000000139"])
    ds = open_dataset("cocostuff27", tmp_path, "val")
    assert ds.n_classes == 27
    names = ds.class_names
    assert (names[0], names[9], names[-1]) == ("electronic-things", "person-things", "water-stuff")
    assert [s.name for s in ds] == ["000000000139", "000000000632"]   # the listed ids only, sorted
    for s in ds:
        img, raw = written[s.name]
        expected = np.vectorize(STEGO_PAIRS.get)(raw)
        np.testing.assert_array_equal(s.label, expected)
        assert np.abs(s.image.astype(int) - img).mean() < 3      # JPEG, near-lossless
        assert s.image.shape == (H, W, 3)


def test_cocostuff_lists_and_errors(tmp_path):
    make_coco(tmp_path, split_dir="train2017", list_name="Coco164kFull_Stuff_Coarse.txt")
    assert len(open_dataset("cocostuff27", tmp_path, "train")) == 3          # STEGO's train list by default
    assert_user_error(lambda: open_dataset("cocostuff27", tmp_path, "train", image_list="Other.txt"),
                      tmp_path / "curated" / "train2017" / "Other.txt", "Coco164kFull_Stuff_Coarse.txt")
    assert_user_error(lambda: open_dataset("cocostuff27", tmp_path, "val"), tmp_path / "images" / "val2017")
    lab = tmp_path / "annotations/train2017/000000000285.png"
    save(lab, raw_ids(np.random.default_rng(0), [3, 182, 200]))
    ds = open_dataset("cocostuff27", tmp_path, "train")
    assert_user_error(lambda: ds[1], lab, "182, 200")
    img = tmp_path / "images/train2017/000000000632.jpg"
    img.write_bytes(b"\xff\xd8\xff garbage")
    assert_user_error(lambda: ds[2], f"cannot read image {img}")


# ---------------------------------------------------------------- potsdam

POTSDAM = {0: 0, 4: 0, 1: 1, 5: 1, 2: 2, 3: 2, 255: 255}


def test_potsdam_reads_mat_tiles(tmp_path):
    written = make_potsdam(tmp_path)
    for split, ids in (("train", ["0", "1"]), ("val", ["2"])):
        ds = open_dataset("potsdam", tmp_path, split)
        assert ds.class_names == ["roads and cars", "buildings and clutter", "vegetation and trees"]
        assert [s.name for s in ds] == ids
        for s in ds:
            rgb, raw = written[s.name]
            np.testing.assert_array_equal(s.image, rgb)                   # the IR channel is dropped
            np.testing.assert_array_equal(s.label, np.vectorize(POTSDAM.get)(raw))
    unl = open_dataset("potsdam", tmp_path, "train", split_list="unlabelled_train.txt")
    assert [(s.name, s.label) for s in unl] == [("7", None)]


def test_potsdam_preset_prepares_one_crop_per_tile(tmp_path):
    """The reference's Potsdam reader ignores the crop type: each tile goes straight to 224 px (specs §6-§7)."""
    from pipeline.config import load_config
    from pipeline.datasets.geometry import resize_shorter_center_crop
    from stages import prepare

    written = make_potsdam(tmp_path / "potsdam")
    config = load_config("potsdam", {"dataset.root": str(tmp_path / "potsdam")})
    outputs = prepare.run(config, tmp_path / "work")["outputs"]
    assert outputs["train"]["samples"] == outputs["train"]["source_images"] == 2
    names, labelled = prepared.read_prepared(outputs["train"]["dir"])
    assert names == ["0", "1"] and labelled
    images, labels = prepared.load_prepared(outputs["train"]["dir"], names, labelled)
    for name, image, label in zip(names, images, labels, strict=True):
        rgb, raw = written[name]
        np.testing.assert_array_equal(image, resize_shorter_center_crop(rgb, 224))  # the whole tile, no crop
        np.testing.assert_array_equal(label, resize_shorter_center_crop(
            np.vectorize(POTSDAM.get)(raw).astype(np.uint8), 224))


def test_potsdam_errors(tmp_path):
    make_potsdam(tmp_path)
    assert_user_error(lambda: open_dataset("potsdam", tmp_path, "train", split_list="all.txt"),
                      tmp_path / "all.txt", "labelled_test.txt")
    from scipy.io import savemat
    savemat(tmp_path / "gt" / "1.mat", {"gt": np.full((H, W), 6, np.uint8)})
    (tmp_path / "imgs" / "0.mat").write_bytes(b"MATLAB 5.0 but not really")
    ds = open_dataset("potsdam", tmp_path, "train")
    assert_user_error(lambda: ds[0], f"cannot read image {tmp_path / 'imgs' / '0.mat'}")
    assert_user_error(lambda: ds[1], tmp_path / "gt" / "1.mat", "6")


# ---------------------------------------------------------------- voc


def test_voc_palette_labels_and_trainaug(tmp_path):
    written = make_voc(tmp_path)
    ds = open_dataset("voc", tmp_path, "val")
    assert ds.n_classes == 21 and ds.class_names[15] == "person" and not ds.trainaug
    (s,) = list(ds)
    np.testing.assert_array_equal(s.label, written["2007_000033"][1])   # palette indices, not colours
    assert np.abs(s.image.astype(int) - written[s.name][0]).mean() < 3
    assert [s.name for s in open_dataset("voc", tmp_path, "train")] == ["2007_000032", "2007_000039"]

    aug_root = tmp_path / "aug"
    written = make_voc(aug_root, aug=("2008_000002", "2007_000032"))
    train = open_dataset("voc", aug_root, "train")
    assert train.trainaug and [s.name for s in train] == ["2007_000032", "2008_000002"]
    assert str(train.items[1].label).endswith("SegmentationClassAug/2008_000002.png")
    np.testing.assert_array_equal(train[1].label, written["2008_000002"][1])
    assert not open_dataset("voc", aug_root, "train", trainaug=False).trainaug
    # the VOC2012 folder itself as the root
    assert len(open_dataset("voc", aug_root / "VOCdevkit" / "VOC2012", "val")) == 1


def test_voc_errors(tmp_path):
    assert_user_error(lambda: open_dataset("voc", tmp_path, "val"), "VOCdevkit/VOC2012/JPEGImages")
    make_voc(tmp_path)
    lab = tmp_path / "VOCdevkit/VOC2012/SegmentationClass/2007_000033.png"
    save(lab, raw_ids(np.random.default_rng(0), [0, 21, 254]), palette=True)
    assert_user_error(lambda: open_dataset("voc", tmp_path, "val")[0], lab, "21, 254")
    save(lab, np.zeros((H, W, 3), np.uint8))                        # a colour picture is not a label
    assert_user_error(lambda: open_dataset("voc", tmp_path, "val")[0], lab, "RGB")


# ---------------------------------------------------------------- folder


def test_folder_layouts(tmp_path):
    rng = np.random.default_rng(0)
    labs = {}
    for k, stem in enumerate(["b", "a", "c"]):
        save(tmp_path / "train" / "images" / f"{stem}.png", picture(k))
        labs[stem] = raw_ids(rng, [0, 1, 2, 255])
        save(tmp_path / "train" / "labels" / f"{stem}.png", labs[stem])
    ds = open_dataset("folder", tmp_path, "train", n_classes=3)
    assert [s.name for s in ds] == ["a", "b", "c"] and ds.class_names == ["class 0", "class 1", "class 2"]
    for s in ds:
        np.testing.assert_array_equal(s.label, labs[s.name])
    np.testing.assert_array_equal(ds[1].image, picture(0))
    assert_user_error(lambda: open_dataset("folder", tmp_path, "train"), tmp_path / "train" / "labels",
                      "n_classes")
    assert_user_error(lambda: open_dataset("folder", tmp_path, "train", n_classes=2)[0],
                      tmp_path / "train" / "labels" / "a.png", "2")
    (tmp_path / "train" / "labels" / "c.png").unlink()
    assert_user_error(lambda: open_dataset("folder", tmp_path, "train", n_classes=3),
                      tmp_path / "train" / "labels" / "c.png")

    plain = tmp_path / "plain"   # images straight in the root, no labels
    save(plain / "x.jpg", picture(1))
    save(plain / "y.webp", picture(2))
    (plain / "notes.txt").write_text("not an image")
    ds = open_dataset("folder", plain, "val")
    assert [(s.name, s.label) for s in ds] == [("x", None), ("y", None)] and ds.n_classes == 0
    (tmp_path / "empty").mkdir()
    assert_user_error(lambda: open_dataset("folder", tmp_path / "empty", "train"), tmp_path / "empty")
    assert_user_error(lambda: open_dataset("folder", tmp_path / "missing", "train"), tmp_path / "missing")
    save(plain / "x.png", picture(3))
    assert_user_error(lambda: open_dataset("folder", plain, "val"), "'x'")


# ---------------------------------------------------------------- geometry


@pytest.mark.parametrize("shape", [(40, 60, 3), (41, 61), (61, 41, 3), (8, 8)])
@pytest.mark.parametrize("ratio", [0.5, 0.7])
def test_five_crop_matches_slicing_and_torchvision(shape, ratio):
    a = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    h, w = shape[:2]
    ch, cw = int(ratio * h), int(ratio * w)
    ty, tx = int(round((h - ch) / 2)), int(round((w - cw) / 2))
    crops = five_crop(a, ratio)
    expected = [a[:ch, :cw], a[:ch, w - cw:], a[h - ch:, :cw], a[h - ch:, w - cw:], a[ty:ty + ch, tx:tx + cw]]
    for got, want in zip(crops, expected, strict=True):
        np.testing.assert_array_equal(got, want)
    t = torch.from_numpy(a if a.ndim == 2 else a.transpose(2, 0, 1))
    for got, ref in zip(crops, TF.five_crop(t, [ch, cw]), strict=True):
        np.testing.assert_array_equal(got, ref.numpy() if a.ndim == 2 else ref.numpy().transpose(1, 2, 0))


def test_resize_shorter_center_crop_matches_slicing():
    a = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    # halving with NEAREST samples the odd pixels; 48 wide -> centre 32 starts at 8
    np.testing.assert_array_equal(resize_shorter_center_crop(a, 32), a[1::2, 1::2][:, 8:40])
    # doubling repeats every pixel; 192 wide -> centre 128 starts at 32
    lab = a[..., 0]
    up = np.repeat(np.repeat(lab, 2, 0), 2, 1)
    np.testing.assert_array_equal(resize_shorter_center_crop(lab, 128), up[:, 32:160])
    np.testing.assert_array_equal(resize_shorter_center_crop(a.transpose(1, 0, 2), 32),
                                  a.transpose(1, 0, 2)[1::2, 1::2][8:40])


@pytest.mark.parametrize("shape", [(37, 53, 3), (53, 37), (100, 100, 3), (30, 77)])
def test_resize_shorter_center_crop_matches_torchvision(shape):
    a = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    for size in (16, 45):
        ref = T.Compose([T.Resize(size, T.InterpolationMode.NEAREST), T.CenterCrop(size)])(Image.fromarray(a))
        got = resize_shorter_center_crop(a, size)
        assert got.shape[:2] == (size, size)
        np.testing.assert_array_equal(got, np.asarray(ref))


# ---------------------------------------------------------------- synthetic


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


def test_synthetic_deterministic_and_rich(tmp_path):
    a = ensure_synthetic(tmp_path / "a", 8, 3, 96, 7)
    b = ensure_synthetic(tmp_path / "b", 8, 3, 96, 7)
    fa, fb = _files(a), _files(b)
    assert len(fa) == 2 * 11 + 1 and fa == fb
    assert json.loads(fa["synthetic.json"])["class_names"][:3] == ["sky", "water", "grass"]

    ds = open_dataset("synthetic", a, "train", n_train=8, n_val=3, size=96, seed=7)
    assert ds.n_classes == 8 and len(ds) == 8 and len(open_dataset("synthetic", a, "val", n_train=8, n_val=3,
                                                                   size=96, seed=7)) == 3
    samples = list(ds)
    assert all(s.image.shape == (96, 96, 3) and s.label.shape == (96, 96) for s in samples)
    labels = np.stack([s.label for s in samples])
    assert labels.max() < 8                                 # every pixel has a class
    present = np.unique(labels)
    assert len(present) >= 5
    for cls in present:   # each class varies in colour across images and in texture within them
        means = [s.image[s.label == cls].mean(0) for s in samples if (s.label == cls).sum() > 20]
        stds = [s.image[s.label == cls].std(0).max() for s in samples if (s.label == cls).sum() > 20]
        if len(means) >= 2:
            assert np.std(means, axis=0).max() > 3, ds.class_names[cls]
        assert min(stds) > 0, ds.class_names[cls]


def test_synthetic_regenerates_on_parameter_change(tmp_path):
    root = tmp_path / "syn"
    ensure_synthetic(root, 3, 1, 64, 0)
    first = root / "train" / "images" / "train_00000.png"
    before, mtime = first.read_bytes(), first.stat().st_mtime_ns
    ensure_synthetic(root, 3, 1, 64, 0)                     # same parameters: nothing rewritten
    assert first.stat().st_mtime_ns == mtime
    ensure_synthetic(root, 2, 1, 64, 1)                     # new seed, fewer images
    assert first.read_bytes() != before
    assert not (root / "train" / "images" / "train_00002.png").exists()
    assert json.loads((root / "synthetic.json").read_text())["seed"] == 1
    assert not list(root.rglob("*.tmp"))
    (root / "val" / "labels" / "val_00000.png").unlink()    # an incomplete set is regenerated
    ensure_synthetic(root, 2, 1, 64, 1)
    assert (root / "val" / "labels" / "val_00000.png").is_file()
    assert_user_error(lambda: open_dataset("synthetic", root, "train", n_classes=5), "8")
