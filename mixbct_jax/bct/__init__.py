"""Backward-compatible training methods, one module each; the module path is the registry.

A method is the file ``mixbct_jax/bct/<name>.py``, which exports ``METHOD = api.Method(...)``: its config presets,
the old-model arrays it needs, its parameters and state, and its hooks into the train step, all declared in one
place (``mixbct_jax/bct/api.py`` documents the contract; docs/methods.md (adding a method) walks through one).
Adding a method is adding a file here: the trainer, the config checks and ``config.apply_method`` find it by name.
Method files import only ``bct.api``, the heads and ``mixbct_jax.numerics``, never each other.
"""

from __future__ import annotations

import importlib
import pathlib

from mixbct_jax.bct.api import ClassFile, Field, Method

# Every module of this package except the contract itself, in a fixed order.
METHODS = tuple(
    sorted(p.stem for p in pathlib.Path(__file__).parent.glob("*.py") if not p.stem.startswith("_") and p.stem != "api")
)


def get(name: str) -> Method:
    """The ``Method`` of ``mixbct_jax.bct.<name>``."""
    if name not in METHODS:
        raise ValueError(f"config.bct.method={name!r} is not a known method; choose one of {METHODS}")
    return importlib.import_module(f"mixbct_jax.bct.{name}").METHOD


def presets() -> dict[str, Method]:
    """Every preset name (``config.apply_method``'s ``method=``) -> the method that defines it."""
    return {preset: method for method in map(get, METHODS) for preset in method.presets}


def config_fields() -> list[Field]:
    """Every method's ``config.bct`` fields, each once (a shared field must be declared identically)."""
    fields: dict[str, Field] = {}
    for method in map(get, METHODS):
        for field in method.config:
            if fields.setdefault(field.name, field) != field:
                raise ValueError(f"config.bct.{field.name} is declared differently by two methods ({method.name})")
    return list(fields.values())


def class_files() -> list[ClassFile]:
    """Every method's per-class file (its ``config.old`` field), each field once."""
    return list({f.field: f for method in map(get, METHODS) for f in method.class_files}.values())
