"""Fake-quantized Conv2d / Linear: y = layer( Q_a(x · input_scale), Q_w(W) ) [ + B·A·(x · input_scale) ].

Subclasses of nn.Conv2d / nn.Linear, so ``weight`` and ``bias`` keep their state_dict names and
``isinstance(m, nn.Linear)`` still holds for code that inspects the model (e.g. diffusers).

- ``weight_quant``: WeightQuantizer, per output channel.
- ``act_quant``: TemporalActQuantizer of the INPUT, or None (input left in float).
- ``input_scale``: buffer [C_in] (ones) multiplying the input per channel before ``act_quant``.
  Weight Dilation carries its 1/s here when it cannot fold it into the producer of the input.
- ``lowrank_down`` A / ``lowrank_up`` B (only when ``lowrank_rank`` > 0): SVDQuant's float low-rank branch,
  reading the unquantized scaled input; ``weight`` is then the residual W − B·A that is quantized
  (dq.quant.lowrank sets it from the SVD). A conv's A is a conv like the layer's ([r, C_in, kh, kw]) and
  B a 1×1 conv ([C_out, r]).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dq.quant.quantizers import TemporalActQuantizer, WeightQuantizer


def max_rank(weight: Tensor) -> int:
    """The largest low-rank branch a weight takes: below both dimensions of its matrix ([C_out, C_in·kh·kw])."""
    return min(weight.shape[0], weight[0].numel()) - 1


class _QuantInput:
    """Shared input path of QuantConv2d / QuantLinear (mixin; the nn class comes second in the MRO)."""

    weight: nn.Parameter
    weight_quant: WeightQuantizer
    act_quant: TemporalActQuantizer | None
    input_scale: Tensor
    _channel_axis: int  # axis of the input channels in the input tensor

    def _init_quant(
        self, in_channels: int, out_channels: int, w_bits: int, a_bits: int | None, num_steps: int,
        device: torch.device | str | None, dtype: torch.dtype | None,
    ) -> None:
        self.weight_quant = WeightQuantizer(out_channels, w_bits, device=device, dtype=dtype)
        self.act_quant = (
            None if a_bits is None else TemporalActQuantizer(a_bits, num_steps, device=device, dtype=dtype)
        )
        self.register_buffer("input_scale", torch.ones(in_channels, device=device, dtype=dtype))
        self._scale_key: tuple[int, int] | None = None
        self._scale_is_one = True
        self.lowrank_rank = 0

    def set_lowrank(self, rank: int) -> None:
        """Give the layer a float low-rank branch of ``rank`` (zero: the layer's function is unchanged)."""
        w = self.weight
        if not isinstance(rank, int) or not 0 < rank <= max_rank(w):
            raise ValueError(f"low-rank rank={rank!r} must be an int in 1..{max_rank(w)} "
                             f"for a weight of shape {list(w.shape)}")
        if getattr(self, "padding_mode", "zeros") != "zeros":
            raise ValueError(f"a low-rank branch needs zero padding, not padding_mode={self.padding_mode!r}")
        self.lowrank_down = nn.Parameter(w.new_zeros(rank, *w.shape[1:]), requires_grad=w.requires_grad)
        self.lowrank_up = nn.Parameter(w.new_zeros(w.shape[0], rank), requires_grad=w.requires_grad)
        self.lowrank_rank = rank

    def lowrank_weight(self) -> Tensor | None:
        """B·A shaped like ``weight`` (the branch as one dense weight), or None without a branch."""
        if not self.lowrank_rank:
            return None
        return (self.lowrank_up @ self.lowrank_down.flatten(1)).view_as(self.weight)

    def _materialize(self, device: torch.device) -> None:
        """Give the quantizers created on the meta device real (default-valued) storage."""
        for q in (self.weight_quant, self.act_quant):
            if q is not None:
                q.to_empty(device=device)
                q.reset_parameters()
        self.input_scale = torch.ones_like(self.input_scale, device=device)

    def _input_scale_is_one(self) -> bool:
        # One host sync per change of input_scale (keyed on storage and version), not per forward.
        s = self.input_scale
        key = (s.data_ptr(), s._version)
        if key != self._scale_key:
            self._scale_is_one = bool((s == 1).all())
            self._scale_key = key
        return self._scale_is_one

    def _scaled_input(self, x: Tensor) -> Tensor:
        if not self._input_scale_is_one():
            shape = [1] * x.ndim
            shape[self._channel_axis] = -1
            x = x * self.input_scale.view(shape)
        return x

    def _folded_weight(self) -> Tensor:
        """(W [+ B·A]) · input_scale per input channel (dim 1): the float weight of the same function."""
        shape = [1] * self.weight.ndim
        shape[1] = -1
        w = self.weight.detach()
        if self.lowrank_rank:
            w = w + self.lowrank_weight().detach()
        return w * self.input_scale.view(shape)


class QuantConv2d(_QuantInput, nn.Conv2d):
    """nn.Conv2d with fake-quantized weight and input. Input [B, C_in, H, W] → [B, C_out, H', W']."""

    _channel_axis = 1

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
        groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *,
        w_bits: int, a_bits: int | None, num_steps: int = 1,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        if groups != 1:
            # WD and input_scale index weight[:, k] by input channel, which only holds for groups=1.
            raise ValueError(f"QuantConv2d supports groups=1 only, got groups={groups}; skip this layer")
        nn.Conv2d.__init__(
            self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            padding_mode, device=device, dtype=dtype,
        )
        self._init_quant(in_channels, out_channels, w_bits, a_bits, num_steps, device, dtype)

    @classmethod
    def from_float(
        cls, module: nn.Conv2d, w_bits: int, a_bits: int | None, num_steps: int = 1
    ) -> "QuantConv2d":
        """Wrap ``module`` (its weight/bias Parameters are reused, not copied); Δ_w min–max initialised."""
        w = module.weight
        new = cls(
            module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
            module.dilation, module.groups, module.bias is not None, module.padding_mode,
            w_bits=w_bits, a_bits=a_bits, num_steps=num_steps, device="meta", dtype=w.dtype,
        )
        new.weight, new.bias = w, module.bias
        new._materialize(w.device)
        new.weight_quant.init_from(w)
        new.train(module.training)
        return new

    def to_float(self) -> nn.Conv2d:
        """Plain nn.Conv2d computing the same float function (input_scale folded into the weight)."""
        m = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, self.dilation,
            self.groups, self.bias is not None, self.padding_mode, device="meta", dtype=self.weight.dtype,
        )
        m.weight = nn.Parameter(self._folded_weight(), requires_grad=self.weight.requires_grad)
        if self.bias is not None:
            m.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=self.bias.requires_grad)
        return m.train(self.training)

    def forward(self, x: Tensor) -> Tensor:
        x = self._scaled_input(x)
        y = self._conv_forward(x if self.act_quant is None else self.act_quant(x), self.weight_quant(self.weight),
                               self.bias)
        if self.lowrank_rank:
            a = F.conv2d(x, self.lowrank_down, None, self.stride, self.padding, self.dilation)
            y = y + F.conv2d(a, self.lowrank_up[:, :, None, None])
        return y


class QuantLinear(_QuantInput, nn.Linear):
    """nn.Linear with fake-quantized weight and input. Input [..., C_in] → [..., C_out]."""

    _channel_axis = -1

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, *,
        w_bits: int, a_bits: int | None, num_steps: int = 1,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias, device=device, dtype=dtype)
        self._init_quant(in_features, out_features, w_bits, a_bits, num_steps, device, dtype)

    @classmethod
    def from_float(
        cls, module: nn.Linear, w_bits: int, a_bits: int | None, num_steps: int = 1
    ) -> "QuantLinear":
        """Wrap ``module`` (its weight/bias Parameters are reused, not copied); Δ_w min–max initialised."""
        w = module.weight
        new = cls(
            module.in_features, module.out_features, module.bias is not None,
            w_bits=w_bits, a_bits=a_bits, num_steps=num_steps, device="meta", dtype=w.dtype,
        )
        new.weight, new.bias = w, module.bias
        new._materialize(w.device)
        new.weight_quant.init_from(w)
        new.train(module.training)
        return new

    def to_float(self) -> nn.Linear:
        """Plain nn.Linear computing the same float function (input_scale folded into the weight)."""
        m = nn.Linear(
            self.in_features, self.out_features, self.bias is not None, device="meta", dtype=self.weight.dtype
        )
        m.weight = nn.Parameter(self._folded_weight(), requires_grad=self.weight.requires_grad)
        if self.bias is not None:
            m.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=self.bias.requires_grad)
        return m.train(self.training)

    def forward(self, x: Tensor) -> Tensor:
        x = self._scaled_input(x)
        y = F.linear(x if self.act_quant is None else self.act_quant(x), self.weight_quant(self.weight), self.bias)
        if self.lowrank_rank:
            y = y + F.linear(F.linear(x, self.lowrank_down), self.lowrank_up)
        return y


QUANT_LAYERS = (QuantConv2d, QuantLinear)


def iter_quant_layers(model: nn.Module) -> Iterator[tuple[str, QuantConv2d | QuantLinear]]:
    """(qualified name, layer) for every QuantConv2d / QuantLinear of ``model``, in module order."""
    for name, m in model.named_modules():
        if isinstance(m, QUANT_LAYERS):
            yield name, m
