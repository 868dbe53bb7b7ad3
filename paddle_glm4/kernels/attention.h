// Causal attention over a KV cache in bounded memory (attention.cc): the operator glm4_attention.
#pragma once

#include "common.h"

namespace glm4 {

// One call: queries [b, s, h, d] over the first L slots of a cache [b, C, g, d] (C >= L), h a multiple of g
// (grouped-query attention: query head i reads key/value group i / (h / g)). Query i sits at slot start + i
// and sees slot j when j <= start + i and (key_valid is null, or key_valid[j] of its row, or j is its own slot).
// Strides are in elements; the last two dimensions of q, k and v are contiguous ([h or g, d]).
struct AttentionArgs {
  const float* q;
  int64_t q_stride_b, q_stride_s;
  const void* k;  // float32 or bfloat16 bits (`bf16`)
  const void* v;
  bool bf16;
  int64_t k_stride_b, k_stride_s, v_stride_b, v_stride_s;
  const bool* key_valid;  // [b, L] (rows `valid_stride_b` apart), or null
  int64_t valid_stride_b;
  float* out;             // [b, s, h, d], contiguous
  int64_t b, s, h, g, d, L, start;
};

// isa: kScalar runs the reference (each query's scores over every key it sees, then one softmax: the plainest
// order); kAvx2 and better run the blocked path (blocks of keys widened to float32 one at a time, an online
// softmax, AVX2 micro-kernels), whose memory does not grow with L.
void attention(const AttentionArgs& a, int isa, int threads);

}  // namespace glm4
