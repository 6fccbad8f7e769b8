"""Torch files in and out, without ever running code from a file.

Every torch file hp-pipe reads goes through `load_torch_file`, which uses `torch.load(weights_only=True)`:
tensors, numbers, strings, lists, tuples and dicts only. A checkpoint handed around by someone else (a run
folder, a probe, a DINO .pth) therefore cannot execute anything when it is loaded. hp-pipe's own checkpoints
are written so that this suffices: `save_checkpoint` refuses any other Python object before writing.
Third-party backbone weights that need more (a training script's own classes) are refused with the class
named; full unpickling happens only when the user passes `--trust-weights` (`features.trust_weights`).
"""

from __future__ import annotations

import argparse
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import UserError
from pipeline.files import atomic_write

# DINO's training checkpoints pickle their argparse.Namespace under `args`: plain data, safe to rebuild.
BACKBONE_GLOBALS: tuple[type, ...] = (argparse.Namespace,)
PLAIN = (torch.Tensor, str, int, float, bool, type(None))


def unsafe_globals(path: Path) -> list[str]:
    """The Python classes/functions the file would need, read from its pickle opcodes (nothing executed)."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # not a zip checkpoint: the load error itself is reported
        return []


def load_torch_file(path: str | Path, *, allowed: Sequence[type] = (), trust: bool = False,
                    what: str = "checkpoint", fix: str = "") -> Any:
    """torch.load that runs no code from the file; `trust=True` is the user's explicit opt-out (third-party
    backbone weights only). Every failure is one UserError naming the file, the offending class and the fix."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} not found{'; ' + fix if fix else ''}")
    try:
        if trust:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        names = [n for n in unsafe_globals(path) if n not in {f"{c.__module__}.{c.__qualname__}" for c in allowed}]
        if names or "Unsupported global" in str(err):
            offending = ", ".join(names) or str(err).split("GLOBAL ")[-1].split(" ")[0]
            raise UserError(f"{what} {path} holds Python objects that loading would have to run ({offending}); "
                            f"refused, nothing from it was executed. {fix}".rstrip()) from None
        raise UserError(f"cannot read {what} {path} ({type(err).__name__}): not a PyTorch file, or a corrupt one"
                        f"{'; ' + fix if fix else ''}") from None
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"cannot read {what} {path} ({type(err).__name__}): not a PyTorch file, or a corrupt one"
                        f"{'; ' + fix if fix else ''}") from None


def check_plain(value: Any, where: str = "state") -> None:
    """Raise TypeError unless `value` is made of tensors, numbers, strings, None, lists, tuples and dicts,
    i.e. loads back under weights_only=True (a programming error, caught before anything is written)."""
    if isinstance(value, PLAIN):
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str | int):
                raise TypeError(f"{where}: key {key!r} is a {type(key).__name__}, not str/int")
            check_plain(item, f"{where}.{key}")
        return
    if isinstance(value, list | tuple) and type(value) in (list, tuple):
        for i, item in enumerate(value):
            check_plain(item, f"{where}[{i}]")
        return
    raise TypeError(f"{where} is a {type(value).__module__}.{type(value).__qualname__}: checkpoints hold plain "
                    "data only (tensors, numbers, strings, lists, dicts) so that they load without running code")


def as_dicts(value: Any) -> Any:
    """`value` with every dict subclass (a stage's view of a config section: a record, not a computation) as a plain
    dict, which torch.save writes without naming a class."""
    if isinstance(value, dict):
        return {key: as_dicts(item) for key, item in dict.items(value)}
    if type(value) in (list, tuple):
        return type(value)(as_dicts(item) for item in value)
    return value


def non_finite(value: Any, where: str = "state") -> str | None:
    """The first floating tensor holding NaN or inf, by its place in `value` (None when all are finite)."""
    if isinstance(value, torch.Tensor):
        return where if value.is_floating_point() and not bool(torch.isfinite(value).all()) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list | tuple) else ()
    for key, item in items:
        found = non_finite(item, f"{where}.{key}")
        if found:
            return found
    return None


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Plain, finite data only, written to a temporary file and renamed: never torn, never poisoned (a resumed run
    must not start from NaN weights), always loadable without running code."""
    state = as_dicts(state)
    check_plain(state)
    bad = non_finite(state)
    if bad:
        raise ValueError(f"refusing to write {path}: {bad} holds NaN or inf values")
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """One of hp-pipe's own checkpoints (run, probe), on the CPU (RNG states must stay there; load_state_dict
    moves weights and optimizer state to their device), never running code from the file."""
    state = load_torch_file(path, fix="hp-pipe's checkpoints hold plain data only: this file was not written "
                                      "by hp-pipe, or was altered. Retrain the run (--force) or remove the file")
    if not isinstance(state, dict):
        raise UserError(f"checkpoint {path} is not an hp-pipe checkpoint (a {type(state).__name__}, not a dict); "
                        "retrain the run (--force) or remove the file")
    return state
