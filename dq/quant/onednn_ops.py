"""oneDNN's u8 × s8 convolution and matmul (``torch.ops.onednn``, the kernels torch's own compiler lowers quantized
layers to) as two torch ops, ``dq::qconv2d`` and ``dq::qlinear``, with shape functions, for dq.quant.int8's layers.

The ops take the step's (Δx, zx) as tensors, so a compiled graph keeps them graph inputs; inductor calls the ops as
they are and fuses x → x_q into the code that produced x. The packed weight layout is made once per weight tensor.
torch.library.Library, not @custom_op (docs/design.md: its wrapper costs ~15 µs a call). Torch only."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

_PACKED = WeakIdKeyDictionary()  # int8 weight tensor → its packed layout
_LIB = torch.library.Library("dq", "DEF")
_LIB.define("qconv2d(Tensor xq, Tensor x_scale, Tensor x_zp, Tensor w8, Tensor w_scale, Tensor w_zp, Tensor? bias, "
            "int[] stride, int[] padding, int[] dilation, ScalarType out_dtype) -> Tensor")
_LIB.define("qlinear(Tensor xq, Tensor x_scale, Tensor x_zp, Tensor w8, Tensor w_scale, Tensor w_zp, Tensor? bias, "
            "ScalarType out_dtype, str post_op=\"none\") -> Tensor")
# what oneDNN's matmul may apply to its float result before writing it: post_op → (its name, its algorithm)
POST_OPS = {"none": ("none", ""), "gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh")}


def packed_weight(w8: Tensor, w_scale: Tensor, conv: Optional[tuple[list[int], list[int], list[int]]]) -> Tensor:
    """oneDNN's packed layout of the int8 weight ``w8`` (a convolution's if ``conv`` = (stride, padding, dilation)),
    made on the first call per weight tensor."""
    if w8 not in _PACKED:  # the layout with zero-point compensation serves every zx (0 included)
        _PACKED[w8] = (torch.ops.onednn.qlinear_prepack(w8, None) if conv is None else
                       torch.ops.onednn.qconv_prepack(w8, w_scale, 0.5, 1, *conv, 1, None))
    return _PACKED[w8]


def _qconv2d(xq: Tensor, x_scale: Tensor, x_zp: Tensor, w8: Tensor, w_scale: Tensor, w_zp: Tensor,
             bias: Optional[Tensor], stride: list[int], padding: list[int], dilation: list[int],
             out_dtype: torch.dtype) -> Tensor:
    """[N, C_out, H', W'] (channels-last, ``out_dtype``) = Δx·Δw·conv(xq − zx, w8) + b; xq uint8 [N, C_in, H, W]."""
    w = packed_weight(w8, w_scale, (stride, padding, dilation))
    y = torch.ops.onednn.qconv_pointwise.tensor(xq, x_scale, x_zp, w, w_scale, w_zp, bias, stride, padding,
                                                dilation, 1, 1.0, 0, out_dtype, "none", [], "")
    return y.contiguous(memory_format=torch.channels_last)


@torch.library.register_fake("dq::qconv2d")
def _(xq, x_scale, x_zp, w8, w_scale, w_zp, bias, stride, padding, dilation, out_dtype):
    hw = [(xq.shape[2 + i] + 2 * padding[i] - dilation[i] * (w8.shape[2 + i] - 1) - 1) // stride[i] + 1 for i in (0, 1)]
    return torch.empty((xq.shape[0], w8.shape[0], *hw), dtype=out_dtype, device=xq.device,
                       memory_format=torch.channels_last)


def _qlinear(xq: Tensor, x_scale: Tensor, x_zp: Tensor, w8: Tensor, w_scale: Tensor, w_zp: Tensor,
             bias: Optional[Tensor], out_dtype: torch.dtype, post_op: str = "none") -> Tensor:
    """[..., C_out] (``out_dtype``) = f(Δx·Δw·(xq − zx)·w8ᵀ + b), f the POST_OPS entry (identity for "none");
    xq uint8 [..., C_in]."""
    if post_op not in POST_OPS:
        raise ValueError(f"qlinear post_op={post_op!r}: one of {', '.join(POST_OPS)}")
    name, algorithm = POST_OPS[post_op]
    w = packed_weight(w8, w_scale, None)
    return torch.ops.onednn.qlinear_pointwise.tensor(xq, x_scale, x_zp, w, w_scale, w_zp, bias, 1.0, 0, out_dtype,
                                                     name, [], algorithm)


@torch.library.register_fake("dq::qlinear")
def _(xq, x_scale, x_zp, w8, w_scale, w_zp, bias, out_dtype, post_op="none"):
    return xq.new_empty((*xq.shape[:-1], w8.shape[0]), dtype=out_dtype)


_LIB.impl("qconv2d", _qconv2d, "CPU")
_LIB.impl("qlinear", _qlinear, "CPU")
qconv2d = torch.ops.dq.qconv2d.default
qlinear = torch.ops.dq.qlinear.default
