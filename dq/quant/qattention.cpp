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

#ifdef DQ_AMX
// 16×16 transpose of 32-bit words held in 16 vectors (r[i] = row i)
static inline void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int i = 0; i < 16; i += 8)
        for (int j = 0; j < 4; ++j) {
            t[i + j] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0x88);
            t[i + j + 4] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0xdd);
        }
    for (int j = 0; j < 8; ++j) {
        r[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
        r[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xdd);
    }
}
#endif

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
        const int64_t SP = up(s, 32), G = SP / 32;     // keys: 16 per score tile, 32 per P·v step
        const int64_t DP = up(dv, 16), CB = DP / 16;   // value columns: 16 per output tile
        const int64_t IB = up(n, 16) / 16;             // query blocks of 16 rows
        const int64_t W = dk / 2;                      // q's 32-bit words per row (even dk)
        __m512i pairs;                                 // interleaves two rows of 16 bf16: [a0 b0 a1 b1 ...]
        {
            alignas(64) int16_t ix[32];
            for (int c = 0; c < 16; ++c) { ix[2 * c] = c; ix[2 * c + 1] = 32 + c; }
            pairs = _mm512_load_si512(ix);
        }
        #pragma omp parallel
        {
            struct { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } cfg{};
            cfg.palette = 1;
            for (int t = 0; t < 8; ++t) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
            _tile_loadconfig(&cfg);  // every tile 16 rows × 64 bytes: C 16×16 f32, A 16×32 bf16, B 16 pairs × 16
            // zero-padded operands (padding is never written). Sᵀ = k·qᵀ: A = k rows, B = qᵀ in VNNI pairs
            // [block][K step][head-dim pair][16 query rows]. out = P·v: A = P [key group][16 query rows][32 keys],
            // B = v in key pairs [column block][key pair][16 columns × 2].
            std::vector<bf16> kp(SP * KP, bf16(0.f)), vp(CB * SP * 16, bf16(0.f));
            std::vector<uint32_t> qp(IB * KS * 256, 0u), pa(G * 256, 0u);
            std::vector<float> st(SP * 16), ob(256);
            #pragma omp for
            for (int64_t bh = 0; bh < BH; ++bh) {
                const bf16* qb = q + bh * n * dk;
                const bf16* kb = k + bh * s * dk;
                const bf16* vb = v + bh * s * dv;
                const int64_t h = bh % H, o = (bh / H * n * H + h) * dv;  // out[b, 0, h, 0]; rows H·dv apart
                const float z = std::min(std::max(std::nearbyint(p_zp[h]), 0.f), qmax);
                const Vec inv(1.f / p_delta[h]), lo(-z), hi(qmax - z), scale(qk_scale[h]);
                const Vec pv(pv_scale[h]);
                for (int64_t j = 0; j < s; ++j) std::memcpy(kp.data() + j * KP, kb + j * dk, dk * sizeof(bf16));
                if (dk % 2 == 0) {  // qᵀ's pairs: 16×16 transposes of q's 32-bit words, 16 words (a K step) at a time
                    const uint32_t* q32 = reinterpret_cast<const uint32_t*>(qb);
                    for (int64_t ib = 0; ib < IB; ++ib)
                        for (int64_t ks = 0; ks < KS; ++ks) {
                            const int64_t nw = std::min<int64_t>(16, W - ks * 16);
                            const __mmask16 mask = static_cast<__mmask16>((1u << nw) - 1);
                            __m512i r[16];
                            for (int64_t i = 0; i < 16; ++i)
                                r[i] = ib * 16 + i < n ? _mm512_maskz_loadu_epi32(mask, q32 + (ib * 16 + i) * W + ks * 16)
                                                       : _mm512_setzero_si512();
                            transpose16(r);
                            for (int64_t w = 0; w < nw; ++w)
                                _mm512_storeu_si512(qp.data() + ((ib * KS + ks) * 16 + w) * 16, r[w]);
                        }
                } else {
                    bf16* q16 = reinterpret_cast<bf16*>(qp.data());
                    for (int64_t i = 0; i < n; ++i)
                        for (int64_t c = 0; c < dk; ++c)
                            q16[(((i / 16 * KS + c / 32) * 16 + c % 32 / 2) * 16 + i % 16) * 2 + c % 2] = qb[i * dk + c];
                }
                for (int64_t cb = 0; cb < CB; ++cb) {  // v's key pairs, 16 columns at a time
                    const int64_t cnt = std::min<int64_t>(16, dv - cb * 16);
                    const __mmask32 m = static_cast<__mmask32>((1ull << cnt) - 1);
                    for (int64_t j = 0; j < s; j += 2) {
                        const __m512i a = _mm512_maskz_loadu_epi16(m, vb + j * dv + cb * 16);
                        const __m512i b = j + 1 < s ? _mm512_maskz_loadu_epi16(m, vb + (j + 1) * dv + cb * 16)
                                                    : _mm512_setzero_si512();
                        _mm512_storeu_si512(vp.data() + (cb * SP / 2 + j / 2) * 32, _mm512_permutex2var_epi16(a, pairs, b));
                    }
                }
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
                    // bits), two keys to a 32-bit word; each group of 32 keys transposed to 16 rows of 32 keys
                    for (int64_t g = 0; g < G; ++g) {
                        __m512i w[16];
                        for (int64_t t = 0; t < 16; ++t) {
                            const int64_t j = g * 32 + 2 * t;
                            const __m512i a = j < s ? _mm512_castps_si512(at::vec::minimum(at::vec::maximum(
                                ((Vec::loadu(st.data() + j * 16) * r) * inv).round(), lo), hi)) : _mm512_setzero_si512();
                            const __m512i b = j + 1 < s ? _mm512_castps_si512(at::vec::minimum(at::vec::maximum(
                                ((Vec::loadu(st.data() + (j + 1) * 16) * r) * inv).round(), lo), hi)) : _mm512_setzero_si512();
                            w[t] = _mm512_or_si512(_mm512_srli_epi32(a, 16),
                                                   _mm512_and_si512(b, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
                        }
                        transpose16(w);
                        for (int64_t i = 0; i < 16; ++i) _mm512_storeu_si512(pa.data() + g * 256 + i * 16, w[i]);
                    }
                    const int64_t rows = std::min<int64_t>(16, n - ib * 16);
                    for (int64_t cb = 0; cb < CB; ++cb) {  // out = P·v: 16 query rows × 16 value columns per tile
                        _tile_zero(1);
                        for (int64_t g = 0; g < G; ++g) {
                            _tile_loadd(6, pa.data() + g * 256, 64);
                            _tile_loadd(7, vp.data() + (cb * SP / 2 + g * 16) * 32, 64);
                            _tile_dpbf16ps(1, 6, 7);
                        }
                        _tile_stored(1, ob.data(), 64);
                        const int64_t cnt = std::min<int64_t>(16, dv - cb * 16);
                        const __mmask16 m16 = static_cast<__mmask16>((1u << cnt) - 1);
                        for (int64_t r2 = 0; r2 < rows; ++r2) {
                            const __m512 y = _mm512_mul_ps(_mm512_loadu_ps(ob.data() + r2 * 16), _mm512_set1_ps(pv_scale[h]));
                            const int64_t at = o + (ib * 16 + r2) * H * dv + cb * 16;
                            if (bf) _mm256_mask_storeu_epi16(static_cast<bf16*>(out) + at, m16, (__m256i)_mm512_cvtneps_pbh(y));
                            else _mm512_mask_storeu_ps(static_cast<float*>(out) + at, m16, y);
                        }
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
