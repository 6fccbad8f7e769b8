"""The range of every config value, checked once when a config is built (preset, then `--set`, then options).

A value out of range would otherwise surface much later as a traceback (`--chunk-size 0`), a NaN (`tau = 0`)
or, worse, as a silent no-op (`--epochs -3` finishing "complete" with no checkpoint). Rules are data: one line
per key; keys a preset does not have are skipped.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

from pipeline.errors import UserError

Rule = Callable[[Any], str | None]  # None when the value is fine, else what it must be


def integer(low: int) -> Rule:
    return lambda v: None if isinstance(v, int) and not isinstance(v, bool) and v >= low else f"an integer >= {low}"


def number(low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False) -> Rule:
    lo, hi = ("(" if low_open else "[") + f"{low:g}", f"{high:g}" + (")" if high_open else "]")

    def check(v: Any) -> str | None:
        ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        ok = ok and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
        return None if ok else f"a finite number in {lo}, {hi.replace('inf]', 'inf)')}"

    return check


def one_of(*choices: str) -> Rule:
    return lambda v: None if v in choices else f"one of {', '.join(choices)}"


def boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "true or false"


def auto_or_boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) or v in ("auto", "true", "false") else "true, false or auto"


def device_name(v: Any) -> str | None:
    ok = v in ("auto", "cpu", "cuda") or (isinstance(v, str) and re.fullmatch(r"cuda:\d+", v) is not None)
    return None if ok else "auto, cpu, cuda or cuda:N"


def batch_fits_chunks(config: dict[str, dict[str, Any]]) -> None:
    """features.batch_size (crops per forward) must divide chunk_size or be a multiple of it: chunks are written
    whole, so a batch is a slice of one chunk or several whole chunks."""
    f = config.get("features", {})
    batch, chunk = f.get("batch_size", 0), f.get("chunk_size")
    if not batch or not isinstance(chunk, int) or chunk < 1 or chunk % batch == 0 or batch % chunk == 0:
        return
    raise UserError(f"config key 'features.batch_size' = {batch} must divide features.chunk_size = {chunk} or be a "
                    f"multiple of it (chunks are written whole); fix it with --set features.batch_size="
                    f"{chunk * max(1, batch // chunk)} (or 0: one chunk per forward)")


POSITIVE, COUNT = integer(1), integer(0)
POSITIVE_REAL, NON_NEGATIVE = number(0, low_open=True), number(0)
FRACTION, OPEN_FRACTION = number(0, 1), number(0, 1, low_open=True)

RULES: dict[str, Rule] = {
    **{f"dataset.{k}": POSITIVE for k in ("n_train", "n_val", "size")},
    "dataset.n_classes": COUNT,  # 0: a `folder` dataset without labels
    "dataset.seed": COUNT,
    "prepare.crop_ratio": OPEN_FRACTION, "prepare.resolution": POSITIVE, "prepare.val_resolution": POSITIVE,
    "features.n_views": POSITIVE, "features.chunk_size": POSITIVE, "features.clevel": integer(0),
    "features.lhp_sigma": POSITIVE_REAL, "features.seed": COUNT,
    "features.compressor": one_of("zstd", "lz4", "blosclz", "none"),
    "features.device": device_name, "features.amp": auto_or_boolean,
    "features.workers": COUNT, "features.batch_size": COUNT,  # batch_size 0: one chunk per forward
    "features.dtype": one_of("float16", "int8"),  # docs/cache.md, "Compact cache"
    "hcl_features.views": integer(2), "hcl_features.crops": integer(2), "hcl_features.mask_mass": OPEN_FRACTION,
    "hcl_features.mask_min_size": POSITIVE, "hcl_features.seed": COUNT,
    **{f"hcl_features.{k}": POSITIVE for k in ("crop_resolution", "resolution", "val_resolution")},
    "train.method": one_of("hp", "hcl"), "train.device": one_of("auto", "cpu", "cuda"),
    "train.pool_backend": one_of("faiss", "torch"),
    **{f"train.{k}": POSITIVE for k in ("head_dim", "epochs", "batch_size", "pool_size", "renew_interval",
                                        "log_interval", "checkpoint_interval", "buffer_chunks")},
    "train.warmup": COUNT, "train.anchor_tile": COUNT, "train.seed": COUNT,
    "train.tau": POSITIVE_REAL, "train.lr": POSITIVE_REAL, "train.grad_clip": POSITIVE_REAL,
    "train.alpha": NON_NEGATIVE, "train.weight_decay": NON_NEGATIVE, "train.rho": FRACTION,
    "train.ema_m": FRACTION, "train.dropout": number(0, 1, high_open=True),
    **{f"hcl.{k}": POSITIVE for k in ("epochs", "batch_size", "clusters", "kmeans_iterations", "kmeans_min_points",
                                      "dim", "hidden", "out_dim", "heads")},
    "hcl.lr_drop_epoch": COUNT, "hcl.seed": COUNT, "hcl.lr": POSITIVE_REAL, "hcl.tau": POSITIVE_REAL,
    "hcl.weight_decay": NON_NEGATIVE, "hcl.lr_drop": OPEN_FRACTION, "hcl.ema_m": FRACTION,
    "hcl.sample_fraction": OPEN_FRACTION, "hcl.bank_replace": FRACTION,
    "evaluate.protocol": one_of("paper", "kmeans"), "evaluate.cluster_method": one_of("kmeans", "adam"),
    "evaluate.crf_scheduler": one_of("processes", "distributed"),
    **{f"evaluate.{k}": POSITIVE for k in ("cluster_patches", "linear_epochs", "batch_size", "crf_workers",
                                           "overcluster_k", "overcluster_pca", "overcluster_seeds",
                                           "overcluster_size", "overcluster_iterations", "overcluster_restarts")},
    "evaluate.extra_clusters": COUNT, "evaluate.pictures": COUNT, "evaluate.seed": COUNT,
    "evaluate.linear_lr": POSITIVE_REAL, "evaluate.cluster_lr": POSITIVE_REAL,
    "evaluate.linear_optimizer": one_of("auto", "adam", "sgd"), "evaluate.linear_sgd_lr": POSITIVE_REAL,
    "evaluate.linear_sgd_momentum": number(0, 1, high_open=True), "evaluate.linear_sgd_weight_decay": NON_NEGATIVE,
    "evaluate.linear_sgd_drop_epoch": COUNT,
    "run.tensorboard": boolean,
}


def check_config(config: dict[str, dict[str, Any]]) -> None:
    """One UserError for the first value out of range, naming the key, the value, the range and the fix."""
    for key, rule in RULES.items():
        section, _, name = key.partition(".")
        if name not in config.get(section, {}):
            continue
        value = config[section][name]
        expected = rule(value)
        if expected:
            raise UserError(f"config key '{key}' must be {expected}, got {value!r}; "
                            f"fix it with --set {key}=VALUE (or in the preset)")
    batch_fits_chunks(config)
    for section, values in config.items():  # any other float: finite (NaN and inf are never meant)
        for name, value in values.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"config key '{section}.{name}' must be a finite number, got {value!r}")
