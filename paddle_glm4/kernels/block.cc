// One transformer block in one call; see block.h.
#include "block.h"

#include "elementwise.h"

namespace glm4 {

namespace {

// The new keys or values [b, s, g, d] into their cache slots, in the cache's dtype.
void store_in_cache(const BlockArgs& a, const float* rows, void* cache) {
  const int64_t width = a.g * a.d;
  for (int64_t i = 0; i < a.b; ++i)
    for (int64_t j = 0; j < a.s; ++j) {
      const float* src = rows + (i * a.s + j) * width;
      const int64_t at = i * a.cache_stride_b + (a.start + j) * a.cache_stride_s;
      if (a.bf16) {
        uint16_t* dst = static_cast<uint16_t*>(cache) + at;
        for (int64_t e = 0; e < width; ++e) dst[e] = float_to_bf16(src[e]);
      } else {
        std::memcpy(static_cast<float*>(cache) + at, src, width * sizeof(float));
      }
    }
}

// Rows of the last `keep` positions of each of b sequences of s rows [b, s, width], moved to the front.
void keep_last(float* rows, int64_t b, int64_t s, int64_t keep, int64_t width) {
  for (int64_t i = 0; i < b; ++i)
    std::memmove(rows + i * keep * width, rows + (i * s + s - keep) * width, keep * width * sizeof(float));
}

}  // namespace

void block(const BlockArgs& a, int isa, int act, int threads) {
  const int64_t M = a.b * a.s, H = a.H, hd = a.h * a.d, gd = a.g * a.d, F = a.down.w.K;
  const int64_t kept = a.keep > 0 ? a.keep : a.s, Mk = a.b * kept;
  // the intermediates, kept between calls (a decode step's are ~0.3 MB a row)
  thread_local std::vector<float> buffer;
  buffer.resize(M * (H + (hd + 2 * gd) + hd + 2 * gd + hd + H + H) + Mk * (2 * F + F + H));
  float* normed = buffer.data();          // [M, H]
  float* qkv = normed + M * H;            // [M, (h + 2g) d]
  float* q = qkv + M * (hd + 2 * gd);     // [M, h d]
  float* k = q + M * hd;                  // [M, g d]
  float* v = k + M * gd;                  // [M, g d]
  float* attended = v + M * gd;           // [Mk, h d]
  float* projected = attended + M * hd;   // [Mk, H]
  float* residual = projected + M * H;    // [M, H]: x, then x + attention
  float* gate_up = residual + M * H;      // [Mk, 2F]
  float* activated = gate_up + Mk * 2 * F;  // [Mk, F]
  float* mlp = activated + Mk * F;        // [Mk, H]

  rms_norm(a.x, nullptr, a.input_norm, M, H, a.eps, normed, nullptr, isa, threads);
  linear(normed, M, a.qkv, qkv, isa, act, threads);
  split_rotary(RotaryArgs{qkv, a.cos, a.sin, q, k, v, M, a.h, a.g, a.d, a.r}, isa, threads);
  store_in_cache(a, k, a.k_cache);
  store_in_cache(a, v, a.v_cache);

  // with `keep`, the queries, attention and output projection of the kept positions alone (nothing after
  // attention mixes positions; every key and value is written above)
  AttentionArgs at{};
  at.q = q + (a.s - kept) * hd, at.q_stride_b = a.s * hd, at.q_stride_s = hd;
  at.k = a.k_cache, at.v = a.v_cache, at.bf16 = a.bf16;
  at.k_stride_b = at.v_stride_b = a.cache_stride_b;
  at.k_stride_s = at.v_stride_s = a.cache_stride_s;
  at.key_valid = a.key_valid, at.valid_stride_b = a.valid_stride_b;
  at.out = attended;
  at.b = a.b, at.s = kept, at.h = a.h, at.g = a.g, at.d = a.d, at.L = a.L, at.start = a.start + a.s - kept;
  attention(at, isa, threads);
  linear(attended, Mk, a.o, projected, isa, act, threads);

  std::memcpy(residual, a.x, M * H * sizeof(float));
  if (kept < a.s) keep_last(residual, a.b, a.s, kept, H);
  // the residual add and the norm in one pass (as glm4_add_rms_norm): normed = norm(x + attention), the sum
  // written over the residual (each element is read before it is written)
  rms_norm(projected, residual, a.post_norm, Mk, H, a.eps, normed, residual, isa, threads);
  linear(normed, Mk, a.gate_up, gate_up, isa, act, threads);
  swiglu(gate_up, Mk, F, activated, isa, threads);
  linear(activated, Mk, a.down, mlp, isa, act, threads);
  for (int64_t i = 0; i < Mk * H; ++i) a.out[i] = residual[i] + mlp[i];
}

}  // namespace glm4
