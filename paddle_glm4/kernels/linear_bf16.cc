// y = x @ W^T (+ bias) with W bfloat16 [N, K]: the published dtype, no conversion loss.
// Paths: scalar reference; AVX2+FMA (weights widened to float32, activations float32 or rounded to bf16);
// AVX-512 BF16 (vdpbf16ps: activations rounded to bf16, products summed in float32).
#include "common.h"

namespace glm4 {
namespace {

struct Bf16Format {
  static float value(const Weights& w, int64_t n, int64_t k) {
    uint16_t bits;
    std::memcpy(&bits, w.data + n * w.row_bytes + 2 * k, 2);
    return bf16_to_float(bits);
  }
  static float scale(const Weights&, int64_t, int64_t) { return 1.f; }
  static constexpr bool kBf16Rows = true;
#if GLM4_X86
  GLM4_AVX2 static void row_f32(const Weights& w, int64_t n, int64_t k0, int64_t kb, float* out) {
    const uint16_t* row = reinterpret_cast<const uint16_t*>(w.data + n * w.row_bytes) + k0;
    int64_t k = 0;
    for (; k + 8 <= kb; k += 8) {
      const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k)));
      _mm256_storeu_ps(out + k, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
    }
    for (; k < kb; ++k) out[k] = bf16_to_float(row[k]);
  }
#endif
};

#if GLM4_X86
// 16 weights per step (two vectors of 8), widened: a bf16 is the high half of a float32.
template <int MR>
GLM4_AVX2 void dot_f32_avx2(const Weights& w, int64_t n, const Acts& a, int64_t m0, float* out) {
  const float* xs[MR];
  row_pointers(a.f, a, m0, xs);
  __m256 acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  alignas(32) uint8_t buf[32];
  const RowChunks rc = row_chunks(w, n, 32, buf);
  for (int64_t at = 0; at < w.row_bytes; at += 32) {
    prefetch_weights<32>(rc, at);
    const uint8_t* p = rc.at(at);
    const __m256i lo = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256i hi = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)));
    const __m256 w0 = _mm256_castsi256_ps(_mm256_slli_epi32(lo, 16));
    const __m256 w1 = _mm256_castsi256_ps(_mm256_slli_epi32(hi, 16));
    for (int i = 0; i < MR; ++i) {
      const float* x = xs[i] + at / 2;
      acc[i][0] = _mm256_fmadd_ps(_mm256_loadu_ps(x), w0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(_mm256_loadu_ps(x + 8), w1, acc[i][1]);
    }
  }
  for (int i = 0; i < MR; ++i) out[i] = hsum_avx2(_mm256_add_ps(acc[i][0], acc[i][1]));
}

// 32 weights per step: vdpbf16ps multiplies pairs of bf16 and adds both products to a float32 lane. Two
// accumulators per row, alternating steps: one chain would wait on vdpbf16ps's latency.
template <int MR>
GLM4_BF16 void dot_bf16_avx512(const Weights& w, int64_t n, const Acts& a, int64_t m0, float* out) {
  const uint16_t* xs[MR];
  row_pointers(a.b, a, m0, xs);
  __m512 acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  alignas(64) uint8_t buf[64];
  const RowChunks rc = row_chunks(w, n, 64, buf);
  const bool prefetch = prefetch_all_dots();
  int64_t at = 0;
  for (; at + 128 <= rc.full; at += 128) {
    if (prefetch) prefetch_weights<128>(rc, at);
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(rc.row + at);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(rc.row + at + 64);
    for (int i = 0; i < MR; ++i) {
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], (__m512bh)_mm512_loadu_si512(xs[i] + at / 2), w0);
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], (__m512bh)_mm512_loadu_si512(xs[i] + at / 2 + 32), w1);
    }
  }
  for (; at < w.row_bytes; at += 64) {
    const __m512bh wv = (__m512bh)_mm512_loadu_si512(rc.at(at));
    for (int i = 0; i < MR; ++i)
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], (__m512bh)_mm512_loadu_si512(xs[i] + at / 2), wv);
  }
  for (int i = 0; i < MR; ++i) out[i] = _mm512_reduce_add_ps(_mm512_add_ps(acc[i][0], acc[i][1]));
}
#endif

}  // namespace

Plan plan_bf16(int isa, int act, bool use_gemm, int64_t) {
  Plan p;
  p.gemm = gemm_plan<Bf16Format>(isa, act, kBlockK);
  p.dots = scalar_dots<Bf16Format>();
  p.name = "scalar";
#if GLM4_X86
  if (isa >= kAvx512Bf16 && act == kBf16) {
    // two rows per pass: four rows of bf16 activations (8 KB each at K = 4096) would fill L1 (measured: 4
    // rows of gate_up in 21-26 ms as 2 + 2, 30-38 ms as 4, one thread)
    p.dots = {{dot_bf16_avx512<1>, dot_bf16_avx512<2>}, 2};
    p.bf16_bits = true;
    p.name = "avx512bf16";
  } else if (isa >= kAvx2) {
    p.dots = {{dot_f32_avx2<1>, dot_f32_avx2<2>, dot_f32_avx2<3>, dot_f32_avx2<4>}};
    p.name = "avx2";
  }
#endif
  (void)use_gemm;
  return p;
}

}  // namespace glm4
