"""STEGO's part of the training loop (pipeline/training/trainer.py): its head, its step and its probes (docs/stego.md
§2-§4).

The backbone never runs here: each item's features and its positive's (a random one of its `num_neighbors`
nearest crops in the neighbour table, §1) come from the HP store. The loop around it (seeds, resume, NaN guard,
checkpoints, logs) is the shared one; `train` runs it with `StegoTraining`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cache.reader import FeatureStore
from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.evaluation.online_probes import OnlineProbes, online_probe_settings
from pipeline.methods.stego.head import StegoHead
from pipeline.methods.stego.loss import StegoLossSettings, stego_loss
from pipeline.methods.stego.stages import read_table
from pipeline.orchestration.runner import StageContext
from pipeline.training import trainer

CURVES = (("loss", "intra", "inter", "neg"), ("cd_intra", "cd_inter", "cd_neg"))  # curves.png, a panel each
POSITIVE_CHUNKS_BYTES = 512 * 2**20  # decoded chunks kept for the positives' reads (`ChunkCache`)


def train(ctx: StageContext, config: Config, store: FeatureStore, out: Path,
          upstream: dict[str, dict[str, Any]], preview: str | None = None) -> dict[str, Any]:
    """The STEGO head trained on `store` with the neighbour table of `upstream["knn-train"]` into the run folder;
    `preview`: the val store whose images TensorBoard shows at each checkpoint."""
    table = read_table(upstream["knn-train"], len(store))
    return trainer.train(ctx, config, store, out, StegoTraining(ctx, config, store, table), preview)


def loss_settings(s: dict[str, Any]) -> StegoLossSettings:
    return StegoLossSettings(**{k: s[k] for k in ("feature_samples", "neg_samples", "pointwise", "zero_clamp",
                                                  "stabilize", "w_intra", "w_inter", "w_neg", "b_intra", "b_inter",
                                                  "b_neg", "correspondence_weight")})


def positives(table: np.ndarray, index: torch.Tensor, num_neighbors: int, generator: torch.Generator) -> np.ndarray:
    """Each item's positive (§1): rank r ~ U{1..num_neighbors} of its row, drawn anew every time it is loaded;
    rank 0 is skipped as "self" without checking, as the reference does."""
    rank = torch.randint(1, num_neighbors + 1, (len(index),), generator=generator)
    return table[index.numpy(), rank.numpy()]


class ChunkCache:
    """Samples of one store array by index, keeping up to `budget` bytes of decoded chunks (least recently used
    dropped first).

    Each positive sits in a random chunk of the store, and a chunk is decoded (and checked) whole: without this a
    step decoded one chunk per positive, chunk_size crops for one. A store that fits in `budget` is decoded once;
    a larger one hits in proportion (budget / store size), so at COCO scale most positives still cost a decode.
    The values are the store's own (`FeatureStore.read_chunk`, checked when decoded)."""

    def __init__(self, store: FeatureStore, name: str, budget: int = POSITIVE_CHUNKS_BYTES):
        self.store, self.name, self.budget = store, name, budget
        self.chunks: OrderedDict[int, np.ndarray] = OrderedDict()
        self.bytes = 0

    def gather(self, indices: Sequence[int]) -> np.ndarray:
        """Samples `indices` (any order, repeats allowed), as `FeatureStore.gather` returns them."""
        indices = np.asarray(indices, dtype=np.int64)
        size = self.store.chunk_size
        wanted = [int(c) for c in np.unique(indices // size)]
        missing = [c for c in wanted if c not in self.chunks]
        decoded = dict(zip(missing, self.store.read_chunks([(self.name, c) for c in missing]), strict=True))
        blocks = {c: decoded[c] if c in decoded else self.chunks[c] for c in wanted}
        out = np.empty((len(indices), *self.store.array(self.name).shape[1:]), self.store.dtype(self.name))
        for k, i in enumerate(indices):
            out[k] = blocks[int(i) // size][int(i) % size]
        for c in wanted:  # most recently used last
            if c in decoded:
                self.chunks[c] = decoded[c]
                self.bytes += decoded[c].nbytes
            else:
                self.chunks.move_to_end(c)
        while self.bytes > self.budget and self.chunks:
            self.bytes -= self.chunks.popitem(last=False)[1].nbytes
        return out


@dataclass
class StegoStep:
    loss: torch.Tensor
    codes: torch.Tensor  # the anchors' codes, for the probes (detached there)
    terms: dict[str, float] = field(default_factory=dict)


class StegoTraining:
    """STEGO's hooks: the head with Adam (§2, §4), the correspondence loss on anchors and their positives (§3) and,
    under evaluate.protocol = paper, the jointly trained probes (§3 "Probes", shared with HP: online_probes.py)."""

    section, label, curves, epoch_images = "stego", "STEGO", CURVES, None

    def __init__(self, ctx: StageContext, config: Config, store: FeatureStore, table: np.ndarray):
        self.ctx, self.config, self.store, self.table, self.s = ctx, config, store, table, config["stego"]
        if self.s["num_neighbors"] >= table.shape[1]:
            raise UserError(f"stego.num_neighbors = {self.s['num_neighbors']} needs a neighbour table wider than "
                            f"that, but it keeps {table.shape[1]} (stego_cache.knn_size); lower one or raise the "
                            "other")

    def build(self, plan: trainer.RunPlan, generator: torch.Generator) -> None:
        """The head (the first draws after the seed), its optimizer, the loss settings, the probes."""
        self.plan, self.generator, self.device = plan, generator, plan.device
        self.in_dim = self.store.array("feat").shape[-1]
        self.head = StegoHead(self.in_dim, self.s["head_dim"], self.s["dropout"]).to(self.device)
        self.optimizer = torch.optim.Adam(self.head.parameters(), lr=self.s["lr"])  # §4: Adam, no schedule
        self.settings = loss_settings(self.s)
        probes = online_probe_settings(self.config)
        labelled = "label" in self.store.names()
        self.probes = OnlineProbes(self.s["head_dim"], probes, self.device, labelled) if probes else None
        if self.probes is not None and "linear" in probes["probes"] and not labelled:
            self.ctx.log(f"the training split has no labels ({self.store.url}): the linear probe is not trained")
        self.names = ["feat"] + (["label"] if self.probes is not None and self.probes.trains_linear else [])
        self.positive_features = ChunkCache(self.store, "feat")

    def start(self) -> None:
        self.head.train()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.probes is not None:
            self.probes.load_state_dict(state["online_probes"])

    def state_dict(self) -> dict[str, Any]:
        return {"method": "stego", "head": self.head.state_dict(), "optimizer": self.optimizer.state_dict(),
                "in_dim": self.in_dim, "head_dim": self.s["head_dim"], "dropout": self.s["dropout"],
                "online_probes": self.probes.state_dict() if self.probes is not None else None}

    def rng_states(self) -> dict[str, Any]:
        return {}  # every draw (dropout, coordinates, permutations, positives) is from the trainer's generator

    def epoch_start(self, epoch: int, checkpoint: Callable[[], None]) -> None:
        self.head.train()

    def inputs(self, t: int, i: int, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Anchors and their positives, channels first (§1: the positive read from the store by index)."""
        pos = positives(self.table, batch["index"], self.s["num_neighbors"], self.generator)
        as_input = lambda x: x.to(self.device).float().permute(0, 3, 1, 2).contiguous()  # noqa: E731
        return as_input(batch["feat"]), as_input(torch.from_numpy(self.positive_features.gather(pos)))

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> StegoStep:
        f, f_pos = inputs
        f_loss, c = self.head(f, self.generator)  # §2 anchors: two head masks, then the loss features' mask
        f_pos_loss, c_pos = self.head(f_pos, self.generator)  # §2 positives, the same three draws
        out = stego_loss(f_loss, c, f_pos_loss, c_pos, self.settings, self.generator)  # §3
        terms = {"loss": float(out.loss.detach()), "intra": float(out.intra), "inter": float(out.inter),
                 "neg": float(out.neg), "cd_intra": float(out.cd_intra), "cd_inter": float(out.cd_inter),
                 "cd_neg": float(out.cd_neg)}
        return StegoStep(out.loss, c, terms)

    def update(self, out: StegoStep, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        self.optimizer.step()  # §4: no clipping, no weight decay
        if self.probes is not None:  # §3: the probes' own Adam steps on the detached codes
            out.terms.update(self.probes.step(out.codes, batch.get("label")))
        return out.terms

    def postfix(self, terms: dict[str, float]) -> dict[str, str]:
        return {k: f"{terms[k]:.3f}" for k in ("loss", "intra", "inter", "neg")}

    def finish(self, outputs: dict[str, Any]) -> dict[str, Any]:
        if self.probes is not None:
            outputs["online_probes"] = self.probes.outputs()
        return outputs
