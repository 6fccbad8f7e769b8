"""From a batch of images to the arrays of one store chunk (docs/hp.md §1, §3).

Pure computation: the caller reads images and writes the result. Everything random (the
photometric views) is seeded by the sample's global index, so a chunk is the same whichever
process computes it and however often it is recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.extraction import timing
from pipeline.extraction.augment import photometric_view
from pipeline.extraction.backbone import Backbone, normalize
from pipeline.extraction.lhp import lhp_weights


@dataclass(frozen=True)
class ExtractSettings:
    n_views: int = 2
    with_lhp: bool = True
    photometric_on_normalized: bool = True
    lhp_sigma: float = 28.0
    seed: int = 0


def view_seed(seed: int, index: int, view: int) -> int:
    """A distinct, reproducible seed per (run seed, sample, view)."""
    return (seed * 1_000_003 + index) * 97 + view


def model_inputs(
    images: np.ndarray, indices: np.ndarray, settings: ExtractSettings
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Normalized images and their photometric views (B*K, in sample-major order), ready for the backbone.

    Kept apart from the forward pass so a loader thread can build the next batch's views
    while the backbone runs on the current one (timed as the features run's "augment").
    """
    with timing.timed("augment"):
        x = normalize(torch.from_numpy(np.ascontiguousarray(images)))
        if not settings.n_views:
            return x, None
        views = torch.stack([
            photometric_view(x[i], view_seed(settings.seed, int(indices[i]), k), settings.photometric_on_normalized)
            for i in range(len(x))
            for k in range(settings.n_views)
        ])
    return x, views


def extract_chunk(
    backbone: Backbone, x: torch.Tensor, views: torch.Tensor | None, settings: ExtractSettings
) -> dict[str, np.ndarray]:
    """Backbone outputs for one chunk -> feat, cls_attn, [lhp], [feat_aug] as float16 numpy arrays.

    Timed in two parts: "forward" (the backbone passes, attention logits included, as the bare forward of
    `hp-pipe bench features` runs them) and "lhp" (LHP weights and the float16 copies to host memory)."""
    with timing.timed("forward"):
        out = backbone(x)
    with timing.timed("lhp"):
        b, h, w, _ = out.feat.shape
        result = {
            "feat": out.feat.to(torch.float16).cpu().numpy(),
            "cls_attn": out.cls_attn.to(torch.float16).cpu().numpy(),
        }
        if settings.with_lhp:
            lhp = lhp_weights(out.attn_logits.float(), h, w, settings.lhp_sigma)
            result["lhp"] = lhp.to(torch.float16).cpu().numpy()
    if views is not None:
        with timing.timed("forward"):
            aug = backbone(views).feat
        with timing.timed("lhp"):
            feat_aug = aug.to(torch.float16).cpu().numpy()
            result["feat_aug"] = feat_aug.reshape(b, settings.n_views, *feat_aug.shape[1:])
    return result
