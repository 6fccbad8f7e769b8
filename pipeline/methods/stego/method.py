"""STEGO as hp-pipe's method contract (pipeline/methods/contract.py): what the rest of hp-pipe asks of STEGO.

The maths is docs/stego.md: the head (head.py), the correspondence loss (loss.py), the neighbour table (knn.py),
the training hooks (training.py). STEGO reads HP's `prepare` and `features` stores and adds two stages of its own
(stages.py): the neighbour table and the mirrored val features.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.datasets.geometry import shorter_side_geometry
from pipeline.evaluation.online_probes import online_probe_settings
from pipeline.methods.contract import MIN_ITERATIONS, Config, Method, at_least, four_batches
from pipeline.methods.stego.settings import StegoCacheSection, StegoSection
from pipeline.methods.stego.stages import STAGES
from pipeline.methods.stego.training import CURVES
from pipeline.orchestration import paths

# §7: the numbers STEGO reports (Acc, mIoU %), after CRF, per dataset and backbone
PAPER = {
    "cocostuff27": [("vit_small_patch8_224.dino", 48.3, 24.5, 74.4, 38.3),
                    ("vit_base_patch8_224.dino", 56.9, 28.2, 76.1, 41.0),
                    ("vit_small_patch16_224.dino", 52.5, 23.7, 70.6, 34.5)],
    "cityscapes": [("vit_base_patch8_224.dino", 73.2, 21.0, 90.3, 26.8)],
    "potsdam": [("vit_small_patch8_224.dino", 77.0, None, None, None)],
}
SOURCE = ("STEGO (Hamilton et al., ICLR 2022): cluster and linear probes trained with the head, dense CRF and flip "
          "averaging; ViT-B/8 COCO from the released checkpoint, the others as the HP paper's tables cite them")


def _train(ctx, config: Config, store, out, upstream=None, preview=None) -> dict[str, Any]:
    from pipeline.methods.stego import training

    return training.train(ctx, config, store, out, upstream or {}, preview=preview)


def _encoder(state: dict[str, Any]):
    """STEGO's codes (§2, evaluation mode); with the mirrored features at hand, the reference's flip averaging
    (§6): c = (c(x) + flip(c(flip x))) / 2."""
    from pipeline.evaluation.encoders import Encoder
    from pipeline.methods.stego.head import StegoHead

    head = StegoHead(state["in_dim"], state["head_dim"], state.get("dropout", 0.1))
    head.load_state_dict(state["head"])
    head.eval()

    def codes(feat: torch.Tensor) -> torch.Tensor:
        return head.codes(feat.float().permute(0, 3, 1, 2))

    def from_arrays(a: dict[str, torch.Tensor]) -> torch.Tensor:
        c = codes(a["feat"])
        if "feat_flip" in a:
            c = (c + codes(a["feat_flip"]).flip(-1)) / 2
        return c

    def live(backbone, x: torch.Tensor) -> torch.Tensor:
        return (codes(backbone(x).feat) + codes(backbone(x.flip(-1)).feat).flip(-1)) / 2

    return Encoder(head.dim, ("feat", "feat_flip"), from_arrays, live)


def _paper_rows(config: Config) -> list[dict[str, Any]]:
    rows = []
    for backbone, acc, miou, linear_acc, linear_miou in PAPER.get(config["dataset"]["name"], []):
        rows.append({"backbone": backbone, "features": "head", "probe": "cluster", "acc": acc, "miou": miou})
        if linear_acc is not None:
            rows.append({"backbone": backbone, "features": "head", "probe": "linear", "acc": linear_acc,
                         "miou": linear_miou})
    return rows


def _paper_differences(config: Config, protocol: str) -> list[str]:
    out = []
    if protocol != "paper":
        out.append(f"evaluation protocol {protocol}: probes fitted after training (the paper: probes trained with "
                   "the head; --set evaluate.protocol=paper)")
    if not config["stego_cache"]["flip_tta"]:
        out.append("no flip averaging (stego_cache.flip_tta = false; the paper averages each val image's codes "
                   "with its mirror's)")
    out.append("features from the cache in float16 (the reference: float32, computed at every step)")
    return out


def _notes(config: Config) -> dict[str, str]:
    on = config["stego_cache"]["flip_tta"]
    return {"flip_averaging": "val codes averaged with those of the mirrored image (STEGO's flip averaging)" if on
            else "no flip averaging (stego_cache.flip_tta = false): the reference averages with the mirrored image"}


MAX_PASSES = 10  # passes over a small folder's crops that stego.max_steps may make at most


def _small_data(config: Config, images: int, crops: int, explicit: set[str]) -> list[tuple[str, Any, str]]:
    """A small folder's [stego] and [stego_cache] (pipeline/datasets/folder.py): STEGO trains on the shared store's
    crops, each with a positive from its nearest crops. The batch halves until four batches fit in the crops (at
    least 2: the negatives are the batch's other images); the run lasts MIN_ITERATIONS iterations at least, in whole
    epochs (stego.epochs, raised as needed); stego.max_steps passes over the crops MAX_PASSES times at most (the
    reference's 5000 batches of 16 are under half a pass over COCO-Stuff's five-crops; on a dozen images they would
    pass over the same crops more than a thousand times; 10 passes are HCL's epochs), so that only a folder of
    1,600 images or more keeps the reference's 5000 steps; the neighbour table keeps no more
    neighbours than there are crops (the knn stage needs knn_size <= crops) and the positive is drawn from fewer
    ranks than the table keeps (num_neighbors < knn_size, rank 0 being the crop itself)."""
    s, c = config["stego"], config["stego_cache"]
    batch = four_batches(s["batch_size"], crops, 2, "stego.batch_size" in explicit)
    per_epoch = max(1, crops // batch)
    knn = min(c["knn_size"], crops)
    epochs = at_least(s["epochs"], per_epoch)
    out = [("stego.batch_size", batch, f"{images} training images, {crops} crops: four batches per epoch at least")]
    if s["max_steps"]:
        passes = max(MAX_PASSES, epochs)  # whole epochs, MIN_ITERATIONS iterations at least
        out.append(("stego.max_steps", min(s["max_steps"], per_epoch * passes),
                    f"{per_epoch} iterations per epoch: at most {passes} passes over the {crops} crops, at least "
                    f"{MIN_ITERATIONS} iterations"))
    else:
        out.append(("stego.epochs", epochs, f"{per_epoch} iterations per epoch: at least {MIN_ITERATIONS} in all"))
    return [*out,
            ("stego_cache.knn_size", knn, f"{crops} training crops: no more neighbours kept than crops"),
            ("stego.num_neighbors", max(1, min(s["num_neighbors"], knn - 1)),
             f"positives drawn from ranks 1..{knn - 1} of the {knn} the neighbour table keeps")]


STEGO = Method(
    name="stego", label="STEGO", title="STEGO (Hamilton et al., ICLR 2022)", doc="docs/stego.md",
    sections={"stego": StegoSection, "stego_cache": StegoCacheSection}, section="stego",
    presets="pipeline.methods.stego",
    stores={"train": "features-train", "val": "features-val"}, store_url=paths.store_url,
    stages=STAGES, train_inputs=("features-train", "knn-train"), val_inputs=("features-val-flip",),
    training_sections=("dataset", "prepare", "features", "train", "stego", "stego_cache"),
    train=_train, check_store=lambda store: store.array("feat"),
    checkpoint=("head", "optimizer", "online probes (protocol paper)"),
    curves=CURVES, small_data=_small_data,
    encoder=_encoder,
    geometry=shorter_side_geometry,
    online_probes=online_probe_settings, protocols=("paper", "kmeans"), protocol_notes=_notes,
    crf_by_default=False, linear_optimizer="adam",
    paper_rows=_paper_rows, paper_differences=_paper_differences, paper_source=lambda config: SOURCE,
)
