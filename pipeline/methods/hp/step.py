"""One Hidden Positives training step on cached backbone outputs (docs/hp.md §2-§5).

Pure computation: the caller reads batches from the store, owns the optimizers and writes
checkpoints. Dropout draws from the global torch RNG; every other random choice comes from
the `generator` passed in, so a run is reproducible from its saved RNG states.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.methods.hp.heads import ProjectionHead, SegmentationHead, lhp_mix
from pipeline.methods.hp.loss import hp_loss
from pipeline.methods.hp.pool import PoolIndex


class HPHeads(nn.Module):
    """S, its EMA copy S_m and the projection P (§2), with the Dropout2d of §2."""

    def __init__(self, in_dim: int, dim: int, dropout: float = 0.1):
        super().__init__()
        self.dim = dim
        self.S = SegmentationHead(in_dim, dim)
        self.S_m = copy.deepcopy(self.S).requires_grad_(False)  # §2: starts as a copy of S, never gets gradients
        self.P = ProjectionHead(dim)
        self.drop = nn.Dropout2d(dropout)  # §2: drawn afresh for every use in training

    def codes(self, f: torch.Tensor) -> torch.Tensor:
        """Evaluation codes s = S(f) (§8); dropout is off in eval mode."""
        return self.S(f)


@dataclass
class Pools:
    """The reference pools of §4 as 1-NN indexes over unit vectors."""

    agnostic: PoolIndex  # Pool_ag over backbone features, built once
    specific: PoolIndex  # Pool_sp over S_m codes, renewed every renew_interval iterations


@dataclass
class StepSettings:
    tau: float
    rho: float
    alpha: float
    anchor_tile: int | None = None


@dataclass
class StepOutput:
    loss: torch.Tensor  # L = L_hp + α·consistency, differentiable
    terms: dict[str, float]  # detached values for logging
    codes: torch.Tensor | None = None  # s = S(f) of this batch, detached: what the online probes train on (§8)


def flat(x: torch.Tensor) -> torch.Tensor:
    """(B, D, h, w) -> (B, n, D): one row per patch."""
    return x.flatten(2).transpose(1, 2)


def pool_entries(heads: HPHeads, patches: torch.Tensor, specific: bool) -> torch.Tensor:
    """Pool vectors (§4) from one chosen patch per image, `patches` (P, C).

    S_m is a per-position map and Dropout2d masks whole channels per image, so computing on the
    chosen patch alone equals computing on the whole map and picking that patch afterwards.
    """
    x = patches[:, :, None, None]
    with torch.no_grad():
        if specific:
            x = heads.drop(heads.S_m(x, heads.drop))  # the same path as s_m in the step
        else:
            x = heads.drop(x)  # Pool_ag: the feature f with dropout on
    return F.normalize(x[:, :, 0, 0].float(), dim=1)


def training_step(
    heads: HPHeads,
    f: torch.Tensor,
    f_aug: torch.Tensor,
    lhp: torch.Tensor,
    pools: Pools,
    lam: float,
    settings: StepSettings,
    generator: torch.Generator | None = None,
) -> StepOutput:
    """f, f_aug: (B, C, h, w) cached features of the image and of one photometric view; lhp: (B, h, w, 9)."""
    b, c, h, w = f.shape
    f_mine = F.normalize(heads.drop(f), dim=1)  # §2: features used for positive mining, dropped out
    s = heads.S(f, heads.drop)  # §3: s = S(f), one dropout mask per branch of S (§2)
    s_aug = heads.S(f_aug, heads.drop)  # §3: s_aug = S(f_aug)
    with torch.no_grad():
        s_m = F.normalize(heads.drop(heads.S_m(f, heads.drop)).float(), dim=1)  # §2-§3: s_m = normalize(S_m(f))
    s_mix = heads.drop(lhp_mix(s, lhp))  # §3: LHP mix (gradients into every neighbour), dropped out
    z, z_aug, z_mix = heads.P(s), heads.P(s_aug), heads.P(s_mix)  # §3: unit-norm projections
    with torch.no_grad():
        r = pools.agnostic.max_similarity(flat(f_mine).reshape(b * h * w, c)).view(b, h * w)  # §4: r_i
        r_m = pools.specific.max_similarity(flat(s_m).reshape(b * h * w, -1)).view(b, h * w)  # §4: r^m_i
    out = hp_loss(
        flat(f_mine).float(), flat(s_m).float(), flat(z).float(), flat(z_mix).float(), r.float(), r_m.float(),
        lam=lam, tau=settings.tau, rho=settings.rho, generator=generator, anchor_tile=settings.anchor_tile,
    )
    consistency = (z.float() - z_aug.float()).norm(dim=1).mean()  # §5: mean_i ||z_i − z_aug_i||₂
    loss = out.loss + settings.alpha * consistency  # §5: L = L_hp + α·consistency
    terms = {
        "loss": float(loss.detach()),
        "ghp": float(out.ghp_term),
        "lhp": float(out.lhp_term),
        "consistency": float(consistency.detach()),
        "positives": float(out.positives_per_anchor),
        "kept": float(out.kept_anchors),
    }
    return StepOutput(loss, terms, s.detach())
