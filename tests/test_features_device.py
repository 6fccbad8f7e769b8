"""Extraction on the device (docs/cache.md, "Computing a store"): features.device / amp / batch_size / workers,
exercised on the CPU through the same code a GPU runs (bf16 autocast, DataLoader workers, device batches)."""

import numpy as np
import pytest
import torch

from cache.reader import FeatureStore
from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.extraction.backbone import load_backbone, normalize
from pipeline.extraction.workers import feature_amp, feature_device
from pipeline.methods.hp import store as hp_store
from pipeline.orchestration.graph import stage_plan
from stages import features, features_hcl

TINY = {
    "dataset.n_train": "2", "dataset.n_val": "1", "dataset.size": "96",
    "prepare.resolution": "48", "prepare.val_resolution": "64",
    "features.backbone": "vit_small_patch16_224.dino", "features.weights": "random",
    "features.n_views": "1", "features.chunk_size": "4",
}
HCL = {
    "hcl_features.resolution": "64", "hcl_features.crop_resolution": "128", "hcl_features.val_resolution": "64",
}
# bf16 autocast against fp32, per patch: the measured minimum is 0.99993 (random-init ViT-S/16, synthetic crops, CPU);
# the bound asserted is the documented one (docs/cache.md, "Computing a store")
COSINE_BOUND = 0.999


def tiny_config(**extra):
    return load_config("synthetic", {**TINY, **{k: str(v) for k, v in extra.items()}})


def arrays_of(url):
    store = FeatureStore.open(url)
    return {name: store.array(name)[:] for name in store.names()}


def per_patch_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64).reshape(-1, a.shape[-1]), b.astype(np.float64).reshape(-1, b.shape[-1])
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_decode_workers_change_no_bit_of_the_store(tmp_path):
    """workers=2 (DataLoader processes) and workers=0 (in-process) write identical stores: views are seeded per
    sample, never per worker. A batch of two chunks (batch_size = 2 x chunk_size) keeps every chunk whole."""
    stores = {}
    for workers, batch in ((0, 0), (2, 0), (2, 8)):
        config = tiny_config(**{"features.workers": workers, "features.batch_size": batch})
        manifest = features.run(config, tmp_path / f"w{workers}-{batch}", "train")
        stores[workers, batch] = arrays_of(manifest["outputs"]["store"])
        attrs = FeatureStore.open(manifest["outputs"]["store"]).attrs["extraction"]
        assert attrs["workers"] == workers and attrs["batch_size"] == (batch or 4)
    reference = stores[0, 0]
    assert len(reference["feat"]) == 10 and "feat_aug" in reference
    for name, value in reference.items():
        np.testing.assert_array_equal(stores[2, 0][name], value, err_msg=name)
    merged = stores[2, 8]  # float rounding may differ with the batch shape; everything else is exact
    for name, value in reference.items():
        if value.dtype == np.float16:
            np.testing.assert_allclose(merged[name].astype(np.float32), value.astype(np.float32), rtol=1e-2,
                                       atol=2e-3, err_msg=name)
        else:
            np.testing.assert_array_equal(merged[name], value, err_msg=name)


def test_smaller_device_batches_slice_a_chunk_into_forwards(tmp_path, monkeypatch):
    """batch_size = 1 with chunk_size 4: four forwards per chunk (plus their views), the same values; batch_size = 8:
    one forward per two chunks."""
    sizes = []
    original = hp_store.extract_chunk

    def counting(backbone, x, views, settings):
        sizes.append((len(x), None if views is None else len(views)))
        return original(backbone, x, views, settings)

    monkeypatch.setattr(hp_store, "extract_chunk", counting)
    one = arrays_of(features.run(tiny_config(**{"features.batch_size": 1}), tmp_path / "b1", "train")
                    ["outputs"]["store"])
    assert sizes and set(sizes) == {(1, 1)} and len(sizes) == 10
    sizes.clear()
    whole = arrays_of(features.run(tiny_config(), tmp_path / "b4", "train")["outputs"]["store"])
    assert sorted(sizes) == [(2, 2), (4, 4), (4, 4)]  # 10 crops in chunks of 4: one forward per chunk
    sizes.clear()
    features.run(tiny_config(**{"features.batch_size": 8}), tmp_path / "b8", "train")
    assert sorted(sizes) == [(2, 2), (8, 8)]  # two whole chunks per forward, then the last one
    np.testing.assert_allclose(one["feat"].astype(np.float32), whole["feat"].astype(np.float32), rtol=1e-2, atol=2e-3)
    np.testing.assert_array_equal(one["crop_order"], whole["crop_order"])


def test_amp_runs_bf16_autocast_on_the_cpu():
    """amp on the CPU is the GPU's path: the blocks' matmuls run in bfloat16, the outputs come back float32 and
    agree with the fp32 forward per patch (cosine >= 0.999) without being the same numbers."""
    exact = load_backbone("vit_small_patch16_224.dino", "random")
    amp = load_backbone("vit_small_patch16_224.dino", "random", amp=True)
    assert exact.autocast_dtype is None and amp.autocast_dtype == torch.bfloat16
    seen = []
    hook = amp.model.blocks[0].attn.qkv.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    x = normalize(torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)))
    try:
        low = amp(x)
    finally:
        hook.remove()
    high = exact(x)
    assert seen == [torch.bfloat16] and low.feat.dtype == torch.float32
    cos = per_patch_cosine(low.feat.numpy(), high.feat.numpy())
    assert cos.min() >= COSINE_BOUND
    assert not torch.equal(low.feat, high.feat)


def test_amp_store_is_recorded_told_apart_and_close_to_fp32(tmp_path):
    """A store written with amp records it (device, dtype, amp), has another fingerprint than the fp32 one (the stage
    recomputes when amp changes: a bf16 store is never taken for an fp32 one) and agrees with it per patch."""
    workdir = tmp_path / "work"
    plain, amp = tiny_config(), tiny_config(**{"features.amp": "true"})
    first = features.run(plain, workdir, "train")
    url = first["outputs"]["store"]
    exact = arrays_of(url)
    assert FeatureStore.open(url).attrs["extraction"] == {
        "device": "cpu", "amp": False, "dtype": "float32", "batch_size": 4, "workers": 0}
    second = features.run(amp, workdir, "train")
    assert second["outputs"]["store"] == url and second["outputs"]["computed"] == 10  # recomputed, not reused
    assert second["fingerprint"] != first["fingerprint"]
    attrs = FeatureStore.open(url).attrs["extraction"]
    assert attrs == {"device": "cpu", "amp": True, "dtype": "bfloat16", "batch_size": 4, "workers": 0}
    low = arrays_of(url)
    for name in ("feat", "feat_aug"):
        cos = per_patch_cosine(low[name], exact[name])
        assert cos.min() >= COSINE_BOUND, (name, cos.min())
    assert not np.array_equal(low["feat"], exact["feat"])
    np.testing.assert_array_equal(low["image"], exact["image"])
    # LHP zeroes the entries below their row's mean (docs/hp.md §1): an entry at the threshold may flip between 0
    # and ~sigma/n under another rounding; every other entry agrees
    a, b = exact["lhp"].astype(np.float32), low["lhp"].astype(np.float32)
    flipped = (a == 0) != (b == 0)
    assert flipped.mean() <= 0.05
    np.testing.assert_allclose(b[~flipped], a[~flipped], rtol=1e-2, atol=2e-3)
    again = features.run(plain, workdir, "train")  # and back: fp32 again, recomputed
    assert again["outputs"]["computed"] == 10 and not FeatureStore.open(url).attrs["extraction"]["amp"]


def test_fingerprints_follow_the_numerics_not_the_machine(tmp_path):
    """amp true/false give other fingerprints for every feature stage (HP's and HCL's); amp = auto on this CPU is
    fp32 (the fingerprint of amp = false); device, batch_size and workers change no fingerprint."""
    def fingerprints(**extra):
        plan = stage_plan(tiny_config(**extra), tmp_path)
        hcl = stage_plan(tiny_config(**extra, **{"train.method": "hcl"}), tmp_path)  # HCL's own stores
        return {**{name: plan[name] for name in ("features-train", "features-val")},
                **{name: hcl[name] for name in ("features-train-hcl", "features-val-hcl")}}

    auto = fingerprints()
    on, off = fingerprints(**{"features.amp": "true"}), fingerprints(**{"features.amp": "false"})
    for name in auto:
        assert on[name] != off[name], name
    assert (auto == off) == (not torch.cuda.is_available())
    assert auto == fingerprints(**{"features.workers": 3, "features.batch_size": 8, "features.device": "cpu"})
    assert on["features-train"][0]["features"]["amp"] == "bfloat16"
    assert off["features-train"][0]["features"]["amp"] == "float32"


def test_hcl_store_with_workers_and_amp(tmp_path):
    """HCL's stage honours the same keys: workers=2 writes the same store as workers=0; amp is recorded."""
    base = {**HCL, "features.chunk_size": 2}
    ref = features_hcl.run(tiny_config(**base), tmp_path / "a", "train")["outputs"]["store"]
    par = features_hcl.run(tiny_config(**base, **{"features.workers": 2, "features.batch_size": 4}),
                           tmp_path / "b", "train")["outputs"]["store"]
    a, b = arrays_of(ref), arrays_of(par)
    for name, value in a.items():
        if value.dtype == np.float16:  # batch of two chunks: float rounding only
            np.testing.assert_allclose(b[name].astype(np.float32), value.astype(np.float32), rtol=1e-2, atol=2e-3,
                                       err_msg=name)
        else:
            np.testing.assert_array_equal(b[name], value, err_msg=name)
    amp = features_hcl.run(tiny_config(**base, **{"features.amp": "true"}), tmp_path / "c", "train")
    store = FeatureStore.open(amp["outputs"]["store"])
    assert store.attrs["extraction"]["dtype"] == "bfloat16"
    assert per_patch_cosine(store.array("feat")[:], a["feat"]).min() >= COSINE_BOUND


@pytest.mark.parametrize(("key", "value", "fix"), [
    ("features.device", "gpu", "auto, cpu, cuda or cuda:N"),
    ("features.amp", "yes", "true, false or auto"),
    ("features.batch_size", "3", "must divide features.chunk_size = 4 or be a multiple of it"),
    ("features.workers", "-1", "an integer >= 0"),
])
def test_bad_device_settings_are_named(key, value, fix):
    with pytest.raises(UserError, match=key.replace(".", r"\.")) as info:
        load_config("synthetic", {**TINY, key: value})
    assert fix in str(info.value)


def test_device_resolution():
    """auto -> cuda only where there is one; a CUDA device the machine lacks is refused with the fix."""
    assert feature_device(tiny_config()).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert feature_device(tiny_config(**{"features.device": "cpu"})) == torch.device("cpu")
    assert feature_amp(tiny_config(**{"features.device": "cpu"})) is False  # auto: off on the CPU
    assert feature_amp(tiny_config(**{"features.device": "cpu", "features.amp": "true"})) is True
    with pytest.raises(UserError, match="features.device"):
        feature_device(tiny_config(**{"features.device": f"cuda:{torch.cuda.device_count() + 7}"}))


@pytest.mark.parametrize(("name", "patch", "prefix"), [("vit_small_patch16_224.dino", 16, 1),
                                                      ("vit_small_patch8_224.dino", 8, 1),
                                                      ("vit_small_patch14_reg4_dinov2.lvd142m", 14, 5)])
def test_forward_flops_of_the_bench_estimate_count_what_the_backbone_runs(name, patch, prefix):
    """`bench features` turns a forward rate into FLOPs with vit_forward_flops: it must equal torch's own count of
    the backbone's matmuls and convolution (attention unfused so that every product is seen), LHP's logits included."""
    from torch.utils.flop_counter import FlopCounterMode

    from benches.features import vit_forward_flops

    backbone = load_backbone(name, "random")
    for block in backbone.model.blocks:
        block.attn.fused_attn = False
    height, width = (4 * patch, 3 * patch) if patch == 14 else (64, 48)
    with FlopCounterMode(display=False) as counter:
        backbone(torch.zeros(2, 3, height, width))
    assert backbone.facts.num_prefix_tokens == prefix
    assert counter.get_total_flops() == 2 * vit_forward_flops(patch, 384, height, width=width, prefix_tokens=prefix)
    assert round(vit_forward_flops(8, 384, 224) / 2e9, 2) == 22.64  # timm lists 22.44 GMACs without LHP's logits


def test_bench_breakdown_says_where_the_stage_time_goes():
    """`hp-pipe bench features`' per-part figures: medians over repeats, shares of the stage's median wall time,
    the stage's thread's unaccounted rest and its forward against the bare one."""
    from benches.features import STAGE_PARTS, stage_breakdown

    def run(forward, lhp, wait, write):
        return {"forward": {"wall_s": forward, "cpu_s": forward / 2}, "lhp": {"wall_s": lhp, "cpu_s": lhp},
                "wait_decode": {"wall_s": wait, "cpu_s": 0.0}, "write": {"wall_s": write, "cpu_s": write}}

    parts = [run(9.0, 0.2, 0.3, 1.0), run(9.5, 0.3, 0.1, 2.0), run(8.0, 0.1, 0.2, 3.0)]
    figures = stage_breakdown(parts, stage=[10.0, 10.0, 9.0], bare=[9.0, 9.5, 8.0])
    assert figures["forward_s"] == 9.0 and figures["forward_share"] == 0.9 and figures["forward_cpu_s"] == 4.5
    assert figures["write_s"] == 2.0 and figures["write_share"] == 0.2
    assert figures["decode_s"] == 0.0 and figures["wait_write_share"] == 0.0  # parts a run never timed
    assert figures["stage_other_s"] == 0.5  # median of 0.5, 0.1, 0.7: the stage's thread neither busy nor waiting
    assert figures["forward_slowdown"] == 1.0
    assert {f"{p}_{k}" for p in STAGE_PARTS for k in ("s", "share", "cpu_s")} <= set(figures)
