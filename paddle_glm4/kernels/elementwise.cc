// The operators between the linear layers (see elementwise.h): glm4_swiglu, glm4_rms_norm, glm4_add_rms_norm
// and glm4_split_rotary; and after the last one, the sampler's glm4_argmax_logsumexp.
//
// Why kernels: Paddle runs each of these as several single-threaded ops (its swiglu alone took ~24 ms per layer
// of a 512-token prefill at GLM-4-9B's width, on one core), and in a decode step every op is a dispatch of a
// few microseconds for a few microseconds of work, 10-20 of them per layer. Here each is one call, one pass
// over its rows, rows split over the cores when there are enough of them.
//
// The SIMD paths are AVX2 only: these passes read and write each element once, so wider vectors would not
// make them faster than the memory (the linear kernels' AVX-512 paths are for their dot products).
#include "elementwise.h"

// A product and a sum stay two roundings (GCC would fuse them into an FMA in the AVX2 functions), as in the
// scalar path and in Paddle's ops: the rotary embedding then equals ops.apply_rotary's to the bit.
#pragma GCC optimize("fp-contract=off")

namespace glm4 {
namespace {

// Rows per task: at least this many elements, so that a decode step's single row is not split (waking a
// thread costs more than the row).
constexpr int64_t kTaskElements = 1 << 15;

// fn(first, last) over the rows [0, M) of `width` elements each, in tasks over `threads` threads.
template <class Fn>
void for_rows(int64_t M, int64_t width, int threads, const Fn& fn) {
  const int64_t per_task = std::max<int64_t>(1, kTaskElements / std::max<int64_t>(1, width));
  const int64_t tasks = (M + per_task - 1) / per_task;
  ThreadPool::instance().run(threads, tasks,
                             [&](int64_t t) { fn(t * per_task, std::min(M, (t + 1) * per_task)); });
}

// ---- SwiGLU ---------------------------------------------------------------------------------------------
inline float silu(float g) { return g / (1.f + std::exp(-g)); }

void swiglu_row_scalar(const float* x, int64_t F, float* y) {
  for (int64_t j = 0; j < F; ++j) y[j] = silu(x[j]) * x[F + j];
}

// ---- RMSNorm --------------------------------------------------------------------------------------------
// The sum of squares in double (so that both paths, and any order, give the same float mean); the rest in
// float, as ops.rms_norm: x * rsqrt(mean + eps), then times the weight.
inline float inverse_rms(double squares, int64_t H, float eps) {
  return 1.f / std::sqrt(static_cast<float>(squares / static_cast<double>(H)) + eps);
}

// The row to normalize: x itself, or x + residual written to `sum`.
const float* add_row_scalar(const float* x, const float* residual, int64_t H, float* sum) {
  if (residual == nullptr) return x;
  for (int64_t j = 0; j < H; ++j) sum[j] = x[j] + residual[j];
  return sum;
}

void rms_norm_row_scalar(const float* x, const float* residual, const float* weight, int64_t H, float eps,
                         float* y, float* sum) {
  const float* s = add_row_scalar(x, residual, H, sum);
  double squares = 0.0;
  for (int64_t j = 0; j < H; ++j) squares += static_cast<double>(s[j]) * s[j];
  const float inv = inverse_rms(squares, H, eps);
  for (int64_t j = 0; j < H; ++j) y[j] = s[j] * inv * weight[j];
}

// ---- Rotary ---------------------------------------------------------------------------------------------
// One head of d values: pairs (x0, x1) of the first r dims -> (x0 cos0 + x1 sin0, x1 cos1 + x0 sin1) with
// the tables' signed sine (sin0 = -sin, sin1 = +sin), the rest copied.
void rotate_head_scalar(const float* x, const float* cos, const float* sin, int64_t d, int64_t r, float* out) {
  for (int64_t j = 0; j < r; ++j) out[j] = x[j] * cos[j] + x[j ^ 1] * sin[j];
  std::copy(x + r, x + d, out + r);
}

using RotateHead = void (*)(const float*, const float*, const float*, int64_t, int64_t, float*);

void split_rotary_rows(const RotaryArgs& a, int64_t first, int64_t last, RotateHead rotate) {
  const int64_t width = (a.h + 2 * a.g) * a.d;
  for (int64_t m = first; m < last; ++m) {
    const float* row = a.qkv + m * width;
    const float *cos = a.cos + m * a.r, *sin = a.sin + m * a.r;
    for (int64_t i = 0; i < a.h; ++i) rotate(row + i * a.d, cos, sin, a.d, a.r, a.q + (m * a.h + i) * a.d);
    for (int64_t i = 0; i < a.g; ++i)
      rotate(row + (a.h + i) * a.d, cos, sin, a.d, a.r, a.k + (m * a.g + i) * a.d);
    std::copy(row + (a.h + a.g) * a.d, row + width, a.v + m * a.g * a.d);
  }
}

// ---- The sampler's argmax and log-sum-exp -----------------------------------------------------------------
// Paddle's logsumexp took ~1.1 ms on GLM-4's 151552 logits (one core, a libm exp per element), its argmax
// ~0.13 ms, and the greedy step's log-probabilities subtracted the result from the whole row, an op large
// enough that Paddle ran it on its OpenMP team, whose idle thread then spun beside the linear kernels' workers.
// A row of V ends as: top = its largest value (at index), lse = top + log(sum_j exp(x_j - top)).
float logsumexp_from(float top, double sum) {
  if (std::isinf(top)) return top;  // -inf everywhere (nothing possible), or an infinite logit
  return static_cast<float>(static_cast<double>(top) + std::log(sum));
}

// The first position of the largest of x[0, n) (n >= 1), and that value.
void argmax_scalar(const float* x, int64_t n, int64_t* index, float* top) {
  int64_t best = 0;
  for (int64_t j = 1; j < n; ++j)
    if (x[j] > x[best]) best = j;
  *index = best;
  *top = x[best];
}

double sum_exp_scalar(const float* x, int64_t n, float top) {
  double sum = 0.0;
  for (int64_t j = 0; j < n; ++j) sum += std::exp(x[j] - top);
  return sum;
}

#if GLM4_X86
// ---- AVX2 -----------------------------------------------------------------------------------------------
GLM4_AVX2 void swiglu_row_avx2(const float* x, int64_t F, float* y) {
  const __m256 one = _mm256_set1_ps(1.f), zero = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= F; j += 8) {
    const __m256 g = _mm256_loadu_ps(x + j);
    const __m256 e = exp_avx2(_mm256_sub_ps(zero, g));  // exp(-g)
    _mm256_storeu_ps(y + j, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), _mm256_loadu_ps(x + F + j)));
  }
  for (; j < F; ++j) y[j] = silu(x[j]) * x[F + j];
}

GLM4_AVX2 inline double sum_pd(__m256d v) {
  const __m128d pair = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
  return _mm_cvtsd_f64(_mm_add_sd(pair, _mm_unpackhi_pd(pair, pair)));
}

GLM4_AVX2 void rms_norm_row_avx2(const float* x, const float* residual, const float* weight, int64_t H, float eps,
                                 float* y, float* sum) {
  const float* s = x;
  if (residual != nullptr) {
    int64_t j = 0;
    for (; j + 8 <= H; j += 8)
      _mm256_storeu_ps(sum + j, _mm256_add_ps(_mm256_loadu_ps(x + j), _mm256_loadu_ps(residual + j)));
    for (; j < H; ++j) sum[j] = x[j] + residual[j];
    s = sum;
  }
  __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();
  int64_t j = 0;
  for (; j + 8 <= H; j += 8) {
    const __m256 v = _mm256_loadu_ps(s + j);
    const __m256d a = _mm256_cvtps_pd(_mm256_castps256_ps128(v)), b = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
    lo = _mm256_fmadd_pd(a, a, lo);
    hi = _mm256_fmadd_pd(b, b, hi);
  }
  double squares = sum_pd(_mm256_add_pd(lo, hi));
  for (; j < H; ++j) squares += static_cast<double>(s[j]) * s[j];
  const float inv = inverse_rms(squares, H, eps);
  const __m256 inv8 = _mm256_set1_ps(inv);
  for (j = 0; j + 8 <= H; j += 8)
    _mm256_storeu_ps(y + j, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(s + j), inv8), _mm256_loadu_ps(weight + j)));
  for (; j < H; ++j) y[j] = s[j] * inv * weight[j];
}

GLM4_AVX2 void rotate_head_avx2(const float* x, const float* cos, const float* sin, int64_t d, int64_t r,
                                float* out) {
  int64_t j = 0;
  for (; j + 8 <= r; j += 8) {
    const __m256 v = _mm256_loadu_ps(x + j);
    const __m256 swapped = _mm256_permute_ps(v, 0xB1);  // (x1, x0, x3, x2, ...)
    _mm256_storeu_ps(out + j, _mm256_add_ps(_mm256_mul_ps(v, _mm256_loadu_ps(cos + j)),
                                            _mm256_mul_ps(swapped, _mm256_loadu_ps(sin + j))));
  }
  for (; j < r; ++j) out[j] = x[j] * cos[j] + x[j ^ 1] * sin[j];
  std::copy(x + r, x + d, out + r);
}

GLM4_AVX2 void argmax_avx2(const float* x, int64_t n, int64_t* index, float* top) {
  // per lane: the largest value seen and where (the first of equals: only a strictly larger value replaces it)
  __m256 top8 = _mm256_set1_ps(-INFINITY);
  __m256i at8 = _mm256_setzero_si256();
  __m256i j8 = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i step = _mm256_set1_epi32(8);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {  // n < 2^31 (the operator checks): indices fit the lanes
    const __m256 v = _mm256_loadu_ps(x + j);
    const __m256 larger = _mm256_cmp_ps(v, top8, _CMP_GT_OQ);
    top8 = _mm256_blendv_ps(top8, v, larger);
    at8 = _mm256_blendv_epi8(at8, j8, _mm256_castps_si256(larger));
    j8 = _mm256_add_epi32(j8, step);
  }
  alignas(32) float tops[8];
  alignas(32) int32_t ats[8];
  _mm256_store_ps(tops, top8);
  _mm256_store_si256(reinterpret_cast<__m256i*>(ats), at8);
  int64_t best = 0;  // x[0] when no lane saw a larger value than -inf (n < 8, or every value -inf)
  float value = x[0];
  for (int lane = 0; lane < 8; ++lane)
    if (tops[lane] > value || (tops[lane] == value && ats[lane] < best)) value = tops[lane], best = ats[lane];
  for (; j < n; ++j)
    if (x[j] > value) value = x[j], best = j;
  *index = best;
  *top = value;
}

GLM4_AVX2 double sum_exp_avx2(const float* x, int64_t n, float top) {
  const __m256 top_lanes = _mm256_set1_ps(top);
  __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + j), top_lanes));
    lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
    hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
  }
  double sum = sum_pd(_mm256_add_pd(lo, hi));
  for (; j < n; ++j) sum += std::exp(x[j] - top);
  return sum;
}
#endif

}  // namespace

void swiglu(const float* x, int64_t M, int64_t F, float* y, int isa, int threads) {
  auto row = swiglu_row_scalar;
#if GLM4_X86
  if (isa >= kAvx2) row = swiglu_row_avx2;
#endif
  for_rows(M, 3 * F, threads, [&](int64_t first, int64_t last) {
    for (int64_t m = first; m < last; ++m) row(x + m * 2 * F, F, y + m * F);
  });
}

void rms_norm(const float* x, const float* residual, const float* weight, int64_t M, int64_t H, float eps,
              float* y, float* sum, int isa, int threads) {
  auto row = rms_norm_row_scalar;
#if GLM4_X86
  if (isa >= kAvx2) row = rms_norm_row_avx2;
#endif
  for_rows(M, 3 * H, threads, [&](int64_t first, int64_t last) {
    for (int64_t m = first; m < last; ++m)
      row(x + m * H, residual ? residual + m * H : nullptr, weight, H, eps, y + m * H, sum ? sum + m * H : nullptr);
  });
}

void split_rotary(const RotaryArgs& a, int isa, int threads) {
  RotateHead rotate = rotate_head_scalar;
#if GLM4_X86
  if (isa >= kAvx2) rotate = rotate_head_avx2;
#endif
  for_rows(a.M, 2 * (a.h + 2 * a.g) * a.d, threads,
           [&](int64_t first, int64_t last) { split_rotary_rows(a, first, last, rotate); });
}

void argmax_logsumexp(const float* x, int64_t M, int64_t V, int64_t* index, float* log_prob, float* lse, int isa,
                      int threads) {
  auto argmax = argmax_scalar;
  auto sum_exp = sum_exp_scalar;
#if GLM4_X86
  if (isa >= kAvx2) argmax = argmax_avx2, sum_exp = sum_exp_avx2;
#endif
  // A row per task: splitting batch 1's row over the threads (a piece of it each) took no less time in a decode
  // step (~0.21 ms either way, the logits just written by the lm_head's threads), only in a hot loop.
  for_rows(M, V, threads, [&](int64_t first, int64_t last) {
    for (int64_t m = first; m < last; ++m) {
      float top;
      argmax(x + m * V, V, &index[m], &top);
      lse[m] = logsumexp_from(top, std::isinf(top) ? 0.0 : sum_exp(x + m * V, V, top));
      log_prob[m] = top - lse[m];  // one float subtraction, as Paddle's of the chosen logit
    }
  });
}

void rotary_lookup(const int64_t* positions, int64_t M, const float* cos_table, const float* sin_table, int64_t r,
                   float* cos, float* sin) {
  for (int64_t m = 0; m < M; ++m) {
    std::copy(cos_table + positions[m] * r, cos_table + (positions[m] + 1) * r, cos + m * r);
    std::copy(sin_table + positions[m] * r, sin_table + (positions[m] + 1) * r, sin + m * r);
  }
}

}  // namespace glm4

namespace glm4 {

void embedding(const Weights& w, TableKind kind, const int64_t* ids, int64_t M, float* out) {
  for (int64_t m = 0; m < M; ++m) {
    const uint8_t* row = w.data + ids[m] * w.row_bytes;
    float* y = out + m * w.K;
    if (kind == TableKind::kBf16) {
      const uint16_t* bits = reinterpret_cast<const uint16_t*>(row);
      for (int64_t k = 0; k < w.K; ++k) y[k] = bf16_to_float(bits[k]);
    } else if (kind == TableKind::kInt8) {
      const int8_t* q = reinterpret_cast<const int8_t*>(row);
      const float scale = w.scales[ids[m]];
      for (int64_t k = 0; k < w.K; ++k) y[k] = static_cast<float>(q[k]) * scale;
    } else {  // element 2j in the low nibble of byte j, 2j+1 in the high one, each stored as q + 8
      const float* scales = w.scales + ids[m] * w.groups;
      for (int64_t k = 0; k < w.K; ++k) {
        const int nibble = k % 2 ? row[k / 2] >> 4 : row[k / 2] & 15;
        y[k] = static_cast<float>(nibble - 8) * scales[k / w.group];
      }
    }
  }
}

}  // namespace glm4
