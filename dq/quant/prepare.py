"""Turn any torch model into a fake-quantized one and back (torch only: no diffusers, no Lightning).

- :func:`quantize_layers` swaps nn.Conv2d / nn.Linear for QuantConv2d / QuantLinear, with the bits a
  caller-supplied function picks per layer (the model family knows which layers are special);
- :func:`attach_step_index` gives the model its one :class:`StepIndex` and a pre-forward hook that maps
  each call's timestep to table rows (TPQ); the hook handles are kept, so :func:`detach_step_index`
  removes exactly what was added.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from dq.quant.layers import QUANT_LAYERS, QuantConv2d, QuantLinear
from dq.quant.quantizers import TemporalActQuantizer
from dq.quant.steps import StepIndex

# (qualified name, float layer) → (w_bits, a_bits) or None to leave the layer in float
LayerBits = Callable[[str, nn.Module], "tuple[int, int | None] | None"]
# (args, kwargs) of a model call → (its timestep argument, the batch size)
TimestepOf = Callable[[tuple, dict], "tuple[Tensor | int | float, int]"]


def quantize_layers(model: nn.Module, bits_for: LayerBits, num_steps: int) -> list[str]:
    """Swap every Conv2d / Linear that ``bits_for`` gives bits to (in place); returns their names."""
    swapped = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, (nn.Conv2d, nn.Linear)) or isinstance(child, QUANT_LAYERS):
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            bits = bits_for(name, child)
            if bits is None:
                continue
            cls = QuantConv2d if isinstance(child, nn.Conv2d) else QuantLinear
            if cls is QuantConv2d and child.groups != 1:
                raise ValueError(f"{name}: grouped conv (groups={child.groups}) is not supported; add it to quant.skip")
            setattr(parent, child_name, cls.from_float(child, bits[0], bits[1], num_steps))
            swapped.append(name)
    return swapped


def dequantize_layers(model: nn.Module) -> None:
    """QuantConv2d / QuantLinear back to float layers computing the same float function (in place)."""
    for _, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, QUANT_LAYERS):
                setattr(parent, child_name, child.to_float())


def attach_step_index(model: nn.Module, timesteps: Sequence[int], map_calls: bool, timestep_of: TimestepOf) -> StepIndex:
    """Give ``model`` the StepIndex ``model.dq_step_index`` (in its state_dict) and the hooks that set
    its rows from each call's timestep for the duration of the call.

    The pre-hook pushes the previous rows first, and an always-called forward hook pops them, so
    ``current`` is restored whether the forward succeeds or raises. A scalar or one-element timestep
    gives rows [1], broadcast over the batch. ``map_calls=False`` (shared tables): any timestep is
    accepted and no rows are looked up.
    """
    if hasattr(model, "dq_step_index"):
        raise ValueError("this model is already prepared (it has a dq_step_index)")
    device = next(model.parameters()).device
    si = StepIndex(timesteps, map_calls=map_calls).to(device)
    model.dq_step_index = si
    for m in model.modules():
        if isinstance(m, TemporalActQuantizer):
            m.set_step_index(si)

    def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
        index: StepIndex = module.dq_step_index
        index.push(index.current)
        if not index.map_calls:
            return None
        t, batch = timestep_of(args, kwargs)
        rows = index.rows(t.to(index.timesteps.device) if isinstance(t, Tensor) else t).reshape(-1)
        if rows.numel() not in (1, batch):
            raise ValueError(f"timestep has {rows.numel()} entries for a batch of {batch} samples")
        if rows.numel() > 1 and bool((rows == rows[0]).all()):  # one step for the whole batch (sampling):
            rows = rows[:1]  # one row, so quantizers take their scalar path (same values, fewer passes)
        index.current = rows
        return None

    def post(module: nn.Module, args: tuple, output: Any) -> None:
        module.dq_step_index.pop()
        return None

    model._dq_hooks = [model.register_forward_pre_hook(pre, with_kwargs=True),
                       model.register_forward_hook(post, always_call=True)]
    return si


def detach_step_index(model: nn.Module) -> None:
    """Remove the hooks and the StepIndex added by :func:`attach_step_index`."""
    for handle in getattr(model, "_dq_hooks", []):
        handle.remove()
    model.__dict__.pop("_dq_hooks", None)
    del model.dq_step_index


def rows_of(model: nn.Module, timesteps: Tensor) -> Tensor:
    """Table rows of raw ``timesteps`` [B] for a prepared model (zeros for shared tables): the one
    mapping from a sample's timestep to its row, used by model calls and block-level code alike."""
    index: StepIndex = model.dq_step_index
    if not index.map_calls:
        return torch.zeros(timesteps.numel(), dtype=torch.long, device=index.timesteps.device)
    return index.rows(timesteps.to(index.timesteps.device)).reshape(-1)
