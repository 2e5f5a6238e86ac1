"""A denoiser as a chain of blocks, for block-wise distillation (family-independent part).

A model family cuts its model into :class:`Block` s (``family.blocks(model, granularity)``); each block
maps a state (the family's own dataclass with a ``new`` field — the block's outputs that distillation
compares — and a ``detach()``) to the next. Running all blocks in order equals the model's forward
exactly (tested per family).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from dq.errors import choice_error

GRANULARITIES = ("block", "module", "model")


@dataclass
class Block:
    name: str
    modules: list[nn.Module]                  # whose parameters this block owns
    fn: Callable[[Any], Any]

    def __call__(self, state: Any) -> Any:
        return self.fn(state)

    def parameters(self) -> Iterator[nn.Parameter]:
        for m in self.modules:
            yield from m.parameters()


def check_granularity(granularity: str) -> str:
    if granularity not in GRANULARITIES:
        raise choice_error("distill.granularity", granularity, GRANULARITIES)
    return granularity


def whole_model(model: nn.Module, blocks: list[Block]) -> list[Block]:
    """One unit, the whole model against the teacher's output: full-model QAT through the same code."""
    return [Block("model", [model], lambda s: run_blocks(blocks, s, len(blocks) - 1))]


def select_blocks(blocks: list[Block], names: list[str] | tuple[str, ...] | None) -> list[int]:
    """Indices of the named blocks (all when ``names`` is empty), validated against the model's blocks."""
    known = [b.name for b in blocks]
    if not names:
        return list(range(len(blocks)))
    bad = [n for n in names if n not in known]
    if bad:
        raise choice_error("block name", bad[0], known)
    return sorted(known.index(n) for n in names)


def run_blocks(blocks: list[Block], state: Any, upto: int) -> Any:
    """Run blocks[0..upto] (inclusive) from ``state``."""
    for b in blocks[: upto + 1]:
        state = b(state)
    return state


def map_state(state: Any, fn: Callable[[list], Any], others: list | None = None) -> Any:
    """Apply ``fn`` to every tensor field of a (dataclass) block state, across ``[state, *others]``."""
    states = [state, *(others or [])]
    out = {}
    for f in dataclasses.fields(state):
        vals = [getattr(s, f.name) for s in states]
        if isinstance(vals[0], torch.Tensor):
            out[f.name] = fn(vals)
        elif isinstance(vals[0], tuple):
            out[f.name] = tuple(fn(list(parts)) for parts in zip(*vals))
    return dataclasses.replace(state, **out)


def cat_states(states: list[Any]) -> Any:
    """One state holding the batches of ``states`` one after another (dim 0)."""
    return map_state(states[0], torch.cat, states[1:])


def index_state(state: Any, idx: torch.Tensor) -> Any:
    """The samples ``idx`` of a batched state."""
    return map_state(state, lambda v: v[0][idx])


def state_nbytes(state: Any) -> int:
    total = [0]

    def add(v: list) -> torch.Tensor:
        total[0] += v[0].numel() * v[0].element_size()
        return v[0]
    map_state(state, add)
    return total[0]
