"""Entry-point guard: compose the config the way hydra will and check it before any work, so a bad
value or an unknown config option is one line on stderr and exit status 2 — not a traceback.

    python train.py quant.w_bits=three   →  error: quant.w_bits='three' is not an integer; valid: the integers 2..8
    python train.py method=nope          →  error: unknown method 'nope'; valid choices: dilatequant, ...

Multirun (``-m``) sweeps are composed job by job by hydra itself and are not pre-checked here.
"""
from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path
from typing import Callable

CONF = Path(__file__).resolve().parent.parent / "conf"


def _choices_of(full_key: str) -> str | None:
    from dq.config import GROUPS

    parts = full_key.split(".")
    node = GROUPS.get(parts[0])
    for name in parts[1:]:
        if node is None or not dataclasses.is_dataclass(node):
            return None
        f = {f.name: f for f in dataclasses.fields(node)}.get(name)
        if f is None:
            return None
        if f.metadata.get("choices"):
            return str(f.metadata["choices"])
        node = f.type if isinstance(f.type, type) else None
    return None


def explain(e: BaseException) -> str:
    """One line for a composition or validation error."""
    chain, cur = [], e
    while cur is not None:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    from dq.errors import DQError

    for c in chain:
        if isinstance(c, DQError):
            return str(c)
    text = "\n".join(str(c) for c in chain)
    m = re.search(r"Could not find '([\w/]+)/([^']+)'", text)
    if m:
        options = re.findall(r"^\t(\S+)$", text, re.M)
        group = m.group(1).replace("/", ".")
        return f"unknown {group} {m.group(2)!r}; valid choices: {', '.join(o for o in options if not o.endswith('schema'))}"
    key = re.search(r"full_key: (\S+)", text)
    conv = re.search(r"Value '([^']*)' (?:of type '\w+' )?could not be converted to (\w+)", text)
    if key and conv:
        choices = _choices_of(key.group(1))
        return (f"{key.group(1)}={conv.group(1)!r} is not a valid {conv.group(2)}"
                + (f"; valid: {choices}" if choices else ""))
    missing = re.search(r"Key '(\w+)' not in '(\w+)'", text)
    if key and missing:
        return f"{key.group(1)} is not a known setting ({missing.group(2)} has no field {missing.group(1)!r})"
    first = next((ln for ln in str(chain[-1]).splitlines() if ln.strip()), type(chain[-1]).__name__)
    return first + (f" ({key.group(1)})" if key else "")


def precheck(config_name: str, overrides: list[str]) -> str | None:
    """None if the config composes and validates, else the one-line reason."""
    from hydra import compose, initialize_config_dir

    from dq.config import check

    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name, overrides=[o for o in overrides if not o.lstrip("+~").startswith("hydra")])
        check(cfg)
    except Exception as e:  # every failure here is a bad config: report it in one line
        return explain(e)
    return None


def run(config_name: str, entry: Callable[[], object]) -> None:
    """Pre-check ``sys.argv``'s overrides (single runs), then hand over to the @hydra.main ``entry``."""
    from dq import allocator

    allocator.tune()  # before the first large tensor; logged and recorded in results.json by the tasks
    args = sys.argv[1:]
    if not any(a.startswith("-") for a in args):
        problem = precheck(config_name, args)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            sys.exit(2)
    entry()
