"""Attention on quantized operands for narrow heads, as one fused C++ kernel (CPU). Torch only.

    out = Q_p(softmax(q·kᵀ·scale)) · v,   Q_p: P on its quantizer's grid, one (Δ, z) per head

for q, k, v already on their grids (float32, [B, H, n, d]). It computes what ``QuantAttnProcessor._attend``
computes with two batched matmuls, a softmax and a fake quantizer, but one (batch, head) at a time with its
scores in cache instead of [B, H, n, s] score tensors in memory: for heads narrower than 32 the batched
float32 matmuls are short dot products (K = d), and each of the four passes over the scores costs more than
the arithmetic. Written by hand because no library does it: torch's SDPA cannot quantize P between the
softmax and P·v, torchao 0.18's int8 SDPA op has no CPU kernel in its wheel, and inductor does not fuse the
matmuls with the softmax (tried: 10.1 vs 3.4 ms, docs/design.md).

The kernel is compiled by inductor's C++ toolchain (the compiler ``runtime=compiled`` already needs; its
on-disk cache keeps the build), through ``CppPythonBindingsCodeCache`` — a torch-internal API, fine while
torch is pinned to one version. It is a torch op (``dq::qattention``) with a shape function, so a compiled
graph calls it as it is. Inference only, float32, no mask.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dq.quant.fake_quant import qmax_of

SOURCE = r"""
#include <torch/csrc/inductor/cpp_prefix.h>
using Vec = at::vec::Vectorized<float>;
constexpr int64_t L = Vec::size();

// q [BH, n, dk], k [BH, s, dk], v [BH, s, dv], out [BH, n, dv]; P quantizer (delta, zp) per head (bh % H).
extern "C" void kernel(const float* q, const float* k, const float* v, const float* p_delta, const float* p_zp,
                       float* out, int64_t BH, int64_t H, int64_t n, int64_t s, int64_t dk, int64_t dv,
                       float scale, float qmax) {
    const int64_t sp = (s + L - 1) / L * L;  // a row of scores, padded to whole vectors
    const float ninf = -std::numeric_limits<float>::infinity();
    #pragma omp parallel
    {
        std::vector<float> kt(dk * sp, 0.f), p(sp, 0.f);  // kᵀ of one head, one row of scores
        #pragma omp for
        for (int64_t bh = 0; bh < BH; ++bh) {
            const float* qb = q + bh * n * dk;
            const float* kb = k + bh * s * dk;
            const float* vb = v + bh * s * dv;
            float* ob = out + bh * n * dv;
            for (int64_t j = 0; j < s; ++j)
                for (int64_t c = 0; c < dk; ++c) kt[c * sp + j] = kb[j * dk + c];
            const float delta = p_delta[bh % H];
            const float z = std::min(std::max(std::nearbyint(p_zp[bh % H]), 0.f), qmax);
            const Vec inv(1.f / delta), dp(delta), lo(-z), hi(qmax - z);
            for (int64_t i = 0; i < n; ++i) {
                const float* qi = qb + i * dk;
                Vec vmax(ninf);
                for (int64_t j = 0; j < sp; j += L) {  // scores q·kᵀ·scale, four independent FMA chains
                    Vec a0(0.f), a1(0.f), a2(0.f), a3(0.f);
                    int64_t c = 0;
                    for (; c + 4 <= dk; c += 4) {
                        a0 = at::vec::fmadd(Vec(qi[c]), Vec::loadu(kt.data() + c * sp + j), a0);
                        a1 = at::vec::fmadd(Vec(qi[c + 1]), Vec::loadu(kt.data() + (c + 1) * sp + j), a1);
                        a2 = at::vec::fmadd(Vec(qi[c + 2]), Vec::loadu(kt.data() + (c + 2) * sp + j), a2);
                        a3 = at::vec::fmadd(Vec(qi[c + 3]), Vec::loadu(kt.data() + (c + 3) * sp + j), a3);
                    }
                    for (; c < dk; ++c) a0 = at::vec::fmadd(Vec(qi[c]), Vec::loadu(kt.data() + c * sp + j), a0);
                    Vec x = ((a0 + a1) + (a2 + a3)) * Vec(scale);
                    if (j + L > s) x = Vec::set(Vec(ninf), x, s - j);  // padding: exp(−inf) = 0
                    vmax = at::vec::maximum(vmax, x);
                    x.store(p.data() + j);
                }
                const Vec m(at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax));
                Vec vsum(0.f);
                for (int64_t j = 0; j < sp; j += L) {
                    const Vec e = (Vec::loadu(p.data() + j) - m).exp_u20();
                    vsum = vsum + e;
                    e.store(p.data() + j);
                }
                const Vec r(1.f / at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, vsum));
                for (int64_t j = 0; j < sp; j += L) {  // P on its grid: clamp(round(P/Δ), −z, qmax − z)·Δ
                    const Vec x = Vec::loadu(p.data() + j) * r;
                    (at::vec::minimum(at::vec::maximum((x * inv).round(), lo), hi) * dp).store(p.data() + j);
                }
                for (int64_t c = 0; c < dv; c += L) {  // out = P·v
                    const int64_t cnt = std::min(L, dv - c);
                    Vec a0(0.f), a1(0.f), a2(0.f), a3(0.f);
                    int64_t j = 0;
                    for (; j + 4 <= s; j += 4) {
                        a0 = at::vec::fmadd(Vec(p[j]), Vec::loadu(vb + j * dv + c, cnt), a0);
                        a1 = at::vec::fmadd(Vec(p[j + 1]), Vec::loadu(vb + (j + 1) * dv + c, cnt), a1);
                        a2 = at::vec::fmadd(Vec(p[j + 2]), Vec::loadu(vb + (j + 2) * dv + c, cnt), a2);
                        a3 = at::vec::fmadd(Vec(p[j + 3]), Vec::loadu(vb + (j + 3) * dv + c, cnt), a3);
                    }
                    for (; j < s; ++j) a0 = at::vec::fmadd(Vec(p[j]), Vec::loadu(vb + j * dv + c, cnt), a0);
                    ((a0 + a1) + (a2 + a3)).store(ob + i * dv + c, cnt);
                }
            }
        }
    }
}
"""
ARGS = ["const float*"] * 5 + ["float*"] + ["int64_t"] * 6 + ["float", "float"]
_KERNEL: list[Any] = []  # the loaded kernel, once per process


def _kernel() -> Any:
    if not _KERNEL:
        from torch._inductor.codecache import CppPythonBindingsCodeCache  # inductor's import is heavy: on first use
        _KERNEL.append(CppPythonBindingsCodeCache.load_pybinding(ARGS, SOURCE))
    return _KERNEL[0]


_LIB = torch.library.Library("dq", "FRAGMENT")
_LIB.define("qattention(Tensor q, Tensor k, Tensor v, float scale, Tensor p_delta, Tensor p_zp, int p_bits) -> Tensor")


def _qattention(q: Tensor, k: Tensor, v: Tensor, scale: float, p_delta: Tensor, p_zp: Tensor, p_bits: int) -> Tensor:
    b, h, n, dk = q.shape
    s, dv = k.shape[2], v.shape[3]
    q, k, v = (t.float().contiguous() for t in (q, k, v))
    out = q.new_empty((b, h, n, dv))
    _kernel()(q, k, v, p_delta.float().reshape(h).contiguous(), p_zp.float().reshape(h).contiguous(), out,
              b * h, h, n, s, dk, dv, float(scale), float(qmax_of(p_bits)))
    return out


@torch.library.register_fake("dq::qattention")
def _(q, k, v, scale, p_delta, p_zp, p_bits):
    return q.new_empty((*q.shape[:3], v.shape[3]), dtype=torch.float32)


_LIB.impl("qattention", _qattention, "CPU")
qattention = torch.ops.dq.qattention.default
