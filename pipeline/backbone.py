"""Frozen DINO ViT backbone: weights resolution and a thin forward that also returns attention.

The forward reuses timm's modules (patch embedding, blocks, final norm) and only replaces two things:
the position embedding is resized with DINO's own bicubic formula (the +0.1 offset; timm's resampling
differs slightly), and the last block's attention logits are recovered from a hook on its fused `qkv`
projection (timm's fused attention never materialises them).

Weights never hang offline: the pretrained path looks in the local Hugging Face cache with the hub's own
`try_to_load_from_cache`, and downloads (`hf_hub_download`) only when HF_HUB_OFFLINE is not set.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.checkpoints import BACKBONE_GLOBALS, load_torch_file
from pipeline.errors import UserError

# name -> (patch_size, embed_dim, num_heads); depth is 12 for all four.
_SPECS: dict[str, tuple[int, int, int]] = {
    "vit_small_patch16_224.dino": (16, 384, 6),
    "vit_small_patch8_224.dino": (8, 384, 6),
    "vit_base_patch16_224.dino": (16, 768, 12),
    "vit_base_patch8_224.dino": (8, 768, 12),
}
BACKBONES: tuple[str, ...] = tuple(_SPECS)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_ALTERNATIVES = (
    "Use --weights FILE (a local DINO checkpoint, e.g. dino_deitsmall16_pretrain.pth) "
    "or --random-init (untrained backbone, for testing only)"
)
_CONTAINER_KEYS = ("teacher", "student", "state_dict", "model")  # DINO / generic training checkpoints
_PREFIXES = ("module.", "backbone.")  # DDP and DINO's MultiCropWrapper


def normalize(images: torch.Tensor) -> torch.Tensor:
    """(B,H,W,3) uint8 -> (B,3,H,W) float32, ImageNet-normalized (what every DINO model expects)."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected (B,H,W,3) images, got {tuple(images.shape)}")
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def backbone_spec(name: str) -> tuple[int, int, int]:
    """(patch_size, embed_dim, num_heads) of a supported backbone, without building it."""
    if name not in _SPECS:
        raise UserError(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)}")
    return _SPECS[name]


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
    cls_attn: torch.Tensor  # (B, heads, h, w) softmaxed attention of CLS to each patch


class Backbone:
    """A frozen timm DINO ViT; calling it returns features and last-block attention (float32)."""

    def __init__(self, model: torch.nn.Module, name: str, weights: str, amp: bool = False):
        self.model = model.eval().requires_grad_(False)
        self.name = name
        self.patch_size, self.embed_dim, self.num_heads = _SPECS[name]
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
        if not self.amp:
            return None
        if self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16

    def _autocast(self) -> contextlib.AbstractContextManager:
        dtype = self.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> BackboneOutput:
        """images: normalized (B,3,H,W), H and W multiples of the patch size."""
        b, _, height, width = images.shape
        p = self.patch_size
        if height % p or width % p:
            raise UserError(f"image size {height}x{width} is not a multiple of {self.name}'s patch size {p}; "
                            f"choose a resolution divisible by {p}")
        h, w = height // p, width // p
        m = self.model
        captured: list[torch.Tensor] = []
        hook = m.blocks[-1].attn.qkv.register_forward_hook(lambda _mod, _inp, out: captured.append(out))
        try:
            with self._autocast():
                x = m.patch_embed.proj(images.to(self.device, torch.float32))
                x = m.patch_embed.norm(x.flatten(2).transpose(1, 2))
                x = torch.cat([m.cls_token.expand(b, -1, -1).to(x.dtype), x], dim=1)
                x = x + dino_interpolate_pos_embed(m.pos_embed, h, w).to(x.dtype)
                x = m.norm_pre(m.patch_drop(m.pos_drop(x)))
                x = m.norm(m.blocks(x))
        finally:
            hook.remove()
        logits = _attention_logits(m.blocks[-1].attn, captured[-1])  # (B, heads, T, T) float32
        return BackboneOutput(
            feat=x[:, 1:].float().reshape(b, h, w, -1),
            attn_logits=logits[:, :, 1:, 1:].mean(dim=1),
            cls_attn=logits[:, :, 0].softmax(dim=-1)[:, :, 1:].reshape(b, -1, h, w),
        )


def _attention_logits(attn: torch.nn.Module, qkv: torch.Tensor) -> torch.Tensor:
    """Pre-softmax logits (q @ k^T) * scale per head, in float32, from the fused qkv projection output."""
    b, t, _ = qkv.shape
    q, k, _v = qkv.float().reshape(b, t, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
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


def _create(name: str, pretrained: bool) -> torch.nn.Module:
    import timm

    return timm.create_model(name, pretrained=pretrained, num_classes=0)


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
        raise UserError(f"cannot download DINO weights for {name} (offline: HF_HUB_OFFLINE is set and "
                        f"{repo} is not in the Hugging Face cache). {_ALTERNATIVES}")
    for filename in files:
        try:
            return Path(hf_hub_download(repo, filename))
        except LocalEntryNotFoundError as e:  # the hub could not be reached (a subclass of the one below)
            raise UserError(f"cannot download DINO weights for {name}: the Hugging Face hub cannot be reached "
                            f"({e}). Set HF_HUB_OFFLINE=1 on machines without network. {_ALTERNATIVES}") from e
        except EntryNotFoundError:
            continue
        except Exception as e:  # network, auth, disk: one message with the hub's reason
            raise UserError(f"downloading DINO weights for {name} from {repo} failed ({e}). Set "
                            f"HF_HUB_OFFLINE=1 on machines without network. {_ALTERNATIVES}") from e
    raise UserError(f"{repo} has none of {', '.join(files)}. {_ALTERNATIVES}")


def _pretrained_model(name: str) -> torch.nn.Module:
    import timm

    path = hub_weights_file(name)
    try:  # timm converts the file with the model's own filter, exactly as for its own download
        return timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=str(path)))
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
    w = sd.get("patch_embed.proj.weight")
    if w is None or w.ndim != 4:
        return None
    for name, (patch, dim, _) in _SPECS.items():
        if (w.shape[0], w.shape[-1]) == (dim, patch):
            return name
    return None


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
    hint = f" — is it a {guess} checkpoint?" if guess and guess != name else ""
    return f"checkpoint {path} does not match {name}: {'; '.join(parts)}{hint}"


def _file_model(name: str, path: Path, trust: bool) -> torch.nn.Module:
    if not path.is_file():
        raise UserError(f"checkpoint file {path} not found. Pass an existing DINO checkpoint with --weights, "
                        "or use --random-init")
    sd = extract_state_dict(_read_checkpoint(path, trust), path)
    model = _random_model(name)
    error = _mismatch(sd, model.state_dict(), path, name)
    if error:
        raise UserError(error)
    model.load_state_dict(sd, strict=True)
    return model


def load_backbone(name: str, weights: str = "pretrained", device: str = "cpu", amp: bool = False,
                  trust: bool = False) -> Backbone:
    """weights: "pretrained" (timm / HF cache), "random" (seeded, the same everywhere) or a checkpoint path.

    trust: unpickle a checkpoint file fully (it may run code): the user's explicit --trust-weights only.

    amp: run under bfloat16 autocast (float16 on a GPU without bf16), on CUDA and on the CPU alike; outputs
    stay float32.
    """
    backbone_spec(name)
    if weights == "pretrained":
        model, label = _pretrained_model(name), "timm-pretrained"
    elif weights == "random":
        model, label = _random_model(name), "random-init"
    else:
        path = Path(weights.removeprefix("file:")).expanduser()
        model, label = _file_model(name, path, trust), f"file:{path}"
    return Backbone(model, name, label, amp=amp).to(device)
