"""HCL's part of the training loop (pipeline/training/trainer.py): MoGoClustering and the HCL step (docs/hcl.md §2-§4).

An epoch is one pass over the images (§4): HCL's store holds R crops per image, and each epoch uses one of them per
image, chosen from (hcl.seed, epoch) alone (pipeline/methods/hcl/views.py `epoch_keep`), so a resumed run reads the
same.
Each epoch starts with MoGoClustering (§3): the momentum head runs over the epoch's crops' cached view-2 variants,
30% of each image's foreground and background tokens refresh the two memory banks, and faiss k-means gives the
centroids held fixed for the epoch. Then the steps on the same crops: q online on view 1, k momentum on view 2, the
loss of §4, AdamW with the step schedule, the momentum update. The loop around it (seeds, resume, NaN guard,
checkpoints, logs) is the shared one; a checkpoint is also written right after each clustering, so a resumed run
never clusters an epoch twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from cache.reader import FeatureStore
from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.methods.hcl.heads import HCLModel, build_model
from pipeline.methods.hcl.mogo import MemoryBank, kmeans_centroids, kmeans_seed
from pipeline.methods.hcl.step import (
    HCLStepOutput,
    head_input,
    lr_at,
    mogo_samples,
    param_groups,
    training_step,
    two_variants,
    variant_levels,
    view_inputs,
)
from pipeline.methods.hcl.views import epoch_keep
from pipeline.orchestration.runner import StageContext
from pipeline.reporting.plots import HCL_CURVES
from pipeline.training import trainer

MOGO_VIEW = 1  # §3.1: the pass runs the momentum head on view 2, i.e. cached variant 1


def train(ctx: StageContext, config: Config, store: FeatureStore, out: Path, preview: str | None = None
          ) -> dict[str, Any]:
    """HCL's heads trained on its `store` into the run folder `out` (the train stage's trainer for
    train.method = hcl); `preview`: the val store whose images TensorBoard shows at each checkpoint."""
    return trainer.train(ctx, config, store, out, HCLTraining(ctx, config, store), preview)


def step_names(patch_sizes: tuple[int, ...]) -> list[str]:
    """The store arrays a step (and the MoGo pass) reads: every branch's cached variants and the foreground mask."""
    return [*(f"hcl_aug_p{p}" for p in patch_sizes), "hcl_aug_cls", "fg_mask"]


def epoch_crops(store: FeatureStore, seed: int, epoch: int) -> np.ndarray:
    """Bool per store sample: the one crop of each image that `epoch` uses (§4)."""
    return epoch_keep(int(store.attrs["images"]), int(store.attrs["crops"]), seed, epoch)


# ---------------------------------------------------------------- MoGoClustering (§3)
def mogo_pass(model: HCLModel, store: FeatureStore, patch_sizes: tuple[int, ...], h_cfg: dict[str, Any],
              banks: dict[str, MemoryBank], epoch: int, generator: torch.Generator,
              device: torch.device, log, keep: np.ndarray | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """§3: sample tokens with the momentum head on the cached view-2 variants of the crops `keep` selects (the
    epoch's crops), then the banks' centroids."""
    sampled: dict[str, list[torch.Tensor]] = {"fg": [], "bg": []}
    batches = store.batches(step_names(patch_sizes), h_cfg["batch_size"], keep=keep)
    n = len(store) if keep is None else int(keep.sum())
    for batch in tqdm(batches, total=-(-n // h_cfg["batch_size"]), desc=f"MoGo epoch {epoch}", leave=False):
        variant = torch.full((len(batch["index"]),), MOGO_VIEW)
        x2 = head_input(variant_levels(batch, patch_sizes, variant), patch_sizes, device)
        fg, bg = mogo_samples(model, x2, batch["fg_mask"].flatten(1).to(device), h_cfg["sample_fraction"],
                              generator)
        sampled["fg"].append(fg)
        sampled["bg"].append(bg)
    return mogo_centroids(sampled, banks, epoch, h_cfg, log, store.url)


def mogo_centroids(sampled: dict[str, list[torch.Tensor]], banks: dict[str, MemoryBank], epoch: int,
                   h_cfg: dict[str, Any], log, source: str) -> dict[str, dict[str, torch.Tensor]]:
    """§3.2-3: update each bank with this pass's tokens, k-means it (the epoch's own seed) -> {"fg", "bg"}, each
    {"raw": centroids as clustered (they pick a(i)), "unit": their normalized copies (the logits)}."""
    centroids = {}
    for kind, parts in sampled.items():
        bank = banks[kind].update(torch.cat(parts), epoch)
        if len(bank) == 0:
            raise UserError(f"MoGoClustering: no {kind} tokens in {source}; check its fg_mask "
                            "(hcl_features.mask_mass)")
        k = min(h_cfg["clusters"], len(bank))
        if k < h_cfg["clusters"]:
            log(f"MoGo: only {len(bank)} {kind} tokens, so K = {k} instead of {h_cfg['clusters']}")
        raw, unit = kmeans_centroids(bank, k, h_cfg["kmeans_iterations"], h_cfg["kmeans_min_points"],
                                     kmeans_seed(h_cfg["seed"], epoch))
        centroids[kind] = {"raw": torch.from_numpy(raw), "unit": torch.from_numpy(unit)}
    return centroids


# ---------------------------------------------------------------- the step (§2, §4)
def backward(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    """The loss's gradients, fresh (the previous step's are dropped first)."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    """One AdamW step on the gradients `backward` left (skipped by the scaler when they are not finite)."""
    scaler.step(optimizer)
    scaler.update()


def optimize(model: HCLModel, loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
             ema_m: float) -> None:
    """One AdamW step, then the momentum update (§2: EMA every iteration). In three parts so that a bench can time
    each: `backward`, `optimizer_step`, `HCLModel.momentum_update`."""
    backward(loss, optimizer, scaler)
    optimizer_step(optimizer, scaler)
    model.momentum_update(ema_m)


# ---------------------------------------------------------------- HCL in the loop
class HCLTraining:
    """HCL's hooks for pipeline/training/trainer.py: the model (§2), AdamW on its parameter groups with the step
    schedule
    (§4), the two memory banks and the epoch's centroids (§3); an epoch is one cached crop of each image (§4)."""

    section, label, curves = "hcl", "HCL", HCL_CURVES

    def __init__(self, ctx: StageContext, config: Config, store: FeatureStore):
        self.ctx, self.store, self.h_cfg = ctx, store, config["hcl"]
        self.epoch_images = int(store.attrs["images"])  # §4: an epoch is a pass over the images
        self.patch_sizes = tuple(store.attrs["patch_sizes"])
        self.names = step_names(self.patch_sizes)

    def build(self, plan: trainer.RunPlan, generator: torch.Generator) -> None:
        """The model (the first draws after the seed), its optimizer, the banks, no centroids yet."""
        h_cfg, seed = self.h_cfg, self.h_cfg["seed"]
        self.device, self.generator = plan.device, generator
        self.n_variants = self.store.array("hcl_aug_cls").shape[1]
        self.width = (len(self.patch_sizes) + 1) * self.store.array("feat").shape[-1]
        self.model = build_model(self.width, h_cfg).to(plan.device)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, h_cfg["weight_decay"]), lr=h_cfg["lr"])
        self.scaler = torch.amp.GradScaler("cuda", enabled=plan.loss_scaling)
        self.banks = {"fg": MemoryBank(seed, h_cfg["bank_replace"]), "bg": MemoryBank(seed + 1, h_cfg["bank_replace"])}
        self.centroids: dict[str, dict[str, torch.Tensor]] = {}  # §3: {"fg", "bg"} -> {"raw", "unit"}, per epoch
        self.clustered_epoch, self.mogo_seconds = -1, []

    def start(self) -> None:
        """Nothing is drawn before the first epoch's MoGo pass."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        for kind, bank in self.banks.items():
            bank.load_state_dict(state["banks"][kind])
        self.centroids, self.clustered_epoch = state["centroids"], state["clustered_epoch"]
        self.mogo_seconds = state["mogo_seconds"]

    def state_dict(self) -> dict[str, Any]:
        return {"method": "hcl", "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "centroids": self.centroids,
                "clustered_epoch": self.clustered_epoch, "banks": {k: b.state_dict() for k, b in self.banks.items()},
                "width": self.width, "patch_sizes": self.patch_sizes, "hcl": self.h_cfg,
                "mogo_seconds": self.mogo_seconds}

    def rng_states(self) -> dict[str, Any]:
        return {}  # the banks' own generators are in their state dicts

    def epoch_start(self, epoch: int, checkpoint: Callable[[], None]) -> np.ndarray:
        """The epoch's crops (§4); unless this epoch was clustered before a resume, its MoGo pass (§3), then a
        checkpoint; the centroids on the device and the epoch's learning rate (§4: step schedule)."""
        keep = epoch_crops(self.store, self.h_cfg["seed"], epoch)  # §4: one crop per image, for MoGo and the steps
        if self.clustered_epoch != epoch:  # §3: once per epoch, before training on it
            m0 = time.perf_counter()
            self.model.eval()
            self.centroids = mogo_pass(self.model, self.store, self.patch_sizes, self.h_cfg, self.banks, epoch,
                                       self.generator, self.device, self.ctx.log, keep)
            self.clustered_epoch = epoch
            self.mogo_seconds.append(round(time.perf_counter() - m0, 3))
            checkpoint()
        self.model.train()
        self.on_device = {kind: {form: c.to(self.device) for form, c in forms.items()}
                          for kind, forms in self.centroids.items()}
        self.lr = lr_at(epoch, self.h_cfg["lr"], self.h_cfg["lr_drop_epoch"], self.h_cfg["lr_drop"])
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        return keep

    def inputs(self, t: int, i: int, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Two of the crop's cached variants, as views 1 and 2 (§4), and its foreground mask."""
        views = two_variants(len(batch["index"]), self.n_variants, self.generator)
        x1, x2 = view_inputs(batch, self.patch_sizes, views, self.device)  # both views assembled in one pass
        return x1, x2, batch["fg_mask"].flatten(1).to(self.device)

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> HCLStepOutput:
        x1, x2, fg_mask = inputs
        return training_step(self.model, x1, x2, fg_mask, self.on_device["fg"], self.on_device["bg"],
                             self.h_cfg["tau"])

    def update(self, out: HCLStepOutput, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        optimize(self.model, out.loss, self.optimizer, self.scaler, self.h_cfg["ema_m"])
        return {**out.terms, "lr": self.lr}

    def postfix(self, terms: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{terms['loss']:.3f}", "fg": f"{terms['fg']:.3f}", "bg": f"{terms['bg']:.3f}",
                "pred": f"{terms['pred']:.4f}", "lr": f"{terms['lr']:.1e}"}

    def finish(self, outputs: dict[str, Any]) -> dict[str, Any]:
        outputs["timings"]["mogo_seconds"] = self.mogo_seconds
        return outputs
