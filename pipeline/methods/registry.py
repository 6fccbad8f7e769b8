"""The registered methods: name -> where its Method lives (pipeline/methods/contract.py). Adding a method is one line
in `REGISTERED`.

Each entry names the module holding the method's `Method` ("module:attribute"), resolved on first use, as package
entry points are: a method's package imports the library (settings, stores, the trainer) and the library asks the
registry, so the registry must not import the methods at its own import.
"""

from __future__ import annotations

import importlib
from functools import cache

from pipeline.errors import UserError
from pipeline.methods.contract import Config, Method

REGISTERED: dict[str, str] = {
    "hp": "pipeline.methods.hp.method:HP",
    "hcl": "pipeline.methods.hcl.method:HCL",
    "stego": "pipeline.methods.stego.method:STEGO",
}


@cache
def methods() -> dict[str, Method]:
    """Every registered method, by name, in registration order."""
    out = {}
    for name, where in REGISTERED.items():
        module, _, attribute = where.partition(":")
        method = getattr(importlib.import_module(module), attribute)
        if method.name != name:
            raise RuntimeError(f"pipeline/methods/registry.py registers {where} as '{name}', but it is named "
                               f"'{method.name}'")
        out[name] = method
    return out


def names() -> tuple[str, ...]:
    return tuple(REGISTERED)


def method_named(name: str, key: str = "train.method") -> Method:
    """The method called `name`; a name not registered is refused listing the registered ones."""
    if not isinstance(name, str) or name not in REGISTERED:
        raise UserError(f"{key} must be one of {', '.join(REGISTERED)}, got '{name}'")
    return methods()[name]


def method_of(config: Config) -> Method:
    """The configured method (train.method)."""
    return method_named(config["train"]["method"])
