// y = x @ W^T (+ bias) with W int8 weight-only: q int8 [N, K], scale float32 [N], w = q * scale.
// Paths: scalar reference; AVX2+FMA with float32 activations (q widened); with int8 activations, AVX2
// (vpmaddubsw on |q| and the activations given q's sign) and AVX-512 VNNI (vpdpbusd on activations
// shifted to unsigned, corrected by the row's weight sum).
#include "common.h"

namespace glm4 {
namespace {

struct Int8Format {
  static float value(const Weights& w, int64_t n, int64_t k) {
    return static_cast<float>(static_cast<int8_t>(w.data[n * w.row_bytes + k]));
  }
  static float scale(const Weights& w, int64_t n, int64_t) { return w.scales[n]; }
  static constexpr bool kBf16Rows = false;
#if GLM4_X86
  GLM4_AVX2 static void row_f32(const Weights& w, int64_t n, int64_t k0, int64_t kb, float* out) {
    const int8_t* row = reinterpret_cast<const int8_t*>(w.data + n * w.row_bytes) + k0;
    int64_t k = 0;
    for (; k + 8 <= kb; k += 8) {
      const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k));
      _mm256_storeu_ps(out + k, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)));
    }
    for (; k < kb; ++k) out[k] = static_cast<float>(row[k]);
  }
  static void row_i8(const Weights& w, int64_t n, int64_t k0, int64_t kb, int8_t* out) {
    std::memcpy(out, w.data + n * w.row_bytes + k0, kb);
  }
#endif
};

#if GLM4_X86
template <int MR>
GLM4_AVX2 void dot_f32_avx2(const Weights& w, int64_t n, const Acts& a, int64_t m0, float* out) {
  const float* xs[MR];
  row_pointers(a.f, a, m0, xs);
  __m256 acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  alignas(16) uint8_t buf[16];
  const RowChunks rc = row_chunks(w, n, 16, buf);
  for (int64_t at = 0; at < w.row_bytes; at += 16) {
    const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rc.at(at)));
    const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
    const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q, 8)));
    for (int i = 0; i < MR; ++i) {
      const float* x = xs[i] + at;
      acc[i][0] = _mm256_fmadd_ps(_mm256_loadu_ps(x), w0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(_mm256_loadu_ps(x + 8), w1, acc[i][1]);
    }
  }
  for (int i = 0; i < MR; ++i) out[i] = hsum_avx2(_mm256_add_ps(acc[i][0], acc[i][1])) * w.scales[n];
}

// q.x = |q| . (x with q's sign): unsigned x signed bytes, as vpmaddubsw needs; |q|, |x| <= 127 so the
// pairwise 16-bit sums cannot saturate.
template <int MR>
GLM4_AVX2 void dot_i8_avx2(const Weights& w, int64_t n, const Acts& a, int64_t m0, float* out) {
  const int8_t* xs[MR];
  row_pointers(a.q, a, m0, xs);
  __m256i acc[MR];
  for (int i = 0; i < MR; ++i) acc[i] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  alignas(32) uint8_t buf[32];
  const RowChunks rc = row_chunks(w, n, 32, buf);
  for (int64_t at = 0; at < w.row_bytes; at += 32) {
    prefetch_weights<32>(rc, at);
    const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rc.at(at)));
    const __m256i aq = _mm256_abs_epi8(q);
    for (int i = 0; i < MR; ++i) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xs[i] + at));
      const __m256i pairs = _mm256_maddubs_epi16(aq, _mm256_sign_epi8(x, q));
      acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(pairs, ones));
    }
  }
  for (int i = 0; i < MR; ++i)
    out[i] = static_cast<float>(hsum_epi32_avx2(acc[i])) * w.scales[n] * a.scale[m0 + i];
}

// vpdpbusd wants unsigned x signed bytes: the activations come as x + 128 (Acts::biased), and
// (x + 128) . q = x . q + 128 * sum(q), sum(q) one more vpdpbusd per 64 weights shared by every row. Each
// weight chunk is loaded once for all MR rows: per row and 64 weights, one vpdpbusd.
template <int MR>
GLM4_VNNI void dot_i8_vnni(const Weights& w, int64_t n, const Acts& a, int64_t m0, float* out) {
  const int8_t* xs[MR];
  row_pointers(a.q, a, m0, xs);
  __m512i acc[MR];
  for (int i = 0; i < MR; ++i) acc[i] = _mm512_setzero_si512();
  __m512i qsum = _mm512_setzero_si512();
  const __m512i ones = _mm512_set1_epi8(1);
  alignas(64) uint8_t buf[64];
  const RowChunks rc = row_chunks(w, n, 64, buf);
  const bool prefetch = prefetch_all_dots();
  for (int64_t at = 0; at < w.row_bytes; at += 64) {
    if (prefetch) prefetch_weights(rc, at);
    const __m512i q = _mm512_loadu_si512(rc.at(at));
    qsum = _mm512_dpbusd_epi32(qsum, ones, q);
    for (int i = 0; i < MR; ++i) acc[i] = _mm512_dpbusd_epi32(acc[i], _mm512_loadu_si512(xs[i] + at), q);
  }
  const int32_t offset = 128 * _mm512_reduce_add_epi32(qsum);
  for (int i = 0; i < MR; ++i)
    out[i] = static_cast<float>(_mm512_reduce_add_epi32(acc[i]) - offset) * w.scales[n] * a.scale[m0 + i];
}
#endif

}  // namespace

Plan plan_int8(int isa, int act, bool use_gemm, int64_t) {
  Plan p;
  p.gemm = gemm_plan<Int8Format>(isa, act, kBlockK);
  p.dots = scalar_dots<Int8Format>();
  p.name = "scalar";
#if GLM4_X86
  if (act == kI8 && isa >= kAvx512Vnni) {
    p.dots = {{dot_i8_vnni<1>, dot_i8_vnni<2>, dot_i8_vnni<3>, dot_i8_vnni<4>, dot_i8_vnni<5>, dot_i8_vnni<6>,
               dot_i8_vnni<7>, dot_i8_vnni<8>},
              8};
    p.biased = true;
    p.name = "avx512vnni";
  } else if (act == kI8 && isa >= kAvx2) {
    p.dots = {{dot_i8_avx2<1>, dot_i8_avx2<2>, dot_i8_avx2<3>, dot_i8_avx2<4>}};
    p.name = "avx2";
  } else if (isa >= kAvx2) {
    p.dots = {{dot_f32_avx2<1>, dot_f32_avx2<2>, dot_f32_avx2<3>, dot_f32_avx2<4>}};
    p.name = "avx2";
  }
#endif
  (void)use_gemm;
  return p;
}

}  // namespace glm4
