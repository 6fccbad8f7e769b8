"""Any timm ViT as the backbone: DINO v1, DINOv2 (patch 14, with and without registers), DINOv3 (rotary, registers).

Random-initialized S-size models at small images (7x7 / 8x8 grids): model facts from timm, the forward and the
last block's attention against timm's own forward and a naive recomputation from the weights, register tokens kept
out of every stored array, HCL's branches for patch 14, a features stage per family loading a checkpoint file the
test writes, and stores of one backbone refused for another.
"""

import copy
import math

import numpy as np
import pytest
import timm
import torch

from cache.reader import FeatureStore
from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.extraction.backbone import (
    BACKBONES,
    Backbone,
    backbone_facts,
    backbone_spec,
    check_resolution,
    create_kwargs,
    load_backbone,
    normalize,
    state_dict_hash,
)
from pipeline.extraction.extract import ExtractSettings, extract_chunk
from pipeline.extraction.lhp import lhp_weights
from pipeline.methods.hcl.multilevel import branch_forward, branch_sizes, multilevel_features, patch_sizes
from stages import features

DINO = "vit_small_patch16_224.dino"
DINOV2 = "vit_small_patch14_dinov2.lvd142m"
DINOV2_REG = "vit_small_patch14_reg4_dinov2.lvd142m"
DINOV3 = "vit_small_patch16_dinov3.lvd1689m"
NEW = (DINOV2, DINOV2_REG, DINOV3)  # the families whose positions come from timm's own path
REGISTERS = (DINOV2_REG, DINOV3)


def _images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return normalize(torch.randint(0, 256, (b, h, w, 3), generator=g, dtype=torch.uint8))


@pytest.fixture(scope="module")
def backbones():
    return {name: load_backbone(name, "random") for name in (DINO, *NEW)}


# --- model facts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name,patch,prefix", [(DINO, 16, 1), (DINOV2, 14, 1), (DINOV2_REG, 14, 5), (DINOV3, 16, 5),
                                               ("vit_base_patch14_reg4_dinov2.lvd142m", 14, 5),
                                               ("vit_base_patch16_dinov3.lvd1689m", 16, 5)])
def test_facts_are_the_timm_models_own(name, patch, prefix):
    facts = backbone_facts(name)
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=0)
    assert (facts.patch_size, facts.num_prefix_tokens, facts.num_registers) == (patch, prefix, prefix - 1)
    assert facts.patch_size == model.patch_embed.patch_size[0]
    assert (facts.embed_dim, facts.num_heads) == (model.embed_dim, model.blocks[-1].attn.num_heads)
    assert facts.num_prefix_tokens == model.num_prefix_tokens
    assert backbone_spec(name) == (facts.patch_size, facts.embed_dim, facts.num_heads)
    assert facts.name == name and f"{facts.arch}.{facts.tag}" == name
    assert facts.attrs()["num_prefix_tokens"] == prefix and facts.attrs()["tag"] == name.split(".")[1]


def test_presets_and_families():
    assert BACKBONES == ("vit_small_patch16_224.dino", "vit_small_patch8_224.dino",
                         "vit_base_patch16_224.dino", "vit_base_patch8_224.dino")
    assert {n: backbone_facts(n).family for n in (DINO, DINOV2, DINOV3)} == {DINO: "dino", DINOV2: "vit",
                                                                             DINOV3: "eva"}
    assert "dynamic_img_size" not in create_kwargs(DINO)  # DINO v1 keeps its own position formula
    assert create_kwargs(DINOV2_REG)["dynamic_img_size"] and create_kwargs(DINOV3)["dynamic_img_size"]


@pytest.mark.parametrize("name,why", [
    ("resnet50", "ResNet is not a ViT"),
    ("convnext_small.dinov3_lvd1689m", "ConvNeXt is not a ViT"),
    ("vit_small_patch16_dinov3.nosuchtag", "no pretrained tag 'nosuchtag'"),
    ("vit_tiny_dino", "timm has no model"),
    ("vit_base_patch16_clip_224.openai", "normalized with mean"),
    ("vit_medium_patch16_gap_256", "no CLS token"),
])
def test_unknown_or_unsupported_names_are_one_user_error(name, why):
    with pytest.raises(UserError, match=why) as err:
        load_backbone(name, "random")
    message = str(err.value)
    assert name in message and "vit_small_patch14_reg4_dinov2.lvd142m" in message and DINO in message


def test_grid_at_resolutions():
    assert check_resolution(224, backbone_facts(DINOV2_REG), "prepare.resolution") == 16  # patch 14 at 224
    assert check_resolution(448, backbone_facts(DINOV2_REG), "prepare.resolution") == 32
    with pytest.raises(UserError, match=r"prepare.val_resolution = 320 .* patch size 14 .*=308 or .*=322"):
        check_resolution(320, backbone_facts(DINOV2_REG), "prepare.val_resolution")


# --- forward and attention ----------------------------------------------------------------------


def _last_block_inputs(model: torch.nn.Module, x: torch.Tensor):
    """timm's own forward_features, recording what its last block received (tokens, rotary embedding)."""
    seen = {}

    def hook(_mod, args, kwargs):
        seen["x"], seen["rope"] = args[0].detach().clone(), kwargs.get("rope")

    handle = model.blocks[-1].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            out = model.forward_features(x)
    finally:
        handle.remove()
    return out, seen["x"], seen["rope"]


def _rotate(t: torch.Tensor, emb: torch.Tensor, half: bool) -> torch.Tensor:
    """RoPE from its definition: t * cos + R(t) * sin, R rotating each pair of channels by 90 degrees."""
    sin, cos = emb[..., : emb.shape[-1] // 2], emb[..., emb.shape[-1] // 2:]
    if half:  # pairs (i, i + d/2)
        d = t.shape[-1] // 2
        turned = torch.cat([-t[..., d:], t[..., :d]], dim=-1)
    else:  # pairs (2i, 2i + 1)
        turned = torch.stack([-t[..., 1::2], t[..., ::2]], dim=-1).flatten(-2)
    return t * cos + turned * sin


def naive_logits(model: torch.nn.Module, tokens: torch.Tensor, rope: torch.Tensor | None) -> torch.Tensor:
    """(B, heads, T, T) last-block logits recomputed from its weights: LayerNorm, q/k projections (with whatever
    bias the checkpoint layout has), RoPE on the patch tokens only, q.k / sqrt(d)."""
    blk, prefix = model.blocks[-1], model.num_prefix_tokens
    attn = blk.attn
    assert isinstance(attn.q_norm, torch.nn.Identity) and isinstance(attn.k_norm, torch.nn.Identity)
    y = blk.norm1(tokens)
    b, t, c = y.shape
    heads = attn.num_heads
    d = c // heads
    w = attn.qkv.weight
    bias = attn.qkv.bias
    if getattr(attn, "q_bias", None) is not None:  # Eva: q and v biases, k none
        bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
    q = (y @ w[:c].T + (0 if bias is None else bias[:c])).reshape(b, t, heads, d).transpose(1, 2)
    k = (y @ w[c:2 * c].T + (0 if bias is None else bias[c:2 * c])).reshape(b, t, heads, d).transpose(1, 2)
    if rope is not None:
        half = attn.rotate_half
        q = torch.cat([q[:, :, :prefix], _rotate(q[:, :, prefix:], rope, half)], dim=2)
        k = torch.cat([k[:, :, :prefix], _rotate(k[:, :, prefix:], rope, half)], dim=2)
    return q @ k.transpose(-2, -1) / math.sqrt(d)


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("size", [(112, 112), (96, 160)])
def test_forward_and_attention_match_timm_and_naive(backbones, name, size):
    """Non-native grids through the model's own position path (DINOv2: timm's dynamic resampling of the 37x37
    table; DINOv3: rotary embeddings), registers dropped from features and attention."""
    bb = backbones[name]
    p, prefix = bb.patch_size, bb.num_prefix_tokens
    size = (size[0] // p * p, size[1] // p * p)
    h, w = size[0] // p, size[1] // p
    x = _images(2, *size, seed=1)
    out = bb(x)
    ref, tokens, rope = _last_block_inputs(bb.model, x)
    assert out.feat.shape == (2, h, w, 384) and out.attn_logits.shape == (2, h * w, h * w)
    assert out.cls_attn.shape == (2, 6, h, w)
    assert ref.shape[1] == prefix + h * w  # timm's tokens hold the prefix; ours never do
    torch.testing.assert_close(out.feat, ref[:, prefix:].reshape(2, h, w, 384), atol=1e-5, rtol=1e-5)
    assert (rope is not None) == (name == DINOV3)
    logits = naive_logits(bb.model, tokens, rope)
    torch.testing.assert_close(out.attn_logits, logits[:, :, prefix:, prefix:].mean(1), atol=1e-4, rtol=1e-4)
    row = torch.cat([logits[:, :, 0, :1], logits[:, :, 0, prefix:]], dim=-1)  # CLS row: CLS + patch columns
    torch.testing.assert_close(out.cls_attn, row.softmax(-1)[..., 1:].reshape(2, 6, h, w), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", NEW)
def test_logits_equal_the_models_own_unfused_softmax(backbones, name):
    """With timm's fused attention off, the block's own softmax (the input of its attn_drop) equals the softmax of
    the logits we rebuild from its q, k and rotary embedding, over all tokens, prefix included."""
    bb = backbones[name]
    x = _images(1, 4 * bb.patch_size, 5 * bb.patch_size, seed=2)
    attn = bb.model.blocks[-1].attn
    probs = []
    handle = attn.attn_drop.register_forward_hook(lambda _m, inp, _o: probs.append(inp[0].detach()))
    fused = attn.fused_attn
    try:
        attn.fused_attn = False
        with torch.no_grad():
            bb.model.forward_features(x)
    finally:
        attn.fused_attn = fused
        handle.remove()
    ours = bb.tokens(x).logits
    torch.testing.assert_close(ours.softmax(-1), probs[0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", REGISTERS)
def test_registers_never_reach_the_stored_arrays(backbones, name):
    # random init gives near-uniform attention (a CLS token ~1e-6, logits ~1e-4): a CLS token of unit scale and a
    # sharper last block, so that what the CLS row and the patches attend to matters
    model = copy.deepcopy(backbones[name].model)
    with torch.no_grad():
        model.cls_token.copy_(torch.randn(model.cls_token.shape, generator=torch.Generator().manual_seed(8)))
        model.blocks[-1].attn.qkv.weight.mul_(5)
    bb = Backbone(model, name, "random-init")
    prefix = bb.num_prefix_tokens
    assert prefix == 5
    x = _images(2, 7 * bb.patch_size, 7 * bb.patch_size, seed=3)
    settings = ExtractSettings(n_views=0, with_lhp=True)
    clean = extract_chunk(bb, x, None, settings)
    assert clean["feat"].shape == (2, 7, 7, 384) and clean["lhp"].shape == (2, 7, 7, 9)
    assert clean["cls_attn"].shape == (2, 6, 7, 7)

    def run_with(hook_kind, change):
        blk = bb.model.blocks[-1]
        handle = (blk.register_forward_pre_hook(change, with_kwargs=True) if hook_kind == "input"
                  else blk.register_forward_hook(change))
        try:
            return extract_chunk(bb, x, None, settings), bb.tokens(x).logits
        finally:
            handle.remove()

    noise = torch.randn(2, prefix - 1, 384, generator=torch.Generator().manual_seed(4)) * 10

    def registers_out(_m, _inp, out):  # the registers' outputs after the last block, before the final norm
        out = out.clone()
        out[:, 1:prefix] += noise
        return out

    after, _ = run_with("output", registers_out)
    for key in ("feat", "lhp", "cls_attn"):
        np.testing.assert_array_equal(after[key], clean[key])

    def registers_in(_m, args, kwargs):  # the registers as the last block reads them: its attention sees them
        tokens = args[0].clone()
        tokens[:, 1:prefix] += noise
        return (tokens,), kwargs

    before_last, logits = run_with("input", registers_in)
    # the last block's attention sees the perturbed registers (their logit columns move) ...
    clean_logits = bb.tokens(x).logits
    assert (logits[..., 1:prefix] - clean_logits[..., 1:prefix]).abs().max() > 1e-2
    # ... but patch<->patch logits, LHP and CLS attention (softmax over CLS + patches) never read a register
    np.testing.assert_allclose(before_last["lhp"].astype(np.float32), clean["lhp"].astype(np.float32), atol=1e-3)
    np.testing.assert_allclose(before_last["cls_attn"].astype(np.float32), clean["cls_attn"].astype(np.float32),
                               atol=1e-4)
    # the CLS attention had register columns stayed in its softmax: it moves, so the check above can fail
    with_registers = [t[:, :, 0].softmax(-1)[..., prefix:] for t in (clean_logits, logits)]
    assert (with_registers[0] - with_registers[1]).abs().max() > 1e-2
    torch.testing.assert_close(logits[:, :, prefix:, prefix:], clean_logits[:, :, prefix:, prefix:], atol=1e-4,
                               rtol=1e-4)


# --- HCL branches ---------------------------------------------------------------------------------


def test_branch_sizes_for_every_patch():
    assert branch_sizes(16) == (16, 32, 56) and branch_sizes(8) == (8, 16, 32, 56)  # the papers' DINO branches
    assert branch_sizes(14) == (14, 28, 56)
    assert patch_sizes(DINOV2_REG) == (14, 28, 56) and patch_sizes(DINOV3) == (16, 32, 56)
    assert patch_sizes("vit_base_patch8_224.dino") == (8, 16, 32, 56)


def _bicubic_aa(x: torch.Tensor, size: int) -> torch.Tensor:
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)


@pytest.mark.parametrize("name", NEW)
def test_coarse_branch_sees_patchwise_upsampled_image_as_native(backbones, name):
    """FlexiViT through each family's own position path: every 2p px patch = bicubic antialiased 2x of a p px
    patch, on the same grid -> the same tokens (registers dropped, CLS kept)."""
    bb = backbones[name]
    p = bb.patch_size
    images = _images(1, 4 * p, 4 * p, seed=5)
    patches = images.unfold(2, p, p).unfold(3, p, p)  # (1, 3, 4, 4, p, p)
    up = _bicubic_aa(patches.permute(0, 2, 3, 1, 4, 5).reshape(16, 3, p, p), 2 * p)
    big = up.reshape(1, 4, 4, 3, 2 * p, 2 * p).permute(0, 3, 1, 4, 2, 5).reshape(1, 3, 8 * p, 8 * p)
    native, native_cls, native_attn = branch_forward(bb, images, p)
    coarse, coarse_cls, coarse_attn = branch_forward(bb, big, 2 * p)
    assert native.shape == coarse.shape == (1, 4, 4, 384)
    torch.testing.assert_close(coarse, native, atol=5e-4, rtol=1e-3)
    torch.testing.assert_close(coarse_cls, native_cls, atol=5e-4, rtol=1e-3)
    torch.testing.assert_close(coarse_attn, native_attn, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("name", [DINOV2_REG, DINOV3])
def test_branch_equals_timm_forward_with_the_resized_kernel(backbones, name):
    """A coarse branch is timm's own forward_features with the patch conv swapped for the FlexiViT-resized one."""
    from pipeline.methods.hcl.multilevel import resize_patch_kernel

    bb = backbones[name]
    p, prefix = bb.patch_size, bb.num_prefix_tokens
    x = _images(2, 8 * p, 8 * p, seed=6)
    levels = multilevel_features(bb, x)
    sizes = patch_sizes(name)
    assert set(levels) == {*(f"p{s}" for s in sizes), "cls", "cls_attn"}
    torch.testing.assert_close(levels[f"p{p}"], bb(x).feat)
    model = copy.deepcopy(bb.model)
    old = model.patch_embed.proj
    conv = torch.nn.Conv2d(3, 384, 2 * p, stride=2 * p)
    with torch.no_grad():
        conv.weight.copy_(resize_patch_kernel(old.weight, 2 * p))
        conv.bias.copy_(old.bias)
    model.patch_embed.proj = conv
    with torch.no_grad():
        ref = model.forward_features(x)
    torch.testing.assert_close(levels[f"p{2 * p}"], ref[:, prefix:].reshape(2, 4, 4, 384), atol=1e-5, rtol=1e-5)


# --- stage, weights file, store identity ----------------------------------------------------------


def _tiny(name: str, weights: str, **extra):
    res = {14: ("56", "70"), 16: ("48", "64")}[backbone_facts(name).patch_size]  # whole grids: 4x4 / 3x3 ...
    return load_config("synthetic", {
        "dataset.n_train": "1", "dataset.n_val": "1", "dataset.size": "96",
        "prepare.resolution": res[0], "prepare.val_resolution": res[1],
        "features.backbone": name, "features.weights": weights, "features.n_views": "1", "features.chunk_size": "2",
        **extra})


@pytest.mark.parametrize("name", [DINO, DINOV2_REG, DINOV3])
def test_features_stage_from_a_weights_file(name, tmp_path):
    """One checkpoint per family, written here and loaded through the `--weights FILE` path by the stage; the store
    holds those weights' outputs, registers dropped, and records the backbone's name, tag and prefix tokens."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        source = timm.create_model(name, pretrained=False, **create_kwargs(name)).eval()
    sd = source.state_dict()
    path = tmp_path / "weights.pth"
    torch.save({"model": sd}, path)
    manifest = features.run(_tiny(name, str(path)), tmp_path / "work", "train")
    store = FeatureStore.open(manifest["outputs"]["store"])
    facts = backbone_facts(name)
    p, g = facts.patch_size, {14: 4, 16: 3}[facts.patch_size]
    assert store.attrs["backbone"] == name and store.attrs["weights"] == f"file:{path}"
    assert store.attrs["weights_hash"] == state_dict_hash(sd) != load_backbone(name, "random").weights_hash
    assert store.attrs["backbone_facts"] == facts.attrs()
    assert store.attrs["backbone_facts"]["num_prefix_tokens"] == (1 if name == DINO else 5)
    images = store.read("image", 0, 2)
    assert images.shape == (2, g * p, g * p, 3)
    feat, lhp, cls_attn = (store.read(k, 0, 2) for k in ("feat", "lhp", "cls_attn"))
    assert feat.shape == (2, g, g, 384) and lhp.shape == (2, g, g, 9) and cls_attn.shape == (2, 6, g, g)
    x = normalize(torch.from_numpy(np.ascontiguousarray(images)))
    if name != DINO:  # timm's own forward of the weights we wrote (DINO v1's +0.1 formula: tests/test_backbone.py)
        with torch.no_grad():
            tokens = source.forward_features(x)
        np.testing.assert_allclose(feat.astype(np.float32), tokens[:, facts.num_prefix_tokens:].reshape(feat.shape),
                                   atol=2e-2, rtol=1e-2)
    loaded = load_backbone(name, str(path))
    out = loaded(x)
    np.testing.assert_allclose(feat.astype(np.float32), out.feat.numpy(), atol=2e-2, rtol=1e-2)
    np.testing.assert_allclose(lhp.astype(np.float32), lhp_weights(out.attn_logits, g, g).numpy(), atol=2e-2,
                               rtol=1e-2)


def test_a_store_of_one_backbone_is_refused_for_another(tmp_path):
    url = str(tmp_path / "shared.zarr")
    features.run(_tiny(DINOV3, "random"), tmp_path / "work", "val", store=url)
    with pytest.raises(UserError, match=r"differs in: backbone"):
        features.run(_tiny(DINOV2_REG, "random"), tmp_path / "work", "val", store=url)
    with pytest.raises(UserError, match=r"differs in: backbone"):  # same patch size, same grid: still refused
        features.run(_tiny("vit_small_patch16_224.dino", "random"), tmp_path / "work", "val", store=url)


def test_a_resolution_that_is_not_a_whole_grid_is_refused_before_any_store(tmp_path):
    """Patch 14 with a resolution of 70 + 2 set explicitly: refused when the config is loaded, naming the key and the
    whole resolutions around it; a config edited past that check is refused by the stage itself, before any store."""
    from stages import features_hcl

    match = r"prepare\.val_resolution = 72 .* patch size 14 .*=70 or prepare\.val_resolution=84"
    with pytest.raises(UserError, match=match):
        _tiny(DINOV2_REG, "random", **{"prepare.val_resolution": "72"})
    config = _tiny(DINOV2_REG, "random")
    config["prepare"]["val_resolution"] = 72
    with pytest.raises(UserError, match=match):
        features.run(config, tmp_path / "work", "val")
    assert not list((tmp_path / "work").rglob("*.zarr"))
    hcl = {"dataset.n_train": "1", "dataset.n_val": "1", "dataset.size": "96", "features.backbone": DINOV2_REG,
           "features.weights": "random", "train.method": "hcl"}
    match = r"hcl_features\.val_resolution = 60 .*=56 or hcl_features\.val_resolution=70"
    with pytest.raises(UserError, match=match):
        load_config("synthetic", {**hcl, "hcl_features.val_resolution": "60"})
    config = load_config("synthetic", hcl)
    config["hcl_features"]["val_resolution"] = 60
    with pytest.raises(UserError, match=match):
        features_hcl.run(config, tmp_path / "work", "val")
    assert not list((tmp_path / "work").rglob("*.zarr"))


def test_hcl_features_stage_with_patch_14(tmp_path):
    """HCL's own store from a DINOv2-with-registers backbone: branches 14/28/56, registers dropped, CLS kept."""
    from pipeline.methods.hcl.extract import hcl_chunk
    from stages import features_hcl

    config = load_config("synthetic", {
        "dataset.n_train": "2", "dataset.n_val": "1", "dataset.size": "96", "features.backbone": DINOV2_REG,
        "features.weights": "random", "features.chunk_size": "2", "train.method": "hcl",
        "hcl_features.resolution": "56", "hcl_features.crop_resolution": "112", "hcl_features.val_resolution": "56"})
    manifest = features_hcl.run(config, tmp_path / "work", "val")
    store = FeatureStore.open(manifest["outputs"]["store"])
    assert store.attrs["patch_sizes"] == [14, 28, 56] and store.attrs["backbone_facts"]["num_prefix_tokens"] == 5
    arrays = {k: store.read(k, 0, 1) for k in ("feat", "hcl_p28", "hcl_p56", "hcl_cls", "image")}
    assert arrays["feat"].shape == (1, 4, 4, 384) and arrays["hcl_p28"].shape == (1, 2, 2, 384)
    assert arrays["hcl_p56"].shape == (1, 1, 1, 384) and arrays["hcl_cls"].shape == (1, 384)
    again = hcl_chunk(load_backbone(DINOV2_REG, "random"), arrays["image"], None, with_mask=False)
    for key in ("feat", "hcl_p28", "hcl_p56", "hcl_cls"):
        np.testing.assert_allclose(arrays[key].astype(np.float32), again[key].astype(np.float32), atol=2e-2)


def _authors_layout(name: str, sd: dict) -> dict:
    """The state dict under the key names of the authors' own releases, as timm's converters read them: DINOv2
    with registers (`register_tokens`, a CLS row in `pos_embed`, `mask_token`), DINOv3 (`storage_tokens`,
    `ls1.gamma` / `ls2.gamma`, `mask_token`, `rope_embed.periods`)."""
    if name == DINOV2_REG:
        out = {k: v for k, v in sd.items() if k not in ("reg_token", "pos_embed")}
        out["register_tokens"] = sd["reg_token"]
        out["pos_embed"] = torch.cat([torch.zeros_like(sd["pos_embed"][:, :1]), sd["pos_embed"]], dim=1)
    else:
        renames = (("reg_token", "storage_tokens"), ("gamma_1", "ls1.gamma"), ("gamma_2", "ls2.gamma"))
        out = {}
        for k, v in sd.items():
            for a, b in renames:
                k = k.replace(a, b)
            out[k] = v
        out["rope_embed.periods"] = torch.ones(16)
    out["mask_token"] = torch.zeros(1, sd["cls_token"].shape[-1])
    return out


@pytest.mark.parametrize("name", REGISTERS)
def test_a_checkpoint_in_the_authors_layout_loads_through_timms_converter(name, tmp_path):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(9)
        sd = timm.create_model(name, pretrained=False, **create_kwargs(name)).state_dict()
    path = tmp_path / "authors.pth"
    torch.save(_authors_layout(name, sd), path)
    assert load_backbone(name, str(path)).weights_hash == state_dict_hash(sd)
    with torch.device("meta"):  # another patch size is never converted (timm would resample the kernel): refused
        other = timm.create_model("vit_small_patch8_224", num_classes=0)
    path = tmp_path / "patch8.pth"
    torch.save({k: torch.zeros(1).expand(v.shape) for k, v in other.state_dict().items()}, path)
    with pytest.raises(UserError, match=r"patch8\.pth.*shape mismatch.*vit_small_patch8_224\.dino"):
        load_backbone(name, str(path))


def test_bench_features_reports_each_familys_grid(tmp_path, capsys):
    """`bench features --backbone` per family: the grid, patch and prefix tokens it reports are the model's, and
    the stored feature bytes per crop follow the grid (16x16 patches at 224 for patch 14, here 4x4 at 56)."""
    import json

    from benches.features import features as bench_features

    bench_features(2, 56, DINOV2_REG, "random", 1, 2, 1, tmp_path, True)
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (figures["patch"], figures["grid"], figures["prefix_tokens"]) == (14, 4, 5)
    assert figures["passes_bare"] == figures["passes_stage"]
    assert figures["raw_fp16_feature_bytes_per_image"] >= 4 * 4 * 384 * 2 * 2  # feat + one view, fp16, 16 patches


@pytest.mark.parametrize("name", [DINO, DINOV2_REG, DINOV3])
def test_an_interrupted_features_run_resumes_to_the_same_store(name, tmp_path, monkeypatch):
    """Per family: Ctrl-C after the first chunk, then the same command again, gives arrays equal to an
    uninterrupted run's (random init is seeded, so both runs use the same weights)."""
    from cache import writer

    reference = features.run(_tiny(name, "random"), tmp_path / "whole", "train")
    real_write, written = writer.write_chunk, []

    def first_chunk_then_ctrl_c(group, chunk, data, *args, **kwargs):
        if written:
            raise KeyboardInterrupt
        real_write(group, chunk, data, *args, **kwargs)
        written.append(chunk)

    monkeypatch.setattr(writer, "write_chunk", first_chunk_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        features.run(_tiny(name, "random"), tmp_path / "cut", "train")
    monkeypatch.setattr(writer, "write_chunk", real_write)
    resumed = features.run(_tiny(name, "random"), tmp_path / "cut", "train")
    assert written and resumed["outputs"]["computed"] < resumed["outputs"]["samples"]  # the first chunk was kept
    whole, cut = (FeatureStore.open(m["outputs"]["store"]) for m in (reference, resumed))
    assert len(whole) == len(cut) > whole.chunk_size
    for key in ("feat", "lhp", "cls_attn", "image"):
        np.testing.assert_array_equal(cut.read(key, 0, len(cut)), whole.read(key, 0, len(whole)), err_msg=key)


# ----------------------------------------------------------------------------- a training checkpoint per family


@pytest.mark.parametrize("name", [DINO, DINOV2_REG, DINOV3])
@pytest.mark.slow
def test_a_training_checkpoint_round_trips_per_family(name, tmp_path):
    """Per family: an HP run killed after a checkpoint and resumed from it ends with weights bit-identical to an
    uninterrupted run's (the checkpoint saved and loaded carries every weight and RNG state)."""
    from pipeline.orchestration import paths
    from pipeline.training.checkpoints import load_checkpoint
    from stages import train as train_stage
    from tests.fixtures import TINY_TRAIN, kill_training_when

    res = {14: "56", 16: "64"}[backbone_facts(name).patch_size]
    sets = {**TINY_TRAIN, "features.backbone": name, "prepare.resolution": res, "prepare.val_resolution": res,
            "hp.epochs": "4"}
    config = load_config("synthetic", sets)
    features.run(config, tmp_path, "train")
    train_stage.run(config, tmp_path, "straight")
    reference = load_checkpoint(paths.checkpoint_path(paths.run_dir(config, tmp_path, "straight")))
    ckpt = paths.checkpoint_path(paths.run_dir(config, tmp_path, "killed"))
    killed = kill_training_when(tmp_path, "killed", sets, ckpt, lambda s: 0 < s["iteration"] < reference["iteration"])
    assert killed and 0 < killed["iteration"] < reference["iteration"]  # it really stopped part way
    train_stage.run(config, tmp_path, "killed")
    resumed = load_checkpoint(ckpt)
    assert resumed["iteration"] == reference["iteration"]
    for key in reference["heads"]:
        assert torch.equal(resumed["heads"][key], reference["heads"][key]), key
