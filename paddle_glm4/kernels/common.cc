// The GEMM driver and its micro-kernels, and one linear from activations to outputs (no Paddle here: the
// operators are in ops.cc).
#include "common.h"

#include <dlfcn.h>

namespace glm4 {

// ---- Micro-kernels ---------------------------------------------------------------------------------------
void micro_f32_scalar(const float* a, int64_t lda, int mr, const float* tile, int64_t kb, const float* colscale,
                      float* c, int64_t ldc) {
  for (int i = 0; i < mr; ++i) {
    float acc[kPanel] = {};
    for (int64_t k = 0; k < kb; ++k)
      for (int64_t j = 0; j < kPanel; ++j) acc[j] += a[i * lda + k] * tile[k * kPanel + j];
    for (int64_t j = 0; j < kPanel; ++j) c[i * ldc + j] += acc[j] * colscale[j];
  }
}

#if GLM4_X86
// 6 rows x 16 columns per pass (12 accumulators of 8 floats), two passes per 32-column panel.
template <int MR>
GLM4_AVX2 static void micro_f32_avx2_rows(const float* a, int64_t lda, const float* tile, int64_t kb,
                                          const float* colscale, float* c, int64_t ldc) {
  for (int half = 0; half < 2; ++half) {
    const float* b = tile + half * 16;
    __m256 acc[MR][2];
    for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    for (int64_t k = 0; k < kb; ++k) {
      const __m256 b0 = _mm256_loadu_ps(b + k * kPanel), b1 = _mm256_loadu_ps(b + k * kPanel + 8);
      for (int i = 0; i < MR; ++i) {
        const __m256 av = _mm256_broadcast_ss(a + i * lda + k);
        acc[i][0] = _mm256_fmadd_ps(av, b0, acc[i][0]);
        acc[i][1] = _mm256_fmadd_ps(av, b1, acc[i][1]);
      }
    }
    const __m256 s0 = _mm256_loadu_ps(colscale + half * 16), s1 = _mm256_loadu_ps(colscale + half * 16 + 8);
    for (int i = 0; i < MR; ++i) {
      float* ci = c + i * ldc + half * 16;
      _mm256_storeu_ps(ci, _mm256_fmadd_ps(acc[i][0], s0, _mm256_loadu_ps(ci)));
      _mm256_storeu_ps(ci + 8, _mm256_fmadd_ps(acc[i][1], s1, _mm256_loadu_ps(ci + 8)));
    }
  }
}

void micro_f32_avx2(const float* a, int64_t lda, int mr, const float* tile, int64_t kb, const float* colscale,
                    float* c, int64_t ldc) {
  static void (*const rows[])(const float*, int64_t, const float*, int64_t, const float*, float*, int64_t) = {
      micro_f32_avx2_rows<1>, micro_f32_avx2_rows<2>, micro_f32_avx2_rows<3>,
      micro_f32_avx2_rows<4>, micro_f32_avx2_rows<5>, micro_f32_avx2_rows<6>};
  for (int i = 0; i < mr; i += 6) {
    const int r = std::min(6, mr - i);
    rows[r - 1](a + i * lda, lda, tile, kb, colscale, c + i * ldc, ldc);
  }
}

// 8 rows x 32 columns (16 accumulators of 16 floats); each step takes a pair of k (vdpbf16ps).
template <int MR>
GLM4_BF16 static void micro_bf16_rows(const uint16_t* a, int64_t lda, const uint16_t* tile, int64_t kb,
                                      const float* colscale, float* c, int64_t ldc) {
  __m512 acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  const int64_t pairs = (kb + 1) / 2;
  for (int64_t p = 0; p < pairs; ++p) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(tile + p * kPanel * 2);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(tile + p * kPanel * 2 + 32);
    for (int i = 0; i < MR; ++i) {
      uint32_t pair;
      std::memcpy(&pair, a + i * lda + 2 * p, 4);
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], av, b0);
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], av, b1);
    }
  }
  const __m512 s0 = _mm512_loadu_ps(colscale), s1 = _mm512_loadu_ps(colscale + 16);
  for (int i = 0; i < MR; ++i) {
    float* ci = c + i * ldc;
    _mm512_storeu_ps(ci, _mm512_fmadd_ps(acc[i][0], s0, _mm512_loadu_ps(ci)));
    _mm512_storeu_ps(ci + 16, _mm512_fmadd_ps(acc[i][1], s1, _mm512_loadu_ps(ci + 16)));
  }
}

void micro_bf16_avx512(const uint16_t* a, int64_t lda, int mr, const uint16_t* tile, int64_t kb,
                       const float* colscale, float* c, int64_t ldc) {
  static void (*const rows[])(const uint16_t*, int64_t, const uint16_t*, int64_t, const float*, float*,
                              int64_t) = {micro_bf16_rows<1>, micro_bf16_rows<2>, micro_bf16_rows<3>,
                                          micro_bf16_rows<4>, micro_bf16_rows<5>, micro_bf16_rows<6>,
                                          micro_bf16_rows<7>, micro_bf16_rows<8>};
  for (int i = 0; i < mr; i += 8) {
    const int r = std::min(8, mr - i);
    rows[r - 1](a + i * lda, lda, tile, kb, colscale, c + i * ldc, ldc);
  }
}

// vpdpbusd as inline assembly: with the intrinsic, GCC 12 copied each accumulator through another register
// around every vpdpbusd in the micro-kernel's loop and kept two of the sixteen on the stack (perf annotate:
// ~34 moves and two spills per 16 vpdpbusd); the assembly updates the accumulator in place.
GLM4_VNNI static inline __m512i dpbusd(__m512i acc, __m512i u8, __m512i s8) {
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "vm"(s8));
  return acc;
}

// 8 rows x 32 columns (16 accumulators of 16 int32); each step takes four k (vpdpbusd: four unsigned
// activation bytes times four signed weights, summed into each lane). The block holds groups of `group` k,
// each with its own column scales (int4's groups; int8's block is one group): each group's integer sums
// start at its column offsets (-128 times the column's sum: the activations' + 128 taken back out), and
// are scaled into C when the group ends.
template <int MR>
GLM4_VNNI static void micro_i8_rows(const int8_t* a, int64_t lda, const int8_t* tile, int64_t kb, int64_t group,
                                    const float* colscale, const int32_t* coloff, float* c, int64_t ldc) {
  for (int64_t g0 = 0; g0 < kb; g0 += group, colscale += kPanel, coloff += kPanel) {
    const __m512i off0 = _mm512_loadu_si512(coloff), off1 = _mm512_loadu_si512(coloff + 16);
    __m512i acc[MR][2];
    for (int i = 0; i < MR; ++i) acc[i][0] = off0, acc[i][1] = off1;
    const int64_t q1 = g0 / 4 + tile_units<int8_t>(std::min(group, kb - g0));
    for (int64_t q = g0 / 4; q < q1; ++q) {
      const __m512i b0 = _mm512_loadu_si512(tile + q * kPanel * 4);
      const __m512i b1 = _mm512_loadu_si512(tile + q * kPanel * 4 + 64);
      for (int i = 0; i < MR; ++i) {
        int32_t quad;
        std::memcpy(&quad, a + i * lda + 4 * q, 4);
        const __m512i av = _mm512_set1_epi32(quad);
        acc[i][0] = dpbusd(acc[i][0], av, b0);
        acc[i][1] = dpbusd(acc[i][1], av, b1);
      }
    }
    const __m512 s0 = _mm512_loadu_ps(colscale), s1 = _mm512_loadu_ps(colscale + 16);
    for (int i = 0; i < MR; ++i) {
      float* ci = c + i * ldc;
      _mm512_storeu_ps(ci, _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][0]), s0, _mm512_loadu_ps(ci)));
      _mm512_storeu_ps(ci + 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][1]), s1, _mm512_loadu_ps(ci + 16)));
    }
  }
}

// coloff[j] = -128 times the sum of the int8 tile's column j (units of four k): one vpdpbusd with ones per
// 16 columns and unit.
GLM4_VNNI void tile_offsets_vnni(const int8_t* tile, int64_t units, int32_t* coloff) {
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
  for (int64_t u = 0; u < units; ++u) {
    s0 = dpbusd(s0, ones, _mm512_loadu_si512(tile + u * kPanel * 4));
    s1 = dpbusd(s1, ones, _mm512_loadu_si512(tile + u * kPanel * 4 + 64));
  }
  _mm512_storeu_si512(coloff, _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(s0, 7)));
  _mm512_storeu_si512(coloff + 16, _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(s1, 7)));
}

void micro_i8_vnni(const int8_t* a, int64_t lda, int mr, const int8_t* tile, int64_t kb, int64_t group,
                   const float* colscale, const int32_t* coloff, float* c, int64_t ldc) {
  static void (*const rows[])(const int8_t*, int64_t, const int8_t*, int64_t, int64_t, const float*,
                              const int32_t*, float*, int64_t) = {
      micro_i8_rows<1>, micro_i8_rows<2>, micro_i8_rows<3>, micro_i8_rows<4>,
      micro_i8_rows<5>, micro_i8_rows<6>, micro_i8_rows<7>, micro_i8_rows<8>};
  for (int i = 0; i < mr; i += 8) {
    const int r = std::min(8, mr - i);
    rows[r - 1](a + i * lda, lda, tile, kb, group, colscale, coloff, c + i * ldc, ldc);
  }
}
#endif

// ---- Tiles ---------------------------------------------------------------------------------------------
#if GLM4_X86
// tile[u][j] = rows[j][u] for j < nr (0 beyond), u < units; rows of `stride` units.
GLM4_AVX2 void transpose32_avx2(const uint32_t* rows, int64_t stride, int64_t nr, int64_t units, uint32_t* tile) {
  for (int64_t u0 = 0; u0 < units; u0 += 8) {
    for (int64_t c0 = 0; c0 < kPanel; c0 += 8) {
      if (u0 + 8 > units || c0 + 8 > nr) {
        for (int64_t u = u0; u < std::min(units, u0 + 8); ++u)
          for (int64_t j = c0; j < c0 + 8; ++j) tile[u * kPanel + j] = j < nr ? rows[j * stride + u] : 0;
        continue;
      }
      __m256 r[8], t[8];
      for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(reinterpret_cast<const float*>(rows + (c0 + i) * stride + u0));
      for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
      }
      for (int i = 0; i < 8; i += 4) {
        r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
      }
      for (int i = 0; i < 4; ++i) {
        float* lo = reinterpret_cast<float*>(tile + (u0 + i) * kPanel + c0);
        float* hi = reinterpret_cast<float*>(tile + (u0 + i + 4) * kPanel + c0);
        _mm256_storeu_ps(lo, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
        _mm256_storeu_ps(hi, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
      }
    }
  }
}
#endif

// ---- GEMM driver -----------------------------------------------------------------------------------------
constexpr int kGemmRows = 24;         // rows per pass over a task's tiles: a multiple of every register block
constexpr int64_t kTaskPanels = 4;    // panels per task: each block's activation rows are reused from L1 this
                                      // many times

// The driver's micro-kernel: the float ones take one scale group per block and no column offsets.
template <class T>
using MicroFn = void (*)(const T* a, int64_t lda, int mr, const T* tile, int64_t kb, int64_t group,
                         const float* colscale, const int32_t* coloff, float* c, int64_t ldc);

template <class T, void (*Micro)(const T*, int64_t, int, const T*, int64_t, const float*, float*, int64_t)>
static void one_group(const T* a, int64_t lda, int mr, const T* tile, int64_t kb, int64_t, const float* colscale,
                      const int32_t*, float* c, int64_t ldc) {
  Micro(a, lda, mr, tile, kb, colscale, c, ldc);
}

template <class T>
static void gemm_tiles(const Weights& w, const Acts& a, const T* acts, int64_t block, DecodeFn<T> decode,
                       MicroFn<T> micro, const float* bias, float* y, int threads) {
  const int64_t panels = (w.N + kPanel - 1) / kPanel, tasks = (panels + kTaskPanels - 1) / kTaskPanels;
  const int64_t tile_size = tile_units<T>(block) * kPerUnit<T> * kPanel;
  const bool int8 = !a.q.empty();  // outputs are scaled by the row's activation scale at the end
  // scale groups of a block (see gemm_block): int4's groups where the block holds several, else the block
  const int64_t group = std::min(w.group, block), block_groups = (block + group - 1) / group;
  ThreadPool::instance().run(threads, tasks, [&](int64_t t) {
    const int64_t p0 = t * kTaskPanels, np = std::min(kTaskPanels, panels - p0);
    thread_local std::vector<T> tiles;
    tiles.resize(np * tile_size);
    thread_local std::vector<float> colscale;  // [panel][group of the block][kPanel]
    thread_local std::vector<int32_t> coloff;
    colscale.resize(np * block_groups * kPanel);
    coloff.resize(np * block_groups * kPanel);
    // the task's outputs accumulate in a buffer of its own, rows of np panels: in y, rows are N floats apart
    // (107 KB for gate_up), and 512 of them spread over as many pages
    const int64_t ldc = np * kPanel;
    thread_local std::vector<float> out;
    out.assign(a.M * ldc, 0.f);
    int64_t n0[kTaskPanels], nr[kTaskPanels];
    for (int64_t p = 0; p < np; ++p) {
      n0[p] = (p0 + p) * kPanel, nr[p] = std::min(kPanel, w.N - n0[p]);
      if (bias && !int8)
        for (int64_t m = 0; m < a.M; ++m)
          for (int64_t j = 0; j < nr[p]; ++j) out[m * ldc + p * kPanel + j] = bias[n0[p] + j];
    }
    for (int64_t k0 = 0; k0 < w.K; k0 += block) {
      const int64_t kb = std::min(block, w.K - k0);
      for (int64_t p = 0; p < np; ++p) {
        T* tile = tiles.data() + p * tile_size;
        decode(w, n0[p], nr[p], k0, kb, tile, colscale.data() + p * block_groups * kPanel);
#if GLM4_X86
        if (int8)
          for (int64_t g0 = 0; g0 < kb; g0 += group)
            tile_offsets_vnni(reinterpret_cast<const int8_t*>(tile) + g0 * kPanel,
                              tile_units<int8_t>(std::min(group, kb - g0)),
                              coloff.data() + (p * block_groups + g0 / group) * kPanel);
#endif
      }
      for (int64_t m0 = 0; m0 < a.M; m0 += kGemmRows) {
        const int mr = static_cast<int>(std::min<int64_t>(kGemmRows, a.M - m0));
        const T* rows = acts + a.block_start(m0, k0);
        for (int64_t p = 0; p < np; ++p)
          micro(rows, a.bstride, mr, tiles.data() + p * tile_size, kb, group,
                colscale.data() + p * block_groups * kPanel, coloff.data() + p * block_groups * kPanel,
                out.data() + m0 * ldc + p * kPanel, ldc);
      }
    }
    const int64_t width = std::min(w.N, p0 * kPanel + ldc) - p0 * kPanel;
    for (int64_t m = 0; m < a.M; ++m) {
      const float* from = out.data() + m * ldc;
      float* to = y + m * w.N + p0 * kPanel;
      if (!int8) {
        std::memcpy(to, from, sizeof(float) * width);
        continue;
      }
      for (int64_t j = 0; j < width; ++j) to[j] = from[j] * a.scale[m] + (bias ? bias[p0 * kPanel + j] : 0.f);
    }
  });
}

void gemm(const Weights& w, const Acts& a, const GemmPlan& plan, const float* bias, float* y, int threads) {
  const int64_t block = gemm_block(plan, w.K);
#if GLM4_X86
  if (plan.tile == kTileI8)
    return gemm_tiles<int8_t>(w, a, a.q.data(), block, plan.decode_i8, micro_i8_vnni, bias, y, threads);
  if (plan.tile == kTileBf16)
    return gemm_tiles<uint16_t>(w, a, a.b.data(), block, plan.decode_bf16,
                                one_group<uint16_t, micro_bf16_avx512>, bias, y, threads);
  if (plan.isa >= kAvx2)
    return gemm_tiles<float>(w, a, a.f.data(), block, plan.decode_f32, one_group<float, micro_f32_avx2>,
                             bias, y, threads);
#endif
  gemm_tiles<float>(w, a, a.f.data(), block, plan.decode_f32, one_group<float, micro_f32_scalar>,
                    bias, y, threads);
}

// ---- One linear ------------------------------------------------------------------------------------------
// Paddle's CPU wheel runs its own parallel ops on Intel's OpenMP runtime (libiomp5), whose workers spin for
// KMP_BLOCKTIME (200 ms by default) after every parallel region: between the few small Paddle ops of a decode
// step they never sleep, and they take the cores this pool computes on (perf of a 2-layer int4 decode: 18-28%
// of the process's samples in libiomp5's spin loop, 53-56% in the GEMV; with a block time of 0, none and
// 76-80%). So a thread that runs these kernels sets its OpenMP block time to 0 (the runtime keeps it per
// thread, inherited by the teams that thread starts), once; a KMP_BLOCKTIME the user set is left alone. A
// float32 model (MKL's GEMM on that team) never calls this: there the spinning workers are the ones that
// compute (2-layer float32 decode, alternated: 7.3-8.3 tokens/s with a block time of 0, 7.7-11.5 without).
static void stop_openmp_spinning() {
  thread_local bool done = false;
  if (done) return;
  done = true;
  const char* user = std::getenv("KMP_BLOCKTIME");
  if (user && *user) return;
  using SetBlocktime = void (*)(int);
  static const auto set = reinterpret_cast<SetBlocktime>(dlsym(RTLD_DEFAULT, "kmp_set_blocktime"));
  if (set) set(0);
}

const char* linear(const float* x, int64_t M, const Weights& w, const float* bias, float* y, int isa, int act,
                   bool use_gemm, bool int_weights, int threads, Planner planner) {
  stop_openmp_spinning();
  const Plan plan = planner(isa, act, use_gemm, w.group);
  const Acts acts = use_gemm ? prepare_acts(x, M, w.K, act, plan.gemm.tile == kTileBf16, 0, 0, true,
                                            gemm_block(plan.gemm, w.K), isa, threads)
                             : prepare_acts(x, M, w.K, act, plan.bf16_bits, plan.perm, int_weights ? w.group : 0,
                                            plan.biased, 0, isa, threads);
  if (use_gemm)
    gemm(w, acts, plan.gemm, bias, y, threads);
  else
    gemv(w, acts, plan.dots, bias, y, threads);
  return plan.name;
}

const char* linear(const float* x, int64_t M, const LinearWeights& l, float* y, int isa, int act, int threads) {
  if (act < 0) act = auto_act(isa, l.int_weights, M);
  bool use_gemm = M > kGemvMaxRows;
  if (act == kI8 && (isa < kAvx512Vnni || M <= kInt8GemvMaxRows)) use_gemm = false;
  return linear(x, M, l.w, l.bias, y, isa, act, use_gemm, l.int_weights, threads, l.planner);
}

}  // namespace glm4
