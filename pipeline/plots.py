"""PNG pictures of results: training curves, feature previews. Matplotlib without a display."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

CURVES = (("loss", "ghp", "lhp"), ("consistency",), ("lambda",), ("positives",))


def training_curves(records: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Loss terms, consistency, λ and positives per anchor against the iteration."""
    if not records:
        return
    it = [r["iteration"] for r in records]
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3.2))
    for ax, keys in zip(axes, CURVES, strict=True):
        for key in keys:
            if key in records[0]:
                ax.plot(it, [r[key] for r in records], label=key)
        ax.set_xlabel("iteration")
        ax.set_title(", ".join(keys))
        if len(keys) > 1:
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def pca_rgb(feat: np.ndarray) -> np.ndarray:
    """(N, h, w, C) features -> (N, h, w, 3) in [0, 1]: the first three principal components."""
    x = feat.reshape(-1, feat.shape[-1]).astype(np.float64)
    x -= x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    y = x @ vt[:3].T
    y = (y - y.min(0)) / np.maximum(y.max(0) - y.min(0), 1e-12)
    return y.reshape(*feat.shape[:-1], 3)


def feature_preview(images: np.ndarray, feat: np.ndarray, cls_attn: np.ndarray, path: Path, title: str = "") -> None:
    """Rows of image | PCA of the patch features | mean CLS attention, for a first look at a store."""
    rgb = pca_rgb(feat)
    attn = cls_attn.astype(np.float32).mean(1)
    fig, axes = plt.subplots(len(images), 3, figsize=(7.5, 2.5 * len(images)), squeeze=False)
    for row, (image, pca, att) in enumerate(zip(images, rgb, attn, strict=True)):
        for ax, picture, name in zip(axes[row], (image, pca, att), ("image", "features (PCA)", "CLS attention"),
                                     strict=True):
            ax.imshow(picture, interpolation="nearest")
            ax.set_axis_off()
            if row == 0:
                ax.set_title(name)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
