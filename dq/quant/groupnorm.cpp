#include <torch/csrc/inductor/cpp_prefix.h>
using Vec = at::vec::Vectorized<float>;
using bf16 = at::BFloat16;
constexpr int64_t L = Vec::size();

// cnt (≤ L) values of x + at as float32 (x float32, or bfloat16 if bf), 0 past cnt
static inline Vec load(const void* x, int64_t at, int64_t cnt, int64_t bf) {
    if (bf) return at::vec::convert<float>(at::vec::Vectorized<bf16>::loadu(static_cast<const bf16*>(x) + at, cnt));
    return Vec::loadu(static_cast<const float*>(x) + at, cnt);
}

// GroupNorm statistics of channels-last data: x [N, S, C] (channels at stride 1, positions at stride C, samples at
// stride sn), G groups of C / G channels. Writes per sample and channel its group's mean and scale = w[c] / sqrt(var +
// eps) (var biased), so that the normalised value is (x − mean)·scale + b. Two passes over each sample (the mean,
// then Σ(x − mean)²), the per-channel sums vectorised over the channels, four vectors of them at a time in registers.
extern "C" void kernel(const void* x, const float* w, float* mean, float* scale, int64_t N, int64_t S, int64_t C,
                       int64_t G, int64_t sn, float eps, int64_t bf) {
    const int64_t cg = C / G, CP = (C + L - 1) / L * L;
    const float inv_count = 1.f / static_cast<float>(S * cg);
    #pragma omp parallel
    {
        std::vector<float> acc(CP, 0.f), mc(CP, 0.f);
        #pragma omp for
        for (int64_t n = 0; n < N; ++n) {
            const int64_t base = n * sn;
            for (int pass = 0; pass < 2; ++pass) {
                for (int64_t c0 = 0; c0 < C; c0 += 4 * L) {  // Σx (pass 0) or Σ(x − mean)² (pass 1), 4·L channels
                    Vec a[4] = {Vec(0.f), Vec(0.f), Vec(0.f), Vec(0.f)}, m[4];
                    const int64_t nv = std::min<int64_t>(4, (C - c0 + L - 1) / L);
                    for (int64_t v = 0; v < nv; ++v) m[v] = Vec::loadu(mc.data() + c0 + v * L);
                    for (int64_t s = 0; s < S; ++s)
                        for (int64_t v = 0; v < nv; ++v) {
                            const int64_t c = c0 + v * L, cnt = std::min(L, C - c);
                            const Vec e = load(x, base + s * C + c, cnt, bf);
                            if (pass == 0) a[v] = a[v] + e;
                            else { const Vec d = e - m[v]; a[v] = at::vec::fmadd(d, d, a[v]); }
                        }
                    for (int64_t v = 0; v < nv; ++v) a[v].store(acc.data() + c0 + v * L);
                }
                for (int64_t g = 0; g < G; ++g) {  // per group, back per channel
                    float t = 0.f;
                    for (int64_t c = g * cg; c < (g + 1) * cg; ++c) t += acc[c];
                    if (pass == 0) {
                        const float m = t * inv_count;
                        for (int64_t c = g * cg; c < (g + 1) * cg; ++c) mc[c] = mean[n * C + c] = m;
                    } else {
                        const float r = 1.f / std::sqrt(t * inv_count + eps);
                        for (int64_t c = g * cg; c < (g + 1) * cg; ++c) scale[n * C + c] = r * w[c];
                    }
                }
            }
        }
    }
}
