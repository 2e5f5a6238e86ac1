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
single layers; quality is compared by FID (scripts/bench_runtime.py). W does not fit int8 for 8-bit
weights (w_q − zw ∈ [−255, 255]): such a layer's kernel gets two int8 halves stacked along its output
channels, W = 16·W_hi + W_lo (W_hi's scale 16·Δw), computes both in one call and adds them (docs/design.md).

Every step of a call is tensor arithmetic (the row's (Δx, zx) are gathered, never read back to the
host), so ``torch.compile`` traces a layer whole and fuses the quantization x → x_q into the kernel
that produced x (dq.quant.compiled). Weights are packed for the kernels once, when the layer is built.
A batch that mixes steps runs each step's samples with their own row. Inference only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dq.quant.act_quantizer import TemporalActQuantizer
from dq.quant.fake_quant import DELTA_MIN, qmax_of
from dq.quant.layers import QuantConv2d, QuantLinear
from dq.quant.onednn_ops import POST_OPS, packed_weight, qconv2d, qlinear  # qconv2d, qlinear: also dq.quant.int8's API
from dq.quant.split import SplitActQuantizer


def available() -> bool:
    """Whether this torch build has the oneDNN int8 ops (x86 CPU builds do)."""
    return hasattr(torch.ops.onednn, "qconv_pointwise") and hasattr(torch.ops.onednn, "qlinear_pointwise")


def quantize_u8(x: Tensor, inv_delta: Tensor, zp: Tensor, bits: int) -> Tensor:
    """uint8 clamp(round(x · inv_delta) + zp, 0, 2^b − 1): the fake quantizer's integers. ``inv_delta``
    broadcasts against x (one value, or per channel with Weight Dilation's input scale folded in)."""
    return torch.clamp(torch.round(x * inv_delta) + zp, 0, qmax_of(bits)).to(torch.uint8)


def int8_weight(w_int: Tensor) -> tuple[Tensor, bool]:
    """(int8 weight, halved): integer weights that fit int8 as they are; wider ones (8-bit weights less their zero
    point span [−255, 255]) as [W_hi; W_lo] along the output channels, w_int = 16·W_hi + W_lo, |w_int| ≤ 2039."""
    w = w_int.to(torch.int64)
    widest = int(w.abs().max())
    if widest > 2039:
        raise ValueError(f"integer weights up to ±{widest} do not fit two int8 halves (at most ±2039); "
                         "load this export with runtime=reference")
    if int(w.min()) >= -128 and int(w.max()) <= 127:
        return w.to(torch.int8), False
    hi = torch.round(w / 16).to(torch.int64)
    return torch.cat([hi, w - 16 * hi]).to(torch.int8), True


class _Int8Base(nn.Module):
    """Shared: the integer weight, its scales and the source layer's activation quantizer (its TPQ rows).
    ``act``, ``cols``, ``bias``: one part of a split layer (its quantizer, its input channels, whether it adds
    the bias); by default the whole layer."""

    def __init__(self, layer: QuantConv2d | QuantLinear, act: TemporalActQuantizer | None = None,
                 cols: slice = slice(None), bias: bool = True) -> None:
        super().__init__()
        wq = layer.weight_quant
        qmax = qmax_of(wq.bits)
        delta = wq.delta.detach().clamp_min(DELTA_MIN).float()
        z = torch.round(wq.zero_point.detach()).clamp(0, qmax)
        shape = [-1] + [1] * (layer.weight.dim() - 1)
        w = layer.weight.detach()[:, cols].float()
        w8, self.halved = int8_weight(torch.clamp(torch.round(w * delta.view(shape).reciprocal()) + z.view(shape), 0,
                                                  qmax) - z.view(shape))
        scale = layer.input_scale.detach()[cols].float()
        bias = None if layer.bias is None or not bias else layer.bias.detach().float()
        if self.halved:  # the high half's step is 16·Δw (exact); the low half adds no bias
            delta = torch.cat([16 * delta, delta])
            bias = None if bias is None else torch.cat([bias, torch.zeros_like(bias)])
        # buffers, not saved (an int8 model is built from its source), moved with the module
        buffers = {"w8": w8, "w_scale": delta, "_wzp": torch.zeros(w8.shape[0], dtype=torch.long), "bias": bias,
                   # Weight Dilation's 1/s where it could not be folded into a producer: applied to x, as the layer does
                   "input_scale": None if bool((scale == 1).all()) else scale,
                   "_row0": torch.zeros(1, dtype=torch.long)}  # shared tables: the one row
        for k, v in buffers.items():
            self.register_buffer(k, v, persistent=False)
        self._axis = layer._channel_axis
        self.act = layer.act_quant if act is None else act  # TemporalActQuantizer: tables + step index
        # what the kernel writes: float32, or bfloat16 (dq.quant.compiled, where the CPU computes in it)
        self.out_dtype = torch.float32

    def _row(self, row: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(Δx [1], 1/Δx broadcastable to x, zx [1]) of one table row, as the quantizer computes them."""
        delta, zp = self.act._row_params(row)
        delta, zp = delta.reshape(1).float(), zp.reshape(1).float()
        inv = delta.reciprocal()
        if self.input_scale is not None:  # x·s·(1/Δx) in one multiply, as the fake layer rounds it
            shape = [1] * (4 if self._axis == 1 else 1)
            shape[self._axis] = -1
            inv = (self.input_scale * inv).view(shape)
        return delta, inv, torch.round(zp).clamp(0, qmax_of(self.act.bits))

    def forward(self, x: Tensor) -> Tensor:
        rows = self.act._rows(x)
        if rows is None or rows.numel() == 1:
            return self._run(x, *self._row(self._row0 if rows is None else rows))
        out = None  # a batch that mixes steps: each step's samples with their row
        for r in torch.unique(rows):
            mask = rows == r
            y = self._run(x[mask], *self._row(r.reshape(1)))
            out = y.new_empty((x.shape[0], *y.shape[1:])) if out is None else out
            out[mask] = y
        return out

    def _join(self, y: Tensor, dim: int) -> Tensor:
        """The layer's output: y as the kernel wrote it, or the sum of its two halves along ``dim`` (halved weights)."""
        if not self.halved:
            return y
        hi, lo = y.chunk(2, dim)
        return hi + lo


class Int8Conv2d(_Int8Base):
    """QuantConv2d run as u8 × s8 oneDNN convolution."""

    def __init__(self, layer: QuantConv2d, act: TemporalActQuantizer | None = None, cols: slice = slice(None),
                 bias: bool = True) -> None:
        if layer.groups != 1 or isinstance(layer.padding, str) or layer.padding_mode != "zeros":
            raise ValueError("int8 convolution needs groups=1, integer zero padding")
        self.stride, self.padding = list(layer.stride), list(layer.padding)
        self.dilation = list(layer.dilation)
        super().__init__(layer, act, cols, bias)
        # Halved weights whose integer products sum exactly in float32 in any order (fan-in · 255² < 2²⁴: a first
        # layer over a few channels, e.g. conv_in) run as one float convolution of (x_q − zx) with W instead: C_out
        # outputs, where the two halves write 2·C_out that every consumer reads again.
        self.float_ints = self.halved and self.w8[0].numel() * 255 * 255 < 2 ** 24
        halves = self.w8.float().chunk(2) if self.float_ints else None
        self.register_buffer("w_float", None if halves is None else 16 * halves[0] + halves[1], persistent=False)
        if not self.float_ints:
            packed_weight(self.w8, self.w_scale, (self.stride, self.padding, self.dilation))  # at load, not at first call

    def _float_ints(self, xq: Tensor, dx: Tensor, zp: Tensor) -> Tensor:
        """Δx·Δw·conv(x_q − zx, W) + b with integer-valued float operands: exact sums in float32; in bfloat16 (the
        compiled runtime's dtype) the operands are exact and the sum is rounded once, as the int8 kernel's output."""
        dt, c = self.out_dtype, self.w8.shape[0] // 2
        acc = F.conv2d(xq.to(dt) - zp.to(dt), self.w_float.to(dt), None, self.stride, self.padding,
                       self.dilation).contiguous(memory_format=torch.channels_last)  # as the int8 kernels write
        y = acc * (dx * self.w_scale[c:]).view(1, -1, 1, 1)
        return (y if self.bias is None else y + self.bias[:c].view(1, -1, 1, 1)).to(dt)

    def _run(self, x: Tensor, dx: Tensor, inv: Tensor, zp: Tensor) -> Tensor:
        if torch.compiler.is_compiling():  # the codes in the kernel's layout, written by the pass that made x
            x = x.contiguous(memory_format=torch.channels_last)
        xq = quantize_u8(x, inv, zp, self.act.bits)
        y = self._float_ints(xq, dx, zp) if self.float_ints else self._join(qconv2d(
            xq, dx, zp.long(), self.w8, self.w_scale, self._wzp, self.bias, self.stride, self.padding, self.dilation,
            self.out_dtype), 1)
        # oneDNN writes channels-last: eager GroupNorm and friends are slow on it, compiled kernels are not
        return y if torch.compiler.is_compiling() else y.contiguous()


class Int8Linear(_Int8Base):
    """QuantLinear run as u8 × s8 oneDNN matmul; input [..., C_in].

    The activation zero point is taken out of the kernel: Σ(x_q − zx)·W = Σ x_q·W − zx·ΣW; the second term,
    one value per output channel, goes into the bias (oneDNN's matmul with a zero point can be slower: design.md)."""

    def __init__(self, layer: QuantLinear, act: TemporalActQuantizer | None = None, cols: slice = slice(None),
                 bias: bool = True) -> None:
        super().__init__(layer, act, cols, bias)
        self.register_buffer("_wsum", self.w8.sum(1, dtype=torch.int64).float(), persistent=False)  # ΣW, exact
        packed_weight(self.w8, self.w_scale, None)  # at load, not at first call
        self.post_op = "none"  # what the kernel applies to its result (fuse_post_op)

    def fuse_post_op(self, post_op: str) -> None:
        """Have the matmul apply ``post_op`` (a POST_OPS key) to its float result, e.g. the GELU that reads it:
        one pass less over the output. Not for halved weights, whose two halves are summed after the kernel."""
        if post_op not in POST_OPS:
            raise ValueError(f"post_op={post_op!r}: one of {', '.join(POST_OPS)}")
        if self.halved and post_op != "none":
            raise ValueError("a halved int8 linear sums its two halves after the kernel: no post-op can run in it")
        self.post_op = post_op

    def _run(self, x: Tensor, dx: Tensor, inv: Tensor, zp: Tensor) -> Tensor:
        if torch.compiler.is_compiling():  # row-major codes: oneDNN copies any other layout before its matmul
            x = x.contiguous()
        xq = quantize_u8(x, inv, zp, self.act.bits)
        shift = dx * zp * self.w_scale * self._wsum  # Δx·Δw·zx·ΣW per output channel
        bias = -shift if self.bias is None else self.bias - shift
        return self._join(qlinear(xq, dx, self._wzp[:1], self.w8, self.w_scale, self._wzp, bias, self.out_dtype,
                                  self.post_op), -1)


def _frozen_float(layer: QuantConv2d | QuantLinear) -> nn.Module:
    """A layer whose input stays float, as a plain float layer with its fake-quantized weight (computed once)."""
    m = layer.to_float()
    with torch.no_grad():
        shape = [1] * layer.weight.ndim
        shape[1] = -1
        w = layer.weight_quant(layer.weight)
        if layer.lowrank_rank:  # the float branch reads the same float input: one dense weight
            w = w + layer.lowrank_weight()
        m.weight.copy_(w * layer.input_scale.view(shape))
    return m.requires_grad_(False)


class Int8Layer(nn.Module):
    """A quantized layer's integer kernels: one per part of a split input (summed; the first adds the bias),
    plus SVDQuant's low-rank branch in float on the scaled input (in the kernels' output dtype)."""

    def __init__(self, layer: QuantConv2d | QuantLinear) -> None:
        super().__init__()
        cls = Int8Conv2d if isinstance(layer, QuantConv2d) else Int8Linear
        act = layer.act_quant
        if isinstance(act, SplitActQuantizer):
            bounds = [0, *torch.tensor(act.sizes).cumsum(0).tolist()]
            self.kernels = nn.ModuleList(cls(layer, q, slice(a, b), bias=i == 0)
                                         for i, (q, a, b) in enumerate(zip(act.parts, bounds, bounds[1:])))
            self.sizes: tuple[int, ...] | None = act.sizes
        else:
            self.kernels = nn.ModuleList([cls(layer)])
            self.sizes = None
        self._axis = layer._channel_axis
        self.lowrank = bool(layer.lowrank_rank)
        self._conv = ((list(layer.stride), list(layer.padding), list(layer.dilation))
                      if isinstance(layer, QuantConv2d) else None)
        down = None
        if self.lowrank:  # A·(x·s) = (A·s)·x: Weight Dilation's input scale folded into A, no pass over x
            shape = [1] * layer.lowrank_down.dim()
            shape[1] = -1
            down = layer.lowrank_down.detach().float() * layer.input_scale.detach().float().view(shape)
        for k, v in {"down": down, "up": layer.lowrank_up.detach().float() if self.lowrank else None}.items():
            self.register_buffer(k, v, persistent=False)

    @property
    def out_dtype(self) -> torch.dtype:
        return self.kernels[0].out_dtype

    def _branch(self, x: Tensor) -> Tensor:
        """B·(A·(x · input_scale)) in the kernels' output dtype (no-op casts once the runtime cast A and B)."""
        x, down, up = x.to(self.out_dtype), self.down.to(self.out_dtype), self.up.to(self.out_dtype)
        if self._conv is not None:
            return F.conv2d(F.conv2d(x, down, None, *self._conv), up[:, :, None, None])
        return F.linear(F.linear(x, down), up)

    def forward(self, x: Tensor) -> Tensor:
        if self.sizes is None:
            y = self.kernels[0](x)
        else:
            parts = x.split(self.sizes, self._axis)
            y = self.kernels[0](parts[0])
            for k, p in zip(self.kernels[1:], parts[1:]):
                y = y + k(p)
        return y + self._branch(x).to(y.dtype) if self.lowrank else y


def to_int8(model: nn.Module) -> list[str]:
    """Swap every QuantConv2d / QuantLinear with an activation quantizer for its int8 kernel (in place);
    layers whose input stays float become float layers holding their quantized weight. Returns the
    names of the int8 layers."""
    swapped = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, (QuantConv2d, QuantLinear)):
                continue
            if child.act_quant is None:
                setattr(parent, child_name, _frozen_float(child))
                continue
            plain = not child.lowrank_rank and not isinstance(child.act_quant, SplitActQuantizer)
            setattr(parent, child_name, (Int8Conv2d if isinstance(child, QuantConv2d) else Int8Linear)(child)
                    if plain else Int8Layer(child))
            swapped.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    return swapped
