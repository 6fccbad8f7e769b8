"""int8 feature vectors with one float16 scale per vector (`features.dtype = "int8"`, docs/cache.md).

Symmetric, per patch: s = max_i |x_i| / 127 rounded *up* to the next float16, q = round(x / s) in [-127, 127].
Rounding the scale up keeps every |x_i / s| <= 127, so nothing clips and each element's error is at most s / 2:

    |x_i - q_i·s| <= s/2 <= (1 + 2^-10) · max_i |x_i| / 254     (while s is a normal float16: max |x_i| >= 127·2^-14)

A vector so small that its scale is a float16 subnormal (max |x_i| < 127·2^-14 ≈ 7.8e-3) still has every error
within s/2, but s is then a multiple of 2^-24, so the right-hand bound no longer holds: its error is at most 2^-25.

Relative to the vector, ||x - x̂|| <= sqrt(D)·s/2, so cos(x, x̂) >= sqrt(1 - D·s²/(4·||x||²)) — about 0.9999 for
DINO-like vectors (D = 384, max |x_i| a few times the RMS). A vector of zeros keeps scale 0 and decodes to zeros.
"""

from __future__ import annotations

import numpy as np
import torch

QMAX = 127


def quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x (..., D) float -> (q (..., D) int8, scale (...) float16) with the bound above."""
    x = np.asarray(x, dtype=np.float32)
    peak = np.abs(x).max(axis=-1)
    scale = (peak / QMAX).astype(np.float16)
    low = scale.astype(np.float32) * QMAX < peak  # float16 rounded down: take the next float16 up
    scale[low] = np.nextafter(scale[low], np.float16(np.inf))
    if not np.isfinite(scale).all():
        raise ValueError("int8 features: a vector is non-finite or beyond float16's range (|x| > 8e6)")
    safe = np.where(scale > 0, scale.astype(np.float32), 1.0)[..., None]
    q = np.clip(np.rint(x / safe), -QMAX, QMAX).astype(np.int8)
    return q, scale


def dequantize(q: np.ndarray | torch.Tensor, scale: np.ndarray | torch.Tensor) -> torch.Tensor:
    """The float32 vectors back: q·s (works on numpy arrays or tensors, any leading shape)."""
    q, scale = torch.as_tensor(q), torch.as_tensor(scale)
    return q.to(torch.float32) * scale.to(torch.float32).unsqueeze(-1)


def error_bound(scale: np.ndarray) -> np.ndarray:
    """Largest possible |x_i - x̂_i| of each vector: half its scale."""
    return np.asarray(scale, dtype=np.float32) / 2
