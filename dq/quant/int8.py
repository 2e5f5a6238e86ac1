"""Real int8 execution of fake-quantized layers on x86 CPUs, through the oneDNN ops that ship in torch
(``torch.ops.onednn``: the kernels torch's own compiler lowers quantized convolutions to). Torch only.

A QuantConv2d / QuantLinear computes f(Δx·(x_q − zx), Δw·(w_q − zw)) + b with integer x_q (per tensor,
one (Δx, zx) row per sampling step) and w_q (per output channel). Here the same integers go to an
u8 × s8 kernel with exact int32 accumulation:

    y = Δx·Δw[c]·Σ (x_q − zx)·W[c]  + b,    W = w_q − zw  (int8, weight zero point 0)

so the only difference to the fake-quant float layer is where float rounding happens (relative error
~1e-6 per layer call, tested ≤ 1e-3). x_q is computed as the fake quantizer does (x · (1/Δx), round
half to even), so both see the same integers — up to a value that lands exactly on a rounding boundary
after a last-bit difference (a Weight-Dilation input scale is folded into the same multiply here). In
a 4-bit network such a one-level difference propagates, so whole-model outputs agree less closely than
single layers; quality is compared by FID (scripts/bench_runtime.py). W does not fit int8 for 8-bit weights (w_q − zw ∈ [−255, 255]):
a per-channel offset o[c] is split off (W − o[c] ∈ [−128, 127]) and o[c]·Σ(x_q − zx) is added back
exactly. Inference only. The packed weights (MKLDNN tensors) are built on first use, not saved.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dq.quant.fake_quant import DELTA_MIN, qmax_of
from dq.quant.layers import QuantConv2d, QuantLinear


def available() -> bool:
    """Whether this torch build has the oneDNN int8 ops (x86 CPU builds do)."""
    return hasattr(torch.ops.onednn, "qconv2d_pointwise") and hasattr(torch.ops.onednn, "qlinear_pointwise")


def quantize_u8(x: Tensor, inv_delta: Tensor, zp: Tensor, bits: int) -> Tensor:
    """uint8 clamp(round(x · inv_delta) + zp, 0, 2^b − 1): the fake quantizer's integers. ``inv_delta`` is
    0-dim (or per channel, with Weight Dilation's input scale folded in); x keeps its layout (the
    kernel reorders the 4× smaller uint8 tensor itself)."""
    t = torch.mul(x, inv_delta)
    return t.round_().add_(zp).clamp_(0, qmax_of(bits)).to(torch.uint8)


def split_int8(w_int: Tensor) -> tuple[Tensor, Tensor | None]:
    """(int8 weight, per-output-channel int64 offset or None) with w_int = w8 + offset[c]."""
    w = w_int.to(torch.int64)
    flat = w.reshape(w.shape[0], -1)
    lo, hi = flat.amin(1), flat.amax(1)
    if bool((hi - lo > 255).any()):
        raise ValueError("a weight channel spans more than 256 integer levels; it cannot run in int8")
    off = torch.where(hi > 127, hi - 127, torch.where(lo < -128, lo + 128, torch.zeros_like(lo)))
    if bool((off == 0).all()):
        return w.to(torch.int8), None
    return (w - off.view(-1, *([1] * (w.dim() - 1)))).to(torch.int8), off


class _Int8Base(nn.Module):
    """Shared: the integer weight, its scales and the source layer's activation quantizer (its TPQ rows)."""

    def __init__(self, layer: QuantConv2d | QuantLinear) -> None:
        super().__init__()
        wq = layer.weight_quant
        qmax = qmax_of(wq.bits)
        delta = wq.delta.detach().clamp_min(DELTA_MIN).float()
        z = torch.round(wq.zero_point.detach()).clamp(0, qmax)
        shape = [-1] + [1] * (layer.weight.dim() - 1)
        w = layer.weight.detach().float()
        # Weight Dilation's 1/s where it could not be folded into a producer: applied to x, as the layer does
        self.input_scale = None if bool((layer.input_scale == 1).all()) else layer.input_scale.detach().float()
        self._axis = layer._channel_axis
        w_q = torch.clamp(torch.round(w * delta.view(shape).reciprocal()) + z.view(shape), 0, qmax)
        self.w8, self.offset = split_int8(w_q - z.view(shape))
        self.w_scale = delta
        self.bias = None if layer.bias is None else layer.bias.detach().float()
        self.act = layer.act_quant                     # TemporalActQuantizer: tables + step index
        self._wzp = torch.zeros(self.w8.shape[0], dtype=torch.long)
        self._packed: dict[bool, Tensor] = {}

    def _groups(self, x: Tensor) -> list[tuple[Tensor | None, float, Tensor, Tensor]]:
        """[(sample mask or None for all, Δx, 1/Δx, zx)] — one entry per distinct step row in the batch."""
        rows = self.act._rows(x)
        if rows is None or rows.numel() == 1:
            return [(None, *self._row(rows))]
        return [(rows == r, *self._row(r.reshape(1))) for r in torch.unique(rows)]

    def _row(self, rows: Tensor | None) -> tuple[float, Tensor, Tensor]:
        """Δx, 1/Δx, zx of one row, as the quantizer computes them (a table row or the knot form)."""
        with torch.no_grad():
            delta, zp = self.act._row_params(rows)
        d = delta.reshape(-1)[0]
        return float(d), d.reciprocal(), torch.round(zp.reshape(-1)[0]).clamp(0, qmax_of(self.act.bits))

    def _scaled_inv(self, inv: Tensor, x: Tensor) -> Tensor:
        """1/Δx, times Weight Dilation's input scale per channel where it was not folded: one multiply of
        x instead of two (x·s·(1/Δx) may round differently from (x·s)·(1/Δx) in the last bit, which
        can move a value exactly on a rounding boundary to the neighbouring level)."""
        if self.input_scale is None:
            return inv
        shape = [1] * x.ndim
        shape[self._axis] = -1
        return (self.input_scale * inv).view(shape)

    def forward(self, x: Tensor) -> Tensor:
        groups = self._groups(x)
        if len(groups) == 1:
            return self._run(x, *groups[0][1:])
        out = None
        for mask, *row in groups:
            y = self._run(x[mask], *row)
            out = x.new_empty((x.shape[0], *y.shape[1:])) if out is None else out
            out[mask] = y
        return out


class Int8Conv2d(_Int8Base):
    """QuantConv2d run as u8 × s8 oneDNN convolution with float32 output (channels-last)."""

    def __init__(self, layer: QuantConv2d) -> None:
        super().__init__(layer)
        if layer.groups != 1 or isinstance(layer.padding, str) or layer.padding_mode != "zeros":
            raise ValueError("int8 convolution needs groups=1, integer zero padding")
        self.stride, self.padding = list(layer.stride), list(layer.padding)
        self.dilation = list(layer.dilation)
        if self.offset is not None:
            self._ones = torch.ones(1, 1, *self.w8.shape[2:])

    def _weight(self, zp_nonzero: bool) -> Tensor:
        # x_scale / x_zp given to the prepack only pick the packed format (with or without the zero-point
        # compensation); the call's own scale and zero point are used at run time.
        if zp_nonzero not in self._packed:
            self._packed[zp_nonzero] = torch.ops.onednn.qconv_prepack(
                self.w8, self.w_scale, 0.5, int(zp_nonzero), self.stride, self.padding, self.dilation, 1, None)
        return self._packed[zp_nonzero]

    @torch.no_grad()
    def _run(self, x: Tensor, dx: float, inv: Tensor, zp: Tensor) -> Tensor:
        xq = quantize_u8(x, self._scaled_inv(inv, x), zp, self.act.bits)
        z = int(zp)
        y = torch.ops.onednn.qconv2d_pointwise(xq, dx, z, self._weight(z != 0), self.w_scale, self._wzp, self.bias,
                                               self.stride, self.padding, self.dilation, 1, 1.0, 0, torch.float32,
                                               "none", [], "")
        if self.offset is not None:  # o[c] · Σ (x_q − zx) over C_in and the window, in exact integers
            s = xq.sum(1, keepdim=True, dtype=torch.int32).sub_(z * xq.shape[1]).float()
            s = F.conv2d(s, self._ones, None, self.stride, self.padding, self.dilation)
            y.addcmul_(s, (dx * self.w_scale.double() * self.offset.double()).float().view(1, -1, 1, 1))
        return y.contiguous()  # oneDNN returns channels-last; GroupNorm and friends are slow on it here


class Int8Linear(_Int8Base):
    """QuantLinear run as u8 × s8 oneDNN matmul with float32 output; input [..., C_in]."""

    @torch.no_grad()
    def _run(self, x: Tensor, dx: float, inv: Tensor, zp: Tensor) -> Tensor:
        if not self._packed:
            self._packed[True] = torch.ops.onednn.qlinear_prepack(self.w8, None)
        xq = quantize_u8(x, self._scaled_inv(inv, x), zp, self.act.bits)
        z = int(zp)
        y = torch.ops.onednn.qlinear_pointwise(xq, dx, z, self._packed[True], self.w_scale, self._wzp, self.bias,
                                               1.0, 0, torch.float32, "none", [], "")
        if self.offset is not None:
            s = xq.sum(-1, keepdim=True, dtype=torch.int32).sub_(z * xq.shape[-1]).float()
            y.addcmul_(s, (dx * self.w_scale.double() * self.offset.double()).float())
        return y


def to_int8(model: nn.Module) -> list[str]:
    """Swap every QuantConv2d / QuantLinear with an activation quantizer for its int8 kernel (in place);
    layers whose input stays in float keep their fake-quant form. Returns the swapped names."""
    swapped = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, (QuantConv2d, QuantLinear)) and child.act_quant is not None:
                setattr(parent, child_name, (Int8Conv2d if isinstance(child, QuantConv2d) else Int8Linear)(child))
                swapped.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    return swapped
