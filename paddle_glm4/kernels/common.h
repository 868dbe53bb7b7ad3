// Shared machinery of the linear kernels (linear_bf16.cc, linear_int8.cc, linear_int4.cc): which SIMD
// path runs, a small thread pool, how activations are rounded, and the two drivers every format uses —
// a GEMV driver for a few rows (each weight byte read once, dotted with every row) and a GEMM driver for
// many rows (weight tiles decoded into a cache-sized panel, multiplied by a register-blocked micro-kernel).
//
// Each SIMD function is compiled for its instruction set with __attribute__((target)), so one build serves
// every x86-64 CPU; which one runs is decided at run time from the CPU's flags. Outside x86-64 only the
// scalar reference paths are compiled.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <unistd.h>
#if defined(__linux__)
#include <sched.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#define GLM4_X86 1
#include <immintrin.h>
#define GLM4_AVX2 __attribute__((target("avx2,fma,f16c")))
#define GLM4_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")))
#define GLM4_VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
#define GLM4_BF16 \
  __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16")))
#else
#define GLM4_X86 0
#endif

namespace glm4 {

// ---- Paths -----------------------------------------------------------------------------------------------
// Ordered: each level's CPUs have every lower level's instructions (true of every CPU with AVX-512 BF16).
enum Isa { kScalar = 0, kAvx2 = 1, kAvx512Vnni = 2, kAvx512Bf16 = 3 };
enum Act { kF32 = 0, kBf16 = 1, kI8 = 2 };

inline const char* isa_name(int isa) {
  static const char* names[] = {"scalar", "avx2", "avx512vnni", "avx512bf16"};
  return names[isa];
}

// -1 for an unknown name (the op boundary reports it).
inline int isa_from_name(const std::string& name) {
  for (int i = kScalar; i <= kAvx512Bf16; ++i)
    if (name == isa_name(i)) return i;
  return -1;
}

inline int cpu_isa() {
#if GLM4_X86
  __builtin_cpu_init();
  if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) return kScalar;
  if (!(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vnni")))
    return kAvx2;
  return __builtin_cpu_supports("avx512bf16") ? kAvx512Bf16 : kAvx512Vnni;
#else
  return kScalar;
#endif
}

// The path cap: the op's `isa` attribute, or else GLM4_KERNELS_ISA (how tests and users force a lower
// path), or "auto".
inline std::string requested_isa(const std::string& attr) {
  if (!attr.empty() && attr != "auto") return attr;
  const char* env = std::getenv("GLM4_KERNELS_ISA");
  return env && *env ? env : "auto";
}

// The best path this CPU runs under a cap (a valid name or "auto"); a cap above the CPU's is lowered to it.
inline int resolve_isa(const std::string& cap) {
  static const int cpu = cpu_isa();
  return cap == "auto" ? cpu : std::min(cpu, isa_from_name(cap));
}

// -1 for an unknown name.
inline int act_from_name(const std::string& name) {
  static const char* names[] = {"float32", "bfloat16", "int8"};
  for (int i = kF32; i <= kI8; ++i)
    if (name == names[i]) return i;
  return -1;
}

// ---- Threads ---------------------------------------------------------------------------------------------
// A few persistent workers that take task indices from a shared counter (so a core slowed by a neighbour
// on these shared machines takes fewer tasks). Not OpenMP: Paddle's wheel loads both libgomp and Intel's
// libiomp5, and a second OpenMP team spinning beside Paddle's would steal the cores it computes on.
class ThreadPool {
 public:
  static ThreadPool& instance() {
    static ThreadPool pool;
    return pool;
  }

  static int default_threads() {
    const char* env = std::getenv("GLM4_KERNELS_THREADS");
    if (env && std::atoi(env) > 0) return std::atoi(env);
#if defined(__linux__)
    cpu_set_t set;  // the cores this process may run on (a container or taskset may allow fewer)
    if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
    return std::max(1u, std::thread::hardware_concurrency());
  }

  // Runs fn(0) .. fn(tasks - 1) on `threads` threads (the caller is one of them) and returns when all are done.
  void run(int threads, int64_t tasks, const std::function<void(int64_t)>& fn) {
    threads = static_cast<int>(std::min<int64_t>(threads, tasks));
    if (threads <= 1) {
      for (int64_t t = 0; t < tasks; ++t) fn(t);
      return;
    }
    std::lock_guard<std::mutex> one_job_at_a_time(run_mutex_);
    {
      std::unique_lock<std::mutex> lock(mutex_);
      if (owner_ != getpid()) forget_workers();
      while (static_cast<int>(workers_.size()) < threads - 1) {
        int index = static_cast<int>(workers_.size());
        workers_.emplace_back([this, index] { work(index); });
      }
      job_ = &fn;
      tasks_ = tasks;
      next_.store(0);
      helpers_ = threads - 1;
      pending_ = threads - 1;
      ++generation_;
    }
    wake_.notify_all();
    take_tasks(fn);
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return pending_ == 0; });
  }

  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
      if (owner_ != getpid()) forget_workers();
    }
    wake_.notify_all();
    for (auto& w : workers_) w.join();
  }

 private:
  // A forked child has the pool's memory but none of its threads: it starts its own (the parent's thread
  // handles are left alone; joining or destroying them in the child would be undefined).
  void forget_workers() {
    new std::vector<std::thread>(std::move(workers_));  // never freed: those threads are not this process's
    workers_.clear();
    owner_ = getpid();
  }

  void take_tasks(const std::function<void(int64_t)>& fn) {
    for (int64_t t = next_.fetch_add(1); t < tasks_; t = next_.fetch_add(1)) fn(t);
  }

  void work(int index) {
    int64_t seen = 0;
    for (;;) {
      const std::function<void(int64_t)>* job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stop_ || (generation_ != seen && index < helpers_); });
        if (stop_) return;
        seen = generation_;
        job = job_;
      }
      take_tasks(*job);
      std::lock_guard<std::mutex> lock(mutex_);
      if (--pending_ == 0) done_.notify_one();
    }
  }

  std::mutex run_mutex_, mutex_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> workers_;
  const std::function<void(int64_t)>* job_ = nullptr;
  std::atomic<int64_t> next_{0};
  int64_t tasks_ = 0, generation_ = 0;
  int helpers_ = 0, pending_ = 0;
  bool stop_ = false;
  pid_t owner_ = getpid();
};

// ---- Numbers ---------------------------------------------------------------------------------------------
inline float bf16_to_float(uint16_t bits) {
  uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest bfloat16, half to even (NaN stays NaN), as quant.float32_to_bfloat16_bits.
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return static_cast<uint16_t>((u >> 16) | 0x40);
  return static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

// ---- Weights and activations -----------------------------------------------------------------------------
struct Weights {
  const uint8_t* data;    // row n starts at data + n * row_bytes
  const float* scales;    // int8: [N]; int4: [N, groups]; bf16: null
  int64_t N, K, row_bytes, group, groups;
};

constexpr int64_t kPad = 128;  // activation rows are zero-padded to a multiple of this (the widest SIMD chunk)

inline int64_t padded(int64_t k) { return (k + kPad - 1) / kPad * kPad; }

// Activations as the chosen path reads them: rows of stride Kp (= padded(K)), zero beyond K.
struct Acts {
  int64_t M = 0, K = 0, Kp = 0;
  std::vector<float> f;        // float32 (already rounded to bf16 for Act kBf16 on paths without BF16)
  std::vector<uint16_t> b;     // bfloat16 bits
  std::vector<int8_t> q;       // int8 values, per-row scale in `scale`
  std::vector<float> scale;    // [M]
  std::vector<int32_t> gsum;   // [M, groups]: sum of q over each weight group (int4 needs it)
  std::vector<float> gsum8;    // the same times 8, as float32 (exact: |8 sum| < 2^24)
  // SIMD int4 paths read each chunk of `perm` elements as its even elements then its odd ones: the order of
  // the low and high nibbles of its packed weights. 0 = natural order.
  int64_t perm = 0;
  // The VNNI dots read q + 128 (unsigned bytes, as vpdpbusd's first operand must be; padding 0 + 128 too)
  // and subtract 128 times the weights' sum, which every row shares.
  bool biased = false;
};

// A row of n values (n a multiple of perm) from natural order into `perm` order.
template <class T>
inline void permute_row(const T* in, int64_t n, int64_t perm, T* out) {
  if (perm == 0) {
    std::copy(in, in + n, out);
    return;
  }
  const int64_t half = perm / 2;
  for (int64_t base = 0; base < n; base += perm)
    for (int64_t j = 0; j < half; ++j) {
      out[base + j] = in[base + 2 * j];
      out[base + half + j] = in[base + 2 * j + 1];
    }
}

// Round to the nearest integer, half to even, for |v| < 2^22: adding 1.5 * 2^23 leaves no fraction bits, and
// the addition rounds as the FPU does by default (half to even). Unlike std::nearbyint it compiles to plain
// vector adds on every x86-64 (no libm call per element).
inline float round_half_even(float v) {
  constexpr float kMagic = 12582912.f;
  return (v + kMagic) - kMagic;
}

inline Acts prepare_acts(const float* x, int64_t M, int64_t K, int act, bool want_bf16_bits, int64_t perm,
                         int64_t group, bool biased) {
  Acts a;
  a.M = M, a.K = K, a.Kp = padded(K), a.perm = perm, a.biased = biased && act == kI8;
  if (act == kI8) {
    const uint8_t bias = a.biased ? 0x80 : 0;  // q + 128 in two's complement bits: q with its sign bit flipped
    a.q.resize(M * a.Kp);
    a.scale.resize(M);
    int64_t groups = group > 0 ? (K + group - 1) / group : 0;
    a.gsum.assign(M * groups, 0);
    a.gsum8.assign(M * groups, 0.f);
    std::vector<int8_t> natural(a.Kp, 0);  // one row in natural order, zero beyond K
    for (int64_t m = 0; m < M; ++m) {
      const float* row = x + m * K;
      float absmax = 0.f;
      for (int64_t k = 0; k < K; ++k) absmax = std::max(absmax, std::fabs(row[k]));
      // as quant.quantize_activations_int8: scale = absmax / 127, q = round-half-even(x / scale) in float32
      // (|x / scale| <= 127 here, NaN clamps to -127 as before)
      const float s = absmax / 127.f;
      a.scale[m] = s;
      for (int64_t k = 0; k < K; ++k) {
        const float v = s != 0.f ? round_half_even(row[k] / s) : 0.f;
        natural[k] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, v)));
      }
      for (int64_t g = 0; g < groups; ++g) {
        int32_t sum = 0;
        for (int64_t k = g * group; k < std::min(K, (g + 1) * group); ++k) sum += natural[k];
        a.gsum[m * groups + g] = sum;
        a.gsum8[m * groups + g] = 8.f * static_cast<float>(sum);
      }
      int8_t* out = a.q.data() + m * a.Kp;
      permute_row(natural.data(), a.Kp, perm, out);
      for (int64_t k = 0; k < a.Kp; ++k) out[k] = static_cast<int8_t>(static_cast<uint8_t>(out[k]) ^ bias);
    }
    return a;
  }
  if (want_bf16_bits) {
    a.b.resize(M * a.Kp);
    std::vector<uint16_t> natural(a.Kp, 0);
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t k = 0; k < K; ++k) natural[k] = float_to_bf16(x[m * K + k]);
      permute_row(natural.data(), a.Kp, perm, a.b.data() + m * a.Kp);
    }
    return a;
  }
  a.f.resize(M * a.Kp);
  std::vector<float> natural(a.Kp, 0.f);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < K; ++k) {
      const float v = x[m * K + k];
      natural[k] = act == kBf16 ? bf16_to_float(float_to_bf16(v)) : v;
    }
    permute_row(natural.data(), a.Kp, perm, a.f.data() + m * a.Kp);
  }
  return a;
}

// Row n's bytes in chunks of `chunk`: in place up to `full`, the last partial chunk from a zero-filled copy
// made once per row (a zero weight or nibble meets a zero activation there: activations are padded with 0),
// so that the dots' inner loops call nothing and read nothing past the row.
struct RowChunks {
  const uint8_t* row;
  const uint8_t* last;
  int64_t full;
  const uint8_t* at(int64_t offset) const { return offset < full ? row + offset : last; }
};

// How far ahead of the dots the weight stream is prefetched (into L1): the hardware prefetchers alone left a
// one-row GEMV of K = 13696 int4 at 2.0-2.3 ms, 1.75 ms with this (one thread, benchmarks/NOTES.md).
constexpr int64_t kPrefetchBytes = 2048;

#if GLM4_X86
// Prefetching past the end of the weights is harmless: a prefetch never faults.
inline void prefetch_weights(const RowChunks& rc, int64_t at) {
  _mm_prefetch(reinterpret_cast<const char*>(rc.row + at + kPrefetchBytes), _MM_HINT_T0);
}
#endif

inline RowChunks row_chunks(const Weights& w, int64_t n, int64_t chunk, uint8_t* buf) {
  const uint8_t* row = w.data + n * w.row_bytes;
  const int64_t full = w.row_bytes - w.row_bytes % chunk;
  if (full < w.row_bytes) {
    std::memset(buf, 0, chunk);
    std::memcpy(buf, row + full, w.row_bytes - full);
  }
  return {row, buf, full};
}

// Pointers to activation rows m0..m0+MR of an Acts array (stride Kp).
template <int MR, class T>
inline void row_pointers(const std::vector<T>& data, const Acts& a, int64_t m0, const T* (&rows)[MR]) {
  for (int i = 0; i < MR; ++i) rows[i] = data.data() + (m0 + i) * a.Kp;
}

#if GLM4_X86
GLM4_AVX2 inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

GLM4_AVX2 inline int32_t hsum_epi32_avx2(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}
#endif

// ---- GEMV driver -----------------------------------------------------------------------------------------
// dot(w, n, acts, m0, out) writes out[0..MR) = row n of W dotted with activation rows m0..m0+MR (scales,
// activation scales applied; no bias). Each format provides one per path, for MR = 1..rows (at most 8).
using DotFn = void (*)(const Weights&, int64_t, const Acts&, int64_t, float*);
constexpr int kMaxDotRows = 8;
struct DotKernels {
  DotFn mr[kMaxDotRows];
  int rows = 4;  // rows per pass: each weight chunk is decoded once for all of them; their activations share L1
};

constexpr int64_t kGemvChannels = 16;  // channels per task: their weights stay in L2 while every row passes

inline void gemv(const Weights& w, const Acts& a, const DotKernels& dots, const float* bias, float* y,
                 int threads) {
  const int64_t tasks = (w.N + kGemvChannels - 1) / kGemvChannels;
  ThreadPool::instance().run(threads, tasks, [&](int64_t t) {
    const int64_t n_end = std::min(w.N, (t + 1) * kGemvChannels);
    for (int64_t m0 = 0; m0 < a.M; m0 += dots.rows) {
      const int mr = static_cast<int>(std::min<int64_t>(dots.rows, a.M - m0));
      for (int64_t n = t * kGemvChannels; n < n_end; ++n) {
        float out[kMaxDotRows];
        dots.mr[mr - 1](w, n, a, m0, out);
        for (int i = 0; i < mr; ++i) y[(m0 + i) * w.N + n] = out[i] + (bias ? bias[n] : 0.f);
      }
    }
  });
}

// ---- GEMM driver -----------------------------------------------------------------------------------------
// The weight is cut into panels of kPanel channels x a block of k; each panel is decoded by the format's
// `decode` into a k-major tile (float32, or bfloat16 pairs for vdpbf16ps) together with one scale per
// channel for the block (int4: the group's, so k blocks are the groups; int8: the channel's; bf16: 1), then
// every activation row passes through it: y[m, panel] += scale * (x[m, block] . tile).
constexpr int64_t kPanel = 32;       // channels per panel (two 16-float vectors per row in the micro-kernels)
constexpr int64_t kBlockK = 256;     // k per block for bf16/int8: a 32 KB float panel, L1-sized

// decode(w, n0, nr, k0, kb, tile, colscale): tile float [kb][kPanel] (kBf16Tile: uint16 [kb/2][kPanel][2],
// kb rounded up to even), columns >= nr zero; colscale [kPanel].
using DecodeF32 = void (*)(const Weights&, int64_t, int64_t, int64_t, int64_t, float*, float*);
using DecodeBf16 = void (*)(const Weights&, int64_t, int64_t, int64_t, int64_t, uint16_t*, float*);

// Micro-kernels: C[MR rows, kPanel] (row stride ldc) += colscale * (A[MR, kb] . tile), A rows of stride lda.
void micro_f32_scalar(const float* a, int64_t lda, int mr, const float* tile, int64_t kb, const float* colscale,
                      float* c, int64_t ldc);
#if GLM4_X86
void micro_f32_avx2(const float* a, int64_t lda, int mr, const float* tile, int64_t kb, const float* colscale,
                    float* c, int64_t ldc);
void micro_bf16_avx512(const uint16_t* a, int64_t lda, int mr, const uint16_t* tile, int64_t kb,
                       const float* colscale, float* c, int64_t ldc);
#endif

struct GemmPlan {
  int isa;
  bool bf16_tile;         // vdpbf16ps micro-kernel (activations as bf16 bits)
  int64_t block;          // k per block
  DecodeF32 decode_f32;
  DecodeBf16 decode_bf16;
};

void gemm(const Weights& w, const Acts& a, const GemmPlan& plan, const float* bias, float* y, int threads);

// ---- The scalar reference --------------------------------------------------------------------------------
// A format F gives F::value(w, n, k), weight (n, k) before scaling, and F::scale(w, n, k), the scale of the
// group holding k (groups of w.group inputs). The reference computes exactly what every path computes, in
// the plainest order: y = activation_scale * sum over groups of (scale * sum over the group of x * value),
// in float32 (integer sums for int8 activations). Activations in natural order (perm 0).
template <class F, int MR>
void dot_scalar(const Weights& w, int64_t n, const Acts& a, int64_t m0, float* out) {
  float total[MR] = {};
  for (int64_t g0 = 0; g0 < w.K; g0 += w.group) {
    const int64_t g1 = std::min(w.K, g0 + w.group);
    const float s = F::scale(w, n, g0);
    if (!a.q.empty()) {
      int64_t part[MR] = {};
      for (int64_t k = g0; k < g1; ++k) {
        const int64_t v = static_cast<int64_t>(F::value(w, n, k));
        for (int i = 0; i < MR; ++i) part[i] += v * a.q[(m0 + i) * a.Kp + k];
      }
      for (int i = 0; i < MR; ++i) total[i] += static_cast<float>(part[i]) * s;
    } else {
      float part[MR] = {};
      for (int64_t k = g0; k < g1; ++k) {
        const float v = F::value(w, n, k);
        for (int i = 0; i < MR; ++i) part[i] += v * a.f[(m0 + i) * a.Kp + k];
      }
      for (int i = 0; i < MR; ++i) total[i] += part[i] * s;
    }
  }
  for (int i = 0; i < MR; ++i) out[i] = a.q.empty() ? total[i] : total[i] * a.scale[m0 + i];
}

template <class F>
DotKernels scalar_dots() {
  return {{dot_scalar<F, 1>, dot_scalar<F, 2>, dot_scalar<F, 3>, dot_scalar<F, 4>}};
}

// The GEMM tiles decoded one weight at a time (F::value and F::scale inline here), k by k so that the
// tile is written in order; columns past nr stay zero.
template <class F>
void decode_scalar_f32(const Weights& w, int64_t n0, int64_t nr, int64_t k0, int64_t kb, float* tile,
                       float* colscale) {
  for (int64_t j = 0; j < kPanel; ++j) colscale[j] = j < nr ? F::scale(w, n0 + j, k0) : 0.f;
  if (nr < kPanel) std::memset(tile, 0, sizeof(float) * kb * kPanel);
  for (int64_t k = 0; k < kb; ++k)
    for (int64_t j = 0; j < nr; ++j) tile[k * kPanel + j] = F::value(w, n0 + j, k0 + k);
}

template <class F>
void decode_scalar_bf16(const Weights& w, int64_t n0, int64_t nr, int64_t k0, int64_t kb, uint16_t* tile,
                        float* colscale) {
  for (int64_t j = 0; j < kPanel; ++j) colscale[j] = j < nr ? F::scale(w, n0 + j, k0) : 0.f;
  const int64_t kb2 = (kb + 1) / 2 * 2;
  if (nr < kPanel || kb2 != kb) std::memset(tile, 0, sizeof(uint16_t) * kb2 * kPanel);
  for (int64_t k = 0; k < kb; ++k)
    for (int64_t j = 0; j < nr; ++j)
      tile[(k / 2) * kPanel * 2 + j * 2 + k % 2] = float_to_bf16(F::value(w, n0 + j, k0 + k));
}

// ---- Choosing a path -------------------------------------------------------------------------------------
// More rows than this go through the GEMM driver. By measurement (gate_up, 2 threads, same runs): at 5 and 8
// rows the GEMV beat the GEMM on every float-activation path (bf16 vdpbf16ps 25-32 vs 37-55 ms, AVX2 bf16 /
// int8 / int4 float32 41-56 / 41 / 29-36 vs 63-73 ms); at 16 rows they tie (bf16 52 vs 50 ms).
constexpr int64_t kGemvMaxRows = 8;

struct Plan {
  DotKernels dots;         // GEMV
  int64_t perm = 0;        // activation order the dots read (see Acts)
  bool bf16_bits = false;  // the dots read bfloat16 bits
  bool biased = false;     // the dots read int8 activations as q + 128 (see Acts)
  GemmPlan gemm;
  const char* name = "";   // the path that runs, for the benchmark
};

// A format's planner: the kernels for (path, activation dtype, GEMM or GEMV, group size).
using Planner = Plan (*)(int isa, int act, bool use_gemm, int64_t group);

// The GEMM plan any format gets from its scalar decode: bf16 tiles where vdpbf16ps exists, else float32.
#if GLM4_X86
// SIMD decodes: each of the panel's rows decoded along k (F::row_f32, natural order, vectorized), then
// transposed 8 x 8 at a time into the tile. A bf16 tile's unit is a pair of bf16 (32 bits), so the same
// transpose serves both; integer weights are exact in bf16 (at most 8 significant bits).
void transpose32_avx2(const uint32_t* rows, int64_t stride, int64_t nr, int64_t units, uint32_t* tile);

template <class F>
GLM4_AVX2 void decode_avx2_f32(const Weights& w, int64_t n0, int64_t nr, int64_t k0, int64_t kb, float* tile,
                               float* colscale) {
  thread_local std::vector<float> rows;
  rows.resize(kPanel * kb);
  for (int64_t j = 0; j < kPanel; ++j) colscale[j] = j < nr ? F::scale(w, n0 + j, k0) : 0.f;
  for (int64_t j = 0; j < nr; ++j) F::row_f32(w, n0 + j, k0, kb, rows.data() + j * kb);
  transpose32_avx2(reinterpret_cast<const uint32_t*>(rows.data()), kb, nr, kb, reinterpret_cast<uint32_t*>(tile));
}

template <class F>
GLM4_BF16 void decode_avx512_bf16(const Weights& w, int64_t n0, int64_t nr, int64_t k0, int64_t kb,
                                  uint16_t* tile, float* colscale) {
  const int64_t units = (kb + 1) / 2;
  thread_local std::vector<float> row;
  thread_local std::vector<uint16_t> rows;
  row.resize(units * 2 + 16);
  rows.resize(kPanel * units * 2);
  for (int64_t j = 0; j < kPanel; ++j) colscale[j] = j < nr ? F::scale(w, n0 + j, k0) : 0.f;
  for (int64_t j = 0; j < nr; ++j) {
    uint16_t* out = rows.data() + j * units * 2;
    if (F::kBf16Rows) {  // the stored row is already bf16
      std::memcpy(out, w.data + (n0 + j) * w.row_bytes + 2 * k0, 2 * kb);
      if (kb % 2) out[kb] = 0;
      continue;
    }
    F::row_f32(w, n0 + j, k0, kb, row.data());
    std::fill(row.begin() + kb, row.end(), 0.f);
    for (int64_t k = 0; k < units * 2; k += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(row.data() + k)));
  }
  transpose32_avx2(reinterpret_cast<const uint32_t*>(rows.data()), units, nr, units,
                   reinterpret_cast<uint32_t*>(tile));
}
#endif

template <class F>
GemmPlan gemm_plan(int isa, int act, int64_t block) {
  GemmPlan g;
  g.isa = isa;
  g.bf16_tile = act == kBf16 && isa >= kAvx512Bf16;
  g.block = block;
  g.decode_f32 = decode_scalar_f32<F>;
  g.decode_bf16 = decode_scalar_bf16<F>;
#if GLM4_X86
  if (isa >= kAvx2) g.decode_f32 = decode_avx2_f32<F>;
  if (g.bf16_tile) g.decode_bf16 = decode_avx512_bf16<F>;
#endif
  return g;
}

// activation_dtype "auto", by measurement (benchmarks/NOTES.md): int8 for up to kInt8AutoRows rows of
// integer weights on AVX2 and better (their integer dots read the packed weights with the fewest
// instructions; up to 16 rows they beat decoding tiles for the GEMM), else bfloat16 where vdpbf16ps exists
// (twice the float32 rate), else float32.
constexpr int64_t kInt8AutoRows = 16;

inline int auto_act(int isa, bool int_weights, int64_t rows) {
  if (int_weights && rows <= kInt8AutoRows && isa >= kAvx2) return kI8;
  return isa >= kAvx512Bf16 ? kBf16 : kF32;
}

Plan plan_bf16(int isa, int act, bool use_gemm, int64_t group);
Plan plan_int8(int isa, int act, bool use_gemm, int64_t group);
Plan plan_int4(int isa, int act, bool use_gemm, int64_t group);

// y [M, N] = x [M, K] @ W^T (+ bias): the activations prepared as the chosen path reads them, then the
// GEMV or GEMM driver. act is resolved (not "auto"); returns the name of the path that ran.
const char* linear(const float* x, int64_t M, const Weights& w, const float* bias, float* y, int isa, int act,
                   bool use_gemm, bool int_weights, int threads, Planner planner);

}  // namespace glm4
