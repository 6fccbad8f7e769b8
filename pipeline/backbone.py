"""Frozen DINO ViT backbone: weights resolution and a thin forward that also returns attention.

The forward reuses timm's modules (patch embedding, blocks, final norm) and only replaces two things:
the position embedding is resized with DINO's own bicubic formula (the +0.1 offset; timm's resampling
differs slightly), and the last block's attention logits are recovered from a hook on its fused `qkv`
projection (timm's fused attention never materialises them).

Weights never hang offline: the pretrained path first tries the local Hugging Face cache with the hub
forced offline, then checks whether the network is reachable before attempting a real download.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import socket
import threading
import urllib.parse
from collections.abc import Iterator
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

HF_HOST = ("huggingface.co", 443)
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

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not (self.amp and self.device.type == "cuda"):
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)

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


@contextlib.contextmanager
def _hf_offline() -> Iterator[None]:
    """Force huggingface_hub offline (env var and its import-time constant) so only the cache is used."""
    import huggingface_hub.constants as hf_constants

    old_env, old_const = os.environ.get("HF_HUB_OFFLINE"), hf_constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    hf_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hf_constants.HF_HUB_OFFLINE = old_const
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


def _env_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _reachable(host: str, port: int, timeout: float = 3.0) -> bool:
    """TCP connect probe in a daemon thread, so a hanging DNS lookup cannot block us either."""
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        if os.environ.get(var):  # downloads go through the proxy: probe that instead
            url = urllib.parse.urlsplit(os.environ[var])
            if url.hostname:
                host, port = url.hostname, url.port or 8080
            break
    ok: list[bool] = []

    def probe() -> None:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
            ok.append(True)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return bool(ok)


def _pretrained_model(name: str) -> torch.nn.Module:
    try:
        with _hf_offline():
            return _create(name, pretrained=True)  # local HF cache only: fast hit or fast miss
    except Exception:  # any cache miss or corrupt cache entry: decide about downloading below
        pass
    if _env_offline() or not _reachable(*HF_HOST):
        raise UserError(f"cannot download DINO weights for {name} (offline). {_ALTERNATIVES}")
    try:
        return _create(name, pretrained=True)
    except Exception as e:
        raise UserError(f"downloading DINO weights for {name} failed ({e}). {_ALTERNATIVES}") from e


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

    amp: run under bfloat16 (float16 where unsupported) autocast, on CUDA only; outputs stay float32.
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
