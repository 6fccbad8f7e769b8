"""The config's schema: one dataclass per TOML section, its types, its choices (enums) and its ranges, checked once.

A config stays a plain dict of sections (`config["hp"]["tau"]`): it is fingerprinted, printed as TOML and
recorded in run folders, so the dict is what the stages read. This module says what that dict must hold:

- one frozen dataclass per section (`TrainSection`, ...); every key is a field with a type, and a key with a
  choice is a `StrEnum` (`Method`, `Protocol`, ...). The dataclasses hold NO defaults: the values live in the TOML
  presets (`pipeline/presets/_common.toml` is the one source of defaults), and a preset that lacks a field is refused
  when it is loaded;
- a range rule per field where a type is not enough (`within(POSITIVE)`: field metadata), and the checks across keys
  (`CROSS_CHECKS`);
- `check_config(config)`: every section built into its dataclass, one `UserError` for the first problem, naming the
  key, what it must be and the `--set` fix. `pipeline.config.load_config` calls it once, after the overrides;
- `typed(config)`: the same dict as dataclasses (`typed(config).hp.tau` is a float, `typed(config).train.method`
  a `Method`), for code that wants attributes and enums; the dict stays the truth.

A key moves between sections by moving its field between two classes and its line between two TOML tables; a key
that moved is named at its new place when the old one is used (`MOVED`).
"""

from __future__ import annotations

import copy
import difflib
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from enum import Enum, StrEnum
from functools import cache
from typing import Any, get_type_hints

from pipeline.errors import UserError

Config = dict[str, dict[str, Any]]
Rule = Callable[[Any], str | None]  # None when the value is fine, else what it must be


# ----------------------------------------------------------------------------- choices


class Protocol(StrEnum):
    """evaluate.protocol: the reference's probes trained online (paper) or fitted after training (kmeans)."""

    paper = "paper"
    kmeans = "kmeans"


class PoolBackend(StrEnum):
    """hp.pool_backend: who runs the 1-NN lookups of docs/hp.md §4."""

    faiss = "faiss"
    torch = "torch"


class TrainDevice(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class ClusterMethod(StrEnum):
    """evaluate.cluster_method: spherical k-means (faiss) or the reference's centroids trained with Adam."""

    kmeans = "kmeans"
    adam = "adam"


class LinearOptimizer(StrEnum):
    """evaluate.linear_optimizer: auto is adam for HP, sgd for HCL (protocol kmeans)."""

    auto = "auto"
    adam = "adam"
    sgd = "sgd"


class CrfScheduler(StrEnum):
    processes = "processes"
    distributed = "distributed"


class Compressor(StrEnum):
    """features.compressor: the blosc codec of the stores (docs/cache.md)."""

    zstd = "zstd"
    lz4 = "lz4"
    blosclz = "blosclz"
    none = "none"


class FeatureDtype(StrEnum):
    """features.dtype: float16, or int8 with a float16 scale per patch (docs/cache.md, "Compact cache")."""

    float16 = "float16"
    int8 = "int8"


class Probe(StrEnum):
    """The probes of docs/hp.md §8 (evaluate.probes is a comma-separated list of them)."""

    cluster = "cluster"
    linear = "linear"


class FeatureKind(StrEnum):
    """What a paper result row was measured on: the trained head or the raw backbone features."""

    head = "head"
    raw = "raw"


class Scheduler(StrEnum):
    """The command line's --scheduler for the features stages (not a config key)."""

    local = "local"
    local_cluster = "local-cluster"
    distributed = "distributed"


class ProbeSet(StrEnum):
    """The command line's --probe for evaluate: one probe or both (evaluate.probes)."""

    cluster = "cluster"
    linear = "linear"
    all = "all"


class Renewal(StrEnum):
    """`bench scale --renewal`: hp-pipe's whole-chunk renewal, or gathering every chunk the images fall in."""

    chunks = "chunks"
    gather = "gather"


class Split(StrEnum):
    """The command line's --split: one split's stores, or both (not a config key)."""

    train = "train"
    val = "val"
    all = "all"


class Auto(StrEnum):
    auto = "auto"


Switch = bool | Auto  # true | false | "auto": decided from other settings when the value is auto

# how a command line (or a TOML string) spells a boolean
BOOL_WORDS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


# ----------------------------------------------------------------------------- range rules


def integer(low: int) -> Rule:
    return lambda v: None if isinstance(v, int) and not isinstance(v, bool) and v >= low else f"an integer >= {low}"


def number(low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False) -> Rule:
    lo, hi = ("(" if low_open else "[") + f"{low:g}", f"{high:g}" + (")" if high_open else "]")

    def check(v: Any) -> str | None:
        ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        ok = ok and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
        return None if ok else f"a finite number in {lo}, {hi.replace('inf]', 'inf)')}"

    return check


def auto_or_boolean(v: Any) -> str | None:
    """features.amp, train.amp: read as given (pipeline/precision.py amp_setting), so only these exact spellings."""
    return None if isinstance(v, bool) or v in ("auto", "true", "false") else "true, false or auto"


def auto_or_boolean_word(v: Any) -> str | None:
    """evaluate.crf: `--crf` writes "True"/"False", read case-insensitively (pipeline/evaluation/online_probes.py)."""
    ok = isinstance(v, bool) or (isinstance(v, str) and v.strip().lower() in {"auto", *BOOL_WORDS})
    return None if ok else "true, false or auto"


def device_name(v: Any) -> str | None:
    ok = v in ("auto", "cpu", "cuda") or (isinstance(v, str) and re.fullmatch(r"cuda:\d+", v) is not None)
    return None if ok else "auto, cpu, cuda or cuda:N"


def known_dataset(v: Any) -> str | None:
    from pipeline.datasets import DATASETS  # the readers' registry is the list of names

    return None if isinstance(v, str) and v in DATASETS else f"one of {', '.join(DATASETS)}"


def registered_method(v: Any) -> str | None:
    from pipeline.methods.registry import names  # the registry is the list of methods

    return None if isinstance(v, str) and v in names() else f"one of {', '.join(names())}"


def probe_list(v: Any) -> str | None:
    words = [p.strip() for p in str(v).split(",") if p.strip()]
    choices = [p.value for p in Probe]
    return None if all(w in choices for w in words) else f"a comma-separated list of {', '.join(choices)}"


def paper_rows(v: Any) -> str | None:
    """[paper] results: {backbone, features = head | raw, probe = cluster | linear, acc, miou?, head_dim?}."""
    expected = ("a list of { backbone = \"...\", features = \"head\" | \"raw\", probe = \"cluster\" | \"linear\", "
                "acc = NUMBER, miou = NUMBER (optional), head_dim = INTEGER (optional) }")
    checks = {"backbone": lambda x: isinstance(x, str), "features": lambda x: x in [k.value for k in FeatureKind],
              "probe": lambda x: x in [p.value for p in Probe], "acc": lambda x: number(0, 100)(x) is None,
              "miou": lambda x: number(0, 100)(x) is None, "head_dim": lambda x: integer(1)(x) is None}
    for row in v:
        ok = isinstance(row, dict) and {"backbone", "features", "probe", "acc"} <= set(row) <= set(checks)
        if not (ok and all(checks[k](x) for k, x in row.items())):
            return expected
    return None


POSITIVE, COUNT = integer(1), integer(0)
POSITIVE_REAL, NON_NEGATIVE = number(0, low_open=True), number(0)
FRACTION, OPEN_FRACTION = number(0, 1), number(0, 1, low_open=True)


def within(rule: Rule) -> Any:
    """A field with a range rule, and no default: the value comes from the preset."""
    return field(metadata={"rule": rule})


# ----------------------------------------------------------------------------- sections

section = dataclass(frozen=True, kw_only=True)


@section
class DatasetSection:
    name: str = within(known_dataset)  # registry key of the reader (pipeline/datasets)
    root: str
    n_classes: int = within(COUNT)  # 0: a `folder` dataset without labels


@section
class SyntheticDatasetSection(DatasetSection):
    """[dataset] of the generated dataset: the reader's options (pipeline/datasets/synthetic.py)."""

    n_train: int = within(POSITIVE)
    n_val: int = within(POSITIVE)
    size: int = within(POSITIVE)
    seed: int = within(COUNT)


# a reader with options of its own has its own [dataset] section (dataset.name picks it)
DATASET_SECTIONS: dict[str, type[DatasetSection]] = {"synthetic": SyntheticDatasetSection}


@section
class PrepareSection:
    five_crop: bool
    crop_ratio: float = within(OPEN_FRACTION)
    resolution: int = within(POSITIVE)
    val_resolution: int = within(POSITIVE)


@section
class FeaturesSection:
    backbone: str
    weights: str  # pretrained | auto | random | a checkpoint path
    trust_weights: bool
    n_views: int = within(POSITIVE)
    photometric_on_normalized: bool
    lhp_sigma: float = within(POSITIVE_REAL)
    chunk_size: int = within(POSITIVE)
    compressor: Compressor
    clevel: int = within(COUNT)
    dtype: FeatureDtype
    seed: int = within(COUNT)
    device: str = within(device_name)
    amp: Switch = within(auto_or_boolean)
    batch_size: int = within(COUNT)  # 0: one chunk per forward
    workers: int = within(COUNT)



@section
class TrainSection:
    """[train]: what a run of any method reads (a method's own settings are its sections: [hp], [hcl], ...)."""

    method: str = within(registered_method)  # a name in pipeline/methods/registry.py
    device: TrainDevice
    amp: Switch = within(auto_or_boolean)  # pipeline/precision.py
    log_interval: int = within(POSITIVE)
    checkpoint_interval: int = within(POSITIVE)
    buffer_chunks: int = within(POSITIVE)  # store chunks read and shuffled together




@section
class EvaluateSection:
    protocol: Protocol
    probes: str = within(probe_list)  # "cluster,linear"
    cluster_method: ClusterMethod
    extra_clusters: int = within(COUNT)
    cluster_patches: int = within(POSITIVE)
    linear_epochs: int = within(POSITIVE)
    linear_lr: float = within(POSITIVE_REAL)
    linear_optimizer: LinearOptimizer
    linear_sgd_lr: float = within(POSITIVE_REAL)
    linear_sgd_momentum: float = within(number(0, 1, high_open=True))
    linear_sgd_weight_decay: float = within(NON_NEGATIVE)
    linear_sgd_drop_epoch: int = within(COUNT)
    cluster_lr: float = within(POSITIVE_REAL)
    batch_size: int = within(POSITIVE)
    baselines: bool
    crf: Switch = within(auto_or_boolean_word)
    crf_workers: int = within(POSITIVE)
    crf_scheduler: CrfScheduler
    crf_address: str
    pictures: int = within(COUNT)
    seed: int = within(COUNT)
    overcluster: bool
    overcluster_k: int = within(POSITIVE)
    overcluster_pca: int = within(POSITIVE)
    overcluster_seeds: int = within(POSITIVE)
    overcluster_size: int = within(POSITIVE)
    overcluster_iterations: int = within(POSITIVE)
    overcluster_restarts: int = within(POSITIVE)


@section
class RunSection:
    tensorboard: bool


@section
class PaperSection:
    source: str
    epochs: int = within(COUNT)  # 0: the paper states none
    results: list[dict[str, Any]] = within(paper_rows)


# the sections every config has, in the order a config prints them; each method adds its own after [train]
# (pipeline/methods/<name>/settings.py, registered through its Method's `sections`)
CORE_SECTIONS: dict[str, type] = {"dataset": DatasetSection, "prepare": PrepareSection, "features": FeaturesSection,
                                  "train": TrainSection, "evaluate": EvaluateSection, "run": RunSection,
                                  "paper": PaperSection}


class Settings:
    """The whole config, typed: one attribute per TOML section (`typed(config).hp.tau`)."""

    def __init__(self, **sections: Any) -> None:
        self.__dict__.update(sections)

    def __getattr__(self, name: str) -> Any:  # a section no method registers
        raise AttributeError(f"no config section [{name}]")


# ----------------------------------------------------------------------------- cross-key checks


def batch_fits_chunks(s: Settings) -> str | None:
    """features.batch_size (crops per forward) must divide chunk_size or be a multiple of it: chunks are written
    whole, so a batch is a slice of one chunk or several whole chunks."""
    batch, chunk = s.features.batch_size, s.features.chunk_size
    if not batch or chunk % batch == 0 or batch % chunk == 0:
        return None
    return (f"config key 'features.batch_size' = {batch} must divide features.chunk_size = {chunk} or be a "
            f"multiple of it (chunks are written whole); fix it with --set features.batch_size="
            f"{chunk * max(1, batch // chunk)} (or 0: one chunk per forward)")


CROSS_CHECKS: tuple[Callable[[Settings], str | None], ...] = (batch_fits_chunks,)


# ----------------------------------------------------------------------------- schema and types


@cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


@cache
def section_classes() -> dict[str, type]:
    """Section name -> its dataclass ([dataset]: the base class; see `section_class`): the core sections, with the
    registered methods' own after [train]."""
    from pipeline.methods.registry import methods

    own = {name: cls for method in methods().values() for name, cls in method.sections.items()}
    order = list(CORE_SECTIONS)
    at = order.index("train") + 1
    return {name: {**CORE_SECTIONS, **own}[name] for name in [*order[:at], *own, *order[at:]]}


def section_class(config: Config, name: str) -> type:
    """The dataclass of section `name` for this config ([dataset] depends on dataset.name)."""
    if name == "dataset":
        return DATASET_SECTIONS.get(str(config.get("dataset", {}).get("name")), DatasetSection)
    return section_classes()[name]


def field_type(config: Config, key: str) -> Any:
    """The declared type of "section.key", None when the section has no such field."""
    section_name, _, name = key.partition(".")
    if section_name not in section_classes():
        return None
    return _hints(section_class(config, section_name)).get(name)


def type_name(tp: Any) -> str:
    """What a value of type `tp` is, in a user's words."""
    if isinstance(tp, type) and issubclass(tp, Enum):
        return f"one of {', '.join(m.value for m in tp)}"
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string",
            Switch: "true, false or auto"}.get(tp, "a list" if getattr(tp, "__origin__", None) is list else str(tp))


def type_problem(value: Any, tp: Any) -> str | None:
    """None when `value` has type `tp` (an int is a float; a bool is neither), else what it must be."""
    if isinstance(tp, type) and issubclass(tp, Enum):
        ok = isinstance(value, str) and value in {m.value for m in tp}
    elif tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    elif tp is str:
        ok = isinstance(value, str)
    elif tp == Switch:
        ok = isinstance(value, bool | str)  # which strings: the field's rule
    elif getattr(tp, "__origin__", None) is list:
        ok = isinstance(value, list)
    else:
        raise TypeError(f"no check for type {tp}")
    return None if ok else type_name(tp)


def coerce(value: Any, tp: Any, key: str) -> Any:
    """A command-line string as the field's type (a setting given as a Python value is kept as it is); strings stay
    strings where the field takes strings (enums, "auto"), so the dict holds what the user wrote."""
    if not isinstance(value, str) or tp in (None, str, Switch) or isinstance(tp, type) and issubclass(tp, Enum):
        return value
    word = value.strip().lower()
    if tp is bool and word in BOOL_WORDS:
        return BOOL_WORDS[word]
    try:
        if tp is int:
            return int(value)
        if tp is float:
            return float(value)
    except ValueError:
        pass
    if tp in (bool, int, float):
        raise UserError(f"config key '{key}' must be {type_name(tp)}, got '{value}'; fix it with --set {key}=VALUE")
    return value


def _typed_value(value: Any, tp: Any) -> Any:
    if isinstance(tp, type) and issubclass(tp, Enum):
        return tp(value)
    if tp is float:
        return float(value)
    if tp == Switch and isinstance(value, str):
        word = value.strip().lower()
        return Auto.auto if word == "auto" else BOOL_WORDS[word]
    return copy.deepcopy(value)


def _fix(key: str, tp: Any, problem: str = "") -> str:
    example = next(iter(tp)).value if isinstance(tp, type) and issubclass(tp, Enum) else "VALUE"
    if problem.startswith("one of "):  # a choice a rule lists (train.method: the registered methods)
        example = problem.removeprefix("one of ").split(",")[0].strip()
    return f"fix it with --set {key}={example} (or in the preset)"


def check_keys(config: Config, where: str = "the config") -> None:
    """Every section and key of the schema present, none else: a preset (or run record) lacking a field is refused,
    as is a key no code reads."""
    classes = section_classes()
    for name in config:
        if name not in classes:
            raise UserError(f"{where}: unknown section [{name}] (sections: {', '.join(classes)})")
    for name in classes:
        cls, values = section_class(config, name), config.get(name)
        if values is None:
            raise UserError(f"{where} has no section [{name}]; add it (pipeline/presets/_common.toml has them all)")
        hints = _hints(cls)
        for key in hints:
            if key not in values:
                raise UserError(f"{where} has no key '{name}.{key}' ({type_name(hints[key])}); add it to the "
                                "preset (pipeline/presets/_common.toml holds every default)")
        for key in values:
            if key not in hints:
                whose = f" (dataset '{config[name].get('name')}')" if name == "dataset" else ""
                raise UserError(f"{where}{whose}: {unknown_key(name, key, hints)}")


# keys that left a section: old section -> the section that holds them now (HP's settings left [train] for [hp])
MOVED = {"train": "hp"}


def unknown_key(section_name: str, key: str, known: Iterable[str]) -> str:
    """"unknown config key 'train.tua'; did you mean 'hp.tau'? (keys in [train]: ...)": a key that moved to another
    section is named at its new place."""
    moved_to = MOVED.get(section_name)
    moved = [f.name for f in fields(section_classes()[moved_to])] if moved_to else []
    if key in moved:
        return (f"config key '{section_name}.{key}' is now '{moved_to}.{key}' (HP's own settings are in "
                f"[{moved_to}]); use --set {moved_to}.{key}=...")
    close = difflib.get_close_matches(key, list(known), n=1)
    near = difflib.get_close_matches(key, moved, n=1) if not close else []
    hint = f"; did you mean '{section_name}.{close[0]}'?" if close else \
        f"; did you mean '{moved_to}.{near[0]}'?" if near else ""
    return f"unknown config key '{section_name}.{key}'{hint} (keys in [{section_name}]: {', '.join(sorted(known))})"


def check_config(config: Config) -> Settings:
    """Validate the whole config once: keys, types, choices, ranges, then the checks across keys. One UserError for
    the first problem, naming the key, the value, what it must be and the fix. Returns the typed view."""
    name = config.get("dataset", {}).get("name")
    if name is not None and known_dataset(name):  # first: it decides which keys [dataset] has
        raise UserError(f"config key 'dataset.name' must be {known_dataset(name)}, got {name!r}; "
                        "fix it with --dataset (or --set dataset.name=NAME)")
    check_keys(config)
    built = {}
    for name in section_classes():
        cls, values = section_class(config, name), config[name]
        hints, rules = _hints(cls), {f.name: f.metadata.get("rule") for f in fields(cls)}
        for key, tp in hints.items():
            value, rule = values[key], rules[key]
            problem = type_problem(value, tp) or (rule(value) if rule else None)
            if problem:
                dotted = f"{name}.{key}"
                raise UserError(f"config key '{dotted}' must be {problem}, got {value!r}; "
                                f"{_fix(dotted, tp, problem)}")
        built[name] = cls(**{key: _typed_value(values[key], tp) for key, tp in hints.items()})
    settings = Settings(**built)
    for check in CROSS_CHECKS:
        problem = check(settings)
        if problem:
            raise UserError(problem)
    return settings


def typed(config: Config) -> Settings:
    """The config as dataclasses: `typed(config).hp.tau` (a float), `typed(config).evaluate.protocol` (a
    `Protocol`). Built from the dict each call (after validating it), so it never goes stale; read-only."""
    return check_config(config)

