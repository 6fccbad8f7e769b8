"""The cluster probe of docs/hp.md §8: spherical k-means (faiss) and cosine-argmax assignment; the linear probe;
which probes and which linear optimizer a config asks for. No I/O."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import UserError
from pipeline.faiss_ops import kmeans


def probes_of(config: dict[str, dict[str, Any]]) -> list[str]:
    """`evaluate.probes` as a list, checked."""
    probes = [p.strip() for p in config["evaluate"]["probes"].split(",") if p.strip()]
    unknown = set(probes) - {"cluster", "linear"}
    if unknown:
        raise UserError(f"evaluate.probes: unknown probe {', '.join(sorted(unknown))}; use cluster, linear or both")
    return probes


def linear_optimizer(config: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The fitted linear probe's optimizer (`evaluate.linear_optimizer`), as data: Adam(linear_lr) for HP (docs/hp.md
    §8); for HCL runs the HCL reference's linear fine-tuning, SGD with momentum and weight decay, lr x 0.1 from
    `lr_drop_epoch` (0-based) on (docs/hcl.md §5)."""
    e_cfg = config["evaluate"]
    name = str(e_cfg["linear_optimizer"]).strip().lower()
    if name == "auto":  # the method's own (Method.linear_optimizer)
        from pipeline.methods.registry import method_of

        name = method_of(config).linear_optimizer
    if name == "adam":
        return {"optimizer": "Adam", "lr": e_cfg["linear_lr"]}
    if name == "sgd":
        return {"optimizer": "SGD", "lr": e_cfg["linear_sgd_lr"], "momentum": e_cfg["linear_sgd_momentum"],
                "weight_decay": e_cfg["linear_sgd_weight_decay"], "lr_drop_epoch": e_cfg["linear_sgd_drop_epoch"],
                "lr_drop": 0.1}
    raise UserError(f"evaluate.linear_optimizer must be adam, sgd or auto, got '{e_cfg['linear_optimizer']}' (auto: "
                    "Adam for HP, the HCL reference's SGD for train.method = hcl)")


def spherical_kmeans(codes: np.ndarray, k: int, seed: int = 0, iterations: int = 50) -> np.ndarray:
    """(M, D) codes -> (k, D) unit centroids, k-means on the unit sphere (faiss, fixed seed)."""
    x = np.ascontiguousarray(codes, dtype=np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    centroids = kmeans(x, k, iterations=iterations, seed=seed, spherical=True,
                       max_points=max(256, len(x) // k + 1)).centroids
    return centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)


def cosine_scores(codes: torch.Tensor, centroids: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """(B, D, h, w) codes -> (B, K, H, W) cosine similarity to each centroid, after bilinear upsampling to `size`."""
    if size is not None and tuple(codes.shape[-2:]) != tuple(size):
        codes = F.interpolate(codes, size=size, mode="bilinear", align_corners=False)
    return torch.einsum("bdhw,kd->bkhw", F.normalize(codes, dim=1), F.normalize(centroids, dim=1))


def assign(codes: torch.Tensor, centroids: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """(B, D, h, w) codes -> (B, H, W) cluster ids: bilinear upsampling to `size`, then argmax cosine (§8)."""
    return cosine_scores(codes, centroids, size).argmax(1)


def adam_cluster_probe(codes: np.ndarray, k: int, seed: int = 0, steps: int = 300, lr: float = 5e-3,
                       batch: int = 4096) -> np.ndarray:
    """The reference's cluster probe (§8): centroids trained with Adam(5e-3) on −mean(max_k cos).

    Started from farthest-point samples of the codes rather than the reference's random normal
    vectors, so that no centroid starts (and stays) dead, and fitted after training on the finished
    head's codes (protocol kmeans, cluster_method = adam). The reference's own protocol, the probe
    trained online beside the head, is evaluate.protocol = paper (pipeline/evaluation/online_probes.py).
    """
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.from_numpy(np.asarray(codes, dtype=np.float32)), dim=1)
    chosen = [int(torch.randint(0, len(x), (1,), generator=g))]
    for _ in range(k - 1):
        chosen.append(int((x @ x[chosen].T).max(1).values.argmin()))
    centroids = x[chosen].clone().requires_grad_()
    optimizer = torch.optim.Adam([centroids], lr=lr)
    for _ in range(steps):
        rows = x[torch.randint(0, len(x), (min(batch, len(x)),), generator=g)]
        loss = -(rows @ F.normalize(centroids, dim=1).T).max(1).values.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return F.normalize(centroids.detach(), dim=1).numpy()


CLUSTER_METHODS = {"kmeans": spherical_kmeans, "adam": adam_cluster_probe}


class LinearProbe(torch.nn.Module):
    """1x1 conv D -> n_classes (§8); logits upsampled bilinearly to the label size."""

    def __init__(self, in_dim: int, n_classes: int):
        super().__init__()
        self.conv = torch.nn.Conv2d(in_dim, n_classes, 1)

    def forward(self, codes: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        logits = self.conv(codes)
        if size is not None and tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits


def linear_probe_loss(probe: LinearProbe, codes: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Cross-entropy at label resolution; labels outside 0..n_classes-1 are ignored."""
    labels = labels.long()
    labels = torch.where((labels >= 0) & (labels < n_classes), labels, torch.full_like(labels, -100))
    return F.cross_entropy(probe(codes, labels.shape[-2:]), labels, ignore_index=-100)
