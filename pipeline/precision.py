"""Which precision a forward runs in: `train.amp` and `features.amp` = auto | true | false.

Autocast is worth having only where the hardware multiplies in reduced precision natively: every CUDA GPU, and CPUs
that report bf16 instructions (AVX512_BF16 or AMX). Elsewhere a CPU emulates bf16 products, several times slower
than fp32 (measured on an AMD EPYC without AVX-512: 13.7 against 124 GFLOP/s), so `auto` leaves it off there.

- CUDA: training autocasts to fp16 with loss scaling, as the references do on their GPUs; extraction to bf16 (fp16 on
  a GPU without bf16).
- CPU: bf16, never fp16 (no fp16 matmul kernels), with no loss scaling (bf16 has fp32's exponent range).

What stays in fp32 under autocast is the same on both: torch's autocast policy keeps reductions, norms, softmax,
log and exp in fp32, the losses take fp32 inputs and reduce in fp32 (pipeline/methods/*/loss.py), and the optimizer
state and the EMA copies are fp32 parameters that autocast never touches.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch

BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bf16 products
OVERRIDE = "HP_PIPE_CPU_BF16"  # 0 or 1: taken instead of the CPU's flags (the tests pin it, so no result depends on
# the machine the suite runs on)


def amp_setting(value: Any) -> bool | None:
    """An `amp` value as given (true/false from TOML or `--set` alike): None for auto."""
    return None if value == "auto" else value in (True, "true")


@functools.cache
def _cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def cpu_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512_BF16 or AMX); `HP_PIPE_CPU_BF16=0|1` overrides."""
    forced = os.environ.get(OVERRIDE, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return any(flag in _cpu_flags() for flag in BF16_FLAGS)


def training_autocast(setting: Any, device_type: str) -> torch.dtype | None:
    """The dtype a training step autocasts to under `train.amp` on `device_type`, None for fp32."""
    on = amp_setting(setting)
    if device_type == "cuda":
        return torch.float16 if on is None or on else None  # the references' mixed precision, with loss scaling
    if device_type == "cpu" and (on or (on is None and cpu_bf16())):
        return torch.bfloat16
    return None


def extraction_autocast(setting: Any, device_type: str) -> torch.dtype | None:
    """The dtype the feature forward autocasts to under `features.amp` on `device_type`, None for fp32."""
    on = amp_setting(setting)
    if device_type == "cuda":
        if not (on is None or on):
            return None
        bf16 = not torch.cuda.is_available() or torch.cuda.is_bf16_supported()  # an absent GPU: assumed to have it
        return torch.bfloat16 if bf16 else torch.float16
    if device_type == "cpu" and (on or (on is None and cpu_bf16())):
        return torch.bfloat16
    return None


def dtype_name(dtype: torch.dtype | None) -> str:
    """"float32" without autocast, else the autocast dtype's name: what manifests, reports and fingerprints say."""
    return str(dtype or torch.float32).removeprefix("torch.")


def training_numerics(train: dict[str, Any]) -> str:
    """The dtype a run's steps autocast to, from [train] (`amp`, `device`): what the train stage's fingerprint holds
    instead of the literal `amp`, so that `auto` on a bf16 CPU and on another CPU are told apart."""
    return dtype_name(training_autocast(train.get("amp", "auto"), device_type(train.get("device", "auto"))))


def device_type(name: Any) -> str:
    """"cuda" or "cpu" of a device setting (auto: CUDA where there is one), without touching the device."""
    name = str(name)
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name.split(":")[0]
