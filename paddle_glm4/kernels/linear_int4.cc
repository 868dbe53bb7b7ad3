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
  static constexpr bool kBf16Rows = false;
#if GLM4_X86
  // Weights k0..k0+kb of row n as int8 (nibble - 8), in order. k0 is even (groups are): 16 bytes give 32
  // weights, low and high nibbles interleaved back into order. (The VNNI GEMM's tiles take these.)
  GLM4_AVX2 static void row_i8(const Weights& w, int64_t n, int64_t k0, int64_t kb, int8_t* out) {
    const uint8_t* row = w.data + n * w.row_bytes + k0 / 2;
    const __m128i low = _mm_set1_epi8(0x0F), eight = _mm_set1_epi8(8);
    int64_t k = 0;
    for (; k + 32 <= kb; k += 32) {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k / 2));
      const __m128i lo = _mm_and_si128(b, low), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + k), _mm_sub_epi8(_mm_unpacklo_epi8(lo, hi), eight));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + k + 16), _mm_sub_epi8(_mm_unpackhi_epi8(lo, hi), eight));
    }
    for (; k < kb; ++k) out[k] = static_cast<int8_t>(value(w, n, k0 + k));
  }
  // the same widened to float32
  GLM4_AVX2 static void row_f32(const Weights& w, int64_t n, int64_t k0, int64_t kb, float* out) {
    thread_local std::vector<int8_t> q;
    q.resize(kb + 16);
    row_i8(w, n, k0, kb, q.data());
    int64_t k = 0;
    for (; k + 8 <= kb; k += 8)
      _mm256_storeu_ps(out + k, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                                    reinterpret_cast<const __m128i*>(q.data() + k)))));
    for (; k < kb; ++k) out[k] = static_cast<float>(q[k]);
  }
#endif
};

#if GLM4_X86
// 64 weights (32 bytes) per step: nibbles - 8 as signed bytes, widened to eight vectors of 8 floats.
template <int MR>
GLM4_AVX2 void dot_f32_avx2(const Weights& w, int64_t n, const Acts& a, int64_t m0, float* out) {
  const float* xs[MR];
  row_pointers(a.f, a, m0, xs);
  float total[MR] = {};
  const __m256i low = _mm256_set1_epi8(0x0F), eight = _mm256_set1_epi8(8);
  alignas(32) uint8_t buf[32];
  const RowChunks rc = row_chunks(w, n, 32, buf);
  const bool prefetch = prefetch_all_dots();
  for (int64_t g = 0; g < w.groups; ++g) {
    __m256 acc[MR][2];
    for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    const int64_t end = std::min((g + 1) * w.group / 2, w.row_bytes);
    for (int64_t at = g * w.group / 2; at < end; at += 32) {
      if (prefetch) prefetch_weights<32>(rc, at);
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rc.at(at)));
      for (int half = 0; half < 2; ++half) {  // low nibbles: the even elements; high: the odd ones
        const __m256i nib = half ? _mm256_and_si256(_mm256_srli_epi16(b, 4), low) : _mm256_and_si256(b, low);
        const __m256i q = _mm256_sub_epi8(nib, eight);
        const __m128i q0 = _mm256_castsi256_si128(q), q1 = _mm256_extracti128_si256(q, 1);
        const __m256 wv[4] = {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q0)),
                              _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q0, 8))),
                              _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q1)),
                              _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q1, 8)))};
        for (int i = 0; i < MR; ++i) {
          const float* x = xs[i] + at * 2 + half * 32;
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
// Nibbles are unsigned bytes <= 15, so vpmaddubsw's 16-bit pair sums cannot saturate. Each group's integer
// dot, less 8 sum(x) in one lane (exact, in integers), joins a float vector total, scaled: one reduction per
// row at the end instead of one per group.
template <int MR>
GLM4_AVX2 void dot_i8_avx2(const Weights& w, int64_t n, const Acts& a, int64_t m0, float* out) {
  const int8_t* xs[MR];
  row_pointers(a.q, a, m0, xs);
  __m256 total[MR];
  for (int i = 0; i < MR; ++i) total[i] = _mm256_setzero_ps();
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const float* scales = w.scales + n * w.groups;
  alignas(32) uint8_t buf[32];
  const RowChunks rc = row_chunks(w, n, 32, buf);
  const bool prefetch = prefetch_all_dots();
  for (int64_t g = 0; g < w.groups; ++g) {
    __m256i acc[MR];
    for (int i = 0; i < MR; ++i) acc[i] = _mm256_setzero_si256();
    const int64_t end = std::min((g + 1) * w.group / 2, w.row_bytes);
    for (int64_t at = g * w.group / 2; at < end; at += 32) {
      if (prefetch) prefetch_weights<32>(rc, at);
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rc.at(at)));
      const __m256i lo = _mm256_and_si256(b, low), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low);
      for (int i = 0; i < MR; ++i) {
        const int8_t* x = xs[i] + at * 2;
        const __m256i even = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
        const __m256i odd = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32));
        const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, even), _mm256_maddubs_epi16(hi, odd));
        acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(pairs, ones));
      }
    }
    const __m256 s = _mm256_set1_ps(scales[g]);
    for (int i = 0; i < MR; ++i) {
      const __m256i offset = _mm256_zextsi128_si256(_mm_cvtsi32_si128(8 * a.gsum[(m0 + i) * w.groups + g]));
      total[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(acc[i], offset)), s, total[i]);
    }
  }
  for (int i = 0; i < MR; ++i) out[i] = hsum_avx2(total[i]) * a.scale[m0 + i];
}

// With vpdpbusd, 128 weights (64 bytes) per step: unsigned nibbles times signed activations, low and high
// nibbles in one chain: nibble . x = q . x + 8 sum(x). Each chunk is decoded once for all MR rows; per row
// and group, two vpdpbusd, a conversion and an FMA into a float vector. The 8 sum(x) terms are taken off
// once per row at the end: a vector dot of the channel's group scales with the row's group sums (Acts::gsum8,
// 8 sum(x) per group, exact in float32), so the loop over groups does nothing per group but the dots.
template <int MR>
GLM4_VNNI void dot_i8_vnni(const Weights& w, int64_t n, const Acts& a, int64_t m0, float* out) {
  const int8_t* xs[MR];
  row_pointers(a.q, a, m0, xs);
  __m512 total[MR];
  for (int i = 0; i < MR; ++i) total[i] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi8(0x0F);
  const float* scales = w.scales + n * w.groups;
  alignas(64) uint8_t buf[64];
  const RowChunks rc = row_chunks(w, n, 64, buf);
  for (int64_t g = 0; g < w.groups; ++g) {
    __m512i acc[MR];
    for (int i = 0; i < MR; ++i) acc[i] = _mm512_setzero_si512();
    const int64_t end = std::min((g + 1) * w.group / 2, w.row_bytes);
    for (int64_t at = g * w.group / 2; at < end; at += 64) {
      prefetch_weights(rc, at);
      const __m512i b = _mm512_loadu_si512(rc.at(at));
      const __m512i lo = _mm512_and_si512(b, low), hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), low);
      for (int i = 0; i < MR; ++i) {
        const int8_t* x = xs[i] + at * 2;
        acc[i] = _mm512_dpbusd_epi32(acc[i], lo, _mm512_loadu_si512(x));
        acc[i] = _mm512_dpbusd_epi32(acc[i], hi, _mm512_loadu_si512(x + 64));
      }
    }
    const __m512 s = _mm512_set1_ps(scales[g]);
    for (int i = 0; i < MR; ++i) total[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i]), s, total[i]);
  }
  for (int64_t g = 0; g < w.groups; g += 16) {
    const __mmask16 mask = w.groups - g >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (w.groups - g)) - 1);
    const __m512 s = _mm512_maskz_loadu_ps(mask, scales + g);
    for (int i = 0; i < MR; ++i)
      total[i] = _mm512_fnmadd_ps(s, _mm512_maskz_loadu_ps(mask, a.gsum8.data() + (m0 + i) * w.groups + g), total[i]);
  }
  for (int i = 0; i < MR; ++i) out[i] = _mm512_reduce_add_ps(total[i]) * a.scale[m0 + i];
}
#endif

}  // namespace

Plan plan_int4(int isa, int act, bool use_gemm, int64_t group) {
  Plan p;
  // The float tiles' micro-kernels take one scale per column and block: their blocks are the groups. The int8
  // tiles' one scales each group of a block (groups of whole 4-k units): blocks as large as int8's, so that
  // the per-block work (tile column offsets, the rows' passes) comes as seldom as int8's.
  p.gemm = gemm_plan<Int4Format>(isa, act, group);
  if (p.gemm.tile == kTileI8 && group % 4 == 0) p.gemm.block = group * std::max<int64_t>(1, kBlockK / group);
  p.dots = scalar_dots<Int4Format>();
  p.name = "scalar";
#if GLM4_X86
  if (act == kI8 && isa >= kAvx512Vnni && group % 128 == 0) {
    p.dots = {{dot_i8_vnni<1>, dot_i8_vnni<2>, dot_i8_vnni<3>, dot_i8_vnni<4>, dot_i8_vnni<5>, dot_i8_vnni<6>,
               dot_i8_vnni<7>, dot_i8_vnni<8>},
              8};
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
