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

The kernel is compiled by inductor's C++ toolchain (the compiler ``runtime=compiled`` already needs, with the
flags of the CPU's vector ISA; its on-disk cache keeps the build), through ``CppPythonBindingsCodeCache`` — a
torch-internal API, fine while torch is pinned to one version. It is a torch op (``dq::qattention``) with a
shape function, so a compiled graph calls it as it is. Inference only, no mask.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dq.quant.fake_quant import qmax_of

SOURCE = r"""
#include <torch/csrc/inductor/cpp_prefix.h>
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define DQ_AMX 1
#endif
using Vec = at::vec::Vectorized<float>;
using bf16 = at::BFloat16;
constexpr int64_t L = Vec::size();

static inline int64_t up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// One row of scores (s valid of sp, any padding) → P's integers in place: clamp(round(softmax(x·scale)/Δ), lo, hi),
// 0 on the padding.
static inline void softmax_ints(float* x, int64_t s, int64_t sp, float scale, const Vec& inv, const Vec& lo,
                                const Vec& hi) {
    const float ninf = -std::numeric_limits<float>::infinity();
    Vec vmax(ninf);
    for (int64_t j = 0; j < sp; j += L) {
        Vec a = Vec::loadu(x + j) * Vec(scale);
        if (j + L > s) a = Vec::set(Vec(ninf), a, std::max<int64_t>(s - j, 0));  // exp(−inf) = 0
        vmax = at::vec::maximum(vmax, a);
        a.store(x + j);
    }
    const Vec m(at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax));
    Vec vsum(0.f);
    for (int64_t j = 0; j < sp; j += L) {
        const Vec e = (Vec::loadu(x + j) - m).exp_u20();
        vsum = vsum + e;
        e.store(x + j);
    }
    const Vec r(1.f / at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, vsum));
    for (int64_t j = 0; j < sp; j += L)
        at::vec::minimum(at::vec::maximum(((Vec::loadu(x + j) * r) * inv).round(), lo), hi).store(x + j);
}

// out[b, i, h, c] (float32, or bfloat16 if bf), rounded to nearest even
static inline void put(void* out, int64_t at, float x, int64_t bf) {
    if (bf) static_cast<bf16*>(out)[at] = bf16(x);
    else static_cast<float*>(out)[at] = x;
}

// q [BH, n, dk], k [BH, s, dk], v [BH, s, dv]: integers in bfloat16; out [B, n, H, dv], float32 or bfloat16 (bf).
// Per head (bh % H): qk_scale = scale·Δq·Δk, pv_scale = Δp·Δv, P's grid (p_delta, p_zp). amx: use the tile unit.
extern "C" void kernel(const bf16* q, const bf16* k, const bf16* v, const float* qk_scale, const float* pv_scale,
                       const float* p_delta, const float* p_zp, void* out, int64_t BH, int64_t H, int64_t n,
                       int64_t s, int64_t dk, int64_t dv, float qmax, int64_t amx, int64_t bf) {
#ifdef DQ_AMX
    if (amx) {  // scores transposed (Sᵀ = k·qᵀ), so the softmax runs down the keys on vectors of 16 query rows
        const int64_t KP = up(dk, 32), KS = KP / 32;   // head dim: K in steps of 32
        const int64_t SP = up(s, 32);                  // keys: 16 per score tile, 32 per P·v step
        const int64_t DP = up(dv, 16), CB = DP / 16;   // value columns: 16 per output tile
        const int64_t IB = up(n, 16) / 16;             // query blocks of 16 rows
        #pragma omp parallel
        {
            struct { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } cfg{};
            cfg.palette = 1;
            for (int t = 0; t < 8; ++t) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
            _tile_loadconfig(&cfg);  // every tile 16 rows × 64 bytes: C 16×16 f32, A 16×32 bf16, B 16 pairs × 16
            // zero-padded operands (padding is never written): A of Sᵀ = k rows; B of Sᵀ = qᵀ in VNNI pairs
            // [block][K step][head-dim pair][16 query rows]; A of outᵀ = vᵀ; B of outᵀ = Pᵀ in key pairs.
            std::vector<bf16> kp(SP * KP, bf16(0.f)), vt(DP * SP, bf16(0.f));
            std::vector<uint32_t> qp(IB * KS * 256, 0u), pt(SP / 2 * 16, 0u);
            std::vector<float> st(SP * 16), ob(256);
            #pragma omp for
            for (int64_t bh = 0; bh < BH; ++bh) {
                const bf16* qb = q + bh * n * dk;
                const bf16* kb = k + bh * s * dk;
                const bf16* vb = v + bh * s * dv;
                const int64_t h = bh % H, o = (bh / H * n * H + h) * dv;  // out[b, 0, h, 0]; rows H·dv apart
                const float z = std::min(std::max(std::nearbyint(p_zp[h]), 0.f), qmax);
                const Vec inv(1.f / p_delta[h]), lo(-z), hi(qmax - z), scale(qk_scale[h]);
                for (int64_t j = 0; j < s; ++j) std::memcpy(kp.data() + j * KP, kb + j * dk, dk * sizeof(bf16));
                if (dk % 2 == 0) {  // qᵀ's pairs: a transpose of q's 32-bit words
                    const uint32_t* q32 = reinterpret_cast<const uint32_t*>(qb);
                    for (int64_t i = 0; i < n; ++i)
                        for (int64_t w = 0; w < dk / 2; ++w)
                            qp[((i / 16 * KS + w / 16) * 16 + w % 16) * 16 + i % 16] = q32[i * (dk / 2) + w];
                } else {
                    bf16* q16 = reinterpret_cast<bf16*>(qp.data());
                    for (int64_t i = 0; i < n; ++i)
                        for (int64_t c = 0; c < dk; ++c)
                            q16[(((i / 16 * KS + c / 32) * 16 + c % 32 / 2) * 16 + i % 16) * 2 + c % 2] = qb[i * dk + c];
                }
                for (int64_t j = 0; j < s; ++j)
                    for (int64_t c = 0; c < dv; ++c) vt[c * SP + j] = vb[j * dv + c];
                for (int64_t ib = 0; ib < IB; ++ib) {
                    for (int64_t j0 = 0; j0 < SP; j0 += 64) {  // Sᵀ: 16 keys × 16 query rows per tile, 4 at once
                        const int64_t nt = std::min<int64_t>(4, (SP - j0) / 16), a16 = 16 * KP, ab = KP * sizeof(bf16);
                        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                        for (int64_t ks = 0; ks < KS; ++ks) {
                            const bf16* a = kp.data() + j0 * KP + ks * 32;
                            _tile_loadd(5, qp.data() + (ib * KS + ks) * 256, 64);
                            _tile_loadd(4, a, ab); _tile_dpbf16ps(0, 4, 5);
                            if (nt > 1) { _tile_loadd(6, a + a16, ab); _tile_dpbf16ps(1, 6, 5); }
                            if (nt > 2) { _tile_loadd(7, a + 2 * a16, ab); _tile_dpbf16ps(2, 7, 5); }
                            if (nt > 3) { _tile_loadd(4, a + 3 * a16, ab); _tile_dpbf16ps(3, 4, 5); }
                        }
                        float* c = st.data() + j0 * 16;
                        _tile_stored(0, c, 64);
                        if (nt > 1) _tile_stored(1, c + 256, 64);
                        if (nt > 2) _tile_stored(2, c + 512, 64);
                        if (nt > 3) _tile_stored(3, c + 768, 64);
                    }
                    // softmax of x·scale down the keys: max(x)·scale is its max (scale > 0)
                    Vec m(-std::numeric_limits<float>::infinity()), sum(0.f);
                    for (int64_t j = 0; j < s; ++j) m = at::vec::maximum(m, Vec::loadu(st.data() + j * 16));
                    m = m * scale;
                    for (int64_t j = 0; j < s; ++j) {
                        const Vec e = (Vec::loadu(st.data() + j * 16) * scale - m).exp_u20();
                        sum = sum + e;
                        e.store(st.data() + j * 16);
                    }
                    const Vec r = Vec(1.f) / sum;
                    // P's integers clamp(round(P/Δ), −z, qmax − z), exact in bfloat16 (the high half of their float32
                    // bits), two keys to a 32-bit pair
                    for (int64_t j = 0; j < s; j += 2) {
                        const __m512i a = _mm512_castps_si512(at::vec::minimum(at::vec::maximum(
                            ((Vec::loadu(st.data() + j * 16) * r) * inv).round(), lo), hi));
                        const __m512i b = j + 1 < s ? _mm512_castps_si512(at::vec::minimum(at::vec::maximum(
                            ((Vec::loadu(st.data() + (j + 1) * 16) * r) * inv).round(), lo), hi)) : _mm512_setzero_si512();
                        _mm512_storeu_si512(pt.data() + j / 2 * 16, _mm512_or_si512(_mm512_srli_epi32(a, 16),
                            _mm512_and_si512(b, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)))));
                    }
                    const int64_t rows = std::min<int64_t>(16, n - ib * 16);
                    for (int64_t cb = 0; cb < CB; ++cb) {  // outᵀ = vᵀ·Pᵀ: 16 value columns × 16 query rows per tile
                        _tile_zero(1);
                        for (int64_t j0 = 0; j0 < SP; j0 += 32) {
                            _tile_loadd(6, vt.data() + cb * 16 * SP + j0, SP * sizeof(bf16));
                            _tile_loadd(7, pt.data() + j0 / 2 * 16, 64);
                            _tile_dpbf16ps(1, 6, 7);
                        }
                        _tile_stored(1, ob.data(), 64);
                        const float pv = pv_scale[h];
                        for (int64_t r2 = 0; r2 < rows; ++r2)
                            for (int64_t c = 0; c < std::min<int64_t>(16, dv - cb * 16); ++c)
                                put(out, o + (ib * 16 + r2) * H * dv + cb * 16 + c, ob[c * 16 + r2] * pv, bf);
                    }
                }
            }
            _tile_release();
        }
        return;
    }
#endif
    const int64_t sp = up(s, L);  // a row of scores, padded to whole vectors
    #pragma omp parallel
    {
        std::vector<float> qf(n * dk), kt(dk * sp, 0.f), vf(s * dv), p(sp, 0.f), ob(dv);  // one head in float32, kᵀ
        #pragma omp for
        for (int64_t bh = 0; bh < BH; ++bh) {
            const bf16* qb = q + bh * n * dk;
            const bf16* kb = k + bh * s * dk;
            const bf16* vb = v + bh * s * dv;
            const int64_t o = (bh / H * n * H + bh % H) * dv;  // out[b, 0, h, 0]; rows H·dv apart
            for (int64_t i = 0; i < n * dk; ++i) qf[i] = static_cast<float>(qb[i]);
            for (int64_t i = 0; i < s * dv; ++i) vf[i] = static_cast<float>(vb[i]);
            for (int64_t j = 0; j < s; ++j)
                for (int64_t c = 0; c < dk; ++c) kt[c * sp + j] = static_cast<float>(kb[j * dk + c]);
            const int64_t h = bh % H;
            const float z = std::min(std::max(std::nearbyint(p_zp[h]), 0.f), qmax);
            const Vec inv(1.f / p_delta[h]), lo(-z), hi(qmax - z), pv(pv_scale[h]);
            for (int64_t i = 0; i < n; ++i) {
                const float* qi = qf.data() + i * dk;
                for (int64_t j = 0; j < sp; j += L) {  // q·kᵀ, four independent FMA chains
                    Vec a0(0.f), a1(0.f), a2(0.f), a3(0.f);
                    int64_t c = 0;
                    for (; c + 4 <= dk; c += 4) {
                        a0 = at::vec::fmadd(Vec(qi[c]), Vec::loadu(kt.data() + c * sp + j), a0);
                        a1 = at::vec::fmadd(Vec(qi[c + 1]), Vec::loadu(kt.data() + (c + 1) * sp + j), a1);
                        a2 = at::vec::fmadd(Vec(qi[c + 2]), Vec::loadu(kt.data() + (c + 2) * sp + j), a2);
                        a3 = at::vec::fmadd(Vec(qi[c + 3]), Vec::loadu(kt.data() + (c + 3) * sp + j), a3);
                    }
                    for (; c < dk; ++c) a0 = at::vec::fmadd(Vec(qi[c]), Vec::loadu(kt.data() + c * sp + j), a0);
                    ((a0 + a1) + (a2 + a3)).store(p.data() + j);
                }
                softmax_ints(p.data(), s, sp, qk_scale[h], inv, lo, hi);
                for (int64_t c = 0; c < dv; c += L) {  // out = P·v
                    const int64_t cnt = std::min(L, dv - c);
                    Vec a0(0.f), a1(0.f), a2(0.f), a3(0.f);
                    int64_t j = 0;
                    for (; j + 4 <= s; j += 4) {
                        a0 = at::vec::fmadd(Vec(p[j]), Vec::loadu(vf.data() + j * dv + c, cnt), a0);
                        a1 = at::vec::fmadd(Vec(p[j + 1]), Vec::loadu(vf.data() + (j + 1) * dv + c, cnt), a1);
                        a2 = at::vec::fmadd(Vec(p[j + 2]), Vec::loadu(vf.data() + (j + 2) * dv + c, cnt), a2);
                        a3 = at::vec::fmadd(Vec(p[j + 3]), Vec::loadu(vf.data() + (j + 3) * dv + c, cnt), a3);
                    }
                    for (; j < s; ++j) a0 = at::vec::fmadd(Vec(p[j]), Vec::loadu(vf.data() + j * dv + c, cnt), a0);
                    (((a0 + a1) + (a2 + a3)) * pv).store(ob.data() + c, cnt);
                }
                for (int64_t c = 0; c < dv; ++c) put(out, o + i * H * dv + c, ob[c], bf);
            }
        }
    }
}
"""
ARGS = ["const at::BFloat16*"] * 3 + ["const float*"] * 4 + ["void*"] + ["int64_t"] * 6 + ["float"] + ["int64_t"] * 2
_KERNEL: list[Any] = []  # (the loaded kernel, whether it was built with the tile unit), once per process
AMX: bool | None = None  # None: the tile unit where the CPU has it (tests set False to run the float loops)


def _kernel() -> tuple[Any, bool]:
    if not _KERNEL:
        # inductor's import is heavy: on first use
        from torch._inductor.codecache import CppPythonBindingsCodeCache
        from torch._inductor.cpu_vec_isa import VecAMX, pick_vec_isa
        # VecAMX: the build gets the tile flags and this process was granted the tiles (torch._C._cpu._init_amx)
        _KERNEL.extend([CppPythonBindingsCodeCache.load_pybinding(ARGS, SOURCE), isinstance(pick_vec_isa(), VecAMX)])
    return _KERNEL[0], _KERNEL[1]


def has_amx() -> bool:
    """Whether the kernel runs its products on the CPU's bfloat16 tiles (AMX) here."""
    return _kernel()[1]


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
