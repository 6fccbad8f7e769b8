"""One HCL training step and one MoGoClustering sampling step on cached branches (docs/hcl.md §2-§4).

Pure computation: the caller reads batches, owns the optimizer and writes checkpoints. Every random choice comes
from the `generator` passed in, so a run is reproducible from its saved RNG states.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pipeline.methods.hcl.heads import HCLModel
from pipeline.methods.hcl.loss import hcl_loss
from pipeline.methods.hcl.mogo import sample_tokens
from pipeline.methods.hcl.multilevel import concat_levels


def plain_levels(arrays: dict[str, Tensor], patch_sizes: tuple[int, ...]) -> dict[str, Tensor]:
    """The plain crop's branches from store arrays: the finest is `feat`, the others `hcl_p<patch>`."""
    levels = {f"p{patch_sizes[0]}": arrays["feat"], "cls": arrays["hcl_cls"]}
    levels.update({f"p{p}": arrays[f"hcl_p{p}"] for p in patch_sizes[1:]})
    return levels


def variant_levels(arrays: dict[str, Tensor], patch_sizes: tuple[int, ...], variant: Tensor) -> dict[str, Tensor]:
    """Photometric variant `variant[i]` of each image i from the `hcl_aug_*` arrays (B, V, ...)."""
    rows = torch.arange(len(variant))
    levels = {f"p{p}": arrays[f"hcl_aug_p{p}"][rows, variant] for p in patch_sizes}
    levels["cls"] = arrays["hcl_aug_cls"][rows, variant]
    return levels


def head_input(levels: dict[str, Tensor], patch_sizes: tuple[int, ...], device: torch.device) -> Tensor:
    """Branches -> (B, h*w, (levels + 1)·C) tokens: upsampled and concatenated on loading (§1)."""
    x = concat_levels({k: v.to(device) for k, v in levels.items()}, f"p{patch_sizes[0]}")
    return x.flatten(1, 2)


def view_inputs(arrays: dict[str, Tensor], patch_sizes: tuple[int, ...], views: Sequence[Tensor],
                device: torch.device) -> list[Tensor]:
    """Head inputs of several views of each image in one pass: `views[j][i]` is the cached variant image i shows as
    view j; returns one (B, h*w, width) tensor per view, equal to `head_input(variant_levels(arrays, patch_sizes,
    views[j]), ...)`.

    Why: a step needs two views of the same crops. Gathering both views' rows at once moves each branch to the
    device once and upsamples it in one call, instead of once per view (the per-image arithmetic is the same)."""
    batch = len(views[0])
    rows = torch.arange(batch).repeat(len(views))
    variant = torch.cat(list(views))
    levels = {f"p{p}": arrays[f"hcl_aug_p{p}"][rows, variant] for p in patch_sizes}
    levels["cls"] = arrays["hcl_aug_cls"][rows, variant]
    return list(head_input(levels, patch_sizes, device).split(batch))


def two_variants(batch: int, n_variants: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Two different cached variants per image, in random order: view 1 (online) and view 2 (momentum) (§4)."""
    first = torch.randint(0, n_variants, (batch,), generator=generator)
    shift = torch.randint(1, n_variants, (batch,), generator=generator)
    return first, (first + shift) % n_variants


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups (§4): one group, weight decay on every trained parameter, biases and norms included, as the
    reference's AdamW(model.parameters()) does. The momentum copy gets no gradient, so AdamW would skip it anyway."""
    return [{"params": [p for p in module.parameters() if p.requires_grad], "weight_decay": weight_decay}]


def lr_at(epoch: int, lr: float, drop_epoch: int, drop: float) -> float:
    """Step schedule (§4): lr, then lr·drop from epoch `drop_epoch` on."""
    return lr * (drop if epoch >= drop_epoch else 1.0)


@dataclass
class HCLStepOutput:
    loss: Tensor  # differentiable
    terms: dict[str, float]


def training_step(model: HCLModel, x1: Tensor, x2: Tensor, fg_mask: Tensor, fg_centroids: Mapping[str, Tensor],
                  bg_centroids: Mapping[str, Tensor], tau: float) -> HCLStepOutput:
    """x1, x2: (B, n, width) views 1 and 2; fg_mask (B, n); centroids {"raw", "unit"} (§3).
    L = 0.5 (L_fg + L_bg) + 0.5 L_pred (§4)."""
    q, pred_q, k = model(x1, x2)  # §4: q online on view 1, k momentum on view 2
    out = hcl_loss(q, k, pred_q, fg_mask, fg_centroids, bg_centroids, tau)
    terms = {name: float(v.detach()) for name, v in out.items()}
    terms["foreground"] = float(fg_mask.float().mean())
    return HCLStepOutput(out["loss"], terms)


@torch.no_grad()
def mogo_samples(model: HCLModel, x2: Tensor, fg_mask: Tensor, fraction: float,
                 generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """§3.1: momentum keys of view 2, then `fraction` of each image's foreground and background tokens."""
    k = model.momentum_keys(x2).float().cpu()
    fg_mask = fg_mask.cpu()
    fg = [sample_tokens(k[i], fg_mask[i], fraction, generator) for i in range(len(k))]
    bg = [sample_tokens(k[i], ~fg_mask[i], fraction, generator) for i in range(len(k))]
    return torch.cat(fg), torch.cat(bg)
