"""Split-concatenation activation quantization (Q-Diffusion's shortcut splitting). Torch only.

A layer reading a concatenation of tensors with different ranges — a UNet up-path resnet reads
[up-path hidden states | skip connection] — gets one activation quantizer per part, each with its own
per-step tables, instead of one grid stretched over both. The model family says which layers and how the
channels split (``ModelFamily.concat_splits``); the int8 runtime runs such a layer as one integer
kernel per part, summed (dq.quant.int8).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from dq.quant.act_quantizer import TemporalActQuantizer
from dq.quant.layers import QUANT_LAYERS


class SplitActQuantizer(nn.Module):
    """One :class:`TemporalActQuantizer` per part of the input channels; x → cat(Q_i(x_i)).

    Args:
        parts: the parts' quantizers, in channel order.
        sizes: channels per part (their sum is the layer's C_in).
        axis: channel axis of the input (1 for a conv, -1 for a linear).
    """

    def __init__(self, parts: list[TemporalActQuantizer], sizes: tuple[int, ...], axis: int) -> None:
        super().__init__()
        if len(parts) != len(sizes) or len(parts) < 2 or min(sizes) < 1:
            raise ValueError(f"a split needs ≥ 2 parts with one positive size each, got {len(parts)} parts, sizes {sizes}")
        self.parts = nn.ModuleList(parts)
        self.sizes = tuple(int(s) for s in sizes)
        self.axis = axis

    @property
    def bits(self) -> int:
        return self.parts[0].bits

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[self.axis] != sum(self.sizes):
            raise ValueError(f"input has {x.shape[self.axis]} channels, the split quantizer {sum(self.sizes)} {self.sizes}")
        return torch.cat([q(p) for q, p in zip(self.parts, x.split(self.sizes, self.axis))], self.axis)

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}, axis={self.axis}"


def split_inputs(model: nn.Module, splits: dict[str, tuple[int, ...]]) -> list[str]:
    """Give each named quantized layer a :class:`SplitActQuantizer` over ``sizes`` (in place), its parts
    copies of the layer's quantizer (same bits, tables and settings); returns the names split."""
    done = []
    for name, sizes in splits.items():
        layer = model.get_submodule(name)
        if not isinstance(layer, QUANT_LAYERS) or type(layer.act_quant) is not TemporalActQuantizer:
            raise ValueError(f"{name} is not a quantized layer with one per-tensor activation quantizer; cannot split it")
        c_in = layer.weight.shape[1]
        if sum(sizes) != c_in:
            raise ValueError(f"{name} reads {c_in} channels but its split {tuple(sizes)} sums to {sum(sizes)}")
        old = layer.act_quant
        parts = []
        for _ in sizes:
            q = TemporalActQuantizer(old.bits, old.num_steps, lsq_grad_scale=old.lsq_grad_scale,
                                     device=old.delta.device, dtype=old.delta.dtype)
            q.load_state_dict(old.state_dict())
            q.enabled = old.enabled
            parts.append(q)
        layer.act_quant = SplitActQuantizer(parts, tuple(sizes), layer._channel_axis)
        done.append(name)
    return done
