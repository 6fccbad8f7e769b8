"""Hidden Positives as hp-pipe's method contract (pipeline/methods/contract.py): what the rest of hp-pipe asks of HP.

The maths is docs/hp.md: the heads (heads.py, step.py), the loss (loss.py), the pools (pool.py), the schedule
(schedule.py), the training hooks (training.py). HP reads the shared stores: `prepare`'s five-crops and `features`.
"""

from __future__ import annotations

from typing import Any

from pipeline.datasets.geometry import shorter_side_geometry
from pipeline.evaluation.online_probes import online_probe_settings
from pipeline.methods.contract import MIN_ITERATIONS, Config, Method, at_least, four_batches
from pipeline.methods.hp.settings import HpSection
from pipeline.orchestration import paths

PAPER_BATCH = 64  # docs/hp.md §5-§6: every preset of the paper trains with batch 64


def _train(ctx, config: Config, store, out, upstream=None, preview=None) -> dict[str, Any]:
    from pipeline.methods.hp import training

    return training.train(ctx, config, store, out, preview=preview)


def _check_store(store) -> None:
    for name in ("feat_aug", "lhp"):
        store.array(name)  # a clear message when the store lacks an array HP trains on


def _encoder(state: dict[str, Any]):
    from pipeline.evaluation.encoders import Encoder
    from pipeline.methods.hp.step import HPHeads

    heads = HPHeads(state["in_dim"], state["head_dim"])
    heads.load_state_dict(state["heads"])
    heads.eval()
    return Encoder(heads.dim, ("feat",),
                   lambda a: heads.codes(a["feat"].float().permute(0, 3, 1, 2)),
                   lambda backbone, x: heads.codes(backbone(x).feat.permute(0, 3, 1, 2)))


def _paper_rows(config: Config) -> list[dict[str, Any]]:
    return list((config.get("paper") or {}).get("results") or [])  # the dataset presets' [paper]: HP's tables


def _paper_differences(config: Config, protocol: str) -> list[str]:
    """How an HP run's settings differ from the paper's: head width, epochs, batch, protocol."""
    paper, h = config.get("paper") or {}, config["hp"]
    same = [r for r in _paper_rows(config) if r["backbone"] == config["features"]["backbone"]]
    head_dims = {r["head_dim"] for r in same if r.get("head_dim")}
    out = []
    if head_dims and h["head_dim"] not in head_dims:
        out.append(f"head width D = {h['head_dim']} (the paper: {', '.join(map(str, head_dims))})")
    if paper.get("epochs") and h["epochs"] != paper["epochs"]:
        out.append(f"{h['epochs']} training epochs (the paper: {paper['epochs']})")
    if h["batch_size"] != PAPER_BATCH:
        out.append(f"batch {h['batch_size']} (the paper: {PAPER_BATCH})")
    if protocol != "paper":
        out.append(f"evaluation protocol {protocol}: probes fitted after training (the paper: probes trained online "
                   "with the head; --set evaluate.protocol=paper)")
    return out


def _small_data(config: Config, images: int, crops: int, explicit: set[str]) -> list[tuple[str, Any, str]]:
    """A small folder's [hp] (pipeline/datasets/folder.py): the preset's batch 64, pool 2048 and warm-up 1000 would
    train a dozen images for no iteration at all. The batch halves until four batches fit in the five-crops (at
    least 2), the run lasts MIN_ITERATIONS iterations at least, the pool holds at most one entry per crop, Pool_sp is
    renewed at least once per epoch and the λ warm-up ends within the first quarter."""
    h = config["hp"]
    batch = four_batches(h["batch_size"], crops, 2, "hp.batch_size" in explicit)
    per_epoch = max(1, crops // batch)
    epochs = at_least(h["epochs"], per_epoch)
    return [
        ("hp.batch_size", batch, f"{images} training images, {crops} crops: four batches per epoch at least"),
        ("hp.epochs", epochs, f"{per_epoch} iterations per epoch: at least {MIN_ITERATIONS} in all"),
        ("hp.pool_size", min(h["pool_size"], crops), "at most one pool entry per crop"),
        ("hp.renew_interval", min(h["renew_interval"], per_epoch), "Pool_sp renewed at least once per epoch"),
        ("hp.warmup", min(h["warmup"], per_epoch * epochs // 4), "λ ramps up after the first quarter"),
    ]


HP = Method(
    name="hp", label="HP", title="Hidden Positives (Seong et al., CVPR 2023)", doc="docs/hp.md",
    sections={"hp": HpSection}, section="hp", presets="pipeline.methods.hp",
    stores={"train": "features-train", "val": "features-val"}, store_url=paths.store_url,
    training_sections=("dataset", "prepare", "features", "train", "hp"),
    train=_train, check_store=_check_store,
    checkpoint=("heads (S, S_m, P)", "optimizers", "scaler", "pools", "online probes (protocol paper)"),
    curves=(("loss", "ghp", "lhp"), ("consistency",), ("lambda",), ("positives",)), small_data=_small_data,
    encoder=_encoder, geometry=shorter_side_geometry,
    online_probes=online_probe_settings, protocols=("kmeans", "paper"), crf_by_default=False,
    linear_optimizer="adam", paper_rows=_paper_rows, paper_differences=_paper_differences,
)
