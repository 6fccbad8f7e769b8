"""The references' evaluation probes, trained online beside the head (docs/hp.md §8; STEGO trains the same two,
docs/stego.md §3). Shared by every method whose Method.online_probes says it trains them.

HP's reference trains its two evaluation probes in the same loop as the head, on the detached code `s = S(f)`
of every training batch (the training crops' 28x28 grid at /8, the head's dropout on), each with its own Adam:

- cluster probe (`ClusterLookup`): `n_classes + extra_clusters` centroids drawn from a standard normal,
  Adam(5e-3) on `−mean_patches(max_k cos(s, c_k))` at the code's own resolution;
- linear probe: a 1x1 conv `D -> n_classes` (PyTorch's default init), Adam(1e-3) on the cross-entropy of its
  logits upsampled bilinearly to the label size, labels outside `0..n_classes-1` ignored.

`evaluate.protocol = paper` evaluates with these probes; `kmeans` fits k-means and a linear probe afterwards on
the finished head's codes instead. Pure tensor code: the train stage feeds the batches and keeps the state in
its checkpoint. The probes draw nothing from the RNGs the head's training uses (their initial values come from
their own seed), so the head trains bit for bit the same under either protocol.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from pipeline.errors import UserError
from pipeline.evaluation.probes import LinearProbe, linear_probe_loss

PROTOCOLS = ("paper", "kmeans")


def protocol_of(config: dict[str, dict[str, Any]]) -> str:
    """`evaluate.protocol`, checked."""
    protocol = config["evaluate"]["protocol"]
    if protocol not in PROTOCOLS:
        raise UserError(f"evaluate.protocol must be one of {', '.join(PROTOCOLS)}, got '{protocol}' "
                        "(paper: the reference's probes trained online during training; kmeans: k-means and a "
                        "linear probe fitted after training)")
    return protocol


def crf_enabled(config: dict[str, dict[str, Any]]) -> bool:
    """`evaluate.crf`: true | false | auto (on under protocol paper, as the references report, and for a method
    whose evaluation always ends with dense CRF (Method.crf_by_default: HCL, docs/hcl.md §5); off otherwise)."""
    value = config["evaluate"]["crf"]
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text == "auto":
        from pipeline.methods.registry import method_of

        return protocol_of(config) == "paper" or method_of(config).crf_by_default
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise UserError(f"evaluate.crf must be true, false or auto, got '{value}'")


def online_probe_settings(config: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """What the train stage needs to train the probes online (part of its fingerprint), or None when it does not
    (protocol kmeans). A method that trains them asks this (its Method.online_probes)."""
    if protocol_of(config) != "paper":
        return None
    e_cfg, n_classes = config["evaluate"], config["dataset"]["n_classes"]
    probes = sorted({p.strip() for p in e_cfg["probes"].split(",") if p.strip()})
    unknown = set(probes) - {"cluster", "linear"}
    if unknown:
        raise UserError(f"evaluate.probes: unknown probe {', '.join(sorted(unknown))}; use cluster, linear or both")
    if n_classes < 1:
        raise UserError("evaluate.protocol = paper needs dataset.n_classes >= 1 (the probes' sizes); set it with "
                        "--set dataset.n_classes=K, or use --set evaluate.protocol=kmeans")
    return {"probes": probes, "n_classes": n_classes, "extra_clusters": e_cfg["extra_clusters"],
            "cluster_lr": e_cfg["cluster_lr"], "linear_lr": e_cfg["linear_lr"], "seed": e_cfg["seed"]}


def cluster_lookup_loss(codes: torch.Tensor, clusters: torch.Tensor) -> torch.Tensor:
    """ClusterLookup's training loss: `−mean over patches of max_k cos(code, c_k)` on (B, D, h, w) codes, (K, D)
    centroids. The reference writes it with a one-hot of the argmax; max has the same value and gradient."""
    cos = torch.einsum("bdhw,kd->bkhw", F.normalize(codes, dim=1), F.normalize(clusters, dim=1))
    return -cos.max(dim=1).values.mean()


class OnlineProbes:
    """The cluster and linear probes with their optimizers; `step` is one update on one batch's detached codes."""

    def __init__(self, dim: int, settings: dict[str, Any], device: torch.device, labelled: bool):
        self.settings = settings
        self.n_classes = settings["n_classes"]
        k = settings["n_classes"] + settings["extra_clusters"]
        generator = torch.Generator().manual_seed(settings["seed"])
        self.clusters = torch.nn.Parameter(torch.randn(k, dim, generator=generator).to(device))  # torch.randn init
        with torch.random.fork_rng(devices=[]):  # the default conv init, without touching the head's RNG
            torch.manual_seed(settings["seed"])
            self.linear = LinearProbe(dim, self.n_classes).to(device)
        self.trains_cluster = "cluster" in settings["probes"]
        self.trains_linear = "linear" in settings["probes"] and labelled
        self.opt_cluster = torch.optim.Adam([self.clusters], lr=settings["cluster_lr"])
        self.opt_linear = torch.optim.Adam(self.linear.parameters(), lr=settings["linear_lr"])
        self.steps = 0  # batches seen (cluster probe updates when it is trained)
        self.linear_steps = 0  # batches with at least one labelled pixel (linear probe updates)

    def step(self, codes: torch.Tensor, labels: torch.Tensor | None) -> dict[str, float]:
        """One Adam step of each probe on `codes` (B, D, h, w) and `labels` (B, H, W); returns the losses."""
        codes = codes.detach().float()
        terms: dict[str, float] = {}
        if self.trains_cluster:
            loss = cluster_lookup_loss(codes, self.clusters)
            self.opt_cluster.zero_grad(set_to_none=True)
            loss.backward()
            self.opt_cluster.step()
            terms["cluster_probe"] = float(loss.detach())
        if self.trains_linear and labels is not None:
            labels = labels.to(codes.device).long()
            # a batch without a labelled pixel: no step (the reference's loss is NaN there; its GradScaler skips it)
            if ((labels >= 0) & (labels < self.n_classes)).any():
                loss = linear_probe_loss(self.linear, codes, labels, self.n_classes)
                self.opt_linear.zero_grad(set_to_none=True)
                loss.backward()
                self.opt_linear.step()
                self.linear_steps += 1
                terms["linear_probe"] = float(loss.detach())
        self.steps += 1
        return terms

    def outputs(self) -> dict[str, Any]:
        """What the train stage's manifest records of the probes (evaluate reads it back)."""
        return {**self.settings, "trained": self.trained, "iterations": self.steps,
                "linear_iterations": self.linear_steps}

    @property
    def trained(self) -> list[str]:
        """The probes this run trains (the linear one needs training labels)."""
        return [p for p, on in (("cluster", self.trains_cluster), ("linear", self.trains_linear)) if on]

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and dicts only: loads with torch.load(weights_only=True)."""
        return {"clusters": self.clusters.detach().clone(), "linear": self.linear.state_dict(),
                "opt_cluster": self.opt_cluster.state_dict(), "opt_linear": self.opt_linear.state_dict(),
                "steps": self.steps, "linear_steps": self.linear_steps, "settings": self.settings,
                "trained": self.trained}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.clusters.copy_(state["clusters"])
        self.linear.load_state_dict(state["linear"])
        self.opt_cluster.load_state_dict(state["opt_cluster"])
        self.opt_linear.load_state_dict(state["opt_linear"])
        self.steps, self.linear_steps = state["steps"], state["linear_steps"]
