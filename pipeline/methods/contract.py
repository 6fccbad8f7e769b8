"""The method contract: what a method tells hp-pipe, and all that the rest of hp-pipe asks of it (docs/methods.md).

A method is one package under pipeline/methods/ whose `method.py` builds one `Method` and one line in
pipeline/methods/registry.py registers it. The stage graph, the config schema and presets, the CLI's --method,
status, evaluate, predict, report, compare and TensorBoard read these fields; none of them compares a method's name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Config = dict[str, dict[str, Any]]


@dataclass(frozen=True)
class Method:
    # ---- who it is
    name: str  # registry key, `train.method`, the default run name
    label: str  # "HP": the head's result rows, summaries, curve titles
    title: str  # the paper, as the report and compare cite it
    doc: str  # its page: docs/<name>.md

    # ---- its settings: one dataclass per config section it owns, validated once at config load
    sections: dict[str, type]  # {"hp": HpSection}; defaults and per-dataset values in `presets`
    section: str  # the section holding its epochs, batch_size, seed and lr
    presets: str  # package whose presets.toml holds [defaults] and one table per dataset preset

    # ---- the stores it reads and the stages that write them
    stores: dict[str, str]  # split -> the stage whose store it trains on ("train") and evaluates ("val")
    store_url: Callable[[Config, Path, str], str]  # where that split's store lives by default
    store_prefix: str = ""  # --store names "<prefix><split>" in the stores a plan is given (HCL: "hcl-")
    stages: dict[str, Any] = field(default_factory=dict)  # dataset-level stages of its own (Stage by name)
    train_inputs: tuple[str, ...] = ()  # stages its train stage reads (default: the train store's stage)
    val_inputs: tuple[str, ...] = ()  # stages its val codes read besides the val store (STEGO: mirrored features)
    grid_keys: tuple[str, ...] = ()  # its resolutions a backbone cuts into patches (made whole at config load)
    training_sections: tuple[str, ...] = ()  # every section its run's training and stores read (run records)

    # ---- training: the train stage's body calls these
    # (ctx, config, train store, run folder, upstream manifests by stage name, preview=val store URL) -> outputs
    train: Callable[..., dict[str, Any]] | None = None
    check_store: Callable[[Any], Any] | None = None  # (store) -> a clear error when it lacks what `train` reads
    checkpoint: tuple[str, ...] = ()  # what its checkpoint holds besides iteration, rng, config (docs/methods.md)
    curves: tuple[tuple[str, ...], ...] = ()  # metrics.jsonl keys drawn in curves.png, one panel per tuple
    # a small `folder` (pipeline/datasets/folder.py small_data_settings): (config, training images, training crops
    # of the shared prepare store, the keys the user set) -> (dotted key, value, why) for each of its settings
    # derived from that size, so that training runs with no --set: at least four batches an epoch, MIN_ITERATIONS
    # iterations at least, nothing larger than the data; a value the user set is used as set
    small_data: Callable[[Config, int, int, set[str]], list[tuple[str, Any, str]]] = (
        lambda config, images, crops, explicit: [])

    # ---- evaluation
    encoder: Callable[[dict[str, Any]], Any] | None = None  # checkpoint -> Encoder (val images -> codes)
    geometry: Callable[[Config, tuple[int, int], int], tuple[tuple[int, int], tuple[int, int]]] | None = None
    # probes trained with the head (evaluate.protocol = paper): their settings, None when they are not
    online_probes: Callable[[Config], dict[str, Any] | None] = lambda config: None
    protocols: tuple[str, ...] = ("kmeans",)  # evaluate.protocol values it supports
    protocol_notes: Callable[[Config], dict[str, str]] = lambda config: {}  # lines metrics.json's protocol adds
    crf_by_default: bool = False  # evaluate.crf = auto under protocol kmeans
    linear_optimizer: str = "adam"  # evaluate.linear_optimizer = auto

    # ---- its paper, beside our rows in report and compare
    paper_rows: Callable[[Config], list[dict[str, Any]]] = lambda config: []
    paper_differences: Callable[[Config, str], list[str]] = lambda config, protocol: []  # (config, protocol)
    paper_source: Callable[[Config], str] = lambda config: (config.get("paper") or {}).get("source", "")
    paper_note: str = ""  # said first among the differences (HCL: whose numbers the presets' [paper] are)


# ---------------------------------------------------------------- small data: what a `small_data` rule may use
MIN_ITERATIONS = 60  # iterations a small folder trains for at least, whatever its size and method


def four_batches(batch: int, samples: int, low: int, chosen: bool = False) -> int:
    """`batch` halved until four batches fit in the `samples` an epoch passes over, never below `low`; as it is
    when the user `chosen` it (the rest of a rule is derived from the batch that will run)."""
    while not chosen and batch > low and 4 * batch > samples:
        batch = max(low, batch // 2)
    return batch


def at_least(epochs: int, per_epoch: int) -> int:
    """`epochs`, raised until `per_epoch` iterations an epoch make MIN_ITERATIONS at least."""
    return max(epochs, -(-MIN_ITERATIONS // max(1, per_epoch)))


# what training reads of [evaluate] when a method trains its probes online (evaluate.protocol = paper)
ONLINE_PROBE_KEYS = ("probes", "extra_clusters", "cluster_lr", "linear_lr", "seed")
