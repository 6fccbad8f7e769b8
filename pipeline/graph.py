"""The stage graph: which config sections each stage reads, and which stages it reads from.

A stage's fingerprint covers its sections and its inputs' fingerprints, so changing a value
invalidates exactly the stages that read it and everything downstream of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cache.schema import HCL_SCHEMA, SCHEMA_VERSION
from pipeline import paths
from pipeline.config import Config, fingerprint, sections
from pipeline.errors import UserError

# stage -> (config sections it reads, stages it reads from)
STAGES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "prepare": (("dataset", "prepare"), ()),
    "features-train": (("dataset", "prepare", "features"), ("prepare",)),
    "features-val": (("dataset", "prepare", "features"), ("prepare",)),
    # HCL's own stores (docs/hcl.md §4-§5): read the source images themselves, never HP's prepare or features
    "features-train-hcl": (("dataset", "hcl_features"), ()),
    "features-val-hcl": (("dataset", "hcl_features"), ()),
    "train": (("train",), ("features-train",)),
    "evaluate": (("evaluate", "paper"), ("train", "features-val")),  # [paper]: the numbers the report compares with
}
# what differs for a method other than HP: its train and evaluate stages read the HCL arrays
METHOD_STAGES: dict[str, dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "hp": {},
    "hcl": {
        "train": (("train", "hcl"), ("features-train-hcl",)),
        "evaluate": (("evaluate", "paper"), ("train", "features-val-hcl")),
    },
}
METHODS = tuple(METHOD_STAGES)
# the keys of [features] that HCL's stores depend on (the backbone and how chunks are stored); HP's views, LHP and
# store order (n_views, lhp_sigma, seed, ...) are not among them, nor trust_weights (it changes no value)
HCL_FEATURE_KEYS = ("backbone", "weights", "amp", "chunk_size", "compressor", "clevel")
# [features] keys that change where and how fast a store is computed, not what it holds: outside every fingerprint
# (decode workers give bit-identical stores; device and batch size change only float rounding), so a store written
# on a GPU is reused on the CPU. `amp` enters as the forward's resolved dtype (float32 | bfloat16 | float16).
EXTRACTION_ONLY_KEYS = ("device", "workers", "batch_size")


def features_fingerprint(config: Config) -> dict[str, Any]:
    """[features] as the feature stages' fingerprints read it: `amp = "auto"` on a GPU (bf16) and on the CPU (fp32)
    are told apart, so a store written with autocast is never taken for one written without (and the reverse)."""
    from pipeline.workers import extraction_numerics

    f = {k: v for k, v in config["features"].items() if k not in EXTRACTION_ONLY_KEYS}
    f["amp"] = extraction_numerics(config)
    return f


def method_of(config: Config) -> str:
    method = config["train"]["method"]
    if method not in METHOD_STAGES:
        raise UserError(f"train.method must be one of {', '.join(METHODS)}, got '{method}'")
    return method


def source_lists(config: Config, workdir: Path) -> dict[str, list[str]] | None:
    """The source files each split lists (None when the dataset cannot be read: the stage itself will say why)."""
    from pipeline.datasets import open_split

    try:
        listing = {}
        for split in ("train", "val"):
            dataset = open_split(config, workdir, split)
            listing[split] = [dataset.source(i) for i in range(len(dataset))]
        return listing
    except UserError:
        return None


def sources_fingerprint(config: Config, workdir: Path) -> str:
    """Which source files each split lists: adding or removing an image makes `prepare` stale."""
    listing = source_lists(config, workdir)
    return fingerprint(listing) if listing is not None else "unreadable"


def stage_plan(config: Config, workdir: Path, stores: dict[str, str] | None = None) -> dict[str, tuple[dict, dict]]:
    """stage -> (its config, its inputs {upstream: fingerprint}), in dependency order.

    Besides config sections, `prepare` depends on the list of source files and each
    `features-<split>` stage on the URL of the store it writes and the store schema version; each
    `features-<split>-hcl` stage (HCL's own store, read from the source images) on its split's source files, the
    URL of its store (`stores["hcl-<split>"]`), the backbone keys of [features] and the HCL store version
    (cache.schema.HCL_SCHEMA); under evaluate.protocol = paper, `train` also on the online probes' settings (it
    trains them, docs/hp.md §8).
    """
    listing = source_lists(config, workdir)
    features_key = features_fingerprint(config)
    extras: dict[str, dict[str, Any]] = {
        "prepare": {"sources": fingerprint(listing) if listing is not None else "unreadable"}}
    for split in ("train", "val"):
        url = (stores or {}).get(split) or paths.store_url(config, workdir, split)
        extras[f"features-{split}"] = {"store": url, "schema": SCHEMA_VERSION}  # a new layout rebuilds stores
        extras[f"features-{split}-hcl"] = {  # a new HCL store version (e.g. geometry, kernels) rebuilds them
            "store": (stores or {}).get(f"hcl-{split}") or paths.hcl_store_url(config, workdir, split),
            "hcl_schema": HCL_SCHEMA,
            "features": {k: features_key[k] for k in HCL_FEATURE_KEYS},
            "sources": fingerprint(listing[split]) if listing is not None else "unreadable"}
    from pipeline.hp.online_probes import online_probe_settings

    online = online_probe_settings(config)
    if online:  # protocol paper: the train stage also trains the evaluation probes (docs/hp.md §8)
        extras["train"] = {"online_probes": online}
    plan: dict[str, tuple[dict, dict]] = {}
    for name, (names, upstream) in {**STAGES, **METHOD_STAGES[method_of(config)]}.items():
        stage_config = {**sections(config, *names), **extras.get(name, {})}
        if "features" in names:
            stage_config["features"] = features_key
        inputs = {up: fingerprint(*plan[up]) for up in upstream}
        plan[name] = (stage_config, inputs)
    return plan
