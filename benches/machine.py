"""The machine a figure was measured on, in one line: every bench prints it beside its figures."""

from __future__ import annotations

import os
import platform

import torch

from pipeline.precision import _cpu_flags, cpu_bf16


def machine() -> str:
    """CPU model, cores this process may use, whether the CPU multiplies bf16 natively, torch and its CPU kernels;
    the GPU when there is one."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.partition(":")[2].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    flags = _cpu_flags()
    widest = next((f for f in ("avx512f", "avx2", "avx") if f in flags), "no AVX")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    line = (f"{model}, {cores} cores, {widest}, native bf16: {'yes' if cpu_bf16() else 'no'}, torch "
            f"{torch.__version__.split('+')[0]} ({torch.backends.cpu.get_cpu_capability()}), "
            f"{torch.get_num_threads()} threads")
    if torch.cuda.is_available():
        line += f", GPU {torch.cuda.get_device_name(0)}"
    return line
