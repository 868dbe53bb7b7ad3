// The operators outside the linear layers and attention (elementwise.cc): SwiGLU, RMSNorm with an optional
// residual add before it, the token embedding's and the rotary tables' lookups, the rotary embedding of the
// fused qkv projection's queries and keys, and the sampler's argmax and log-sum-exp of the logits. Each is
// one pass over its rows, on every core; the SIMD path (AVX2) beside a scalar reference that computes the
// same operations in the same order as the model's Paddle ops (ops.py), so that they agree to the last bit
// where the order allows it (the exps of swiglu and logsumexp are the exception: about 1 ulp).
#pragma once

#include "common.h"

namespace glm4 {

#if GLM4_X86
// exp(x) for float32 lanes: x = n ln2 + r, |r| <= ln2 / 2, exp(r) by its degree-6 minimax polynomial (Cephes'
// expf constants), 2^n put in the exponent bits. About 1 ulp; lanes below -87.3 (and -inf) give exactly 0.
GLM4_AVX2 inline __m256 exp_avx2(__m256 x) {
  const __m256 underflow = _mm256_cmp_ps(x, _mm256_set1_ps(-87.33654f), _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.33654f)), _mm256_set1_ps(88.37626f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(underflow, _mm256_mul_ps(y, _mm256_castsi256_ps(bits)));
}
#endif

// y [M, F] = silu(x[:, :F]) * x[:, F:] for x [M, 2F] (GLM-4's gate_up projection: gate, then up).
void swiglu(const float* x, int64_t M, int64_t F, float* y, int isa, int threads);

// sum = x + residual (residual may be null: then the norm is of x and sum is not written);
// y = sum * rsqrt(mean(sum^2) + eps) * weight, per row of H. x, residual, y, sum [M, H] contiguous.
void rms_norm(const float* x, const float* residual, const float* weight, int64_t M, int64_t H, float eps,
              float* y, float* sum, int isa, int threads);

// The fused qkv projection's output [M, (h + 2g) d] split into q [M, h, d], k [M, g, d], v [M, g, d], the
// first r dims of every query and key head rotated on interleaved pairs by the row's tables cos, signed_sin
// [M, r] (ops.rotary_tables: x * cos + pair-swapped x * signed_sin).
struct RotaryArgs {
  const float* qkv;
  const float* cos;
  const float* sin;
  float *q, *k, *v;
  int64_t M, h, g, d, r;
};
void split_rotary(const RotaryArgs& a, int isa, int threads);

// The sampler's statistics of each row of x [M, V] (the logits), in one call: index[m], the position of the
// row's largest value (the first, on ties, as paddle.argmax), lse[m] = log(sum(exp(x[m]))), computed as
// top + log(sum(exp(x - top))) with the sum in double (a row of -inf gives -inf, one holding +inf gives +inf),
// and log_prob[m] = top - lse[m], the greedy token's log-probability.
void argmax_logsumexp(const float* x, int64_t M, int64_t V, int64_t* index, float* log_prob, float* lse, int isa,
                      int threads);

// The rotary tables of M tokens, cos and signed sin [M, r], copied from the rows `positions` [M] of tables
// [P, r] that ops.rotary_tables built for positions 0 .. P - 1 (so they equal its result to the bit; a position
// outside [0, P) is the caller's to refuse). Paddle's sin and cos are SLEEF's, which a kernel cannot call.
void rotary_lookup(const int64_t* positions, int64_t M, const float* cos_table, const float* sin_table, int64_t r,
                   float* cos, float* sin);

// The token embedding's rows `ids` [M] (each in 0 .. N - 1: the caller checks) of a table held as a Linear
// weight of N output rows, `w` (bf16, int8 or int4, as the linear kernels take them) -> out [M, K] float32:
// bf16 widened, int8 / int4 dequantized as quantization.Packed.rows does (q as float32 times its scale, one
// multiplication). One loop: a decode step looks up one row.
enum class TableKind { kBf16, kInt8, kInt4 };
void embedding(const Weights& w, TableKind kind, const int64_t* ids, int64_t M, float* out);

}  // namespace glm4
