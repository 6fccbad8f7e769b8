"""`features.dtype = "int8"` (docs/cache.md, "Compact cache"): written by the real features stage, read back
transparently, within the documented bound of the float16 store of the same config, and trainable."""

import numpy as np
import pytest
import torch

from cache.integrity import quick_check, verify_chunks
from cache.quant import dequantize
from cache.reader import FeatureStore
from cache.schema import Layout
from cache.writer import open_group
from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.orchestration import paths
from pipeline.orchestration.runner import read_manifest
from pipeline.training.checkpoints import load_checkpoint
from stages import features
from stages import train as train_stage

TINY = {
    "dataset.n_train": "2", "dataset.n_val": "1", "dataset.size": "96",
    "prepare.resolution": "48", "prepare.val_resolution": "48",
    "features.backbone": "vit_small_patch16_224.dino", "features.weights": "random",
    "features.n_views": "2", "features.chunk_size": "4",
    "hp.batch_size": "4", "hp.epochs": "2", "hp.head_dim": "16", "hp.pool_size": "8",
    "hp.renew_interval": "2", "hp.warmup": "1", "train.log_interval": "1", "train.checkpoint_interval": "2",
}
FLOAT_ARRAYS = ("feat", "feat_aug")


def tiny_config(dtype: str):
    return load_config("synthetic", {**TINY, "features.dtype": dtype})


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """The same config's train store twice, float16 and int8, in separate workdirs (one stage each)."""
    out = {}
    for dtype in ("float16", "int8"):
        workdir = tmp_path_factory.mktemp(dtype)
        manifest = features.run(tiny_config(dtype), workdir, "train")
        out[dtype] = (workdir, manifest)
    return out


def test_int8_store_holds_int8_and_scales_and_records_its_dtype(stores):
    _, manifest = stores["int8"]
    group = open_group(manifest["outputs"]["store"], mode="r")
    assert group.attrs["feature_dtype"] == "int8"
    assert open_group(stores["float16"][1]["outputs"]["store"], mode="r").attrs["feature_dtype"] == "float16"
    for name in FLOAT_ARRAYS:
        assert group[name].dtype == np.int8
        assert group[f"{name}_scale"].dtype == np.float16
        assert group[f"{name}_scale"].shape == group[name].shape[:-1]
    # the chunk records cover the new arrays: verify reads and checks every one of them
    assert {"feat_scale", "feat_aug_scale"} <= set(group.attrs["record_arrays"])
    url = manifest["outputs"]["store"]
    assert quick_check(group, url).ok and verify_chunks(group, url).ok


def test_int8_reads_back_within_the_bound_of_the_float16_store(stores):
    fp16 = FeatureStore.open(stores["float16"][1]["outputs"]["store"])
    int8 = FeatureStore.open(stores["int8"][1]["outputs"]["store"])
    assert len(fp16) == len(int8)
    assert np.array_equal(fp16.read("crop_order", 0, len(fp16)), int8.read("crop_order", 0, len(int8)))
    for name in FLOAT_ARRAYS:
        x = fp16.read(name, 0, len(fp16)).astype(np.float64)
        got = int8.read(name, 0, len(int8))
        assert got.dtype == np.float16 and got.shape == x.shape  # read exactly like a float16 store
        # naive check from the stored int8 values and scales, independent of cache/quant.py
        q = int8.group[name][:].astype(np.float64)
        s = int8.group[f"{name}_scale"][:].astype(np.float64)
        assert np.abs(q).max() <= 127
        assert np.allclose(s, np.abs(x).max(-1) / 127, rtol=2e-3, atol=0)  # max |x| / 127, rounded up to float16
        assert np.all(s * 127 >= np.abs(x).max(-1))
        # |x - x̂| <= s/2 (quantization) + half a float16 ulp of x̂ (the reader hands back float16)
        ulp = np.abs(got.astype(np.float64)) * 2.0**-11
        assert np.all(np.abs(x - got.astype(np.float64)) <= s[..., None] / 2 + ulp + 1e-12)
        # exactly cache/quant.py's decoding, rounded once to float16
        assert np.array_equal(got, dequantize(int8.group[name][:], int8.group[f"{name}_scale"][:]).half().numpy())
        a, b = x.reshape(-1, x.shape[-1]), got.astype(np.float64).reshape(-1, x.shape[-1])
        cosine = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
        assert cosine.min() >= 0.999, cosine.min()
        # gather and batches decode the same way
        idx = [3, 0, 3]
        assert np.array_equal(int8.gather(name, idx), got[idx])
        batch = next(iter(int8.batches([name], 4)))
        assert torch.equal(batch[name], torch.from_numpy(got[batch["index"].numpy()]))


def test_float16_store_reads_exactly_what_it_stores(stores):
    fp16 = FeatureStore.open(stores["float16"][1]["outputs"]["store"])
    assert not fp16.quantized
    for name in FLOAT_ARRAYS:
        assert np.array_equal(fp16.read(name, 0, len(fp16)), fp16.group[name][:], equal_nan=True)
        assert fp16.read(name, 0, len(fp16)).dtype == np.float16
        assert f"{name}_scale" not in fp16.group


def test_int8_float_arrays_take_at_most_055_of_float16_bytes(stores):
    def float_bytes(manifest):
        sizes = manifest["outputs"]["array_bytes"]
        return sum(v for k, v in sizes.items() if k.split("_scale")[0] in FLOAT_ARRAYS)

    ratio = float_bytes(stores["int8"][1]) / float_bytes(stores["float16"][1])
    assert ratio <= 0.55, ratio
    # the uncompressed yardstick is the float16 layout whatever the dtype
    assert stores["int8"][1]["outputs"]["raw_fp16_feature_bytes"] == \
        stores["float16"][1]["outputs"]["raw_fp16_feature_bytes"]


def test_dtype_is_in_the_fingerprint_and_changing_it_recomputes_the_store(stores, tmp_path):
    fps = {d: read_manifest(paths.stage_dir(tiny_config(d), w), "features-train")["fingerprint"]
           for d, (w, _) in stores.items()}
    assert fps["float16"] != fps["int8"]
    workdir = tmp_path / "switch"
    url = features.run(tiny_config("float16"), workdir, "train")["outputs"]["store"]
    again = features.run(tiny_config("int8"), workdir, "train")
    assert again["outputs"]["store"] == url and again["outputs"]["computed"] == again["outputs"]["samples"]
    store = FeatureStore.open(url)
    assert store.attrs["feature_dtype"] == "int8" and store.group["feat"].dtype == np.int8
    # a float16 run's expectation is never met by the int8 store
    with pytest.raises(UserError, match="fingerprint"):
        FeatureStore.open(url, expect={"fingerprint": fps["float16"]})


def test_training_runs_on_an_int8_store(stores):
    workdir, _ = stores["int8"]
    config = tiny_config("int8")
    manifest = train_stage.run(config, workdir, "int8")
    assert manifest["outputs"]["iterations"] > 0
    state = load_checkpoint(paths.checkpoint_path(paths.run_dir(config, workdir, "int8")))
    weights = [v for v in state["heads"].values() if torch.is_tensor(v) and v.is_floating_point()]
    assert weights and all(torch.isfinite(w).all() for w in weights)


def test_bad_dtype_is_refused_with_the_key():
    with pytest.raises(UserError, match="features.dtype"):
        tiny_config("int4")
    with pytest.raises(ValueError, match="int4"):
        Layout(1, 16, 16, 4, 1, 0, False, False, "int4").arrays()


def test_bench_features_int8_figures_compare_the_same_crops(tmp_path):
    from benches.features import float_array_bytes, int8_figures

    config = tiny_config("float16")
    fp16 = features.run(config, tmp_path, "train")
    figures = int8_figures(tiny_config("int8"), tmp_path, fp16, batch_size=3, repeats=2)
    int8 = FeatureStore.open(figures["int8_store"])
    sizes = {name: int(int8.group[name].nbytes_stored()) for name in int8.group.array_keys()}
    want = sum(sizes[n] for n in ("feat", "feat_aug", "feat_scale", "feat_aug_scale")) / float_array_bytes(fp16)
    assert figures["int8_bytes_ratio"] == pytest.approx(want, abs=1e-4) and figures["int8_bytes_ratio"] <= 0.55
    assert 0.999 <= figures["int8_cosine"] <= 1.0
    n = fp16["outputs"]["samples"]
    assert figures["read_crops_fp16"] == figures["read_crops_int8"] == 2 * n  # one epoch per repeat, each side
    assert figures["read_arrays"] == ["feat", "feat_aug"]
