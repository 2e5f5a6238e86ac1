"""Model families, registered by diffusers class name: the one place that lists the supported classes.

    family_of(model)     the family of a model instance (or a one-line error listing the supported classes)
    model_class(name)    the diffusers class of a config's ``_class_name``
    supported()          the supported class names

To add a family: one file here that subclasses ``ModelFamily`` and calls ``register`` — nothing else.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from dq.errors import DQError

_FAMILIES: dict[str, Any] = {}


def register(family: Any) -> Any:
    for cls in family.classes:
        _FAMILIES[cls.__name__] = family
    return family


def supported() -> list[str]:
    return sorted(_FAMILIES)


def _unsupported(name: str) -> DQError:
    return DQError(f"model class {name!r} is not supported; supported classes: {', '.join(supported())} "
                   f"(add a family file in dq/models/families/)")


def family_of(model: Any) -> Any:
    """The ModelFamily of a model instance."""
    name = type(model).__name__
    if name not in _FAMILIES:
        raise _unsupported(name)
    return _FAMILIES[name]


def model_class(name: str) -> type:
    """The diffusers class registered under ``name`` (a config's ``_class_name``)."""
    if name not in _FAMILIES:
        raise _unsupported(name)
    return next(c for c in _FAMILIES[name].classes if c.__name__ == name)


def archs() -> dict[str, tuple[type, dict[str, Any]]]:
    """Every family's named random-init architectures."""
    out: dict[str, tuple[type, dict[str, Any]]] = {}
    for fam in {id(f): f for f in _FAMILIES.values()}.values():
        out.update(fam.archs)
    return out


for _m in pkgutil.iter_modules(__path__):
    if _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")
