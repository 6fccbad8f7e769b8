"""Runs remember their settings (docs/stages.md, "Runs remember their settings").

A run folder holds `config.toml`: the whole resolved config it was created with (written by the train stage when
the run starts, rewritten when it starts over). `evaluate`, `predict`, `report` and `status` build a run's config
as: the preset, then the run's recorded *training* settings, then what the command line gives explicitly. So
`hp-pipe train --set hp.epochs=2` followed by `hp-pipe evaluate` evaluates that run as it was trained, without
repeating the option, where it used to retrain the run with the preset's values and delete it. An explicit option
that differs from the record makes the train stage refuse (`refuse_to_replace`: `--run NEW` or
`--force`).

Training settings are every key of the sections the run's training and its feature stores read (HP: [dataset],
[prepare], [features], [train], [hp]; HCL: [dataset], [features], [hcl_features], [train], [hcl]), `evaluate.protocol`
(protocol paper trains the probes with the head) and, under protocol paper, the online probes' keys. Everything else
([evaluate], [paper], [run], the other method's sections) is an evaluation setting: preset and command line, as for
any evaluation. Two keys are never taken from a file:
`dataset.name` (the preset's) and `features.trust_weights` (unpickling is allowed from the command line only).
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.config import Config, load_config, to_toml
from pipeline.errors import UserError
from pipeline.files import atomic_write_text
from pipeline.orchestration import coverage, paths
from pipeline.settings import MOVED, check_config, section_classes

NEVER_FROM_A_FILE = frozenset({"dataset.name", "features.trust_weights"})


def training_keys(config: Config) -> list[str]:
    """The dotted keys a run's training depends on, in `config`'s own terms: every key of the sections its method's
    training and stores read (Method.training_sections), `evaluate.protocol`, and the online probes' keys when the
    method trains its probes with the head under protocol paper (Method.protocols). A config from before methods
    were registered (no or an unknown train.method) reads as HP's."""
    from pipeline.methods.contract import ONLINE_PROBE_KEYS
    from pipeline.methods.registry import methods

    registered = methods()
    method = registered.get(config.get("train", {}).get("method")) or registered["hp"]
    keys = [f"{s}.{k}" for s in method.training_sections for k in config.get(s, {})
            if f"{s}.{k}" not in NEVER_FROM_A_FILE]
    evaluate = config.get("evaluate", {})
    if "protocol" in evaluate:
        keys.append("evaluate.protocol")
    if evaluate.get("protocol") == "paper" and "paper" in method.protocols:
        keys += [f"evaluate.{k}" for k in ONLINE_PROBE_KEYS if k in evaluate]
    return keys


def write_record(run_folder: Path, config: Config) -> Path:
    """Record the run's whole config (atomically) in its folder."""
    path = paths.run_config_path(run_folder)
    header = (f"# hp-pipe run settings, recorded when the run was created ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
              f"hp-pipe {' '.join(sys.argv[1:])}).\n# evaluate, predict, report and status read the training "
              "settings from here: options given once to train are never repeated.\n\n")
    atomic_write_text(path, header + to_toml(coverage.whole(config)))  # a record of it all (coverage.py)
    return path


def ensure_record(run_folder: Path, config: Config) -> None:
    """Record `config` unless the run has a record already (its creation's, kept on resume)."""
    if not paths.run_config_path(run_folder).exists():
        write_record(run_folder, config)


def read_record(run_folder: Path) -> Config | None:
    """The run's recorded config, None when the run has none (not created yet, or by an older hp-pipe)."""
    path = paths.run_config_path(run_folder)
    try:
        recorded = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not a readable run record ({exc}); delete it to use the command line's settings "
                        "for this run, or train it again with --force") from None
    if not all(isinstance(v, dict) for v in recorded.values()):
        raise UserError(f"{path} is not a run record (sections of keys expected); delete it to use the command "
                        "line's settings for this run, or train it again with --force")
    return moved_keys_in_place(recorded)


def moved_keys_in_place(recorded: Config) -> Config:
    """A record written before keys moved between sections (HP's settings left [train] for [hp]) read with today's
    layout, so that its values are still the run's."""
    for old, new in MOVED.items():
        keys = {f.name for f in dataclasses.fields(section_classes()[new])}
        for key in [k for k in recorded.get(old, {}) if k in keys]:
            recorded.setdefault(new, {}).setdefault(key, recorded[old].pop(key))
    return recorded


def differences(recorded: Config, config: Config) -> dict[str, tuple[Any, Any]]:
    """Training keys whose value in `config` differs from the record: key -> (recorded, now)."""
    out = {}
    for key in training_keys(recorded):
        section, _, name = key.partition(".")
        if name in config.get(section, {}) and config[section][name] != recorded[section][name]:
            out[key] = (recorded[section][name], config[section][name])
    return out


def apply_record(config: Config, recorded: Config, explicit: Iterable[str], source: Path
                 ) -> tuple[Config, dict[str, tuple[Any, Any]]]:
    """`config` with the recorded training settings, except the `explicit` keys (given on the command line);
    also what was taken: key -> (recorded value, the value it replaced)."""
    merged, taken, explicit = copy.deepcopy(config), {}, set(explicit)
    for key in training_keys(recorded):
        section, _, name = key.partition(".")
        if key in explicit or name not in merged.get(section, {}):
            continue  # given now, or a key this version no longer has
        value, now = recorded[section][name], merged[section][name]
        if type(value) is not type(now) and not (isinstance(now, float) and type(value) is int):
            raise UserError(f"{source}: '{key}' should be a {type(now).__name__}, got {value!r}; fix or delete the "
                            "file (it is data: a run folder may come from elsewhere)")
        if value != now:
            taken[key] = (value, now)
        merged[section][name] = value
    try:
        check_config(merged)
    except UserError as exc:
        raise UserError(f"{source}: {exc}") from None
    return merged, taken


@dataclass
class RunSettings:
    """The config a command that reads run `run` uses, and where its training settings came from."""

    config: Config
    run: str
    record: Path | None = None
    taken: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    def note(self) -> str | None:
        """One line naming the recorded settings that differ from the preset and command line, if any."""
        if not self.taken:
            return None
        order = ("train", "hp", "hcl", "features", "hcl_features", "prepare", "dataset", "evaluate")  # telling first
        keys = sorted(self.taken, key=lambda k: order.index(k.partition(".")[0]) if k.partition(".")[0] in order
                      else len(order))
        shown = [f"{k} = {self.taken[k][0]!r}" for k in keys[:8]]
        more = f" and {len(keys) - 8} more" if len(keys) > 8 else ""
        return f"run '{self.run}': its recorded settings from {self.record}: {', '.join(shown)}{more}"


def same_value(key: str, recorded: Any, now: Any) -> bool:
    """Whether a training key's recorded value is the one given now (a data root: the same folder, however
    spelled)."""
    if key == "dataset.root" and recorded and now:
        return Path(str(recorded)).expanduser().resolve() == Path(str(now)).expanduser().resolve()
    return recorded == now


def refuse_other_training_settings(recorded: Config, config: Config, explicit: Iterable[str], run: str,
                                   source: Path) -> None:
    """For a command that only uses a trained run (predict): an explicit training setting other than the run's is
    refused, naming both, instead of being silently ignored or making it use another backbone than the head's."""
    explicit = set(explicit)
    for key in training_keys(recorded):
        section, _, name = key.partition(".")
        if key in explicit and name in config.get(section, {}) and name in recorded.get(section, {}):
            if not same_value(key, recorded[section][name], config[section][name]):
                raise UserError(f"run '{run}' was trained with {key} = {recorded[section][name]!r} ({source}); "
                                f"this command gives {config[section][name]!r}. Leave the option out to use the "
                                "run's value, or train another run with it (--run NEW)")


def for_run(dataset: str, overrides: dict[str, Any], workdir: Path, run: str | None,
            strict: bool = False) -> RunSettings:
    """The preset, the run's recorded training settings, then `overrides` (the command line's explicit keys).
    `strict` (predict): an explicit training key that differs from the record is refused, the record wins."""
    from pipeline.methods.registry import method_of

    config = load_config(dataset, overrides)  # the command line's own values checked first
    name = paths.run_name(run or method_of(config).name)
    folder = paths.run_dir(config, workdir, name)
    recorded = read_record(folder)
    if recorded is None:
        return RunSettings(config, name)
    source = paths.run_config_path(folder)
    trained, asked = recorded.get("train", {}).get("method"), overrides.get("train.method")
    asked = getattr(asked, "value", asked)
    if asked and trained and asked != trained:  # another method's run: never evaluated (or retrained) as this one
        raise UserError(f"run '{name}' was trained with method {trained} ({source}), not {asked}: leave --method out "
                        f"to use the run as it was trained, or train a {asked} run beside it with --run NEW")
    if strict:
        refuse_other_training_settings(recorded, config, overrides, name, source)
    merged, taken = apply_record(config, recorded, overrides, source)
    return RunSettings(merged, name, source, taken)


def refuse_to_replace(sdir: Path, run: str, stage_config: dict[str, Any], inputs: dict[str, str], ckpt: Path,
                      config: Config | None = None) -> None:
    """A run trained (or started) with other settings is never replaced silently: its checkpoint, probes and
    evaluation would go with it. The user picks a new run name or says --force. The train manifest decides; without
    one (stages/ deleted), the run's recorded settings do."""
    from pipeline.config import fingerprint
    from pipeline.orchestration.runner import changed_keys, read_manifest

    if not ckpt.exists():
        return  # nothing trained to lose
    old = read_manifest(sdir, f"train-{run}")
    recorded = read_record(ckpt.parent.parent)
    detail = differences(recorded, config) if recorded is not None and config is not None else {}
    if old is not None:
        if old.get("fingerprint") == fingerprint(stage_config, inputs):
            return
        keys = changed_keys({"config": old.get("config", {}), "inputs": old.get("inputs", {})},
                            {"config": stage_config, "inputs": inputs})
        upstream = any(k.startswith("inputs.") for k in keys)  # the store changed: its sections' keys are the cause
        detail = {k: v for k, v in detail.items() if f"config.{k}" in keys
                  or (upstream and not k.startswith(("train.", "hcl.", "evaluate.")))}
    elif detail:
        keys = list(detail)
    else:
        return
    shown = "; ".join(f"{k} is {r!r} in the run, {n!r} now" for k, (r, n) in list(detail.items())[:4])
    where = f" (its settings: {paths.run_config_path(ckpt.parent.parent)})" if recorded is not None else ""
    raise UserError(f"run '{run}' exists with other settings ({', '.join(keys) or 'inputs'} differ)"
                    f"{': ' + shown if shown else ''}. Training now would replace it and its evaluation{where}. "
                    "Use --run NEW to train a new run beside it, or pass --force to replace it")
