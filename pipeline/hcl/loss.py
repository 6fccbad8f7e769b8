"""HCL's loss (specs/HCL.md §4): prototype cross-entropy per token kind plus the BYOL-style prediction term."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.hcl.mogo import nearest


def prototype_loss(q: torch.Tensor, k: torch.Tensor, centroids: torch.Tensor, tau: float = 0.07) -> torch.Tensor:
    """mean_i −log(exp(q_i·c_a(i)/τ) / Σ_j exp(q_i·c_j/τ)), a(i) = centroid nearest to k_i.

    exp is used directly, without max subtraction, as the reference does (unit vectors, τ = 0.07: ≤ e^14.3).
    No tokens of this kind -> 0 (keeps the graph).
    """
    if q.shape[0] == 0:
        return q.sum() * 0.0
    centroids = centroids.to(q)
    target = torch.from_numpy(nearest(k.detach(), centroids.detach())).to(q.device)
    logits = torch.exp(q @ centroids.T / tau)  # (M, K)
    picked = logits.gather(1, target[:, None]).squeeze(1)
    return -torch.log(picked / logits.sum(1)).mean()


def hcl_loss(q: torch.Tensor, k: torch.Tensor, pred_q: torch.Tensor, fg_mask: torch.Tensor,
             fg_centroids: torch.Tensor, bg_centroids: torch.Tensor, tau: float = 0.07) -> dict[str, torch.Tensor]:
    """L = 0.5 (L_fg + L_bg) + 0.5 L_pred; q, k, pred_q (..., 256), fg_mask (...) bool over the same tokens.

    Always float32, also under autocast: exp(q·c/τ) reaches e^14.3 ≈ 1.6e6, beyond float16's 65,504.
    """
    d = q.shape[-1]
    with torch.autocast(q.device.type, enabled=False):
        q, k, pred_q = q.reshape(-1, d).float(), k.reshape(-1, d).detach().float(), pred_q.reshape(-1, d).float()
        fg_centroids, bg_centroids = fg_centroids.float(), bg_centroids.float()
        fg = fg_mask.reshape(-1).bool()
        l_fg = prototype_loss(q[fg], k[fg], fg_centroids, tau)
        l_bg = prototype_loss(q[~fg], k[~fg], bg_centroids, tau)
        l_pred = nn.MSELoss()(F.normalize(pred_q, dim=-1), k)
    return {"loss": 0.5 * (l_fg + l_bg) + 0.5 * l_pred, "fg": l_fg, "bg": l_bg, "pred": l_pred}
