"""A trained head as evaluation and prediction see it, whatever the method: inputs -> codes (B, dim, h, w).

HP's codes are S(f) (docs/hp.md §8); HCL's are the online head's 768-d segmentation features on the concatenated
branches (docs/hcl.md §2, §5). Each method registers how it reads its checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pipeline.backbone import Backbone
from pipeline.checkpoints import load_checkpoint
from pipeline.hcl.heads import HCLModel, build_model
from pipeline.hcl.multilevel import multilevel_features
from pipeline.hcl.step import head_input, plain_levels
from pipeline.hp.step import HPHeads


@dataclass
class Encoder:
    dim: int
    arrays: tuple[str, ...]  # the store arrays `from_arrays` reads
    from_arrays: Callable[[dict[str, Tensor]], Tensor]  # store arrays (B, ...) -> codes (B, dim, h, w)
    from_backbone: Callable[[Backbone, Tensor], Tensor]  # live backbone on normalized images -> codes


def hcl_model(state: dict[str, Any]) -> HCLModel:
    model = build_model(state["width"], state["hcl"])
    model.load_state_dict(state["model"])
    return model.eval()


def _hp(state: dict[str, Any]) -> Encoder:
    heads = HPHeads(state["in_dim"], state["head_dim"])
    heads.load_state_dict(state["heads"])
    heads.eval()
    return Encoder(heads.dim, ("feat",),
                   lambda a: heads.codes(a["feat"].float().permute(0, 3, 1, 2)),
                   lambda backbone, x: heads.codes(backbone(x).feat.permute(0, 3, 1, 2)))


def _hcl(state: dict[str, Any]) -> Encoder:
    model, sizes = hcl_model(state), tuple(state["patch_sizes"])

    def encode(arrays: dict[str, Tensor]) -> Tensor:
        b, h, w, _ = arrays["feat"].shape
        tokens = model.features(head_input(plain_levels(arrays, sizes), sizes, torch.device("cpu")))
        return tokens.reshape(b, h, w, -1).permute(0, 3, 1, 2)

    def live(backbone: Backbone, x: Tensor) -> Tensor:
        levels = multilevel_features(backbone, x)
        arrays = {"feat": levels[f"p{sizes[0]}"], "hcl_cls": levels["cls"],
                  **{f"hcl_p{p}": levels[f"p{p}"] for p in sizes[1:]}}
        return encode(arrays)

    names = ("feat", *(f"hcl_p{p}" for p in sizes[1:]), "hcl_cls")
    return Encoder(state["hcl"]["dim"], names, encode, live)


ENCODERS: dict[str, Callable[[dict[str, Any]], Encoder]] = {"hp": _hp, "hcl": _hcl}


def load_encoder(checkpoint: str) -> Encoder:
    state = load_checkpoint(checkpoint)
    return ENCODERS[state.get("method", "hp")](state)
