"""`train`: the Hidden Positives heads trained from the feature cache alone (docs/hp.md §2-§5).

The backbone never runs here: every input (features, photometric views, LHP weights) comes
from the zarr store, and the task-specific pool is renewed from cached features through S_m.
A run lives in `<workdir>/<dataset>/runs/<run>/`: checkpoints/last.pt (atomic, every
`checkpoint_interval` iterations and at the end), metrics.jsonl, curves.png. A killed run
resumes from its checkpoint to the same final weights as an uninterrupted one.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from cache.reader import FeatureStore
from pipeline import paths, runs
from pipeline.checkpoints import load_checkpoint, save_checkpoint
from pipeline.config import Config, fingerprint
from pipeline.errors import UserError
from pipeline.graph import method_of, stage_plan
from pipeline.hp.heads import ema_update
from pipeline.hp.online_probes import OnlineProbes, online_probe_settings
from pipeline.hp.pool import PoolIndex, pick_patches
from pipeline.hp.schedule import lambda_at, renews_at
from pipeline.hp.step import HPHeads, Pools, StepSettings, pool_entries, training_step
from pipeline.runner import StageContext, changed_keys, read_manifest, run_stage
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
from stages import features_hcl, train_hcl


# ---------------------------------------------------------------- pools (§4)
def sample_pool(store: FeatureStore, heads: HPHeads, size: int, specific: bool, rng: np.random.Generator,
                generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """One random patch from each of `size` random training images, as unit pool vectors."""
    images = rng.choice(len(store), size, replace=len(store) < size)
    feats = torch.from_numpy(store.gather("feat", np.sort(images)))  # (P, h, w, C)
    patches = pick_patches(feats.reshape(size, -1, feats.shape[-1]), generator).to(device).float()
    return pool_entries(heads, patches, specific)


# ---------------------------------------------------------------- online probes (§8, evaluate.protocol = paper)
def online_probes(ctx: StageContext, config: Config, store: FeatureStore, device: torch.device) -> OnlineProbes | None:
    """The reference's cluster and linear probes, trained on every batch's detached codes; None under kmeans."""
    settings = online_probe_settings(config)
    if settings is None:
        return None
    labelled = "label" in store.names()
    if "linear" in settings["probes"] and not labelled:
        ctx.log(f"the training split has no labels ({store.url}): the online linear probe is not trained")
    return OnlineProbes(config["train"]["head_dim"], settings, device, labelled)


# ---------------------------------------------------------------- checkpoints
# ---------------------------------------------------------------- the loop
def optimize(heads: HPHeads, loss: torch.Tensor, opt_s: torch.optim.Optimizer, opt_p: torch.optim.Optimizer,
             scaler: torch.amp.GradScaler, grad_clip: float, ema_m: float) -> None:
    """The EMA update of S_m, then one optimizer step on S and P (§2, §5).

    The reference updates S_m inside its training forward, i.e. from S's weights *before* this step's update
    (and also when the scaler skips the step); doing it first here keeps that order.
    """
    ema_update(heads.S_m, heads.S, ema_m)  # §2: θ_m ← m·θ_m + (1−m)·θ, θ before the step
    opt_s.zero_grad(set_to_none=True)
    opt_p.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(opt_s)
    torch.nn.utils.clip_grad_norm_(heads.S.parameters(), grad_clip)  # §5: gradient norm of S clipped at 10
    scaler.step(opt_s)
    scaler.step(opt_p)
    scaler.update()


def make_optimizers(heads: HPHeads, t_cfg: dict[str, Any]) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """AdamW for S, Adam for P (§5)."""
    opt_s = torch.optim.AdamW(heads.S.parameters(), lr=t_cfg["lr"], weight_decay=t_cfg["weight_decay"])
    return opt_s, torch.optim.Adam(heads.P.parameters(), lr=t_cfg["lr"])


def train(ctx: StageContext, config: Config, store: FeatureStore, out: Path) -> dict[str, Any]:
    t_cfg = config["train"]
    plan = plan_run(ctx, config, "train", store, out)
    runs.ensure_record(out, config)  # a new (or started over) run records its settings first
    device, amp, iters_per_epoch, total, ckpt = plan.device, plan.amp, plan.iters_per_epoch, plan.total, plan.ckpt
    batch_size, seed = t_cfg["batch_size"], t_cfg["seed"]

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    in_dim = store.array("feat").shape[-1]
    heads = HPHeads(in_dim, t_cfg["head_dim"], t_cfg["dropout"]).to(device)
    opt_s, opt_p = make_optimizers(heads, t_cfg)
    scaler = torch.amp.GradScaler("cuda", init_scale=2048, growth_interval=1000, enabled=amp)  # the reference's
    settings = StepSettings(t_cfg["tau"], t_cfg["rho"], t_cfg["alpha"], t_cfg["anchor_tile"] or None)
    backend = t_cfg["pool_backend"]
    probes = online_probes(ctx, config, store, device)

    t = 0
    if ckpt.exists():
        state = load_checkpoint(ckpt)
        heads.load_state_dict(state["heads"])
        opt_s.load_state_dict(state["opt_s"])
        opt_p.load_state_dict(state["opt_p"])
        scaler.load_state_dict(state["scaler"])
        if probes is not None:
            probes.load_state_dict(state["online_probes"])
        pool_ag, pool_sp = state["pool_ag"].to(device), state["pool_sp"].to(device)
        restore_rng(state, generator, device)
        rng.bit_generator.state = state["rng"]["numpy"]
        t = state["iteration"]
        log_resume(ctx, state, ckpt, total)
    else:
        heads.train()
        pool_ag = sample_pool(store, heads, t_cfg["pool_size"], False, rng, generator, device)  # §4, once
        pool_sp = sample_pool(store, heads, t_cfg["pool_size"], True, rng, generator, device)
    pools = Pools(PoolIndex(pool_ag, backend), PoolIndex(pool_sp, backend))
    log = MetricsLog(out / "metrics.jsonl", keep_until=t, config=config, log=ctx.log)

    def checkpoint() -> None:
        save_checkpoint(ckpt, {
            "iteration": t, "heads": heads.state_dict(), "opt_s": opt_s.state_dict(), "opt_p": opt_p.state_dict(),
            "scaler": scaler.state_dict(), "pool_ag": pool_ag, "pool_sp": pool_sp,
            "rng": {**rng_states(generator, device), "numpy": rng.bit_generator.state},
            "in_dim": in_dim, "head_dim": t_cfg["head_dim"], "config": config, "store": store.url,
            "random_init": store.random_init, "backbone": backbone_identity(store),
            "fingerprint": ctx.fingerprint, "threads": torch.get_num_threads(),
            "online_probes": probes.state_dict() if probes is not None else None,
        })
        log.checkpointed(t, ckpt)  # TensorBoard: overlay images of this checkpoint

    names = ["feat", "feat_aug", "lhp"] + (["label"] if probes is not None and probes.trains_linear else [])
    t0, t_start = time.perf_counter(), t
    heads.train()
    with tqdm(total=total, initial=t, desc=ctx.name, unit="it", smoothing=0.05) as bar:
        while t < total:
            epoch, first = divmod(t, iters_per_epoch)
            batches = store.batches(names, batch_size, shuffle_seed=seed * 1000 + epoch, drop_last=True,
                                    buffer_chunks=t_cfg["buffer_chunks"], start_batch=first)
            for i, batch in enumerate(batches, start=first):
                if renews_at(i, t_cfg["renew_interval"]):  # §4: Pool_sp renewed from cached features through S_m
                    pool_sp = sample_pool(store, heads, t_cfg["pool_size"], True, rng, generator, device)
                    pools.specific = PoolIndex(pool_sp, backend)
                lam = lambda_at(t, t_cfg["warmup"], total)  # §5: λ ramp
                f, f_aug, lhp = _step_inputs(batch, generator, device)
                with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                    out_step = training_step(heads, f, f_aug, lhp, pools, lam, settings, generator)
                if not torch.isfinite(out_step.loss):
                    raise UserError(f"training diverged: the loss is {out_step.loss.item()} at iteration {t} "
                                    f"(terms {out_step.terms}); {kept_checkpoint(ckpt)}. "
                                    "Check the feature store, or lower train.lr")
                optimize(heads, out_step.loss, opt_s, opt_p, scaler, t_cfg["grad_clip"], t_cfg["ema_m"])
                if probes is not None:  # §8: the probes' own Adam steps on this batch's detached codes
                    out_step.terms.update(probes.step(out_step.codes, batch.get("label")))
                t += 1
                terms = {**out_step.terms, "lambda": lam}
                bar.update(1)
                bar.set_postfix(loss=f"{terms['loss']:.3f}", ghp=f"{terms['ghp']:.3f}", lhp=f"{terms['lhp']:.3f}",
                                cons=f"{terms['consistency']:.3f}", lam=f"{lam:.2f}", pos=f"{terms['positives']:.1f}",
                                refresh=False)
                if t % t_cfg["log_interval"] == 0 or t == total:
                    log.append({"iteration": t, "epoch": epoch, **{k: round(v, 6) for k, v in terms.items()},
                                "seconds": round(time.perf_counter() - t0, 3)})
                if t % t_cfg["checkpoint_interval"] == 0 or t == total:
                    checkpoint()
    outputs = run_outputs(ctx, plan, log, store, out, t - t_start, time.perf_counter() - t0, "HP")
    if probes is not None:
        outputs["online_probes"] = {**probes.settings, "trained": probes.trained,
                                    "iterations": probes.steps, "linear_iterations": probes.linear_steps}
    return outputs


def _step_inputs(batch: dict[str, torch.Tensor], generator: torch.Generator, device: torch.device):
    """Channels-first float tensors; one of the K cached photometric views per image (§3)."""
    feat_aug = batch["feat_aug"]  # (B, K, h, w, C)
    view = torch.randint(0, feat_aug.shape[1], (feat_aug.shape[0],), generator=generator)
    f_aug = feat_aug[torch.arange(feat_aug.shape[0]), view]
    as_input = lambda x: x.to(device, non_blocking=True).float().permute(0, 3, 1, 2).contiguous()  # noqa: E731
    return as_input(batch["feat"]), as_input(f_aug), batch["lhp"].to(device).float()


def run(config: Config, workdir: Path, run: str | None = None, force: bool = False,
        replace: bool = False) -> dict[str, Any]:
    """Train the configured method (train.method) into run `run` (default: the method's name).

    A run that exists with other settings is refused before anything runs (`refuse_to_replace`), unless `force`
    (start over) or `replace` (evaluate --force: retrain it if its settings differ, reuse it if they do not). The
    run's whole config is recorded in its folder (pipeline/runs.py) for evaluate, predict, report and status.
    """
    method = method_of(config)
    run = run or method
    sdir, out = paths.stage_dir(config, workdir), paths.run_dir(config, workdir, run)
    if not (force or replace):  # before the features stage: a refused command changes nothing
        planned_config, planned_inputs = stage_plan(config, workdir)["train"]
        refuse_to_replace(sdir, run, {**planned_config, "run": run}, planned_inputs, paths.checkpoint_path(out),
                          config)
    manifest = features_hcl.run_for_method(config, workdir, "train")
    if method == "hcl":  # HCL's own store (docs/hcl.md §4)
        trainer, needs, store_key = train_hcl.train, features_hcl.hcl_arrays, "hcl-train"
    else:
        trainer, needs, store_key = train, lambda store: [store.array(n) for n in ("feat_aug", "lhp")], "train"
    store_fingerprint = manifest["fingerprint"]  # the store records the fingerprint of the stage that wrote it
    url = manifest["outputs"]["store"]
    stage_config, inputs = stage_plan(config, workdir, {store_key: url})["train"]

    def body(ctx: StageContext) -> dict[str, Any]:
        store = FeatureStore.open(url, expect={"split": "train", "fingerprint": store_fingerprint})
        needs(store)  # a clear message when the store lacks what the method needs
        return trainer(ctx, config, store, out)

    result = run_stage(sdir, f"train-{run}", {**stage_config, "run": run}, inputs, body, force)
    runs.ensure_record(out, config)  # a run from before records existed gets one now
    return result


def refuse_to_replace(sdir: Path, run: str, stage_config: dict[str, Any], inputs: dict[str, str], ckpt: Path,
                      config: Config | None = None) -> None:
    """A run trained (or started) with other settings is never replaced silently: its checkpoint, probes and
    evaluation would go with it. The user picks a new run name or says --force. The train manifest decides; without
    one (stages/ deleted), the run's recorded settings do."""
    if not ckpt.exists():
        return  # nothing trained to lose
    old = read_manifest(sdir, f"train-{run}")
    recorded = runs.read_record(ckpt.parent.parent)
    detail = runs.differences(recorded, config) if recorded is not None and config is not None else {}
    if old is not None:
        if old.get("fingerprint") == fingerprint(stage_config, inputs):
            return
        keys = changed_keys({"config": old.get("config", {}), "inputs": old.get("inputs", {})},
                            {"config": stage_config, "inputs": inputs})
        upstream = any(k.startswith("inputs.") for k in keys)  # the store changed: its sections' keys are the cause
        detail = {k: v for k, v in detail.items() if f"config.{k}" in keys
                  or (upstream and not k.startswith(("train.", "hcl.", "evaluate.")))}
    elif detail:
        keys = list(detail)
    else:
        return
    shown = "; ".join(f"{k} is {r!r} in the run, {n!r} now" for k, (r, n) in list(detail.items())[:4])
    where = f" (its settings: {paths.run_config_path(ckpt.parent.parent)})" if recorded is not None else ""
    raise UserError(f"run '{run}' exists with other settings ({', '.join(keys) or 'inputs'} differ)"
                    f"{': ' + shown if shown else ''}. Training now would replace it and its evaluation{where}. "
                    "Use --run NEW to train a new run beside it, or pass --force to replace it")
