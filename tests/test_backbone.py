"""Backbone: checkpoint formats, forward vs timm and by-hand attention, DINO interpolation, offline errors."""

import math
import time

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from pipeline.errors import UserError
from pipeline.extraction.backbone import (
    BACKBONES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    backbone_spec,
    dino_interpolate_pos_embed,
    load_backbone,
    normalize,
    state_dict_hash,
)

NAME = "vit_small_patch16_224.dino"


def _images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return normalize(torch.randint(0, 256, (b, h, w, 3), generator=g, dtype=torch.uint8))


def dino_reference_pos(pos_embed: torch.Tensor, height: int, width: int, patch: int) -> torch.Tensor:
    """DINO's VisionTransformer.interpolate_pos_encoding, as written there (its w is the image height)."""
    w, h = height, width  # DINO: `B, nc, w, h = x.shape`
    npatch = (height // patch) * (width // patch)
    N = pos_embed.shape[1] - 1
    if npatch == N and w == h:
        return pos_embed
    class_pos_embed = pos_embed[:, 0]
    patch_pos_embed = pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    w0, h0 = w // patch + 0.1, h // patch + 0.1
    patch_pos_embed = F.interpolate(
        patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)),
        mode="bicubic",
    )
    assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


@torch.no_grad()
def naive_forward(model: torch.nn.Module, x: torch.Tensor, patch: int):
    """Tokens with DINO's position formula, timm blocks, last block's logits recomputed from its weights."""
    b, _, height, width = x.shape
    tokens = model.patch_embed.proj(x).flatten(2).transpose(1, 2)
    tokens = torch.cat([model.cls_token.expand(b, -1, -1), tokens], 1)
    tokens = tokens + dino_reference_pos(model.pos_embed, height, width, patch)
    for blk in model.blocks[:-1]:
        tokens = blk(tokens)
    last = model.blocks[-1]
    y = last.norm1(tokens)
    qkv = y @ last.attn.qkv.weight.T + last.attn.qkv.bias
    heads = last.attn.num_heads
    hd = qkv.shape[-1] // 3 // heads
    q = qkv[..., : heads * hd].reshape(b, -1, heads, hd).transpose(1, 2)
    k = qkv[..., heads * hd : 2 * heads * hd].reshape(b, -1, heads, hd).transpose(1, 2)
    logits = q @ k.transpose(-2, -1) / math.sqrt(hd)
    feat = model.norm(last(tokens))[:, 1:]
    return feat, logits


@pytest.fixture(scope="module")
def random_bb():
    return load_backbone(NAME, "random")


@pytest.fixture(scope="module")
def other_model():
    """A model with different weights, as a DINO training run would have produced them."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return timm.create_model("vit_small_patch16_224", num_classes=0).eval()


def test_specs_and_normalize():
    assert set(BACKBONES) == {"vit_small_patch16_224.dino", "vit_small_patch8_224.dino",
                              "vit_base_patch16_224.dino", "vit_base_patch8_224.dino"}
    assert backbone_spec("vit_small_patch8_224.dino") == (8, 384, 6)
    assert backbone_spec("vit_base_patch16_224.dino") == (16, 768, 12)
    with pytest.raises(UserError, match="vit_small_patch16_224.dino"):
        backbone_spec("vit_small")
    img = torch.tensor([[[[0, 128, 255]]]], dtype=torch.uint8)
    out = normalize(img)
    assert out.shape == (1, 3, 1, 1) and out.dtype == torch.float32
    expected = [(v / 255 - m) / s for v, m, s in zip((0, 128, 255), IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    torch.testing.assert_close(out.flatten(), torch.tensor(expected))


class _Opaque:  # stands for any non-tensor Python object a training script may pickle
    pass


@pytest.mark.parametrize("fmt", ["plain", "teacher", "pickled"])
def test_checkpoint_round_trip(fmt, other_model, random_bb, tmp_path):
    import argparse

    sd = other_model.state_dict()
    if fmt == "plain":
        obj = sd
    elif fmt == "pickled":  # needs full unpickling: refused unless the user trusts the file
        obj = {"model": sd, "trainer": _Opaque()}
    else:  # a DINO training checkpoint: teacher with DDP + MultiCropWrapper prefixes, a DINO head, args
        teacher = {"module.backbone." + k: v for k, v in sd.items()}
        teacher["module.head.mlp.0.weight"] = torch.randn(8, 384)
        obj = {"teacher": teacher, "student": {}, "epoch": 3, "args": argparse.Namespace(arch="vit_small")}
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)

    if fmt == "pickled":
        with pytest.raises(UserError, match=r"_Opaque.*--trust-weights"):
            load_backbone(NAME, str(path))
    bb = load_backbone(NAME, str(path), trust=fmt == "pickled")
    assert bb.weights == f"file:{path}" and not bb.random_init
    assert bb.weights_hash == state_dict_hash(sd) != random_bb.weights_hash
    x = _images(1, 224, 224)
    out = bb(x)
    ref = other_model.forward_features(x)[:, 1:].reshape(1, 14, 14, 384)  # native grid: no interpolation
    torch.testing.assert_close(out.feat, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [(224, 224), (32, 48)])
def test_forward_and_attention_match_naive(random_bb, size):
    x = _images(2, *size, seed=3)
    h, w = size[0] // 16, size[1] // 16
    out = random_bb(x)
    feat, logits = naive_forward(random_bb.model, x, 16)
    assert out.feat.shape == (2, h, w, 384) and out.attn_logits.shape == (2, h * w, h * w)
    assert out.cls_attn.shape == (2, 6, h, w)
    torch.testing.assert_close(out.feat, feat.reshape(2, h, w, 384), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.attn_logits, logits[:, :, 1:, 1:].mean(1), atol=1e-4, rtol=1e-4)
    cls = logits[:, :, 0].softmax(-1)[:, :, 1:].reshape(2, 6, h, w)
    torch.testing.assert_close(out.cls_attn, cls, atol=1e-6, rtol=1e-5)
    sums = out.cls_attn.sum((-1, -2))
    assert (sums <= 1).all() and (sums > 0).all()


def test_native_forward_equals_timm(random_bb):
    x = _images(1, 224, 224, seed=4)
    ref = random_bb.model.forward_features(x)[:, 1:].reshape(1, 14, 14, 384)
    torch.testing.assert_close(random_bb(x).feat, ref, atol=1e-5, rtol=1e-5)


def test_dino_interpolation(random_bb):
    pos = random_bb.model.pos_embed.detach()
    assert dino_interpolate_pos_embed(pos, 14, 14) is pos  # native grid: unchanged
    for h, w in [(2, 3), (20, 20), (14, 7)]:
        ours = dino_interpolate_pos_embed(pos, h, w)
        ref = dino_reference_pos(pos, h * 16, w * 16, 16)
        assert ours.shape == (1, 1 + h * w, 384)
        torch.testing.assert_close(ours, ref, atol=0, rtol=0)
    timm_pos = resample_abs_pos_embed(pos, (20, 20), num_prefix_tokens=1)
    diff = (timm_pos - dino_interpolate_pos_embed(pos, 20, 20)).abs().max()
    assert diff > 1e-4  # timm's size-driven resampling really is different


def test_random_init_identical_across_loads(random_bb):
    torch.manual_seed(999)
    before = torch.get_rng_state()
    again = load_backbone(NAME, "random")
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG is left alone
    assert again.random_init and again.weights == "random-init"
    assert again.weights_hash == random_bb.weights_hash
    a, b = again.model.state_dict(), random_bb.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_checkpoints(other_model, tmp_path):
    with torch.device("meta"):
        vit_b = timm.create_model("vit_base_patch16_224", num_classes=0)
    # a ViT-B state dict (stride-0 tensors: a tiny file with the right shapes)
    path = tmp_path / "vitb.pth"
    torch.save({k: torch.zeros(1).expand(v.shape) for k, v in vit_b.state_dict().items()}, path)
    with pytest.raises(UserError, match="vitb.pth") as err:
        load_backbone(NAME, str(path))
    assert "vit_base_patch16_224.dino" in str(err.value) and "shape mismatch" in str(err.value)

    sd = other_model.state_dict()
    path = tmp_path / "truncated.pth"
    torch.save({k: v for k, v in sd.items() if not k.startswith("blocks.11.")}, path)
    with pytest.raises(UserError, match=r"truncated\.pth.*missing blocks\.11\."):
        load_backbone(NAME, str(path))

    path = tmp_path / "extra.pth"
    torch.save({**sd, "decoder.weight": torch.zeros(3)}, path)
    with pytest.raises(UserError, match=r"extra\.pth.*unexpected decoder\.weight"):
        load_backbone(NAME, str(path))

    path = tmp_path / "garbage.pth"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(UserError, match="garbage.pth"):
        load_backbone(NAME, str(path))
    path.write_bytes(b"")
    with pytest.raises(UserError, match="garbage.pth"):
        load_backbone(NAME, str(path))

    with pytest.raises(UserError, match="nowhere.pth"):
        load_backbone(NAME, str(tmp_path / "nowhere.pth"))


def _isolate_hf_cache(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # no weights cached here


def test_pretrained_offline_fails_fast(monkeypatch, tmp_path):
    _isolate_hf_cache(monkeypatch, tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        load_backbone(NAME, "pretrained")
    assert time.monotonic() - start < 20  # a guard against timm's ~50 s retry loop
    assert "--weights" in str(err.value) and "--random-init" in str(err.value) and NAME in str(err.value)


def test_pretrained_download_failure_is_one_message(monkeypatch, tmp_path):
    import huggingface_hub

    _isolate_hf_cache(monkeypatch, tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: False)
    asked = []

    def no_network(repo_id, filename, **kwargs):
        asked.append((repo_id, filename))
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    with pytest.raises(UserError, match="Name or service not known.*HF_HUB_OFFLINE.*--weights.*--random-init"):
        load_backbone(NAME, "pretrained")
    assert asked == [("timm/" + NAME, "model.safetensors")]  # the repo timm itself would download from


def test_pretrained_offline_never_downloads(monkeypatch, tmp_path):
    import huggingface_hub

    _isolate_hf_cache(monkeypatch, tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("download attempted"))
    with pytest.raises(UserError, match="offline"):
        load_backbone(NAME, "pretrained")


def test_pretrained_loads_from_the_hub_cache_offline(monkeypatch, tmp_path):
    """Weights placed in the Hugging Face cache layout load offline, and they are those weights."""
    from safetensors.torch import save_file

    _isolate_hf_cache(monkeypatch, tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        source = timm.create_model(NAME, pretrained=False, num_classes=0)
    weights = {k: v.contiguous() for k, v in source.state_dict().items()}
    repo = tmp_path / "hf" / ("models--timm--" + NAME)
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    save_file(weights, str(snapshot / "model.safetensors"))
    backbone = load_backbone(NAME, "pretrained")
    assert backbone.weights == "timm-pretrained"
    assert state_dict_hash(backbone.model.state_dict()) == state_dict_hash(weights)
    assert state_dict_hash(weights) != state_dict_hash(load_backbone(NAME, "random").model.state_dict())


def test_image_size_must_be_patch_multiple(random_bb):
    with pytest.raises(UserError, match="multiple"):
        random_bb(torch.zeros(1, 3, 40, 48))


def test_pretrained_unreachable_hub_says_so(monkeypatch, tmp_path):
    """No network, no HF_HUB_OFFLINE: the hub's 'cannot reach' error is named as such, not as missing files."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    _isolate_hf_cache(monkeypatch, tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: False)

    def unreachable(repo_id, filename, **kwargs):
        raise LocalEntryNotFoundError("connection error, and the file is not in the local cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    with pytest.raises(UserError, match="cannot be reached.*HF_HUB_OFFLINE=1.*--weights") as err:
        load_backbone(NAME, "pretrained")
    assert "has none of" not in str(err.value)
