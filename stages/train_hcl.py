"""`train --method hcl`: Hierarchical Context Learning's heads trained from the feature cache (docs/hcl.md §2-§4).

An epoch is one pass over the images (§4): HCL's store holds R crops per image, and each epoch uses one of them per
image, chosen from (hcl.seed, epoch) alone (pipeline/hcl/views.py `epoch_keep`), so a resumed run reads the same.
Each epoch starts with MoGoClustering (§3): the momentum head runs over the epoch's crops' cached view-2 variants,
30% of each image's foreground and background tokens refresh the two memory banks, and faiss k-means gives the
centroids held fixed for the epoch. Then the steps on the same crops: q online on view 1, k momentum on view 2, the
loss of §4, AdamW with the step schedule, the momentum update. The run layout, checkpoints, metrics.jsonl, curves,
resume and NaN guard are the HP trainer's; a checkpoint is also written right after each clustering, so a resumed
run never clusters an epoch twice.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from cache.reader import FeatureStore
from pipeline import runs
from pipeline.checkpoints import load_checkpoint, save_checkpoint
from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.hcl.heads import HCLModel, build_model
from pipeline.hcl.mogo import MemoryBank, kmeans_centroids, kmeans_seed
from pipeline.hcl.step import head_input, lr_at, mogo_samples, param_groups, training_step, two_variants, variant_levels
from pipeline.hcl.views import epoch_keep
from pipeline.plots import HCL_CURVES
from pipeline.runner import StageContext
from pipeline.trainer import (
    MetricsLog,
    backbone_identity,
    kept_checkpoint,
    log_resume,
    plan_run,
    restore_rng,
    rng_states,
    run_outputs,
)

MOGO_VIEW = 1  # §3.1: the pass runs the momentum head on view 2, i.e. cached variant 1


def step_names(patch_sizes: tuple[int, ...]) -> list[str]:
    return [*(f"hcl_aug_p{p}" for p in patch_sizes), "hcl_aug_cls", "fg_mask"]


def epoch_crops(store: FeatureStore, seed: int, epoch: int) -> np.ndarray:
    """Bool per store sample: the one crop of each image that `epoch` uses (§4)."""
    return epoch_keep(int(store.attrs["images"]), int(store.attrs["crops"]), seed, epoch)


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


def optimize(model: HCLModel, loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
             ema_m: float) -> None:
    """One AdamW step, then the momentum update (§2: EMA every iteration)."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    model.momentum_update(ema_m)


def train(ctx: StageContext, config: Config, store: FeatureStore, out: Path) -> dict[str, Any]:
    t_cfg, h_cfg = config["train"], config["hcl"]
    plan = plan_run(ctx, config, "hcl", store, out, images=int(store.attrs["images"]))  # §4: epoch = the images
    runs.ensure_record(out, config)  # a new (or started over) run records its settings first
    device, amp, iters_per_epoch, total, ckpt = plan.device, plan.amp, plan.iters_per_epoch, plan.total, plan.ckpt
    batch_size, seed = h_cfg["batch_size"], h_cfg["seed"]

    patch_sizes = tuple(store.attrs["patch_sizes"])
    n_variants = store.array("hcl_aug_cls").shape[1]
    width = (len(patch_sizes) + 1) * store.array("feat").shape[-1]
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = build_model(width, h_cfg).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, h_cfg["weight_decay"]), lr=h_cfg["lr"])
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    banks = {"fg": MemoryBank(seed, h_cfg["bank_replace"]), "bg": MemoryBank(seed + 1, h_cfg["bank_replace"])}
    centroids: dict[str, dict[str, torch.Tensor]] = {}  # §3: {"fg", "bg"} -> {"raw", "unit"}, fixed per epoch
    clustered_epoch, mogo_seconds = -1, []

    t = 0
    if ckpt.exists():
        state = load_checkpoint(ckpt)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        for kind, bank in banks.items():
            bank.load_state_dict(state["banks"][kind])
        centroids, clustered_epoch = state["centroids"], state["clustered_epoch"]
        restore_rng(state, generator, device)
        t, mogo_seconds = state["iteration"], state["mogo_seconds"]
        log_resume(ctx, state, ckpt, total)
    log = MetricsLog(out / "metrics.jsonl", keep_until=t, config=config, log=ctx.log)

    def checkpoint() -> None:
        save_checkpoint(ckpt, {
            "method": "hcl", "iteration": t, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(), "centroids": centroids, "clustered_epoch": clustered_epoch,
            "banks": {k: b.state_dict() for k, b in banks.items()},
            "rng": rng_states(generator, device),
            "width": width, "patch_sizes": patch_sizes, "hcl": h_cfg, "config": config, "store": store.url,
            "random_init": store.random_init, "backbone": backbone_identity(store),
            "fingerprint": ctx.fingerprint, "threads": torch.get_num_threads(),
            "mogo_seconds": mogo_seconds,
        })
        log.checkpointed(t, ckpt)  # TensorBoard: overlay images of this checkpoint

    names = step_names(patch_sizes)
    t0, t_start = time.perf_counter(), t
    with tqdm(total=total, initial=t, desc=ctx.name, unit="it", smoothing=0.05) as bar:
        while t < total:
            epoch, first = divmod(t, iters_per_epoch)
            keep = epoch_crops(store, seed, epoch)  # §4: one crop per image, the same for MoGo and the steps
            if clustered_epoch != epoch:  # §3: once per epoch, before training on it
                m0 = time.perf_counter()
                model.eval()
                centroids = mogo_pass(model, store, patch_sizes, h_cfg, banks, epoch, generator, device, ctx.log,
                                      keep)
                clustered_epoch = epoch
                mogo_seconds.append(round(time.perf_counter() - m0, 3))
                checkpoint()
            model.train()
            on_device = {kind: {form: c.to(device) for form, c in forms.items()} for kind, forms in centroids.items()}
            lr = lr_at(epoch, h_cfg["lr"], h_cfg["lr_drop_epoch"], h_cfg["lr_drop"])  # §4: step schedule
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches = store.batches(names, batch_size, shuffle_seed=seed * 1000 + epoch, drop_last=True,
                                    buffer_chunks=t_cfg["buffer_chunks"], start_batch=first, keep=keep)
            for batch in batches:
                view1, view2 = two_variants(len(batch["index"]), n_variants, generator)
                x1 = head_input(variant_levels(batch, patch_sizes, view1), patch_sizes, device)
                x2 = head_input(variant_levels(batch, patch_sizes, view2), patch_sizes, device)
                with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                    step = training_step(model, x1, x2, batch["fg_mask"].flatten(1).to(device),
                                         on_device["fg"], on_device["bg"], h_cfg["tau"])
                if not torch.isfinite(step.loss):
                    raise UserError(f"training diverged: the loss is {step.loss.item()} at iteration {t} "
                                    f"(terms {step.terms}); {kept_checkpoint(ckpt)}. "
                                    "Check the feature store, or lower hcl.lr")
                optimize(model, step.loss, optimizer, scaler, h_cfg["ema_m"])
                t += 1
                terms = {**step.terms, "lr": lr}
                bar.update(1)
                bar.set_postfix(loss=f"{terms['loss']:.3f}", fg=f"{terms['fg']:.3f}", bg=f"{terms['bg']:.3f}",
                                pred=f"{terms['pred']:.4f}", lr=f"{lr:.1e}", refresh=False)
                if t % t_cfg["log_interval"] == 0 or t == total:
                    log.append({"iteration": t, "epoch": epoch, **{k: round(v, 6) for k, v in terms.items()},
                                "seconds": round(time.perf_counter() - t0, 3)})
                if t % t_cfg["checkpoint_interval"] == 0 or t == total:
                    checkpoint()
    return run_outputs(ctx, plan, log, store, out, t - t_start, time.perf_counter() - t0, "HCL", HCL_CURVES,
                       mogo_seconds=mogo_seconds)
