"""HCL as hp-pipe's method contract (pipeline/methods/contract.py): what the rest of hp-pipe asks of HCL.

The maths is docs/hcl.md. HCL reads stores of its own, written from the source images by its two feature stages
(stages/features_hcl.py; chunks: store.py), never HP's prepare or features.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cache.schema import HCL_SCHEMA
from pipeline.config import fingerprint
from pipeline.methods.contract import MIN_ITERATIONS, Config, Method, at_least, four_batches
from pipeline.methods.hcl.settings import HclFeaturesSection, HclSection
from pipeline.orchestration import paths
from pipeline.orchestration.stage import Stage

# the keys of [features] that HCL's stores depend on (the backbone and how chunks are stored); HP's views, LHP and
# store order (n_views, lhp_sigma, seed, ...) are not among them, nor trust_weights (it changes no value)
HCL_FEATURE_KEYS = ("backbone", "weights", "amp", "chunk_size", "compressor", "clevel")


def _store_extras(split: str):
    def extras(config: Config, workdir: Path, stores: dict[str, str], listing: dict | None) -> dict[str, Any]:
        """Its split's source files, the URL of its store, the backbone keys of [features] and the HCL store version
        (a new version, e.g. geometry or kernels, rebuilds the stores)."""
        from pipeline.orchestration.graph import features_fingerprint

        features = features_fingerprint(config)
        return {"store": stores.get(f"hcl-{split}") or paths.hcl_store_url(config, workdir, split),
                "hcl_schema": HCL_SCHEMA, "features": {k: features[k] for k in HCL_FEATURE_KEYS},
                "sources": fingerprint(listing[split]) if listing is not None else "unreadable"}
    return extras


def _check_manifest(job, step, manifest) -> None:
    from pipeline.methods.hcl.store import check_manifest

    check_manifest(job, step, manifest)


def _store_stage(split: str) -> Stage:
    # HCL's own stores (docs/hcl.md §4-§5): read the source images themselves, never HP's prepare or features
    # body and preflight: stages/features_hcl.py, which implements both
    return Stage(sections=("dataset", "hcl_features"), then=_check_manifest, extras=_store_extras(split))


def _train(ctx, config: Config, store, out, upstream=None, preview=None) -> dict[str, Any]:
    from pipeline.methods.hcl import training

    return training.train(ctx, config, store, out, preview=preview)


def _check_store(store) -> None:
    from pipeline.methods.hcl.store import hcl_arrays

    hcl_arrays(store)  # a clear message when the store lacks what HCL reads


def hcl_model(state: dict[str, Any]):
    from pipeline.methods.hcl.heads import build_model

    model = build_model(state["width"], state["hcl"])
    model.load_state_dict(state["model"])
    return model.eval()


def _encoder(state: dict[str, Any]):
    """HCL's codes: the online head's segmentation features on the concatenated branches (docs/hcl.md §2, §5)."""
    from pipeline.evaluation.encoders import Encoder
    from pipeline.methods.hcl.multilevel import multilevel_features
    from pipeline.methods.hcl.step import head_input, plain_levels

    model, sizes = hcl_model(state), tuple(state["patch_sizes"])

    def encode(arrays: dict[str, torch.Tensor]) -> torch.Tensor:
        b, h, w, _ = arrays["feat"].shape
        tokens = model.features(head_input(plain_levels(arrays, sizes), sizes, torch.device("cpu")))
        return tokens.reshape(b, h, w, -1).permute(0, 3, 1, 2)

    def live(backbone, x: torch.Tensor) -> torch.Tensor:
        levels = multilevel_features(backbone, x)
        arrays = {"feat": levels[f"p{sizes[0]}"], "hcl_cls": levels["cls"],
                  **{f"hcl_p{p}": levels[f"p{p}"] for p in sizes[1:]}}
        return encode(arrays)

    names = ("feat", *(f"hcl_p{p}" for p in sizes[1:]), "hcl_cls")
    return Encoder(state["hcl"]["dim"], names, encode, live)


def square_geometry(config: Config, size: tuple[int, int], patch: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """HCL's evaluation geometry (docs/hcl.md §5): the whole image resized to a square, no crop."""
    side = config["hcl_features"]["val_resolution"]
    return (side, side), (side, side)


def _raw_rows(config: Config) -> list[dict[str, Any]]:
    # the presets' [paper] numbers are HP's paper: only its raw-feature rows apply to an HCL run
    return [r for r in (config.get("paper") or {}).get("results") or [] if r["features"] == "raw"]


def _small_data(config: Config, images: int, crops: int, explicit: set[str]) -> list[tuple[str, Any, str]]:
    """A small folder's [hcl] (pipeline/datasets/folder.py): an HCL epoch passes over the images, one cached crop of
    each (docs/hcl.md §4; the shared five-crops `crops` are not what it reads), so the preset's batch 64 trains a
    dozen images for no iteration. The batch halves until four batches fit in the images (at least 1: the head has
    no batch statistics, hcl.batch_size >= 1) and the run lasts MIN_ITERATIONS iterations at least."""
    h = config["hcl"]
    batch = four_batches(h["batch_size"], images, 1, "hcl.batch_size" in explicit)
    per_epoch = max(1, images // batch)
    return [
        ("hcl.batch_size", batch, f"{images} training images, one crop of each per epoch: four batches per epoch "
                                  "at least"),
        ("hcl.epochs", at_least(h["epochs"], per_epoch), f"{per_epoch} iterations per epoch: at least "
                                                          f"{MIN_ITERATIONS} in all"),
    ]


HCL = Method(
    name="hcl", label="HCL", title="Hierarchical Context Learning (2025)", doc="docs/hcl.md",
    sections={"hcl_features": HclFeaturesSection, "hcl": HclSection}, section="hcl", presets="pipeline.methods.hcl",
    store_prefix="hcl-",
    stores={"train": "features-train-hcl", "val": "features-val-hcl"}, store_url=paths.hcl_store_url,
    stages={"features-train-hcl": _store_stage("train"), "features-val-hcl": _store_stage("val")},
    training_sections=("dataset", "features", "hcl_features", "train", "hcl"),
    grid_keys=("hcl_features.resolution", "hcl_features.val_resolution"),
    train=_train, check_store=_check_store,
    checkpoint=("model (online, momentum head, predictor)", "optimizer", "memory banks", "numpy RNG"),
    curves=(("loss", "fg", "bg", "pred"), ("lr",)), small_data=_small_data,
    encoder=_encoder, geometry=square_geometry,
    protocols=("kmeans",), crf_by_default=True, linear_optimizer="sgd",
    paper_rows=_raw_rows,
    paper_note="method HCL: the paper's numbers are HP's; only the raw-feature rows have a paper number beside them",
)
