"""Methods as registered recipes: one file per method in this folder.

Each file defines a config dataclass (its fields are the method's settings — the ``method`` config
group, conf/method/<name>.yaml) and a function ``run(job, cfg) -> Student`` that turns the job's
teacher into a (trained) student, registered with ``@register(ConfigClass)``. The quantize task
looks the function up from the type of the composed config; nothing else names a method.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Callable

from dq.errors import DQError

_RECIPES: dict[type, Callable[..., Any]] = {}


def register(config_cls: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: ``fn(job, cfg)`` is the recipe of configs of type ``config_cls`` (also stored in hydra's
    ConfigStore as ``method/<module>_schema``, so the yaml is type-checked at compose time)."""
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        from hydra.core.config_store import ConfigStore

        _RECIPES[config_cls] = fn
        ConfigStore.instance().store(group="method", name=f"{fn.__module__.rsplit('.', 1)[-1]}_schema",
                                     node=config_cls)
        return fn
    return deco


def recipe_for(method_cfg: object) -> Callable[..., Any]:
    if type(method_cfg) not in _RECIPES:
        raise DQError(f"no method is registered for {type(method_cfg).__name__}; methods: "
                      f"{', '.join(sorted(c.__name__ for c in _RECIPES))}")
    return _RECIPES[type(method_cfg)]


for _m in pkgutil.iter_modules(__path__):
    if _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")
