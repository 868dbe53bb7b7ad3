// y = x @ W^T (+ bias) with W int4 weight-only: qweight uint8 [N, ceil(K/2)] (element 2j in the low nibble
// of byte j, 2j+1 in the high one, stored as q + 8), scales float32 [N, ceil(K/G)]; w = (nibble - 8) * scale.
// Paths: scalar reference (any group size); AVX2+FMA with float32 activations; with int8 activations,
// AVX2 (vpmaddubsw) and AVX-512 VNNI (vpdpbusd). The SIMD dots split each loaded chunk of bytes into its
// low nibbles (the chunk's even elements) and high nibbles (its odd ones), so they read activations
// stored in that order (Acts::perm), and they need groups of whole chunks: G a multiple of 64 (VNNI: 128);
// other group sizes take the scalar path.
#include "common.h"

namespace glm4 {
namespace {

struct Int4Format {
  static float value(const Weights& w, int64_t n, int64_t k) {
    const uint8_t byte = w.data[n * w.row_bytes + k / 2];
    return static_cast<float>(((k & 1) ? byte >> 4 : byte & 0x0F) - 8);
  }
  static float scale(const Weights& w, int64_t n, int64_t k) { return w.scales[n * w.groups + k / w.group]; }
};

#if GLM4_X86
// 64 weights (32 bytes) per step: nibbles - 8 as signed bytes, widened to eight vectors of 8 floats.
template <int MR>
GLM4_AVX2 void dot_f32_avx2(const Weights& w, int64_t n, const Acts& a, int64_t m0, float* out) {
  float total[MR] = {};
  const __m256i low = _mm256_set1_epi8(0x0F), eight = _mm256_set1_epi8(8);
  alignas(32) uint8_t buf[32];
  for (int64_t g = 0; g < w.groups; ++g) {
    __m256 acc[MR][2];
    for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    const int64_t end = std::min((g + 1) * w.group / 2, w.row_bytes);
    for (int64_t at = g * w.group / 2; at < end; at += 32) {
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk_at(w, n, at, 32, buf)));
      for (int half = 0; half < 2; ++half) {  // low nibbles: the even elements; high: the odd ones
        const __m256i nib = half ? _mm256_and_si256(_mm256_srli_epi16(b, 4), low) : _mm256_and_si256(b, low);
        const __m256i q = _mm256_sub_epi8(nib, eight);
        const __m128i q0 = _mm256_castsi256_si128(q), q1 = _mm256_extracti128_si256(q, 1);
        const __m256 wv[4] = {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q0)),
                              _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q0, 8))),
                              _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q1)),
                              _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q1, 8)))};
        for (int i = 0; i < MR; ++i) {
          const float* x = a.f.data() + (m0 + i) * a.Kp + at * 2 + half * 32;
          for (int j = 0; j < 4; ++j) acc[i][j & 1] = _mm256_fmadd_ps(_mm256_loadu_ps(x + 8 * j), wv[j], acc[i][j & 1]);
        }
      }
    }
    const float s = w.scales[n * w.groups + g];
    for (int i = 0; i < MR; ++i) total[i] += hsum_avx2(_mm256_add_ps(acc[i][0], acc[i][1])) * s;
  }
  for (int i = 0; i < MR; ++i) out[i] = total[i];
}

// With int8 activations x: sum (nibble - 8) x = nibble . x - 8 sum(x), the group sums of x precomputed.
// Nibbles are unsigned bytes <= 15, so vpmaddubsw's 16-bit pair sums cannot saturate.
template <int MR>
GLM4_AVX2 void dot_i8_avx2(const Weights& w, int64_t n, const Acts& a, int64_t m0, float* out) {
  float total[MR] = {};
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  alignas(32) uint8_t buf[32];
  for (int64_t g = 0; g < w.groups; ++g) {
    __m256i acc[MR];
    for (int i = 0; i < MR; ++i) acc[i] = _mm256_setzero_si256();
    const int64_t end = std::min((g + 1) * w.group / 2, w.row_bytes);
    for (int64_t at = g * w.group / 2; at < end; at += 32) {
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk_at(w, n, at, 32, buf)));
      const __m256i lo = _mm256_and_si256(b, low), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low);
      for (int i = 0; i < MR; ++i) {
        const int8_t* x = a.q.data() + (m0 + i) * a.Kp + at * 2;
        const __m256i even = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
        const __m256i odd = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32));
        const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, even), _mm256_maddubs_epi16(hi, odd));
        acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(pairs, ones));
      }
    }
    const float s = w.scales[n * w.groups + g];
    for (int i = 0; i < MR; ++i)
      total[i] += static_cast<float>(hsum_epi32_avx2(acc[i]) - 8 * a.gsum[(m0 + i) * w.groups + g]) * s;
  }
  for (int i = 0; i < MR; ++i) out[i] = total[i] * a.scale[m0 + i];
}

// The same with vpdpbusd on 128 weights (64 bytes) per step.
template <int MR>
GLM4_VNNI void dot_i8_vnni(const Weights& w, int64_t n, const Acts& a, int64_t m0, float* out) {
  float total[MR] = {};
  const __m512i low = _mm512_set1_epi8(0x0F);
  alignas(64) uint8_t buf[64];
  for (int64_t g = 0; g < w.groups; ++g) {
    __m512i acc[MR];
    for (int i = 0; i < MR; ++i) acc[i] = _mm512_setzero_si512();
    const int64_t end = std::min((g + 1) * w.group / 2, w.row_bytes);
    for (int64_t at = g * w.group / 2; at < end; at += 64) {
      const __m512i b = _mm512_loadu_si512(chunk_at(w, n, at, 64, buf));
      const __m512i lo = _mm512_and_si512(b, low), hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), low);
      for (int i = 0; i < MR; ++i) {
        const int8_t* x = a.q.data() + (m0 + i) * a.Kp + at * 2;
        acc[i] = _mm512_dpbusd_epi32(acc[i], lo, _mm512_loadu_si512(x));
        acc[i] = _mm512_dpbusd_epi32(acc[i], hi, _mm512_loadu_si512(x + 64));
      }
    }
    const float s = w.scales[n * w.groups + g];
    for (int i = 0; i < MR; ++i)
      total[i] += static_cast<float>(_mm512_reduce_add_epi32(acc[i]) - 8 * a.gsum[(m0 + i) * w.groups + g]) * s;
  }
  for (int i = 0; i < MR; ++i) out[i] = total[i] * a.scale[m0 + i];
}
#endif

}  // namespace

Plan plan_int4(int isa, int act, bool use_gemm, int64_t group) {
  Plan p;
  p.gemm = gemm_plan<Int4Format>(isa, act, group);  // k blocks are the groups: one scale per column each
  p.dots = scalar_dots<Int4Format>();
  p.name = "scalar";
#if GLM4_X86
  if (act == kI8 && isa >= kAvx512Vnni && group % 128 == 0) {
    p.dots = {{dot_i8_vnni<1>, dot_i8_vnni<2>, dot_i8_vnni<3>, dot_i8_vnni<4>}};
    p.perm = 128;
    p.name = "avx512vnni";
  } else if (isa >= kAvx2 && group % 64 == 0) {
    if (act == kI8)
      p.dots = {{dot_i8_avx2<1>, dot_i8_avx2<2>, dot_i8_avx2<3>, dot_i8_avx2<4>}};
    else
      p.dots = {{dot_f32_avx2<1>, dot_f32_avx2<2>, dot_f32_avx2<3>, dot_f32_avx2<4>}};
    p.perm = 64;
    p.name = "avx2";
  }
#endif
  (void)use_gemm;
  return p;
}

}  // namespace glm4
