// glm4_attention's kernels: causal grouped-query attention over a KV cache held in float32 or bfloat16.
//
// Why a kernel: Paddle's CPU scaled_dot_product_attention builds the whole score matrix [b, h, s, L] and
// repeats each key/value group for its query heads, and a bfloat16 cache had to be widened whole before it.
// Here a task takes one key/value group and a few queries, i.e. all (query, head) rows that read the same
// keys, and walks the keys in blocks: each block is laid out as a small tile (widened to float32, or, for a
// bf16 cache on CPUs with vdpbf16ps, its bf16 pairs as stored), multiplied by the micro-kernels of the linear
// GEMM (common.cc), and folded into the running output by an online softmax. Memory is a few tiles per
// thread whatever s and L are; each key is read once per task. A decode step's keys are split over tasks.
#include "attention.h"
#include "elementwise.h"

namespace glm4 {
namespace {

constexpr int64_t kKeyBlock = 4 * kPanel;  // keys per block: four micro-kernel panels
// (query, head) rows per task: each key tile is made once per task, so the more rows, the fewer tiles per
// FLOP; at 192 (and 128 keys a block) a task's scratch is ~300 KB, within a core's L2
constexpr int64_t kTaskRows = 192;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// The micro-kernels' per-column scales (attention has none).
constexpr float kOnes[kPanel] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
                                 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};

// A bf16 cache's elements from `offset` (in elements) on.
inline const uint16_t* bf16_row(const void* base, int64_t offset) {
  return static_cast<const uint16_t*>(base) + offset;
}

inline void widen_row_scalar(const AttentionArgs& a, const void* base, int64_t offset, float* out) {
  if (a.bf16) {
    const uint16_t* row = bf16_row(base, offset);
    for (int64_t i = 0; i < a.d; ++i) out[i] = bf16_to_float(row[i]);
  } else {
    std::memcpy(out, static_cast<const float*>(base) + offset, sizeof(float) * a.d);
  }
}

inline bool visible(const AttentionArgs& a, int64_t bi, int64_t query_slot, int64_t j) {
  return j <= query_slot && (a.key_valid == nullptr || j == query_slot || a.key_valid[bi * a.valid_stride_b + j]);
}

// ---- The reference --------------------------------------------------------------------------------------
void attention_reference(const AttentionArgs& a, int threads) {
  const int64_t per_group = a.h / a.g;
  const float scale = 1.f / std::sqrt(static_cast<float>(a.d));
  ThreadPool::instance().run(threads, a.b * a.s * a.h, [&](int64_t t) {
    const int64_t bi = t / (a.s * a.h), i = t / a.h % a.s, head = t % a.h, group = head / per_group;
    const int64_t slot = a.start + i, keys = std::min(a.L, slot + 1);
    const float* q = a.q + bi * a.q_stride_b + i * a.q_stride_s + head * a.d;
    std::vector<float> scores(keys), row(a.d), acc(a.d, 0.f);
    float top = -INFINITY;
    for (int64_t j = 0; j < keys; ++j) {
      scores[j] = -INFINITY;
      if (!visible(a, bi, slot, j)) continue;
      widen_row_scalar(a, a.k, bi * a.k_stride_b + j * a.k_stride_s + group * a.d, row.data());
      float dot = 0.f;
      for (int64_t e = 0; e < a.d; ++e) dot += q[e] * row[e];
      scores[j] = dot * scale;
      top = std::max(top, scores[j]);
    }
    float total = 0.f;
    for (int64_t j = 0; j < keys; ++j) {
      if (scores[j] == -INFINITY) continue;
      const float p = std::exp(scores[j] - top);
      total += p;
      widen_row_scalar(a, a.v, bi * a.v_stride_b + j * a.v_stride_s + group * a.d, row.data());
      for (int64_t e = 0; e < a.d; ++e) acc[e] += p * row[e];
    }
    float* out = a.out + ((bi * a.s + i) * a.h + head) * a.d;
    for (int64_t e = 0; e < a.d; ++e) out[e] = acc[e] / total;
  });
}

#if GLM4_X86
// ---- The blocked path -----------------------------------------------------------------------------------
// n values of a key or value row as float32 (n a multiple of 8; bf16 widened by a shift into the high half).
GLM4_AVX2 inline void widen_row_avx2(const AttentionArgs& a, const void* base, int64_t offset, int64_t n,
                                     float* out) {
  if (!a.bf16) {
    std::memcpy(out, static_cast<const float*>(base) + offset, sizeof(float) * n);
    return;
  }
  const uint16_t* row = bf16_row(base, offset);
  for (int64_t e = 0; e < n; e += 8) {
    const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + e));
    _mm256_storeu_ps(out + e, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16)));
  }
}

// Per-thread scratch: packed queries, scores (then probabilities), running output, key and value tiles.
struct Scratch {
  std::vector<float> q, scores, acc, top, total, rows, key_tiles, value_tiles;
  std::vector<uint16_t> q16, p16, key_tiles16, value_tiles16;  // the bf16 dots' operands
};

// What a block of keys goes through, in float32 (the keys widened) or in bfloat16 pairs (a bf16 cache read as
// stored, dotted by vdpbf16ps): a tile of the block's keys, scores = q . keys^T, then acc += p . values.
struct Task {
  const AttentionArgs& a;
  int64_t bi, group, rows, dp;
  Scratch& w;
  int64_t offset(int64_t stride_b, int64_t stride_s, int64_t j) const {
    return bi * stride_b + j * stride_s + group * a.d;
  }
};

// ---- float32 dots
GLM4_AVX2 void pack_q_f32(Task& t, int64_t r, const float* q, float scale) {
  for (int64_t e = 0; e < t.a.d; ++e) t.w.q[r * t.dp + e] = q[e] * scale;
}

GLM4_AVX2 void scores_f32(Task& t, int64_t j0, int64_t nb) {
  const AttentionArgs& a = t.a;
  const int64_t d8 = a.d / 8 * 8;
  for (int64_t jj = 0; jj < nb; ++jj) {  // the block's keys widened: rows [nb][dp], zero past d
    float* out = t.w.rows.data() + jj * t.dp;
    const int64_t offset = t.offset(a.k_stride_b, a.k_stride_s, j0 + jj);
    widen_row_avx2(a, a.k, offset, d8, out);
    for (int64_t e = d8; e < a.d; ++e)
      out[e] = a.bf16 ? bf16_to_float(bf16_row(a.k, offset)[e]) : static_cast<const float*>(a.k)[offset + e];
  }
  for (int p = 0; p * kPanel < nb; ++p) {
    float* tile = t.w.key_tiles.data() + p * t.dp * kPanel;
    transpose32_avx2(reinterpret_cast<const uint32_t*>(t.w.rows.data() + p * kPanel * t.dp), t.dp,
                     std::min(kPanel, nb - p * kPanel), t.dp, reinterpret_cast<uint32_t*>(tile));
    micro_f32_avx2(t.w.q.data(), t.dp, static_cast<int>(t.rows), tile, t.dp, kOnes, t.w.scores.data() + p * kPanel,
                   kKeyBlock);
  }
}

GLM4_AVX2 void accumulate_f32(Task& t, int64_t j0, int64_t nb) {
  const AttentionArgs& a = t.a;
  float* tile = t.w.value_tiles.data();
  for (int64_t c = 0; c < t.dp; c += kPanel) {  // one 32-column panel of values at a time
    const int64_t n = std::max<int64_t>(0, std::min(kPanel, a.d - c)), n8 = n / 8 * 8;
    for (int64_t jj = 0; jj < nb; ++jj) {
      const int64_t offset = t.offset(a.v_stride_b, a.v_stride_s, j0 + jj) + c;
      float* out = tile + jj * kPanel;
      widen_row_avx2(a, a.v, offset, n8, out);
      for (int64_t e = n8; e < kPanel; ++e)
        out[e] = e >= n ? 0.f : a.bf16 ? bf16_to_float(bf16_row(a.v, offset)[e]) : static_cast<const float*>(a.v)[offset + e];
    }
    micro_f32_avx2(t.w.scores.data(), kKeyBlock, static_cast<int>(t.rows), tile, nb, kOnes, t.w.acc.data() + c,
                   t.dp);
  }
}

// ---- bfloat16 dots: q and p rounded to bf16 (half to even), products summed in float32
GLM4_BF16 void pack_q_bf16(Task& t, int64_t r, const float* q, float scale) {
  for (int64_t e = 0; e < t.a.d; ++e) t.w.q16[r * t.a.d + e] = float_to_bf16(q[e] * scale);
}

GLM4_BF16 void scores_bf16(Task& t, int64_t j0, int64_t nb) {
  const AttentionArgs& a = t.a;
  for (int p = 0; p * kPanel < nb; ++p) {
    // a key row's pairs of bf16 are 32-bit units: the cache's rows transposed unit by unit are the tile
    const uint16_t* keys = bf16_row(a.k, t.offset(a.k_stride_b, a.k_stride_s, j0 + p * kPanel));
    uint16_t* tile = t.w.key_tiles16.data() + p * a.d * kPanel;
    transpose32_avx2(reinterpret_cast<const uint32_t*>(keys), a.k_stride_s / 2, std::min(kPanel, nb - p * kPanel),
                     a.d / 2, reinterpret_cast<uint32_t*>(tile));
    micro_bf16_avx512(t.w.q16.data(), a.d, static_cast<int>(t.rows), tile, a.d, kOnes,
                      t.w.scores.data() + p * kPanel, kKeyBlock);
  }
}

GLM4_BF16 void accumulate_bf16(Task& t, int64_t j0, int64_t nb) {
  const AttentionArgs& a = t.a;
  for (int64_t r = 0; r < t.rows; ++r)
    for (int64_t jj = 0; jj < kKeyBlock; jj += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(t.w.p16.data() + r * kKeyBlock + jj),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(t.w.scores.data() + r * kKeyBlock + jj)));
  const int64_t pairs = (nb + 1) / 2;
  uint16_t* tile = t.w.value_tiles16.data();
  for (int64_t c = 0; c < a.d; c += kPanel) {
    // tile [pair of keys][column][2]: two value rows interleaved, 16 columns at a time
    const int64_t n = std::min(kPanel, a.d - c);
    for (int64_t pr = 0; pr < pairs; ++pr) {
      const uint16_t* first = bf16_row(a.v, t.offset(a.v_stride_b, a.v_stride_s, j0 + 2 * pr) + c);
      const uint16_t* second = 2 * pr + 1 < nb ? first + a.v_stride_s : nullptr;
      uint16_t* out = tile + pr * kPanel * 2;
      if (n < kPanel) std::memset(out, 0, sizeof(uint16_t) * kPanel * 2);
      for (int64_t e = 0; e + 16 <= n; e += 16) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(first + e));
        const __m256i y = second ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(second + e))
                                 : _mm256_setzero_si256();
        const __m256i lo = _mm256_unpacklo_epi16(x, y), hi = _mm256_unpackhi_epi16(x, y);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 2 * e), _mm256_permute2x128_si256(lo, hi, 0x20));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 2 * e + 16), _mm256_permute2x128_si256(lo, hi, 0x31));
      }
      for (int64_t e = n / 16 * 16; e < n; ++e) {
        out[2 * e] = first[e];
        out[2 * e + 1] = second ? second[e] : 0;
      }
    }
    micro_bf16_avx512(t.w.p16.data(), kKeyBlock, static_cast<int>(t.rows), tile, nb, kOnes, t.w.acc.data() + c,
                      t.dp);
  }
}

struct Dots {
  void (*pack_q)(Task&, int64_t, const float*, float);
  void (*scores)(Task&, int64_t, int64_t);
  void (*accumulate)(Task&, int64_t, int64_t);
};

// A part's unnormalized result, when a unit's keys are split over several tasks: acc [rows, dp], and per row
// the running maximum and the sum of exp(score - maximum).
struct Partial {
  float* acc;
  float* top;
  float* total;
};

// Rows r = (query i0 + r / per_group, head group * per_group + r % per_group) of batch row bi, over the keys
// key_begin..key_end (a multiple of kKeyBlock..) that they may see: the output rows, or, with `part`, their
// unnormalized partial result.
GLM4_AVX2 void attend_rows(const AttentionArgs& a, int64_t bi, int64_t group, int64_t i0, int64_t i1,
                           int64_t key_begin, int64_t key_end, const Dots& dots, Scratch& w, const Partial* part) {
  const int64_t per_group = a.h / a.g, rows = (i1 - i0) * per_group;
  Task t{a, bi, group, rows, round_up(a.d, kPanel), w};  // dp: the head dim padded to whole panels
  const int64_t dp = t.dp;
  w.q.assign(rows * dp, 0.f);
  w.q16.resize(rows * a.d);
  w.acc.assign(rows * dp, 0.f);
  w.scores.resize(rows * kKeyBlock);
  w.p16.resize(rows * kKeyBlock);
  w.top.assign(rows, -INFINITY);
  w.total.assign(rows, 0.f);
  w.rows.assign(kKeyBlock * dp, 0.f);
  w.key_tiles.resize(kKeyBlock * dp);
  w.value_tiles.resize(kKeyBlock * kPanel);
  w.key_tiles16.resize(kKeyBlock * a.d);
  w.value_tiles16.resize(kKeyBlock * kPanel);
  const float scale = 1.f / std::sqrt(static_cast<float>(a.d));
  for (int64_t r = 0; r < rows; ++r)
    dots.pack_q(t, r, a.q + bi * a.q_stride_b + (i0 + r / per_group) * a.q_stride_s +
                          (group * per_group + r % per_group) * a.d, scale);
  // the last query sees slots up to start + i1 - 1; every query sees at least its own slot
  const int64_t keys = std::min({a.L, a.start + i1, key_end});
  for (int64_t j0 = key_begin; j0 < keys; j0 += kKeyBlock) {
    const int64_t nb = std::min(kKeyBlock, keys - j0);
    std::fill(w.scores.begin(), w.scores.end(), 0.f);
    dots.scores(t, j0, nb);  // scores [rows, kKeyBlock] = q . keys^T
    // masked keys -inf: only blocks that reach past the first query's slot, or any block under key_valid
    const bool whole = a.key_valid == nullptr && j0 + nb - 1 <= a.start + i0;
    for (int64_t r = 0; r < rows; ++r) {
      float* row = w.scores.data() + r * kKeyBlock;
      const int64_t slot = a.start + i0 + r / per_group;
      if (!whole || nb < kKeyBlock)
        for (int64_t jj = 0; jj < kKeyBlock; ++jj)
          if (jj >= nb || (!whole && !visible(a, bi, slot, j0 + jj))) row[jj] = -INFINITY;
      // online softmax: the new running maximum rescales what was summed so far
      __m256 m8 = _mm256_set1_ps(-INFINITY);
      for (int64_t jj = 0; jj < kKeyBlock; jj += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(row + jj));
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, m8);
      const float block_top = *std::max_element(lanes, lanes + 8);
      if (block_top == -INFINITY) {  // nothing visible here (padding): p = 0 everywhere
        std::fill(row, row + kKeyBlock, 0.f);
        continue;
      }
      const float top = std::max(w.top[r], block_top);
      const float carry = w.top[r] == top ? 1.f : w.top[r] == -INFINITY ? 0.f : std::exp(w.top[r] - top);
      const __m256 top8 = _mm256_set1_ps(top);
      __m256 sum8 = _mm256_setzero_ps();
      for (int64_t jj = 0; jj < kKeyBlock; jj += 8) {
        const __m256 p = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(row + jj), top8));
        _mm256_storeu_ps(row + jj, p);
        sum8 = _mm256_add_ps(sum8, p);
      }
      w.total[r] = w.total[r] * carry + hsum_avx2(sum8);
      w.top[r] = top;
      if (carry != 1.f) {
        const __m256 c8 = _mm256_set1_ps(carry);
        float* acc = w.acc.data() + r * dp;
        for (int64_t e = 0; e < dp; e += 8) _mm256_storeu_ps(acc + e, _mm256_mul_ps(c8, _mm256_loadu_ps(acc + e)));
      }
    }
    dots.accumulate(t, j0, nb);  // acc [rows, dp] += p [rows, nb] . values [nb, dp]
  }
  if (part) {
    std::copy(w.acc.begin(), w.acc.begin() + rows * dp, part->acc);
    std::copy(w.top.begin(), w.top.begin() + rows, part->top);
    std::copy(w.total.begin(), w.total.begin() + rows, part->total);
    return;
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* out = a.out + ((bi * a.s + i0 + r / per_group) * a.h + group * per_group + r % per_group) * a.d;
    const float inv = 1.f / w.total[r];
    for (int64_t e = 0; e < a.d; ++e) out[e] = w.acc[r * dp + e] * inv;
  }
}

void attention_blocked(const AttentionArgs& a, int isa, int threads) {
  // a bf16 cache on a CPU with vdpbf16ps: bf16 dots, as the linear kernels' "auto" activations there
  const bool bf16_dots = a.bf16 && isa >= kAvx512Bf16 && a.d % 2 == 0 && a.k_stride_s % 2 == 0 && a.v_stride_s % 2 == 0;
  const Dots dots = bf16_dots ? Dots{pack_q_bf16, scores_bf16, accumulate_bf16}
                              : Dots{pack_q_f32, scores_f32, accumulate_f32};
  const int64_t per_group = a.h / a.g;
  const int64_t queries = std::max<int64_t>(1, kTaskRows / per_group);  // per task
  const int64_t blocks = (a.s + queries - 1) / queries;
  const int64_t units = a.b * a.g * blocks;
  // Few units (a decode step: batch x groups) over many keys: each unit's keys are split into parts, so that
  // every thread has work and a core slowed by other work on the machine does not hold the step up; the parts'
  // partial softmaxes are merged below. Parts of at least kSplitKeys keys, at most kPartsPerThread per thread.
  constexpr int64_t kSplitKeys = 8 * kKeyBlock, kPartsPerThread = 4;
  const int64_t span = std::min(a.L, a.start + a.s);
  const int64_t parts = std::max<int64_t>(1, std::min((kPartsPerThread * threads + units - 1) / units,
                                                      span / kSplitKeys));
  // A short job (a decode step over a short context: GLM-4's 2 units of 16 rows over a few hundred keys, tens
  // of microseconds) runs on the calling thread: waking the pool's worker after the Python between two
  // operators (more than its spin) cost more than the job. Measured in a 2-layer decode step at ~40 keys:
  // 0.12-0.14 ms per call on one thread, 0.20-0.23 ms on two.
  if (units * span < kSplitKeys) threads = 1;
  if (parts == 1) {
    // the last query blocks see the most keys: handed out first, so that no thread is left with a long one
    ThreadPool::instance().run(threads, units, [&](int64_t t) {
      thread_local Scratch scratch;
      const int64_t block = blocks - 1 - t / (a.b * a.g), bi = t % (a.b * a.g) / a.g, group = t % a.g;
      attend_rows(a, bi, group, block * queries, std::min(a.s, (block + 1) * queries), 0, a.L, dots, scratch,
                  nullptr);
    });
    return;
  }
  const int64_t rows = queries * per_group, dp = round_up(a.d, kPanel);
  const int64_t part_keys = round_up((span + parts - 1) / parts, kKeyBlock);
  std::vector<float> acc(units * parts * rows * dp), top(units * parts * rows), total(units * parts * rows);
  const auto partial = [&](int64_t unit, int64_t p) {
    const int64_t at = unit * parts + p;
    return Partial{acc.data() + at * rows * dp, top.data() + at * rows, total.data() + at * rows};
  };
  ThreadPool::instance().run(threads, units * parts, [&](int64_t t) {
    thread_local Scratch scratch;
    const int64_t unit = t / parts, p = t % parts;
    const int64_t block = unit / (a.b * a.g), bi = unit % (a.b * a.g) / a.g, group = unit % a.g;
    const Partial out = partial(unit, p);
    std::fill(out.top, out.top + rows, -INFINITY);  // a part past a unit's last key stays empty
    std::fill(out.total, out.total + rows, 0.f);
    std::fill(out.acc, out.acc + rows * dp, 0.f);
    attend_rows(a, bi, group, block * queries, std::min(a.s, (block + 1) * queries), p * part_keys,
                (p + 1) * part_keys, dots, scratch, &out);
  });
  // merged: out = sum_p acc_p e^(top_p - top) / sum_p total_p e^(top_p - top), top the largest top_p
  for (int64_t unit = 0; unit < units; ++unit) {
    const int64_t block = unit / (a.b * a.g), bi = unit % (a.b * a.g) / a.g, group = unit % a.g;
    const int64_t i0 = block * queries, n = (std::min(a.s, i0 + queries) - i0) * per_group;
    for (int64_t r = 0; r < n; ++r) {
      float best = -INFINITY;
      for (int64_t p = 0; p < parts; ++p) best = std::max(best, partial(unit, p).top[r]);
      float sum = 0.f;
      float* out = a.out + ((bi * a.s + i0 + r / per_group) * a.h + group * per_group + r % per_group) * a.d;
      std::fill(out, out + a.d, 0.f);
      for (int64_t p = 0; p < parts; ++p) {
        const Partial part = partial(unit, p);
        if (part.top[r] == -INFINITY) continue;
        const float weight = std::exp(part.top[r] - best);
        sum += part.total[r] * weight;
        for (int64_t e = 0; e < a.d; ++e) out[e] += part.acc[r * dp + e] * weight;
      }
      for (int64_t e = 0; e < a.d; ++e) out[e] /= sum;
    }
  }
}
#endif

}  // namespace

void attention(const AttentionArgs& a, int isa, int threads) {
  if (a.b == 0 || a.s == 0 || a.h == 0) return;
#if GLM4_X86
  if (isa >= kAvx2) return attention_blocked(a, isa, threads);
#endif
  attention_reference(a, threads);
}

}  // namespace glm4
