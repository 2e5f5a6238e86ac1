"""Weight quantizer (per output channel, method.md §1); the activation quantizer is in act_quantizer.py.

Every parameter and buffer is created in ``__init__`` (a checkpoint loads with ``strict=True`` into a
freshly built model, no forward pass needed). Transient state — the ``enabled`` flags, the
calibration statistics, the eval cache, the step-index reference — is plain attributes, never in
the state_dict.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from dq.quant.act_quantizer import CALIBRATION_METHODS, TemporalActQuantizer
from dq.quant.fake_quant import DELTA_MIN, check_bits, fake_quant, minmax_params, qmax_of

__all__ = ["CALIBRATION_METHODS", "TemporalActQuantizer", "WeightQuantizer", "set_quant_state"]


class WeightQuantizer(nn.Module):
    """Per-output-channel fake quantizer of a weight, learnable Δ_w (LSQ).

    Args:
        num_out_channels: C_out, the size of ``weight.shape[ch_axis]``.
        bits: 2..8.
        ch_axis: the output-channel axis of the weight (0 for nn.Linear and nn.Conv2d).
        learn_zero_point: z_w an nn.Parameter (else a buffer, fixed after :meth:`init_from`).
        lsq_grad_scale: scale gradients of Δ_w, z_w by 1/sqrt(numel_per_channel · qmax).

    Tables: ``delta`` [C_out] (Parameter), ``zero_point`` [C_out].

    In no-grad mode the fake-quantized weight is cached, keyed on the identity, storage and
    ``_version`` of the weight, Δ and z, so any in-place update (optimizer step, load_state_dict,
    ``with torch.no_grad(): w.mul_(...)``) invalidates it. Edits through ``tensor.data`` bypass the
    version counter: call :meth:`clear_cache` after those.
    """

    def __init__(
        self,
        num_out_channels: int,
        bits: int,
        ch_axis: int = 0,
        learn_zero_point: bool = False,
        lsq_grad_scale: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.bits = check_bits(bits, "weight bits")
        self.ch_axis = ch_axis
        self.lsq_grad_scale = lsq_grad_scale
        self.enabled = True
        self.delta = nn.Parameter(torch.ones(num_out_channels, device=device, dtype=dtype))
        zp = torch.zeros(num_out_channels, device=device, dtype=dtype)
        if learn_zero_point:
            self.zero_point = nn.Parameter(zp)
        else:
            self.register_buffer("zero_point", zp)
        self._cache: tuple[Tensor, tuple[int, ...], Tensor] | None = None

    def reset_parameters(self) -> None:
        """Δ = 1, z = 0 (placeholder values until :meth:`init_from`)."""
        with torch.no_grad():
            self.delta.fill_(1.0)
            self.zero_point.zero_()
        self._cache = None

    @torch.no_grad()
    def init_from(self, weight: Tensor) -> None:
        """Min–max init per output channel (no clipping error), effective range containing 0."""
        c = self.delta.numel()
        w = weight.detach().movedim(self.ch_axis, 0).reshape(c, -1).float()
        lo, hi = torch.aminmax(w, dim=1)
        delta, zp = minmax_params(lo, hi, self.bits)
        self.delta.copy_(delta)
        self.zero_point.copy_(zp)
        self._cache = None

    def clear_cache(self) -> None:
        self._cache = None

    def _broadcast_shape(self, w: Tensor) -> list[int]:
        shape = [1] * w.ndim
        shape[self.ch_axis] = self.delta.numel()
        return shape

    def _quantize(self, w: Tensor) -> Tensor:
        shape = self._broadcast_shape(w)
        g = None
        if self.lsq_grad_scale:
            g = 1.0 / math.sqrt(w.numel() / self.delta.numel() * qmax_of(self.bits))
        delta = self.delta.clamp_min(DELTA_MIN).view(shape)
        return fake_quant(w, delta, self.zero_point.view(shape), self.bits, grad_scale=g)

    def forward(self, w: Tensor) -> Tensor:
        """w: weight with C_out on ``ch_axis`` → fake-quantized weight, same shape (identity if disabled)."""
        if not self.enabled:
            return w
        if torch.is_grad_enabled():
            self._cache = None  # training: the weight moves every step, a cache would only hold memory
            return self._quantize(w)
        key = (
            w.data_ptr(), w._version,
            self.delta.data_ptr(), self.delta._version, self.zero_point.data_ptr(), self.zero_point._version,
        )
        cache = self._cache
        if cache is not None and cache[0] is w and cache[1] == key:
            return cache[2]
        out = self._quantize(w)
        self._cache = (w, key, out)
        return out

    def extra_repr(self) -> str:
        return f"C_out={self.delta.numel()}, bits={self.bits}, enabled={self.enabled}"


def set_quant_state(model: nn.Module, weight: bool | None = None, act: bool | None = None) -> None:
    """Enable/disable every WeightQuantizer (``weight``) and TemporalActQuantizer (``act``) of ``model``.

    None leaves that kind as it is."""
    for m in model.modules():
        if weight is not None and isinstance(m, WeightQuantizer):
            m.enabled = weight
        elif act is not None and isinstance(m, TemporalActQuantizer):
            m.enabled = act


def clear_weight_caches(model: nn.Module) -> int:
    """Drop the fake-quantized weight copies a no-grad pass left in ``model``'s WeightQuantizers (a float copy
    of every quantized weight: 3.4 GB for SD-1.5's UNet). Values do not change; the next no-grad call
    recomputes them. Returns how many were dropped. Called where a phase ends (sampling, each distillation
    stage), so one phase's copies do not sit in memory through the next."""
    n = 0
    for m in model.modules():
        if isinstance(m, WeightQuantizer) and m._cache is not None:
            m.clear_cache()
            n += 1
    return n
