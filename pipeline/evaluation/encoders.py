"""A trained head as evaluation and prediction see it, whatever the method: inputs -> codes (B, dim, h, w).

Each method says how its checkpoint becomes an Encoder (its Method.encoder, pipeline/methods/contract.py): HP's
codes are S(f) (docs/hp.md §8), HCL's the online head's segmentation features (docs/hcl.md §2, §5), STEGO's its
head's code (docs/stego.md §2).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from pipeline.extraction.backbone import Backbone
from pipeline.training.checkpoints import load_checkpoint


@dataclass
class Encoder:
    dim: int
    arrays: tuple[str, ...]  # the store arrays `from_arrays` reads
    from_arrays: Callable[[dict[str, Tensor]], Tensor]  # store arrays (B, ...) -> codes (B, dim, h, w)
    from_backbone: Callable[[Backbone, Tensor], Tensor]  # live backbone on normalized images -> codes


def encoder_of(state: dict[str, Any]) -> Encoder:
    """The Encoder of a loaded checkpoint, by the method it records (checkpoints from before methods were recorded
    are HP's)."""
    from pipeline.methods.registry import method_named

    return method_named(state.get("method", "hp"), "the checkpoint's method").encoder(state)


def load_encoder(checkpoint: str) -> Encoder:
    return encoder_of(load_checkpoint(checkpoint))
