"""HP's part of the training loop (pipeline/training/trainer.py): its state, its step, its pools (docs/hp.md §2-§5, §8).

The backbone never runs here: every input (features, photometric views, LHP weights) comes from the zarr store,
and the task-specific pool is renewed from cached features through S_m (§4). The loop around it (seeds, resume,
NaN guard, checkpoints, logs) is the shared one; `train` runs it with `HPTraining`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cache.reader import FeatureStore
from pipeline.config import Config
from pipeline.evaluation.online_probes import OnlineProbes, online_probe_settings
from pipeline.methods.hp.heads import ema_update
from pipeline.methods.hp.pool import PoolIndex, patch_choices
from pipeline.methods.hp.schedule import lambda_at, renews_at
from pipeline.methods.hp.step import HPHeads, Pools, StepOutput, StepSettings, pool_entries, training_step
from pipeline.orchestration.runner import StageContext
from pipeline.reporting.plots import CURVES
from pipeline.training import trainer


def train(ctx: StageContext, config: Config, store: FeatureStore, out: Path, preview: str | None = None
          ) -> dict[str, Any]:
    """The HP heads trained on `store` into the run folder `out` (the train stage's trainer for train.method = hp);
    `preview`: the val store whose images TensorBoard shows at each checkpoint."""
    return trainer.train(ctx, config, store, out, HPTraining(ctx, config, store), preview)


# ---------------------------------------------------------------- pools (§4)
def sample_pool(store: FeatureStore, heads: HPHeads, size: int, specific: bool, rng: np.random.Generator,
                generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """One random patch from each of `size` random training crops, as unit pool vectors (§4). The crops come from
    ceil(size / chunk_size) random whole chunks of the randomly permuted store (FeatureStore.sample_chunks): a renewal
    reads O(pool size) data, not a share of the store."""
    h, w = store.array("feat").shape[1:3]
    pick = patch_choices(size, h * w, generator).cpu().numpy()  # one random patch per crop, read alone
    patches = torch.from_numpy(store.sample_chunks("feat", size, rng, patches=pick)[1])  # (P, C)
    return pool_entries(heads, patches.to(device).float(), specific)


# ---------------------------------------------------------------- optimizers (§2, §5)
def make_optimizers(heads: HPHeads, t_cfg: dict[str, Any]) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """AdamW for S, Adam for P (§5)."""
    opt_s = torch.optim.AdamW(heads.S.parameters(), lr=t_cfg["lr"], weight_decay=t_cfg["weight_decay"])
    return opt_s, torch.optim.Adam(heads.P.parameters(), lr=t_cfg["lr"])


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


# ---------------------------------------------------------------- step inputs (§3)
def step_inputs(batch: dict[str, torch.Tensor], generator: torch.Generator,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Channels-first float tensors; one of the K cached photometric views per image (§3)."""
    feat_aug = batch["feat_aug"]  # (B, K, h, w, C)
    view = torch.randint(0, feat_aug.shape[1], (feat_aug.shape[0],), generator=generator)
    f_aug = feat_aug[torch.arange(feat_aug.shape[0]), view]
    as_input = lambda x: x.to(device, non_blocking=True).float().permute(0, 3, 1, 2).contiguous()  # noqa: E731
    return as_input(batch["feat"]), as_input(f_aug), batch["lhp"].to(device).float()


# ---------------------------------------------------------------- online probes (§8, evaluate.protocol = paper)
def online_probes(ctx: StageContext, config: Config, store: FeatureStore, device: torch.device) -> OnlineProbes | None:
    """The reference's cluster and linear probes, trained on every batch's detached codes; None under kmeans."""
    settings = online_probe_settings(config)
    if settings is None:
        return None
    labelled = "label" in store.names()
    if "linear" in settings["probes"] and not labelled:
        ctx.log(f"the training split has no labels ({store.url}): the online linear probe is not trained")
    return OnlineProbes(config["hp"]["head_dim"], settings, device, labelled)


# ---------------------------------------------------------------- HP in the loop
class HPTraining:
    """HP's hooks for pipeline/training/trainer.py: heads S, S_m, P with their optimizers (§2, §5), the two pools
    (§4), the
    λ ramp (§5) and, under evaluate.protocol = paper, the online probes (§8)."""

    section, label, curves, epoch_images = "hp", "HP", CURVES, None

    def __init__(self, ctx: StageContext, config: Config, store: FeatureStore):
        self.ctx, self.config, self.store, self.t_cfg = ctx, config, store, config["hp"]

    def build(self, plan: trainer.RunPlan, generator: torch.Generator) -> None:
        """The heads (the first draws after the seed), their optimizers, the loss settings, the probes."""
        t_cfg, device = self.t_cfg, plan.device
        self.plan, self.generator, self.device = plan, generator, device
        self.rng = np.random.default_rng(t_cfg["seed"])  # which chunks a pool renewal reads (§4)
        self.in_dim = self.store.array("feat").shape[-1]
        self.heads = HPHeads(self.in_dim, t_cfg["head_dim"], t_cfg["dropout"]).to(device)
        self.opt_s, self.opt_p = make_optimizers(self.heads, t_cfg)
        self.scaler = torch.amp.GradScaler("cuda", init_scale=2048, growth_interval=1000,  # the reference's
                                           enabled=plan.loss_scaling)
        self.settings = StepSettings(t_cfg["tau"], t_cfg["rho"], t_cfg["alpha"], t_cfg["anchor_tile"] or None)
        self.probes = online_probes(self.ctx, self.config, self.store, device)
        self.names = ["feat", "feat_aug", "lhp"] + (["label"] if self.probes is not None
                                                    and self.probes.trains_linear else [])

    def start(self) -> None:
        """A fresh run's pools (§4): Pool_ag once for the whole run, Pool_sp until its first renewal."""
        self.heads.train()
        self.pool_ag = self._sample(False)
        self.pool_sp = self._sample(True)
        self._index_pools()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.heads.load_state_dict(state["heads"])
        self.opt_s.load_state_dict(state["opt_s"])
        self.opt_p.load_state_dict(state["opt_p"])
        self.scaler.load_state_dict(state["scaler"])
        if self.probes is not None:
            self.probes.load_state_dict(state["online_probes"])
        self.pool_ag, self.pool_sp = state["pool_ag"].to(self.device), state["pool_sp"].to(self.device)
        self.rng.bit_generator.state = state["rng"]["numpy"]
        self._index_pools()

    def state_dict(self) -> dict[str, Any]:
        return {"heads": self.heads.state_dict(), "opt_s": self.opt_s.state_dict(), "opt_p": self.opt_p.state_dict(),
                "scaler": self.scaler.state_dict(), "pool_ag": self.pool_ag, "pool_sp": self.pool_sp,
                "in_dim": self.in_dim, "head_dim": self.t_cfg["head_dim"],
                "online_probes": self.probes.state_dict() if self.probes is not None else None}

    def rng_states(self) -> dict[str, Any]:
        return {"numpy": self.rng.bit_generator.state}

    def epoch_start(self, epoch: int, checkpoint: Callable[[], None]) -> None:
        self.heads.train()  # HP reads every crop of the store each epoch: no `keep`

    def inputs(self, t: int, i: int, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Pool_sp renewed when batch `i` of the epoch is due (§4), λ at iteration t (§5), the step's tensors (§3)."""
        if renews_at(i, self.t_cfg["renew_interval"]):  # §4: Pool_sp renewed from cached features through S_m
            self.pool_sp = self._sample(True)
            self.pools.specific = PoolIndex(self.pool_sp, self.t_cfg["pool_backend"])
        self.lam = lambda_at(t, self.t_cfg["warmup"], self.plan.total)  # §5: λ ramp
        return step_inputs(batch, self.generator, self.device)

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> StepOutput:
        f, f_aug, lhp = inputs
        return training_step(self.heads, f, f_aug, lhp, self.pools, self.lam, self.settings, self.generator)

    def update(self, out: StepOutput, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        optimize(self.heads, out.loss, self.opt_s, self.opt_p, self.scaler, self.t_cfg["grad_clip"],
                 self.t_cfg["ema_m"])
        if self.probes is not None:  # §8: the probes' own Adam steps on this batch's detached codes
            out.terms.update(self.probes.step(out.codes, batch.get("label")))
        return {**out.terms, "lambda": self.lam}

    def postfix(self, terms: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{terms['loss']:.3f}", "ghp": f"{terms['ghp']:.3f}", "lhp": f"{terms['lhp']:.3f}",
                "cons": f"{terms['consistency']:.3f}", "lam": f"{terms['lambda']:.2f}",
                "pos": f"{terms['positives']:.1f}"}

    def finish(self, outputs: dict[str, Any]) -> dict[str, Any]:
        if self.probes is not None:
            outputs["online_probes"] = self.probes.outputs()
        return outputs

    def _sample(self, specific: bool) -> torch.Tensor:
        return sample_pool(self.store, self.heads, self.t_cfg["pool_size"], specific, self.rng, self.generator,
                           self.device)

    def _index_pools(self) -> None:
        self.pools = Pools(PoolIndex(self.pool_ag, self.t_cfg["pool_backend"]),
                           PoolIndex(self.pool_sp, self.t_cfg["pool_backend"]))
