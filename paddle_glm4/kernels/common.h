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
#include <chrono>
#include <condition_variable>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include <pthread.h>
#include <unistd.h>
#if defined(__linux__)
#include <sched.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#define GLM4_X86 1
#include <cpuid.h>
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
      while (static_cast<int>(workers_.size()) < threads - 1) {
        int index = static_cast<int>(workers_.size());
        workers_.emplace_back([this, index] { work(index); });
      }
      job_ = &fn;
      tasks_ = tasks;
      next_.store(0);
      helpers_ = threads - 1;
      pending_.store(threads - 1);
      generation_.fetch_add(1);
    }
    wake_.notify_all();  // no system call when every worker is still spinning
    take_tasks(fn);
    spin_while([this] { return pending_.load(std::memory_order_acquire) != 0; });
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return pending_.load() == 0; });
  }

  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& w : workers_) w.join();
  }

 private:
  ThreadPool() { pthread_atfork(nullptr, nullptr, [] { instance().after_fork(); }); }

  // A forked child has the pool's memory but none of its threads: it starts its own when it needs them.
  // The parent's thread handles are left alone (joining or destroying them in the child would be undefined),
  // and the locks and condition variables start afresh: their state counts threads the child does not have
  // (a parent's worker waiting on `wake_` made the child's first notify wait forever).
  void after_fork() {
    new std::vector<std::thread>(std::move(workers_));  // never freed: those threads are not this process's
    workers_.clear();
    new (&run_mutex_) std::mutex;
    new (&mutex_) std::mutex;
    new (&wake_) std::condition_variable;
    new (&done_) std::condition_variable;
  }

  void take_tasks(const std::function<void(int64_t)>& fn) {
    for (int64_t t = next_.fetch_add(1); t < tasks_; t = next_.fetch_add(1)) fn(t);
  }

  // Waits up to kSpin for cond() to turn false before the caller sleeps on a condition variable: a decode
  // step calls the pool a few hundred times, ~0.1-1 ms apart, and waking a sleeping thread (a futex call, and
  // on a VM an interrupt to a halted virtual CPU) cost ~65 us per call here (a tiny GEMV on 2 threads: 76 us
  // sleeping, 11 us spinning; 10 us on one thread).
  static constexpr std::chrono::microseconds kSpin{200};

  template <class Cond>
  static void spin_while(Cond cond) {
    const auto until = std::chrono::steady_clock::now() + kSpin;
    while (cond() && std::chrono::steady_clock::now() < until) {
#if GLM4_X86
      _mm_pause();
#endif
    }
  }

  void work(int index) {
    int64_t seen = 0;
    for (;;) {
      spin_while([&] { return generation_.load(std::memory_order_acquire) == seen; });
      const std::function<void(int64_t)>* job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stop_ || (generation_.load() != seen && index < helpers_); });
        if (stop_) return;
        seen = generation_.load();
        job = job_;
      }
      take_tasks(*job);
      std::lock_guard<std::mutex> lock(mutex_);
      if (pending_.fetch_sub(1) == 1) done_.notify_one();
    }
  }

  std::mutex run_mutex_, mutex_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> workers_;
  const std::function<void(int64_t)>* job_ = nullptr;
  std::atomic<int64_t> next_{0}, generation_{0};
  std::atomic<int> pending_{0};
  int64_t tasks_ = 0;
  int helpers_ = 0;
  bool stop_ = false;
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

// Activations as the chosen path reads them, in one of two layouts:
// - GEMV (block 0): rows of stride Kp (= padded(K)), zero beyond K, in `perm` order;
// - GEMM (block > 0): the k-blocks the GEMM multiplies one after another, each stored as M rows of
//   `bstride` (block rounded up to 4: the tiles' 32-bit units) — so that a micro-kernel's rows are a few KB
//   apart, not K elements (rows 8 KB apart all fall in one L1 set and evict each other).
struct Acts {
  int64_t M = 0, K = 0, Kp = 0;
  int64_t block = 0, bstride = 0;
  std::vector<float> f;        // float32 (already rounded to bf16 for Act kBf16 on paths without BF16)
  std::vector<uint16_t> b;     // bfloat16 bits
  std::vector<int8_t> q;       // int8 values, per-row scale in `scale` (GEMM layout: q + 128, vpdpbusd's
                               // unsigned operand)
  std::vector<float> scale;    // [M]
  std::vector<int32_t> gsum;   // [M, groups]: sum of q over each weight group (int4's GEMV needs it)
  std::vector<float> gsum8;    // the same times 8, as float32 (exact: |8 sum| < 2^24)
  // SIMD int4 GEMV paths read each chunk of `perm` elements as its even elements then its odd ones: the
  // order of the low and high nibbles of its packed weights. 0 = natural order.
  int64_t perm = 0;
  // The VNNI dots and the GEMM's int8 tiles read q + 128 (unsigned bytes, as vpdpbusd's first operand must
  // be; GEMV padding 0 + 128 too) and subtract 128 times the weights' sum, which every row shares.
  bool biased = false;

  int64_t size() const { return block ? (K + block - 1) / block * M * bstride : M * Kp; }
  // Where element (m, k) is stored.
  int64_t index(int64_t m, int64_t k) const {
    if (block) return (k / block) * M * bstride + m * bstride + k % block;
    if (perm == 0) return m * Kp + k;
    const int64_t base = k - k % perm, j = k % perm;
    return m * Kp + base + (j % 2) * (perm / 2) + j / 2;
  }
  // Row m of the GEMM block starting at k0 (rows of stride bstride follow).
  int64_t block_start(int64_t m, int64_t k0) const { return (k0 / block) * M * bstride + m * bstride; }
};

// Round to the nearest integer, half to even, for |v| < 2^22: adding 1.5 * 2^23 leaves no fraction bits, and
// the addition rounds as the FPU does by default (half to even). Unlike std::nearbyint it compiles to plain
// vector adds on every x86-64 (no libm call per element).
inline float round_half_even(float v) {
  constexpr float kMagic = 12582912.f;
  return (v + kMagic) - kMagic;
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

// evens[i] = v[2i], odds[i] = v[2i + 1] for n values, n a multiple of 32 (int4's GEMV layout, Acts::perm).
GLM4_AVX2 inline void deinterleave_i8_avx2(const int8_t* v, int64_t n, int8_t* evens, int8_t* odds) {
  // within each 128-bit lane: its 8 even bytes, then its 8 odd ones; then the lanes' halves regrouped
  const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4, 6, 8, 10, 12,
                                         14, 1, 3, 5, 7, 9, 11, 13, 15);
  for (int64_t i = 0; i < n; i += 32) {
    const __m256i s = _mm256_shuffle_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + i)), split);
    const __m256i halves = _mm256_permute4x64_epi64(s, 0xD8);  // evens of both lanes, then odds of both
    _mm_storeu_si128(reinterpret_cast<__m128i*>(evens + i / 2), _mm256_castsi256_si128(halves));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(odds + i / 2), _mm256_extracti128_si256(halves, 1));
  }
}

// The sum of n int8 values.
GLM4_AVX2 inline int32_t sum_i8_avx2(const int8_t* v, int64_t n) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc = _mm256_setzero_si256();
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    const __m256i wide = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v + k)));
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(wide, ones));
  }
  int32_t sum = hsum_epi32_avx2(acc);
  for (; k < n; ++k) sum += v[k];
  return sum;
}
#endif

inline int32_t sum_i8_scalar(const int8_t* v, int64_t n) {
  int32_t sum = 0;
  for (int64_t k = 0; k < n; ++k) sum += v[k];
  return sum;
}

// Stores row m's values (natural order) where the layout puts them: whole runs at once where they are
// contiguous. `simd`: int8 values in perm order are split by AVX2 shuffles, whole chunks at a time (a
// decode step's rows are few: the scalar loop below was most of a one-row call's fixed cost).
template <class T>
void store_row(const Acts& a, std::vector<T>& data, int64_t m, const T* values, bool simd = false) {
  if (a.block) {
    for (int64_t k0 = 0; k0 < a.K; k0 += a.block)
      std::memcpy(data.data() + a.block_start(m, k0), values + k0, sizeof(T) * std::min(a.block, a.K - k0));
  } else if (a.perm == 0) {
    std::memcpy(data.data() + m * a.Kp, values, sizeof(T) * a.K);
  } else {  // each chunk of perm: its even elements, then its odd ones (Acts::index, without a division each)
    T* out = data.data() + m * a.Kp;
    const int64_t half = a.perm / 2;
    int64_t base = 0;
#if GLM4_X86
    if constexpr (std::is_same_v<T, int8_t>)
      if (simd && a.perm % 32 == 0)
        for (; base + a.perm <= a.K; base += a.perm)
          deinterleave_i8_avx2(values + base, a.perm, out + base, out + base + half);
#endif
    (void)simd;
    for (; base < a.K; base += a.perm)
      for (int64_t j = 0; j < std::min(a.perm, a.K - base); ++j) out[base + (j & 1) * half + j / 2] = values[base + j];
  }
}

// One row rounded as each activation dtype says, in natural order: scalar references, and SIMD versions
// that round identically (division, round-half-even and bf16's round-to-nearest-even are exact IEEE
// operations whatever the instruction).
inline float quantize_row_scalar(const float* x, int64_t K, int8_t* q) {
  float absmax = 0.f;
  for (int64_t k = 0; k < K; ++k) absmax = std::max(absmax, std::fabs(x[k]));
  // as quant.quantize_activations_int8: scale = absmax / 127, q = round-half-even(x / scale) in float32
  const float s = absmax / 127.f;
  for (int64_t k = 0; k < K; ++k) {
    const float v = s != 0.f ? round_half_even(x[k] / s) : 0.f;
    q[k] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, v)));
  }
  return s;
}

inline void bf16_row_scalar(const float* x, int64_t K, uint16_t* out) {
  for (int64_t k = 0; k < K; ++k) out[k] = float_to_bf16(x[k]);
}

#if GLM4_X86
GLM4_AVX2 inline float quantize_row_avx2(const float* x, int64_t K, int8_t* q) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 vmax = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + k)));
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  float absmax = std::max(_mm_cvtss_f32(m4), _mm_cvtss_f32(_mm_movehdup_ps(m4)));
  for (; k < K; ++k) absmax = std::max(absmax, std::fabs(x[k]));
  const float s = absmax / 127.f;
  if (s == 0.f) {
    std::memset(q, 0, K);
    return s;
  }
  const __m256 vs = _mm256_set1_ps(s), hi = _mm256_set1_ps(127.f), lo = _mm256_set1_ps(-127.f);
  for (k = 0; k + 8 <= K; k += 8) {
    __m256 v = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + k), vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i i = _mm256_cvtps_epi32(_mm256_min_ps(hi, _mm256_max_ps(lo, v)));
    const __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + k), _mm_packs_epi16(i16, i16));
  }
  for (; k < K; ++k) q[k] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, round_half_even(x[k] / s))));
  return s;
}

// bf16 = the float's high half after adding 0x7FFF + its lowest kept bit (round to nearest, ties to even);
// NaNs keep a quiet payload as float_to_bf16 does.
GLM4_AVX2 inline void bf16_row_avx2(const float* x, int64_t K, uint16_t* out) {
  const __m256i bias = _mm256_set1_epi32(0x7FFF), one = _mm256_set1_epi32(1), quiet = _mm256_set1_epi32(0x400000);
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m256i h[2];
    for (int i = 0; i < 2; ++i) {
      const __m256 v = _mm256_loadu_ps(x + k + 8 * i);
      const __m256i u = _mm256_castps_si256(v);
      const __m256i rounded = _mm256_add_epi32(u, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(u, 16), one)));
      const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      h[i] = _mm256_srli_epi32(_mm256_blendv_epi8(rounded, _mm256_or_si256(u, quiet), nan), 16);
    }
    // packus works within 128-bit lanes: restore the order after
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k),
                        _mm256_permute4x64_epi64(_mm256_packus_epi32(h[0], h[1]), 0xD8));
  }
  bf16_row_scalar(x + k, K - k, out + k);
}
#endif

// Rows are prepared in parallel (at 512 rows of K = 13696 the serial loop took as long as a tenth of the
// GEMM). `gemm_block` > 0 asks for the GEMM layout with k-blocks of that size (perm is then 0).
inline Acts prepare_acts(const float* x, int64_t M, int64_t K, int act, bool want_bf16_bits, int64_t perm,
                         int64_t group, bool biased, int64_t gemm_block, int isa, int threads) {
  Acts a;
  a.M = M, a.K = K, a.Kp = padded(K), a.perm = perm, a.biased = (biased || gemm_block) && act == kI8;
  a.block = gemm_block, a.bstride = (gemm_block + 3) / 4 * 4;
  const bool simd = GLM4_X86 && isa >= kAvx2;
  const int64_t groups = group > 0 ? (K + group - 1) / group : 0;
  if (act == kI8) {
    a.q.assign(a.size(), static_cast<int8_t>(a.biased && !gemm_block ? 0x80 : 0));
    a.scale.resize(M);
    if (!gemm_block) a.gsum.assign(M * groups, 0), a.gsum8.assign(M * groups, 0.f);
  } else if (want_bf16_bits) {
    a.b.assign(a.size(), 0);
  } else {
    a.f.assign(a.size(), 0.f);
  }
  ThreadPool::instance().run(threads, M, [&](int64_t m) {
    const float* row = x + m * K;
    thread_local std::vector<int8_t> q;
    thread_local std::vector<uint16_t> bits;
    thread_local std::vector<float> rounded;
    if (act == kI8) {
      q.resize(K);
#if GLM4_X86
      a.scale[m] = simd ? quantize_row_avx2(row, K, q.data()) : quantize_row_scalar(row, K, q.data());
#else
      a.scale[m] = quantize_row_scalar(row, K, q.data());
#endif
      if (!gemm_block)
        for (int64_t g = 0; g < groups; ++g) {
          const int64_t k0 = g * group, n = std::min(K, k0 + group) - k0;
#if GLM4_X86
          const int32_t sum = simd ? sum_i8_avx2(q.data() + k0, n) : sum_i8_scalar(q.data() + k0, n);
#else
          const int32_t sum = sum_i8_scalar(q.data() + k0, n);
#endif
          a.gsum[m * groups + g] = sum;
          a.gsum8[m * groups + g] = 8.f * static_cast<float>(sum);
        }
      if (a.biased)  // q + 128 in two's complement bits: q with its sign bit flipped
        for (int64_t k = 0; k < K; ++k) q[k] = static_cast<int8_t>(static_cast<uint8_t>(q[k]) ^ 0x80);
      store_row(a, a.q, m, q.data(), simd);
      return;
    }
    if (want_bf16_bits || act == kBf16) {
      bits.resize(K);
#if GLM4_X86
      if (simd)
        bf16_row_avx2(row, K, bits.data());
      else
#endif
        bf16_row_scalar(row, K, bits.data());
      if (want_bf16_bits) {
        store_row(a, a.b, m, bits.data());
        return;
      }
      rounded.resize(K);
      for (int64_t k = 0; k < K; ++k) rounded[k] = bf16_to_float(bits[k]);
      row = rounded.data();
    }
    store_row(a, a.f, m, row);
  });
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

// The int4 VNNI and the AVX2 bf16 and int8 dots prefetch their weight stream kPrefetchBytes ahead, into L2
// only (_MM_HINT_T1), every cache line of it. Measured one row at a time on rotating weight copies in 2 MB pages,
// as a loaded model's are, 2 threads, alternated in one process (2026-12-01, Zen 4): prefetched into L1 (T0, 4
// KB ahead, before) the stream's lines pushed the activations out of L1 where a row of them is long, and the int4
// down projection (K = 13696: 13.7 KB of int8 activations) read 28 GB/s where the other shapes read 31-35; into
// L2, 6 KB ahead, 32-40 GB/s (+13-42%), the other shapes within 2% (4 KB ahead: 5-8% slower than 6 KB; 8 and 16
// KB no better). The AVX2 dots (forced on an AVX-512 machine): bf16 +13-69%, int8 -4..+13% (down). Where the
// hardware prefetchers keep up alone, the instructions only cost: on Zen 4 the VNNI int8 dot reads 1-10%
// faster without any (15% against T1 when the memory ran at 50 GB/s), the AVX-512 bf16 one -3..+11% (and
// slower in a 2-layer decode), the AVX2 int4 ones 4-8% slower on every shape but down: those three prefetch only
// where prefetch_all_dots() says (Zen 5 and later, Intel).
constexpr int64_t kPrefetchBytes = 6144;

#if GLM4_X86
// The lines of one step of `step` bytes (a line per step of up to 64). Every line, not every other one: on an
// Intel Xeon (2026-12-02) the AVX-512 bf16 dot, 128 bytes a step, read 1.14-1.25x of no prefetch with its first
// line prefetched and 1.34-1.47x with both (a 2-thread read probe's rate); on Zen 5 the two were alike.
// Prefetching past the end of the weights is harmless: a prefetch never faults.
template <int64_t step = 64>
inline void prefetch_weights(const RowChunks& rc, int64_t at) {
  for (int64_t line = 0; line < step; line += 64)
    _mm_prefetch(reinterpret_cast<const char*>(rc.row + at + kPrefetchBytes + line), _MM_HINT_T1);
}
#endif

// Whether the dots that do not always prefetch do (the AVX-512 bf16, VNNI int8 and AVX2 int4 ones): on AMD family
// 0x1A (Zen 5) and later, and on Intel.
// Measured (2 MB pages, 1 row, 2 threads, alternated rounds with a control): on Zen 5 (2026-12-02) bf16
// 1.01-1.14x of no prefetch on every GLM-4 shape, int8 1.10-1.12x (the control 0.93-1.06x); a 2-layer decode
// alternated with llama.cpp's, bf16 0.86x and 0.78x of llama.cpp without, 0.92x and 0.87x with; int8 0.91x and
// 1.05x without, 1.12x and 1.10x with. On an Intel Xeon (family 6 model 207, 2026-12-02: one core streams
// ~15 GB/s, as many misses in flight as it can track) bf16 1.34-1.47x, int8 1.31-1.44x (the control
// 0.95-1.03x); the AVX2 int4 dots (forced) 1.24-1.68x (the control 0.99-1.06x). On Zen 4 (above) they read
// faster without.
inline bool prefetch_all_dots() {
#if GLM4_X86
  static const bool helps = [] {
    unsigned eax, ebx, ecx, edx;
    if (__builtin_cpu_is("intel")) return true;
    if (!__builtin_cpu_is("amd") || !__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return false;
    const unsigned base = (eax >> 8) & 0xF, extended = (eax >> 20) & 0xFF;
    return (base == 0xF ? base + extended : base) >= 0x1A;
  }();
  return helps;
#else
  return false;
#endif
}

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

// ---- GEMV driver -----------------------------------------------------------------------------------------
// dot(w, n, acts, m0, out) writes out[0..MR) = row n of W dotted with activation rows m0..m0+MR (scales,
// activation scales applied; no bias). Each format provides one per path, for MR = 1..rows (at most 8).
using DotFn = void (*)(const Weights&, int64_t, const Acts&, int64_t, float*);
constexpr int kMaxDotRows = 8;
struct DotKernels {
  DotFn mr[kMaxDotRows];
  int rows = 4;  // rows per pass: each weight chunk is decoded once for all of them; their activations share L1
};

constexpr int64_t kGemvChannels = 16;  // channels per pass: their weights stay in L2 while every row passes
// Weight bytes per task: each thread streams long runs of consecutive memory. Tasks of 16 channels (32 KB of
// int4 rows) had the two threads' reads interleave every few KB, and the memory read 28-30 GB/s; runs of
// 256 KB and more read 33-36 GB/s (a plain 2-thread read of 1 GB here, huge pages, benchmarks/NOTES.md).
constexpr int64_t kGemvTaskBytes = 512 << 10;

// Channels per task: whole passes, ~kGemvTaskBytes of weights, and at least one task per thread.
inline int64_t gemv_task_channels(const Weights& w, int threads) {
  const int64_t passes = std::max<int64_t>(1, kGemvTaskBytes / (kGemvChannels * w.row_bytes));
  const int64_t per_thread = (w.N + threads - 1) / threads;
  const int64_t at_most = (per_thread + kGemvChannels - 1) / kGemvChannels * kGemvChannels;
  return std::max<int64_t>(kGemvChannels, std::min(passes * kGemvChannels, at_most));
}

inline void gemv(const Weights& w, const Acts& a, const DotKernels& dots, const float* bias, float* y,
                 int threads) {
  const int64_t channels = gemv_task_channels(w, threads);
  const int64_t tasks = (w.N + channels - 1) / channels;
  ThreadPool::instance().run(threads, tasks, [&](int64_t t) {
    const int64_t task_end = std::min(w.N, (t + 1) * channels);
    for (int64_t n0 = t * channels; n0 < task_end; n0 += kGemvChannels) {
      const int64_t n_end = std::min(task_end, n0 + kGemvChannels);
      for (int64_t m0 = 0; m0 < a.M; m0 += dots.rows) {
        const int mr = static_cast<int>(std::min<int64_t>(dots.rows, a.M - m0));
        for (int64_t n = n0; n < n_end; ++n) {
          float out[kMaxDotRows];
          dots.mr[mr - 1](w, n, a, m0, out);
          for (int i = 0; i < mr; ++i) y[(m0 + i) * w.N + n] = out[i] + (bias ? bias[n] : 0.f);
        }
      }
    }
  });
}

// ---- GEMM driver -----------------------------------------------------------------------------------------
// The weight is cut into panels of kPanel channels x a block of k; each panel is decoded by the format into
// a k-major tile of 32-bit units — one float32, a pair of bfloat16 (vdpbf16ps) or four int8 (vpdpbusd) —
// with one scale per channel for the block (int4: the group's, so k blocks are the groups; int8: the
// channel's; bf16: 1). A task takes a few neighbouring panels and walks k: each block's tiles are decoded
// once, then every activation row passes through them in register blocks (the rows' block of activations
// stays in L1 while it meets each tile): y[m, panel] += scale * (x[m, block] . tile).
constexpr int64_t kPanel = 32;       // channels per panel (two 16-float vectors per row in the micro-kernels)
// k per block for bf16/int8 (and int4's int8 tiles). Larger than L1 by measurement: 512 rows, 2 threads, GFLOP/s
// at 256 / 1024 k, alternated in one process: bf16 gate_up 357-362 / 369-374, down 362-365 / 393-398, int8 qkv
// 701-712 / 737-742, int4 down 630-637 / 668-675; int4 at 64 rows 364-380 / 464-508. Each block's micro-kernel
// calls load and store their outputs once, and each tile reads its 32 weight rows in runs of 2 KB, not 512 B.
constexpr int64_t kBlockK = 1024;
enum Tile { kTileF32 = 0, kTileBf16 = 1, kTileI8 = 2 };

// A tile of T holds tile_units(kb) units of kPanel columns x (4 / sizeof(T)) consecutive k; columns past the
// panel's channels and k past kb are zero.
template <class T>
constexpr int64_t kPerUnit = 4 / sizeof(T);
template <class T>
inline int64_t tile_units(int64_t kb) { return (kb + kPerUnit<T> - 1) / kPerUnit<T>; }

// decode(w, n0, nr, k0, kb, tile, colscale): channels n0..n0+nr, k0..k0+kb into tile; colscale [kPanel] for
// each scale group in the block (groups of w.group k: one where w.group >= kb).
template <class T>
using DecodeFn = void (*)(const Weights&, int64_t, int64_t, int64_t, int64_t, T*, float*);

// Micro-kernels: C[mr rows, kPanel] (row stride ldc) += colscale * (A[mr, kb] . tile), A rows of stride
// lda (attention.cc uses them too).
void micro_f32_scalar(const float* a, int64_t lda, int mr, const float* tile, int64_t kb, const float* colscale,
                      float* c, int64_t ldc);
#if GLM4_X86
void micro_f32_avx2(const float* a, int64_t lda, int mr, const float* tile, int64_t kb, const float* colscale,
                    float* c, int64_t ldc);
void micro_bf16_avx512(const uint16_t* a, int64_t lda, int mr, const uint16_t* tile, int64_t kb,
                       const float* colscale, float* c, int64_t ldc);
// int8 tiles meet activations stored as q + 128 (vpdpbusd multiplies unsigned by signed bytes): coloff[j],
// -128 times the sum of the tile's column j, takes the 128 back out, exactly, in integers. The block is cut
// into scale groups of `group` k (a multiple of 4 where there are several): colscale and coloff hold kPanel
// values per group.
void micro_i8_vnni(const int8_t* a, int64_t lda, int mr, const int8_t* tile, int64_t kb, int64_t group,
                   const float* colscale, const int32_t* coloff, float* c, int64_t ldc);
void tile_offsets_vnni(const int8_t* tile, int64_t units, int32_t* coloff);
#endif

struct GemmPlan {
  int isa = kScalar;
  int tile = kTileF32;
  int64_t block = kBlockK;  // k per block
  DecodeFn<float> decode_f32 = nullptr;
  DecodeFn<uint16_t> decode_bf16 = nullptr;
  DecodeFn<int8_t> decode_i8 = nullptr;
};

// The k-block size a call uses (the activations are laid out for it).
inline int64_t gemm_block(const GemmPlan& plan, int64_t K) { return std::max<int64_t>(1, std::min(plan.block, K)); }

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

// A panel's scales for a k-block: kPanel per scale group (0 past nr).
template <class F>
void column_scales(const Weights& w, int64_t n0, int64_t nr, int64_t k0, int64_t kb, float* colscale) {
  for (int64_t g0 = 0; g0 < kb; g0 += w.group, colscale += kPanel)
    for (int64_t j = 0; j < kPanel; ++j) colscale[j] = j < nr ? F::scale(w, n0 + j, k0 + g0) : 0.f;
}

// The GEMM's float32 tiles decoded one weight at a time (F::value and F::scale inline here), k by k so that
// the tile is written in order; columns past nr stay zero.
template <class F>
void decode_scalar_f32(const Weights& w, int64_t n0, int64_t nr, int64_t k0, int64_t kb, float* tile,
                       float* colscale) {
  column_scales<F>(w, n0, nr, k0, kb, colscale);
  if (nr < kPanel) std::memset(tile, 0, sizeof(float) * kb * kPanel);
  for (int64_t k = 0; k < kb; ++k)
    for (int64_t j = 0; j < nr; ++j) tile[k * kPanel + j] = F::value(w, n0 + j, k0 + k);
}

// ---- Choosing a path -------------------------------------------------------------------------------------
// More rows than this go through the GEMM driver. By measurement (gate_up, 2 threads, forced either way and
// alternated in one process, GEMV / GEMM ms): bf16 vdpbf16ps 8 rows 12-13 / 22-23, 16 rows 22-27 / 27-29, 24
// rows 30 / 31-34 in one run and 77 / 53 in another, 32 rows 95 / 62; AVX2 float32 activations, bf16 16 rows
// 46 / 54, int4 16 rows 37-39 / 47-49.
constexpr int64_t kGemvMaxRows = 16;
// Integer activations stay on the GEMV dots up to this many rows, then take the vpdpbusd GEMM (VNNI only):
// gate_up, 2 threads, GEMV / GEMM ms, same runs: int8 16 rows 17.2-17.7 / 16.9-17.3, 24 rows 25.1-25.4 / 19.6-19.8,
// 32 rows 33 / 22; int4 16 rows 11.5-12.2 / 14.7-15.3, 24 rows 19.2-20.7 / 17.0-18.2, 32 rows 23.4 / 21.1.
constexpr int64_t kInt8GemvMaxRows = 16;

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

#if GLM4_X86
// SIMD decodes: each of the panel's rows decoded along k (Row: natural order, vectorized, kb values of T),
// then transposed 8 x 8 units at a time into the tile; one transpose serves every tile type, its unit being
// 32 bits. Integer weights are exact in bf16 (at most 8 significant bits).
void transpose32_avx2(const uint32_t* rows, int64_t stride, int64_t nr, int64_t units, uint32_t* tile);

template <class F, class T, void (*Row)(const Weights&, int64_t, int64_t, int64_t, T*)>
void decode_rows(const Weights& w, int64_t n0, int64_t nr, int64_t k0, int64_t kb, T* tile, float* colscale) {
  const int64_t units = tile_units<T>(kb), len = units * kPerUnit<T>;
  thread_local std::vector<T> rows;
  rows.resize(kPanel * len);
  column_scales<F>(w, n0, nr, k0, kb, colscale);
  for (int64_t j = 0; j < nr; ++j) {
    T* out = rows.data() + j * len;
    Row(w, n0 + j, k0, kb, out);
    std::fill(out + kb, out + len, T(0));
  }
  transpose32_avx2(reinterpret_cast<const uint32_t*>(rows.data()), units, nr, units,
                   reinterpret_cast<uint32_t*>(tile));
}

// A row as bfloat16: the stored one where it is bf16, else its float32 decode rounded.
template <class F>
GLM4_BF16 void row_bf16_avx512(const Weights& w, int64_t n, int64_t k0, int64_t kb, uint16_t* out) {
  if (F::kBf16Rows) {
    std::memcpy(out, w.data + n * w.row_bytes + 2 * k0, 2 * kb);
    return;
  }
  thread_local std::vector<float> row;
  row.resize(kb);
  F::row_f32(w, n, k0, kb, row.data());
  int64_t k = 0;
  for (; k + 16 <= kb; k += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(row.data() + k)));
  for (; k < kb; ++k) out[k] = float_to_bf16(row[k]);
}
#endif

// The GEMM plan of a format: int8 tiles for int8 activations on VNNI, bf16 tiles where vdpbf16ps exists,
// else float32 tiles (activations float32, or rounded to bf16 and widened).
template <class F>
GemmPlan gemm_plan(int isa, int act, int64_t block) {
  GemmPlan g;
  g.isa = isa;
  g.block = block;
  g.tile = act == kI8 && isa >= kAvx512Vnni ? kTileI8 : act == kBf16 && isa >= kAvx512Bf16 ? kTileBf16 : kTileF32;
  g.decode_f32 = decode_scalar_f32<F>;
#if GLM4_X86
  if (isa >= kAvx2) g.decode_f32 = decode_rows<F, float, F::row_f32>;
  if (g.tile == kTileBf16) g.decode_bf16 = decode_rows<F, uint16_t, row_bf16_avx512<F>>;
  if constexpr (!F::kBf16Rows)  // the integer formats
    if (g.tile == kTileI8) g.decode_i8 = decode_rows<F, int8_t, F::row_i8>;
#endif
  return g;
}

// activation_dtype "auto", by measurement (benchmarks/NOTES.md): int8 for integer weights on AVX-512 VNNI at
// every row count (their GEMM's vpdpbusd tiles did 1.6x the bf16 tiles' rate at 512 rows, and beat them at 17
// and 64), and up to kInt8AutoRows rows on AVX2 (their integer dots read the packed weights with the fewest
// instructions; up to 16 rows they beat decoding tiles for the GEMM); else bfloat16 where vdpbf16ps exists
// (twice the float32 rate), else float32.
constexpr int64_t kInt8AutoRows = 16;

inline int auto_act(int isa, bool int_weights, int64_t rows) {
  if (int_weights && (isa >= kAvx512Vnni || (rows <= kInt8AutoRows && isa >= kAvx2))) return kI8;
  return isa >= kAvx512Bf16 ? kBf16 : kF32;
}

Plan plan_bf16(int isa, int act, bool use_gemm, int64_t group);
Plan plan_int8(int isa, int act, bool use_gemm, int64_t group);
Plan plan_int4(int isa, int act, bool use_gemm, int64_t group);

// y [M, N] = x [M, K] @ W^T (+ bias): the activations prepared as the chosen path reads them, then the
// GEMV or GEMM driver. act is resolved (not "auto"); returns the name of the path that ran.
const char* linear(const float* x, int64_t M, const Weights& w, const float* bias, float* y, int isa, int act,
                   bool use_gemm, bool int_weights, int threads, Planner planner);

// A Linear layer as the operators hold it: its weights, its bias (or null) and how its format computes.
struct LinearWeights {
  Weights w;
  const float* bias;
  bool int_weights;
  Planner planner;
};

// The linear operators' call: y [M, N] = x [M, K] @ W^T (+ bias), the GEMV for up to kGemvMaxRows rows and the
// GEMM above (integer activations: the GEMV up to kInt8GemvMaxRows rows, and wherever VNNI is missing);
// act < 0 picks the activation dtype as auto_act does. Returns the name of the path that ran.
const char* linear(const float* x, int64_t M, const LinearWeights& l, float* y, int isa, int act, int threads);

}  // namespace glm4
