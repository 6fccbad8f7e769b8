"""Frozen timm ViT backbone: model facts, weights resolution and a thin forward that also returns attention.

Any timm ViT with a CLS token can be the backbone (docs/hp.md §1): DINO v1, DINOv2 (with or without registers),
DINOv3 (rotary position embeddings and registers). Everything about the model (patch size, width, heads, the
number of prefix tokens = CLS + registers) is read from the timm model itself, never from a table here.

The forward reuses timm's modules (patch embedding kernel, position handling, blocks, final norm); what differs per
family is only how positions reach a grid that is not the model's native one:

- DINO v1 (`.dino` tag): DINO's own bicubic formula with the +0.1 offset (timm's resampling differs slightly);
- other `VisionTransformer`s (DINOv2, ...): timm's `dynamic_img_size` path (`_pos_embed` resamples the table);
- `Eva` models (DINOv3, EVA02, ...): timm's `_pos_embed`, whose rotary embeddings are computed for any grid.

The last block's attention logits are rebuilt from the q and k that block itself computed (hooks on its `q_norm`
and `k_norm`, after any bias and qk-norm), with the rotary embedding the block received applied by timm's own
`apply_rot_embed_cat` (timm's fused attention never materialises the logits). Prefix tokens never leave this
module as patches: features and LHP logits are patch tokens only, CLS attention is softmaxed over CLS + patches
(register columns dropped, DINO's definition when there are none).

Weights never hang offline: the pretrained path looks in the local Hugging Face cache with the hub's own
`try_to_load_from_cache`, and downloads (`hf_hub_download`) only when HF_HUB_OFFLINE is not set.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.errors import UserError
from pipeline.precision import extraction_autocast
from pipeline.training.checkpoints import BACKBONE_GLOBALS, load_torch_file

# The DINO presets (the papers' backbones); any other timm ViT name (with its pretrained tag) works as well.
BACKBONES: tuple[str, ...] = (
    "vit_small_patch16_224.dino",
    "vit_small_patch8_224.dino",
    "vit_base_patch16_224.dino",
    "vit_base_patch8_224.dino",
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_ALTERNATIVES = (
    "Use --weights FILE (a local checkpoint, e.g. dino_deitsmall16_pretrain.pth) "
    "or --random-init (untrained backbone, for testing only)"
)
_CONTAINER_KEYS = ("teacher", "student", "state_dict", "model")  # DINO / generic training checkpoints
_PREFIXES = ("module.", "backbone.")  # DDP and DINO's MultiCropWrapper
_EXAMPLES = "e.g. vit_small_patch14_reg4_dinov2.lvd142m or vit_small_patch16_dinov3.lvd1689m"


def normalize(images: torch.Tensor) -> torch.Tensor:
    """(B,H,W,3) uint8 -> (B,3,H,W) float32, ImageNet-normalized (what every supported backbone expects)."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected (B,H,W,3) images, got {tuple(images.shape)}")
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@dataclass(frozen=True)
class BackboneFacts:
    """What the pipeline needs to know about a timm ViT, read from the model itself."""

    name: str  # as given: architecture[.pretrained tag]
    arch: str
    tag: str  # "" without a tag
    family: str  # "dino" (DINO v1 positions), "vit" (timm dynamic_img_size), "eva" (timm Eva: rotary / dynamic)
    patch_size: int
    embed_dim: int
    num_heads: int
    num_prefix_tokens: int  # CLS + registers, in front of the patch tokens

    @property
    def num_registers(self) -> int:
        return self.num_prefix_tokens - 1

    def attrs(self) -> dict[str, Any]:
        """What a store records about its backbone beyond the name (docs/cache.md)."""
        return {"arch": self.arch, "tag": self.tag, "family": self.family, "patch_size": self.patch_size,
                "embed_dim": self.embed_dim, "num_heads": self.num_heads,
                "num_prefix_tokens": self.num_prefix_tokens}


def _unknown(name: str, why: str) -> UserError:
    return UserError(f"--backbone {name!r}: {why}. Use a timm ViT name with its pretrained tag ({_EXAMPLES}) "
                     f"or one of the DINO presets: {', '.join(BACKBONES)}")


def _vit_classes() -> tuple[type, ...]:
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer, Eva


@functools.lru_cache(maxsize=64)
def backbone_facts(name: str) -> BackboneFacts:
    """Model facts of a timm ViT name, from the model built on the meta device (no memory, no weights).

    Unknown names, unknown pretrained tags and models that are not ViTs with a CLS token are refused with one
    UserError saying what to pass instead.
    """
    import timm
    from timm.models import get_pretrained_cfg, split_model_name_tag

    if not isinstance(name, str) or not name.strip():
        raise _unknown(str(name), "no model name given")
    arch, tag = split_model_name_tag(name)
    if not timm.is_model(arch):
        raise _unknown(name, f"timm has no model {arch!r}")
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError as e:  # timm: "Invalid pretrained tag (...) for ..."
        raise _unknown(name, f"timm has no pretrained tag {tag!r} for {arch}") from e
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=0)
    vit, eva = _vit_classes()
    if not isinstance(model, (vit, eva)):
        raise _unknown(name, f"{type(model).__name__} is not a ViT (hp-pipe needs patch tokens and attention)")
    if getattr(model, "cls_token", None) is None:
        raise _unknown(name, "the model has no CLS token (CLS attention needs one)")
    proj = model.patch_embed.proj
    attn = model.blocks[-1].attn if hasattr(model.blocks[-1], "attn") else None
    square = isinstance(proj, torch.nn.Conv2d) and proj.kernel_size == proj.stride
    if not square or proj.kernel_size[0] != proj.kernel_size[1]:
        raise _unknown(name, "its patch embedding is not a square, non-overlapping convolution")
    if attn is None or not all(hasattr(attn, a) for a in ("q_norm", "k_norm", "num_heads", "scale")):
        raise _unknown(name, f"its last block ({type(model.blocks[-1]).__name__}) has no timm self-attention "
                             "whose q and k can be read")
    if cfg is not None and (tuple(cfg.mean), tuple(cfg.std)) != (IMAGENET_MEAN, IMAGENET_STD):
        raise _unknown(name, f"it expects inputs normalized with mean {cfg.mean} / std {cfg.std}; hp-pipe feeds "
                             "ImageNet-normalized images")
    family = "eva" if isinstance(model, eva) else ("dino" if tag == "dino" else "vit")
    return BackboneFacts(name, arch, tag or "", family, int(proj.kernel_size[0]), int(model.embed_dim),
                         int(attn.num_heads), int(model.num_prefix_tokens))


def backbone_spec(name: str) -> tuple[int, int, int]:
    """(patch_size, embed_dim, num_heads) of a backbone, without building its weights."""
    f = backbone_facts(name)
    return f.patch_size, f.embed_dim, f.num_heads


def check_resolution(resolution: int, facts: BackboneFacts, key: str) -> int:
    """The grid side at `resolution`; a resolution that is not a whole number of patches is refused, naming the
    config key and the nearest resolutions that work."""
    p = facts.patch_size
    if resolution % p:
        lo, hi = (resolution // p) * p, (resolution // p + 1) * p
        raise UserError(f"{key} = {resolution} is not a multiple of the patch size {p} of {facts.name}; "
                        f"use --set {key}={lo if lo else hi} or {key}={hi}")
    return resolution // p


def dino_interpolate_pos_embed(pos_embed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """DINO's `interpolate_pos_encoding`: (1, 1+N, C) -> (1, 1+h*w, C), bicubic with a +0.1 offset.

    The scale factor (not the output size) drives the sampling grid, which is why this differs from
    timm's `resample_abs_pos_embed`. The native square grid is returned unchanged, as in DINO.
    """
    n = pos_embed.shape[1] - 1
    if h * w == n and h == w:
        return pos_embed
    side = math.sqrt(n)
    grid = pos_embed[:, 1:].float().reshape(1, int(side), int(side), -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((h + 0.1) / side, (w + 0.1) / side), mode="bicubic")
    if grid.shape[-2:] != (h, w):
        raise RuntimeError(f"DINO position interpolation gave {tuple(grid.shape[-2:])}, expected {(h, w)}")
    grid = grid.permute(0, 2, 3, 1).reshape(1, h * w, -1).to(pos_embed.dtype)
    return torch.cat([pos_embed[:, :1], grid], dim=1)


@dataclass
class BackboneOutput:
    feat: torch.Tensor  # (B, h, w, C) last block after the final LayerNorm, patch tokens only
    attn_logits: torch.Tensor  # (B, n, n) last block q.k^T*scale, patch rows/cols, mean over heads
    cls_attn: torch.Tensor  # (B, heads, h, w) CLS row softmaxed over CLS + patches, patch columns


@dataclass
class TokenOutput:
    """Every token of one forward (float32): what `Backbone.__call__` and HCL's branches cut their outputs from."""

    tokens: torch.Tensor  # (B, P + h*w, C) after the final norm; P prefix tokens first
    logits: torch.Tensor  # (B, heads, P + h*w, P + h*w) last block's pre-softmax attention logits
    prefix: int  # P = CLS + registers
    h: int
    w: int

    @property
    def feat(self) -> torch.Tensor:
        """(B, h, w, C) patch tokens: prefix tokens dropped."""
        b = self.tokens.shape[0]
        return self.tokens[:, self.prefix:].reshape(b, self.h, self.w, -1)

    @property
    def cls(self) -> torch.Tensor:
        return self.tokens[:, 0]

    @property
    def patch_logits(self) -> torch.Tensor:
        """(B, n, n) patch<->patch logits, mean over heads (LHP's input: registers never enter)."""
        p = self.prefix
        return self.logits[:, :, p:, p:].mean(dim=1)

    @property
    def cls_attn(self) -> torch.Tensor:
        """(B, heads, h, w): the CLS row softmaxed over CLS + patch columns (register columns dropped first, so
        with no registers this is DINO's own CLS attention without its self column)."""
        p, b = self.prefix, self.tokens.shape[0]
        row = self.logits[:, :, 0]
        row = torch.cat([row[..., :1], row[..., p:]], dim=-1)
        return row.softmax(dim=-1)[..., 1:].reshape(b, -1, self.h, self.w)


class Backbone:
    """A frozen timm ViT; calling it returns features and last-block attention (float32)."""

    def __init__(self, model: torch.nn.Module, name: str, weights: str, amp: bool = False):
        self.model = model.eval().requires_grad_(False)
        self.name = name
        self.facts = backbone_facts(name)
        self.patch_size, self.embed_dim, self.num_heads = (self.facts.patch_size, self.facts.embed_dim,
                                                           self.facts.num_heads)
        self.num_prefix_tokens = self.facts.num_prefix_tokens
        if model.num_prefix_tokens != self.num_prefix_tokens or model.embed_dim != self.embed_dim:
            raise ValueError(f"model does not match {name}: {model.num_prefix_tokens} prefix tokens, "
                             f"width {model.embed_dim}")
        if self.facts.family != "dino" and not getattr(model, "dynamic_img_size", False):
            raise ValueError(f"{name} must be built with dynamic_img_size=True (create_kwargs)")
        self.weights = weights
        self.random_init = weights == "random-init"
        self.weights_hash = state_dict_hash(model.state_dict())
        self.amp = amp

    @property
    def device(self) -> torch.device:
        return self.model.cls_token.device

    def to(self, device: str | torch.device) -> Backbone:
        self.model.to(device)
        return self

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """bf16 under amp (fp16 on a GPU without bf16), on the CPU as on CUDA: the CPU runs the GPU's path."""
        return extraction_autocast(bool(self.amp), self.device.type)

    def _autocast(self) -> contextlib.AbstractContextManager:
        dtype = self.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    @torch.inference_mode()
    def tokens(self, images: torch.Tensor, patch: int | None = None, kernel: torch.Tensor | None = None) -> TokenOutput:
        """All tokens and the last block's logits for normalized (B,3,H,W) images, H and W multiples of `patch`.

        patch/kernel: another patch size with its (resized) embedding kernel (HCL's branches); default native.
        """
        m = self.model
        p = patch or self.patch_size
        b, _, height, width = images.shape
        if height % p or width % p:
            raise UserError(f"image size {height}x{width} is not a multiple of {self.name}'s patch size {p}; "
                            f"choose a resolution divisible by {p}")
        h, w = height // p, width // p
        weight = m.patch_embed.proj.weight if kernel is None else kernel
        attn = m.blocks[-1].attn
        seen: dict[str, Any] = {}
        hooks = [
            attn.register_forward_pre_hook(lambda _m, _a, kw: seen.__setitem__("rope", kw.get("rope")),
                                           with_kwargs=True),
            attn.q_norm.register_forward_hook(lambda _m, _i, out: seen.__setitem__("q", out)),
            attn.k_norm.register_forward_hook(lambda _m, _i, out: seen.__setitem__("k", out)),
        ]
        try:
            with self._autocast():
                x = F.conv2d(images.to(self.device, torch.float32), weight, m.patch_embed.proj.bias, stride=p)
                x = m.patch_embed.norm(x.permute(0, 2, 3, 1))  # (B, h, w, C): timm's dynamic NHWC layout
                x = m.norm(self._blocks(x, h, w)).float()
        finally:
            for hook in hooks:
                hook.remove()
        logits = attention_logits(attn, seen["q"], seen["k"], seen.get("rope"))
        return TokenOutput(x, logits, self.num_prefix_tokens, h, w)

    def _blocks(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Position handling of the model's family, then its blocks (as the family's `forward_features`)."""
        m, family = self.model, self.facts.family
        if family == "dino":
            b = x.shape[0]
            x = torch.cat([m.cls_token.expand(b, -1, -1).to(x.dtype), x.reshape(b, h * w, -1)], dim=1)
            x = x + dino_interpolate_pos_embed(m.pos_embed, h, w).to(x.dtype)
            return m.blocks(m.norm_pre(m.patch_drop(m.pos_drop(x))))
        if family == "vit":  # timm's dynamic_img_size path: the position table resampled to (h, w)
            return m.blocks(m.norm_pre(m.patch_drop(m._pos_embed(x))))
        x, rope = m._pos_embed(x)  # Eva: position table (if any) and rotary embeddings for (h, w)
        x = m.norm_pre(x)
        mixed = getattr(m, "rope_mixed", False) and rope is not None
        for i, blk in enumerate(m.blocks):
            x = blk(x, rope=rope[i] if mixed else rope)
        return x

    def __call__(self, images: torch.Tensor) -> BackboneOutput:
        """images: normalized (B,3,H,W), H and W multiples of the patch size."""
        out = self.tokens(images)
        return BackboneOutput(feat=out.feat, attn_logits=out.patch_logits, cls_attn=out.cls_attn)


def attention_logits(attn: torch.nn.Module, q: torch.Tensor, k: torch.Tensor,
                     rope: torch.Tensor | None = None) -> torch.Tensor:
    """Pre-softmax logits (q @ k^T) * scale per head, in float32, from the q and k an attention block computed
    (after its qk-norm): the block's rotary embedding applied to non-prefix tokens as timm's attention does, and
    grouped key heads repeated to the query heads."""
    q, k = q.float(), k.float()
    if rope is not None:
        from timm.layers import apply_rot_embed_cat

        npt, half, rope = attn.num_prefix_tokens, getattr(attn, "rotate_half", False), rope.float()
        q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], dim=2)
        k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2)
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return (q @ k.transpose(-2, -1)) * attn.scale


def state_dict_hash(state_dict: dict[str, torch.Tensor]) -> str:
    """Short sha256 over sorted names and raw bytes: identifies the weights a cache was built from."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        digest.update(key.encode())
        digest.update(str(t.dtype).encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:12]


# --- weights -------------------------------------------------------------------------------------


def create_kwargs(name: str) -> dict[str, Any]:
    """timm.create_model arguments of a backbone: no classifier; every family but DINO v1 (whose positions are
    interpolated here) built with `dynamic_img_size`, so its own position path serves any grid."""
    kwargs: dict[str, Any] = {"num_classes": 0}
    if backbone_facts(name).family != "dino":
        kwargs["dynamic_img_size"] = True
    return kwargs


def _create(name: str, pretrained: bool) -> torch.nn.Module:
    import timm

    return timm.create_model(name, pretrained=pretrained, **create_kwargs(name))


def _random_model(name: str) -> torch.nn.Module:
    """Seeded init inside a forked RNG: identical weights in every process, caller's RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _create(name, pretrained=False)


def _offline() -> bool:
    """HF_HUB_OFFLINE as set now (the hub reads it once, at import)."""
    import huggingface_hub

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return env or huggingface_hub.is_offline_mode()


def _hub_location(name: str) -> tuple[str, tuple[str, ...]]:
    """The Hugging Face repo and candidate file names timm itself would download for `name`."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id:
        raise UserError(f"timm has no Hugging Face weights for {name}. {_ALTERNATIVES}")
    files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else ("model.safetensors", "pytorch_model.bin")
    return cfg.hf_hub_id, files


def hub_weights_file(name: str) -> Path:
    """The weights file of `name`: from the local Hugging Face cache, else downloaded (never when offline).

    The cache is looked up with the hub's own `try_to_load_from_cache`, so an offline machine with cached
    weights never touches the network and one without fails at once instead of retrying.
    """
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    repo, files = _hub_location(name)
    for filename in files:
        cached = try_to_load_from_cache(repo, filename)
        if isinstance(cached, str):
            return Path(cached)
    if _offline():
        raise UserError(f"cannot download weights for {name} (offline: HF_HUB_OFFLINE is set and "
                        f"{repo} is not in the Hugging Face cache). {_ALTERNATIVES}")
    for filename in files:
        try:
            return Path(hf_hub_download(repo, filename))
        except LocalEntryNotFoundError as e:  # the hub could not be reached (a subclass of the one below)
            raise UserError(f"cannot download weights for {name}: the Hugging Face hub cannot be reached "
                            f"({e}). Set HF_HUB_OFFLINE=1 on machines without network. {_ALTERNATIVES}") from e
        except EntryNotFoundError:
            continue
        except Exception as e:  # network, auth, disk: one message with the hub's reason
            raise UserError(f"downloading weights for {name} from {repo} failed ({e}). Set "
                            f"HF_HUB_OFFLINE=1 on machines without network. {_ALTERNATIVES}") from e
    raise UserError(f"{repo} has none of {', '.join(files)}. {_ALTERNATIVES}")


def _pretrained_model(name: str) -> torch.nn.Module:
    import timm

    path = hub_weights_file(name)
    try:  # timm converts the file with the model's own filter, exactly as for its own download
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                                 **create_kwargs(name))
    except Exception as e:
        raise UserError(f"the cached weights {path} for {name} do not load ({e}); delete the file so it is "
                        f"downloaded again. {_ALTERNATIVES}") from e


def _read_checkpoint(path: Path, trust: bool) -> object:
    """DINO checkpoints load without running code (their `args` Namespace is allowed); anything needing other
    Python classes is refused unless the user explicitly trusts the file."""
    return load_torch_file(path, allowed=BACKBONE_GLOBALS, trust=trust, what="checkpoint",
                           fix="Pass a plain DINO checkpoint (e.g. dino_deitsmall16_pretrain.pth), or, only for a "
                               "file from a source you trust, add --trust-weights (unpickles it fully)")


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def extract_state_dict(obj: object, path: str | Path) -> dict[str, torch.Tensor]:
    """Plain state dict or training checkpoint -> backbone weights: prefixes stripped, DINO head dropped."""
    for key in _CONTAINER_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"checkpoint {path} holds no state dict (expected tensors, or a dict under one of "
                        f"{', '.join(_CONTAINER_KEYS)})")
    sd = {_strip(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    return {k: v for k, v in sd.items() if not k.startswith("head.")}


def _guess_arch(sd: dict[str, torch.Tensor]) -> str | None:
    """A DINO preset with the checkpoint's patch size and width, else a description of both."""
    w = sd.get("patch_embed.proj.weight")
    if w is None or w.ndim != 4:
        return None
    for name in BACKBONES:
        patch, dim, _ = backbone_spec(name)
        if (w.shape[0], w.shape[-1]) == (dim, patch):
            return name
    return f"patch-{w.shape[-1]}, width-{w.shape[0]}"


def _mismatch(
    sd: dict[str, torch.Tensor], model_sd: dict[str, torch.Tensor], path: Path, name: str
) -> str | None:
    missing = [k for k in model_sd if k not in sd]
    unexpected = [k for k in sd if k not in model_sd]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}"
              for k, v in model_sd.items() if k in sd and sd[k].shape != v.shape]
    if not (missing or unexpected or shapes):
        return None
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            parts.append(f"{label} {', '.join(items[:3])}{more}")
    guess = _guess_arch(sd)
    facts = backbone_facts(name)
    own = f"patch-{facts.patch_size}, width-{facts.embed_dim}"
    hint = f" — is it a {guess} checkpoint?" if guess and guess not in (name, own) else ""
    return f"checkpoint {path} does not match {name}: {'; '.join(parts)}{hint}"


def _file_model(name: str, path: Path, trust: bool) -> torch.nn.Module:
    if not path.is_file():
        raise UserError(f"checkpoint file {path} not found. Pass an existing checkpoint with --weights, "
                        "or use --random-init")
    sd = extract_state_dict(_read_checkpoint(path, trust), path)
    model = _random_model(name)
    error = _mismatch(sd, model.state_dict(), path, name)
    if error:
        converted = _converted(sd, model)
        if converted is None:
            raise UserError(error)
        sd = converted
    model.load_state_dict(sd, strict=True)
    return model


def _converted(sd: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """A checkpoint in its authors' own key layout (e.g. Meta's DINOv2 / DINOv3 files) through the converter timm
    applies to its own downloads (`checkpoint_filter_fn` of the model's module); None unless the result matches
    the model exactly. A checkpoint of another patch size is never converted (timm would resample its kernel)."""
    kernel = sd.get("patch_embed.proj.weight")
    if kernel is not None and kernel.shape != model.patch_embed.proj.weight.shape:
        return None
    convert = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if convert is None:
        return None
    try:
        out = convert(dict(sd), model)
    except Exception:  # a converter that cannot read this layout: report the plain mismatch
        return None
    model_sd = model.state_dict()
    if set(out) != set(model_sd) or any(out[k].shape != v.shape for k, v in model_sd.items()):
        return None
    return out


def load_backbone(name: str, weights: str = "pretrained", device: str = "cpu", amp: bool = False,
                  trust: bool = False) -> Backbone:
    """weights: "pretrained" (timm / HF cache), "random" (seeded, the same everywhere) or a checkpoint path.

    trust: unpickle a checkpoint file fully (it may run code): the user's explicit --trust-weights only.

    amp: run under bfloat16 autocast (float16 on a GPU without bf16), on CUDA and on the CPU alike; outputs
    stay float32.
    """
    backbone_facts(name)
    if weights == "pretrained":
        model, label = _pretrained_model(name), "timm-pretrained"
    elif weights == "random":
        model, label = _random_model(name), "random-init"
    else:
        path = Path(weights.removeprefix("file:")).expanduser()
        model, label = _file_model(name, path, trust), f"file:{path}"
    return Backbone(model, name, label, amp=amp).to(device)
