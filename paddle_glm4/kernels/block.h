// One GLM-4 transformer block in one call (block.cc): the operator glm4_block.
//
// Decoding a token runs each layer's dozen small operators one after another, and between two of them the
// Python and Paddle dispatch cost ~40-300 us (their data falls out of the caches while a GEMV streams its
// weights): ~0.7 ms a layer, more than the norms, rotary and attention themselves. Here the layer's steps
// follow each other in C++, each the very function its own operator calls, in the same order on the same
// rows: the result is the per-operator forward's, bit for bit.
#pragma once

#include "attention.h"
#include "common.h"

namespace glm4 {

// x + attention(norm(x)), then + mlp(norm(.)): model.GLM4Block.forward.
struct BlockArgs {
  const float* x;  // [b, s, H], contiguous
  int64_t b, s, H;
  int64_t keep;    // > 0: only the last `keep` positions' queries, attention, output projection and MLP run
                   // (every key and value is still written), and only they are written to `out`
  const float *input_norm, *post_norm;  // [H]
  float eps;
  LinearWeights qkv, o, gate_up, down;  // [H] -> [(h + 2g) d] -> attention -> [h d] -> [H]; [H] -> [2F] -> [F] -> [H]
  int64_t h, g, d;
  const float *cos, *sin;  // the rotary tables, [b * s, r] (ops.rotary_tables)
  int64_t r;
  // The KV cache of this layer, [B >= b, C, g, d] each (rows `cache_stride_b`, slots `cache_stride_s` elements
  // apart): the new keys and values are written at slots start .. start + s of rows 0 .. b - 1 (rounded to
  // bfloat16, half to even, when `bf16`), then attention reads the first L slots (see AttentionArgs).
  void *k_cache, *v_cache;
  bool bf16;
  int64_t cache_stride_b, cache_stride_s, capacity;
  int64_t start, L;
  const bool* key_valid;  // [b, L], or null
  int64_t valid_stride_b;
  float* out;  // [b, keep or s, H]
};

// act: the Linear layers' activation dtype (kF32, kBf16, kI8; < 0: auto, as the linear operators pick).
void block(const BlockArgs& a, int isa, int act, int threads);

}  // namespace glm4
