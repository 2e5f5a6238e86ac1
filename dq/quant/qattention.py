"""Attention on quantized operands, as one fused C++ kernel (CPU). Torch only.

    out = Δp·Δv · (P_int · v_int),   P_int = clamp(round(softmax(Δq·Δk·scale · q_int·k_intᵀ) / Δp), −zp, qmax − zp)

for q, k, v given as their quantizers' integers (q_int = clamp(round(q/Δq), −zq, qmax − zq), bfloat16, exact for
up to 8 bits) with one Δ per head. It computes what ``QuantAttnProcessor._attend`` computes on the fake-quantized
operands with two batched matmuls, a softmax and a fake quantizer — the same integers, scaled once instead of per
operand (~1e-7 relative) — but one (batch, head) at a time with its scores in cache instead of [B, H, n, s]
score tensors in memory. Both products are of integers, so they run on the CPU's bfloat16 tile unit (AMX,
``_tile_dpbf16ps``: exact products, float32 sums) where it has one, else as float32 FMA loops. Written by hand
because no library does it: torch's SDPA cannot quantize P between the softmax and P·v, torchao 0.18's int8
SDPA op has no CPU kernel in its wheel, and inductor does not fuse the matmuls with the softmax (tried: 10.1 vs
3.4 ms, docs/design.md).

The kernel (dq/quant/qattention.cpp) is built by inductor's C++ toolchain through dq.quant.cpp_kernel. It is a
torch op (``dq::qattention``) with a shape function, so a compiled graph calls it as it is. Inference only, no mask.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Any

import torch
from torch import Tensor

from dq.quant import cpp_kernel
from dq.quant.fake_quant import qmax_of

log = logging.getLogger(__name__)

ARGS = (("const at::BFloat16*",) * 3 + ("const float*",) * 4 + ("void*",) + ("int64_t",) * 6 + ("float",)
        + ("int64_t",) * 2)
KERNEL = ("qattention", ARGS)
AMX: bool | None = None  # None: the tile unit where the CPU has it (tests set False to run the float loops)


@functools.cache
def _kernel() -> tuple[Any, bool]:
    """(the loaded kernel, whether it was built with the tile unit), once per process."""
    from torch._inductor.cpu_vec_isa import VecAMX, pick_vec_isa  # heavy: on first use

    # VecAMX: the build gets the tile flags and this process was granted the tiles (torch._C._cpu._init_amx)
    fn, amx = cpp_kernel.load(*KERNEL), isinstance(pick_vec_isa(), VecAMX)
    if tiles_expected() and not amx:
        log.warning("the CPU has AMX tiles but inductor's toolchain built dq's attention kernel without them "
                    "(an older compiler?): heads of 32 and wider run on its float loops, slower")
    return fn, amx


def has_amx() -> bool:
    """Whether the kernel runs its products on the CPU's bfloat16 tiles (AMX) here (builds it)."""
    return _kernel()[1]


def tiles_expected() -> bool:
    """Whether the kernel will run on the AMX tiles here, without waiting for its build: the CPU has the tiles and
    ATEN_CPU_CAPABILITY does not narrow inductor's pick of the vector ISA (:func:`has_amx` says for sure)."""
    return torch.cpu._is_amx_tile_supported() and not os.environ.get("ATEN_CPU_CAPABILITY")


_LIB = torch.library.Library("dq", "FRAGMENT")
_LIB.define("qattention(Tensor q, Tensor k, Tensor v, Tensor qk_scale, Tensor pv_scale, Tensor p_delta, Tensor p_zp, "
            "int p_bits, ScalarType out_dtype) -> Tensor")


def _empty(q: Tensor, v: Tensor, out_dtype: torch.dtype) -> Tensor:
    """The output [B, H, n, dv], laid out as [B, n, H, dv] (so the heads' concatenation is a view)."""
    b, h, n = q.shape[:3]
    if out_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"qattention out_dtype={out_dtype}: float32 or bfloat16")
    return q.new_empty((b, n, h, v.shape[3]), dtype=out_dtype).transpose(1, 2)


def _qattention(q: Tensor, k: Tensor, v: Tensor, qk_scale: Tensor, pv_scale: Tensor, p_delta: Tensor, p_zp: Tensor,
                p_bits: int, out_dtype: torch.dtype) -> Tensor:
    b, h, n, dk = q.shape
    s, dv = k.shape[2], v.shape[3]
    fn, amx = _kernel()
    q, k, v = (t.to(torch.bfloat16).contiguous() for t in (q, k, v))
    out = _empty(q, v, out_dtype)
    fn(q, k, v, *(t.float().reshape(h).contiguous() for t in (qk_scale, pv_scale, p_delta, p_zp)), out,
       b * h, h, n, s, dk, dv, float(qmax_of(p_bits)), int(amx if AMX is None else AMX and amx),
       int(out_dtype == torch.bfloat16))
    return out


@torch.library.register_fake("dq::qattention")
def _(q, k, v, qk_scale, pv_scale, p_delta, p_zp, p_bits, out_dtype):
    return _empty(q, v, out_dtype)


_LIB.impl("qattention", _qattention, "CPU")
qattention = torch.ops.dq.qattention.default
