"""Config as plain data: a preset (TOML) per dataset, overridden from the command line.

A config is a dict of sections (`dataset`, `prepare`, `features`, `train`, ...) holding plain
values. Each stage fingerprints only the sections it reads, so a change to `train` leaves the
feature cache valid while a change to `features` invalidates features and everything after it.
Its schema (types, choices, ranges) is pipeline/settings.py, which also gives a typed view:
`typed(config).hp.tau`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import tomllib
from enum import Enum, StrEnum
from importlib import resources
from typing import Any

from pipeline.errors import UserError
from pipeline.methods.contract import Method
from pipeline.settings import Config, check_config, check_keys, coerce, field_type, unknown_key


def preset_names() -> list[str]:
    files = resources.files("pipeline.presets").iterdir()
    return sorted(f.name[:-5] for f in files if f.name.endswith(".toml") and not f.name.startswith("_"))


# the presets as a choice (the command line's --dataset lists them in --help)
Preset = StrEnum("Preset", {name: name for name in preset_names()})


def _read_preset(name: str) -> Config:
    text = resources.files("pipeline.presets").joinpath(f"{name}.toml").read_text()
    return tomllib.loads(text)


def load_config(dataset: str, overrides: dict[str, Any] | None = None) -> Config:
    """The preset for `dataset` on top of the common defaults, then `overrides` ("section.key": value), validated
    once against the schema (pipeline/settings.py): a plain dict of sections, as the presets spell it."""
    if dataset not in preset_names():
        raise UserError(f"unknown dataset preset '{dataset}'; choose one of: {', '.join(preset_names())}")
    config = _read_preset("_common")
    for section, values in _read_preset(dataset).items():
        config.setdefault(section, {}).update(values)
    add_method_presets(config, dataset, overrides or {})
    check_keys(config, f"preset '{dataset}' (pipeline/presets/{dataset}.toml on top of _common.toml, and the "
                       "methods' presets.toml)")
    for key, value in (overrides or {}).items():
        set_value(config, key, value)
    check_config(config)
    whole_grids(config, set(overrides or {}))
    return config


def method_presets(method: Method) -> dict[str, Config]:
    """A method's presets.toml: {"defaults": {section: values}, "<dataset>": {section: values}, ...}."""
    return tomllib.loads(resources.files(method.presets).joinpath("presets.toml").read_text())


def add_method_presets(config: Config, dataset: str, overrides: dict[str, Any]) -> None:
    """Every registered method's own sections: its defaults, then its table for `dataset`. The chosen method's
    presets may also set other sections ([defaults.evaluate], [<dataset>.features]: the backbone its released
    configuration uses, ...) and hold a table per backbone ([<dataset>.by_backbone."<name>"]) that applies when that
    backbone is the one chosen. Sections are kept in the schema's order (pipeline/settings.py section_classes)."""
    from pipeline.methods.registry import methods
    from pipeline.settings import section_classes

    given = overrides.get("train.method") or config.get("train", {}).get("method")
    chosen = str(getattr(given, "value", given))
    for method in methods().values():
        presets = method_presets(method)
        for section in method.sections:
            config[section] = {**presets.get("defaults", {}).get(section, {}),
                               **presets.get(dataset, {}).get(section, {})}
        if method.name != chosen:
            continue
        for table in (presets.get("defaults", {}), presets.get(dataset, {})):  # the chosen method's other values
            for section, values in table.items():
                if section not in method.sections and section != "by_backbone":
                    config.setdefault(section, {}).update(values)
        backbone = overrides.get("features.backbone") or config.get("features", {}).get("backbone")
        for section, values in presets.get(dataset, {}).get("by_backbone", {}).get(backbone, {}).items():
            config.setdefault(section, {}).update(values)
    order = list(section_classes())
    for section in sorted(config, key=lambda s: order.index(s) if s in order else len(order)):
        config[section] = config.pop(section)


# the resolutions a backbone cuts into patches: [prepare]'s, and each method's own (Method.grid_keys: HCL's
# hcl_features.resolution and val_resolution; its crop_resolution is a resize before the views, not a grid)
GRID_KEYS = ("prepare.resolution", "prepare.val_resolution")


def grid_keys() -> tuple[str, ...]:
    from pipeline.methods.registry import methods

    return GRID_KEYS + tuple(key for method in methods().values() for key in method.grid_keys)
_said: set[str] = set()


def nearest_whole(resolution: int, patch: int) -> int:
    """The multiple of `patch` nearest to `resolution` (ties: the larger), at least one patch."""
    return max(patch, patch * ((2 * resolution + patch) // (2 * patch)))


def whole_grids(config: Config, explicit: set[str]) -> None:
    """The preset resolutions are DINO's (patch 8 and 16 divide them all); for a backbone whose patch does not
    divide one, the config holds the nearest whole multiple instead (320 -> 322 at patch 14), so every
    fingerprint and run record carries the resolution actually used. A resolution set on the command line is
    never changed: one that is not whole is refused here, before any work. Resolving the backbone here also
    refuses a bad --backbone before any stage runs. The four DINO presets skip it (no timm import)."""
    from pipeline.extraction.backbone import BACKBONES, backbone_facts, check_resolution
    from pipeline.log import log

    name = config["features"]["backbone"]
    if name in BACKBONES:
        return
    facts = backbone_facts(name)
    for key in grid_keys():
        section, _, field = key.partition(".")
        value = config[section][field]
        if key in explicit:
            check_resolution(value, facts, key)
            continue
        whole = nearest_whole(value, facts.patch_size)
        if whole != value:
            config[section][field] = whole
            line = (f"{key} {value} -> {whole} for patch {facts.patch_size} of {name} "
                    f"({whole // facts.patch_size} x {whole // facts.patch_size} grid)")
            if line not in _said:  # once per process: a command loads its config more than once
                _said.add(line)
                log.info(line)


def set_value(config: Config, key: str, value: Any) -> None:
    """Set "section.key" after checking that it exists; a command-line string becomes the field's type."""
    section, _, name = key.partition(".")
    if section not in config or not name:
        raise UserError(
            f"unknown config key '{key}': keys are 'section.name' with section one of "
            f"{', '.join(sorted(config))}"
        )
    if name not in config[section]:
        raise UserError(unknown_key(section, name, config[section]))
    if isinstance(value, Enum):  # a command-line choice: the dict holds plain strings
        value = value.value
    config[section][name] = coerce(value, field_type(config, key), key)


def parse_sets(pairs: list[str] | None) -> dict[str, str]:
    """`--set a.b=c` pairs into a dict."""
    out = {}
    for pair in pairs or []:
        key, eq, value = pair.partition("=")
        if not eq:
            raise UserError(f"--set needs KEY=VALUE (e.g. --set hp.tau=0.7), got '{pair}'")
        out[key.strip()] = value.strip()
    return out


def toml_value(value: Any) -> str:
    """One value in TOML syntax (strings as JSON strings are TOML basic strings, once DEL, which JSON leaves as it
    is and TOML forbids, is escaped too)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def to_toml(config: Config) -> str:
    """The whole config as TOML: `tomllib.loads(to_toml(c)) == c`."""
    return "".join(f"[{section}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in values.items()) + "\n"
                   for section, values in config.items())


def fingerprint(*parts: Any) -> str:
    """Stable short hash of plain data (dicts are key-sorted)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def sections(config: Config, *names: str) -> Config:
    return {name: copy.deepcopy(config[name]) for name in names}

