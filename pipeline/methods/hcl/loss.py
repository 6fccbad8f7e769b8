"""HCL's loss (docs/hcl.md §4): prototype cross-entropy per token kind plus the BYOL-style prediction term."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.methods.hcl.mogo import nearest_l2


def prototype_loss(q: torch.Tensor, k: torch.Tensor, raw: torch.Tensor, unit: torch.Tensor,
                   tau: float = 0.07) -> torch.Tensor:
    """mean_i −log(exp(q_i·u_a(i)/τ) / Σ_j exp(q_i·u_j/τ)), a(i) = the raw centroid nearest to k_i in L2.

    `raw`: the k-means centroids as clustered (the reference searches its faiss L2 index, which holds these);
    `unit`: their L2-normalized copies, the only ones in the logits (§3-§4). exp is used directly, without max
    subtraction, as the reference does (unit vectors, τ = 0.07: ≤ e^14.3). No tokens of this kind -> 0 (keeps the
    graph).
    """
    if q.shape[0] == 0:
        return q.sum() * 0.0
    unit = unit.to(q)
    target = nearest_l2(k.detach(), raw.detach().to(k))
    logits = torch.exp(q @ unit.T / tau)  # (M, K)
    picked = logits.gather(1, target[:, None]).squeeze(1)
    return -torch.log(picked / logits.sum(1)).mean()


def hcl_loss(q: torch.Tensor, k: torch.Tensor, pred_q: torch.Tensor, fg_mask: torch.Tensor,
             fg_centroids: Mapping[str, torch.Tensor], bg_centroids: Mapping[str, torch.Tensor],
             tau: float = 0.07) -> dict[str, torch.Tensor]:
    """L = 0.5 (L_fg + L_bg) + 0.5 L_pred; q, k, pred_q (..., 256), fg_mask (...) bool over the same tokens.

    Each centroid set is {"raw": (K, 256), "unit": (K, 256)} as `kmeans_centroids` returns them (§3).
    Always float32, also under autocast: exp(q·c/τ) reaches e^14.3 ≈ 1.6e6, beyond float16's 65,504.
    """
    d = q.shape[-1]
    with torch.autocast(q.device.type, enabled=False):
        q, k, pred_q = q.reshape(-1, d).float(), k.reshape(-1, d).detach().float(), pred_q.reshape(-1, d).float()
        fg = fg_mask.reshape(-1).bool()
        l_fg = prototype_loss(q[fg], k[fg], fg_centroids["raw"].float(), fg_centroids["unit"].float(), tau)
        l_bg = prototype_loss(q[~fg], k[~fg], bg_centroids["raw"].float(), bg_centroids["unit"].float(), tau)
        l_pred = nn.MSELoss()(F.normalize(pred_q, dim=-1), k)
    return {"loss": 0.5 * (l_fg + l_bg) + 0.5 * l_pred, "fg": l_fg, "bg": l_bg, "pred": l_pred}
