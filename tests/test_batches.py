"""Training batches are i.i.d.-like over all crops (docs/hp.md §7): the store's permuted sample order, the plan's
distinct images per batch against an independent closed form, and the order of every array."""

from fractions import Fraction
from math import comb

import numpy as np
import pytest
from PIL import Image

from cache import writer
from cache.order import crop_permutation, iid_distinct_images, plan_distinct_images, store_order
from cache.reader import FeatureStore, batch_plan
from cache.schema import SCHEMA_VERSION
from pipeline.config import load_config
from pipeline.datasets import dataset_options, open_dataset
from pipeline.datasets.geometry import five_crop
from pipeline.errors import UserError
from pipeline.extraction import prepared
from pipeline.orchestration import paths
from stages import features

TINY = {
    "dataset.n_train": "4", "dataset.n_val": "2", "dataset.size": "96",
    "prepare.resolution": "48", "prepare.val_resolution": "64",
    "features.backbone": "vit_small_patch16_224.dino", "features.weights": "random",
    "features.n_views": "1", "features.chunk_size": "4",
}


def tiny_config():
    return load_config("synthetic", dict(TINY))


def expected_distinct(n_images: int, crops: int, batch: int) -> float:
    """Σ over images of P(image in a uniform batch-subset of the n·c crops), with exact integer binomials."""
    n = n_images * crops
    return float(n_images * (1 - Fraction(comb(n - crops, batch), comb(n, batch))))


def distinct_counts(source: np.ndarray, n: int, chunk: int, batch: int, buffer: int, seeds) -> list[int]:
    return [len({int(source[i]) for i in b})
            for seed in seeds for _, bs in batch_plan(n, chunk, batch, seed, buffer, True) for b in bs]


# ---------------------------------------------------------------- the plan, simulated


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plan_batches_hold_as_many_images_as_an_iid_shuffle(seed):
    n_images, crops, chunk, buffer, batch = 200, 5, 16, 8, 64
    n = n_images * crops
    expected = expected_distinct(n_images, crops, batch)  # ≈ 56.41
    source = crop_permutation(n, seed) // crops  # the features stage's order: sample -> its source image
    counts = distinct_counts(source, n, chunk, batch, buffer, range(10))  # 10 epochs of training's plan
    assert np.mean(counts) >= 0.98 * expected
    # the same plan laid out image by image (schema 1) holds about half as many: this test can fail
    old = distinct_counts(np.arange(n) // crops, n, chunk, batch, buffer, range(10))
    assert np.mean(old) < 0.6 * expected
    # the library's simulation counts the same batches
    assert plan_distinct_images(n_images, crops, chunk, buffer, batch, seed=seed, epochs=10) == pytest.approx(
        np.mean(counts), abs=1e-12)
    assert plan_distinct_images(n_images, crops, chunk, buffer, batch, seed=seed, epochs=10,
                                permuted=False) == pytest.approx(np.mean(old), abs=1e-12)


@pytest.mark.parametrize("n_images,crops,batch", [(200, 5, 64), (49_629, 5, 64), (2_975, 5, 64), (7, 3, 21),
                                                  (30, 1, 8), (10, 5, 48)])
def test_iid_figure_is_the_exact_expectation(n_images, crops, batch):
    assert iid_distinct_images(n_images, crops, batch) == pytest.approx(expected_distinct(n_images, crops, batch),
                                                                         rel=1e-12)


def test_iid_figure_against_plain_shuffles():
    """Monte Carlo with a plain rng.permutation: 20 images x 5 crops, batches of 16 (exact: ≈ 11.06)."""
    rng = np.random.default_rng(0)
    source = np.arange(100) // 5
    counts = [len(set(source[rng.permutation(100)[:16]].tolist())) for _ in range(20_000)]
    assert abs(np.mean(counts) - iid_distinct_images(20, 5, 16)) < 0.05  # standard error ≈ 0.008


def test_store_order_is_a_permutation_with_its_source_images():
    crop_order, source = store_order(1000, 5, 0)
    assert sorted(crop_order.tolist()) == list(range(1000)) and not np.array_equal(crop_order, np.arange(1000))
    np.testing.assert_array_equal(source, crop_order // 5)
    np.testing.assert_array_equal(crop_order, crop_permutation(1000, 0))  # the bench simulates this very order
    natural, images = store_order(10, 1, None)
    np.testing.assert_array_equal(natural, np.arange(10))
    np.testing.assert_array_equal(images, np.arange(10))
    with pytest.raises(ValueError):
        store_order(11, 5, 0)


# ---------------------------------------------------------------- the store the features stage writes


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("order")
    config = tiny_config()
    stores = {s: features.run(config, workdir, s)["outputs"]["store"] for s in ("train", "val")}
    return config, workdir, stores


@pytest.mark.slow
def test_train_store_holds_the_crops_in_a_permuted_order(built):
    config, workdir, stores = built
    store = FeatureStore.open(stores["train"])
    crop_order, source = store.read("crop_order", 0, len(store)), store.read("source_image", 0, len(store))
    n = len(store)
    assert n == 20 and sorted(crop_order.tolist()) == list(range(n))
    assert not np.array_equal(crop_order, np.arange(n))
    directory = paths.prepared_dir(config, workdir, "train")
    names, _ = prepared.read_prepared(directory)
    dataset = open_dataset("synthetic", workdir / "data" / "synthetic", "train", **dataset_options(config))
    images, labels = store.read("image", 0, n), store.read("label", 0, n)
    assert store.attrs["samples"] == [names[i] for i in crop_order]
    for i in range(n):
        name = names[crop_order[i]]
        # the prepared crop files of sample i's crop ...
        np.testing.assert_array_equal(images[i], np.asarray(Image.open(directory / "images" / f"{name}.png")))
        np.testing.assert_array_equal(labels[i], np.asarray(Image.open(directory / "labels" / f"{name}.png")))
        # ... cut from image source[i]: its name and its pixels (96 px, ratio 0.5 -> 48 px crops, no resize)
        base, k = name.rsplit("_", 1)
        assert base == dataset.sample_name(int(source[i]))
        original = dataset[int(source[i])]
        np.testing.assert_array_equal(images[i], five_crop(original.image, 0.5)[int(k)])
        np.testing.assert_array_equal(labels[i], five_crop(original.label, 0.5)[int(k)])
    assert np.bincount(source).tolist() == [5] * 4  # every image's five crops, once


def test_val_store_keeps_the_dataset_order(built):
    config, workdir, stores = built
    store = FeatureStore.open(stores["val"])
    np.testing.assert_array_equal(store.read("crop_order", 0, len(store)), np.arange(2))
    np.testing.assert_array_equal(store.read("source_image", 0, len(store)), np.arange(2))
    names, _ = prepared.read_prepared(paths.prepared_dir(config, workdir, "val"))
    assert store.attrs["samples"] == names


@pytest.mark.slow
def test_interrupted_features_stage_resumes_to_the_identical_store(built, tmp_path, monkeypatch):
    config, _, stores = built
    reference = FeatureStore.open(stores["train"])
    real, calls = writer.write_chunk, []

    def dies_on_the_third_chunk(group, chunk, data, *args):
        calls.append(chunk)
        if len(calls) == 3:
            raise RuntimeError("killed")
        real(group, chunk, data, *args)

    monkeypatch.setattr(writer, "write_chunk", dies_on_the_third_chunk)
    workdir = tmp_path / "work"
    with pytest.raises(RuntimeError, match="killed"):
        features.run(config, workdir, "train")
    monkeypatch.setattr(writer, "write_chunk", real)
    url = paths.store_url(config, workdir, "train")
    assert writer.finished_chunks(writer.open_group(url, "r")).sum() == 2
    manifest = features.run(config, workdir, "train")
    assert manifest["outputs"]["computed"] == 12  # 3 of 5 chunks of 4
    resumed = FeatureStore.open(url)
    assert resumed.names() == reference.names()  # HP's stores never hold HCL's arrays (HCL has its own stores)
    for name in resumed.names():
        np.testing.assert_array_equal(resumed.read(name, 0, 20), reference.read(name, 0, 20), err_msg=name)
    assert resumed.attrs["samples"] == reference.attrs["samples"]


def test_store_of_the_previous_schema_is_refused_with_the_rebuild_command(built, tmp_path):
    _, _, stores = built
    group = writer.open_group(stores["val"], "r+")
    group.attrs["schema_version"] = SCHEMA_VERSION - 1
    try:
        message = (rf"schema version {SCHEMA_VERSION - 1}, this hp-pipe reads {SCHEMA_VERSION}; "
                   r"rebuild it with `hp-pipe features --force`")
        with pytest.raises(UserError, match=message):
            FeatureStore.open(stores["val"])
    finally:
        group.attrs["schema_version"] = SCHEMA_VERSION
