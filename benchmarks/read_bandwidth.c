/* The machine's memory read bandwidth, measured the way a decode step reads its weights: every core streams
 * its own long contiguous run of a buffer far larger than the caches, with the widest loads the CPU has.
 *
 *     read_bandwidth BYTES PASSES [THREADS [ISA [PAGES]]]
 *
 * BYTES of memory (rounded down to whole 4 KB pages, at least one per thread) are filled first (so that no
 * page fault lands in a timed pass, and each thread's pages are its own), then read PASSES times by THREADS
 * threads (default: every CPU this process may run on, one thread pinned to each). ISA (avx512, avx2 or
 * scalar; default or "auto": the widest this CPU supports) forces a path, so that tests can run each one.
 * PAGES: "huge" (the default: 2 MB pages where the kernel grants them, fewer TLB misses, the best a reader
 * can do) or "small" (4 KB pages, what a reader of a memory-mapped file or of unadvised memory gets). Prints one
 * JSON line: {"bytes", "huge_page_bytes" (of them, how many the kernel gave as huge pages), "threads", "isa",
 * "seconds": [one per pass]}; the caller takes the best.
 *
 * The buffer holds the 64-bit words 0, 1, 2, ...: every pass checks that the words it read add up to n(n-1)/2,
 * so a path that skipped or re-read a part of the buffer fails (exit 1) instead of reporting a rate. Exit 2
 * on bad arguments or when the memory cannot be had, each with a one-line reason on stderr.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#define PAGE 4096u
#define MAX_PASSES 1000

typedef uint64_t (*reader_fn)(const uint64_t *words, size_t count);

/* The reference path any compiler builds: four independent sums, so that the adds are not one long chain. */
static uint64_t read_scalar(const uint64_t *words, size_t count) {
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    size_t i = 0;
    for (; i + 4 <= count; i += 4) {
        s0 += words[i];
        s1 += words[i + 1];
        s2 += words[i + 2];
        s3 += words[i + 3];
    }
    for (; i < count; i++) s0 += words[i];
    return s0 + s1 + s2 + s3;
}

#if defined(__x86_64__)
/* 256 bytes per iteration into four accumulators: enough loads in flight to keep the memory busy. A thread's
 * run is whole pages, so `count` is a multiple of 32 words. */
__attribute__((target("avx2"))) static uint64_t read_avx2(const uint64_t *words, size_t count) {
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    for (size_t i = 0; i < count; i += 16) {
        a0 = _mm256_add_epi64(a0, _mm256_load_si256((const __m256i *)(words + i)));
        a1 = _mm256_add_epi64(a1, _mm256_load_si256((const __m256i *)(words + i + 4)));
        a2 = _mm256_add_epi64(a2, _mm256_load_si256((const __m256i *)(words + i + 8)));
        a3 = _mm256_add_epi64(a3, _mm256_load_si256((const __m256i *)(words + i + 12)));
    }
    __m256i sum = _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3));
    uint64_t lanes[4];
    _mm256_storeu_si256((__m256i *)lanes, sum);
    return lanes[0] + lanes[1] + lanes[2] + lanes[3];
}

__attribute__((target("avx512f"))) static uint64_t read_avx512(const uint64_t *words, size_t count) {
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    for (size_t i = 0; i < count; i += 32) {
        a0 = _mm512_add_epi64(a0, _mm512_load_si512((const void *)(words + i)));
        a1 = _mm512_add_epi64(a1, _mm512_load_si512((const void *)(words + i + 8)));
        a2 = _mm512_add_epi64(a2, _mm512_load_si512((const void *)(words + i + 16)));
        a3 = _mm512_add_epi64(a3, _mm512_load_si512((const void *)(words + i + 24)));
    }
    return (uint64_t)_mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_add_epi64(a0, a1), _mm512_add_epi64(a2, a3)));
}
#endif

typedef struct {
    const char *name;
    reader_fn read;
} isa_t;

static int supported(const char *name) {
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (!strcmp(name, "avx512")) return __builtin_cpu_supports("avx512f");
    if (!strcmp(name, "avx2")) return __builtin_cpu_supports("avx2");
#endif
    return !strcmp(name, "scalar");
}

static isa_t choose(const char *forced) {
    static const isa_t paths[] = {
#if defined(__x86_64__)
        {"avx512", read_avx512},
        {"avx2", read_avx2},
#endif
        {"scalar", read_scalar},
    };
    for (size_t i = 0; i < sizeof paths / sizeof paths[0]; i++)
        if ((forced ? !strcmp(forced, paths[i].name) : 1) && supported(paths[i].name)) return paths[i];
    return (isa_t){NULL, NULL};
}

typedef struct {
    uint64_t *words;
    size_t first, count; /* this thread's run, in words */
    int cpu;             /* pinned to it; -1: not pinned */
    reader_fn read;
    int passes;
    pthread_barrier_t *start, *done;
    uint64_t sums[MAX_PASSES];
} worker_t;

static void *work(void *arg) {
    worker_t *w = arg;
    if (w->cpu >= 0) {
        cpu_set_t one;
        CPU_ZERO(&one);
        CPU_SET(w->cpu, &one);
        pthread_setaffinity_np(pthread_self(), sizeof one, &one); /* best effort: the rate is still valid */
    }
    uint64_t *run = w->words + w->first;
    for (size_t i = 0; i < w->count; i++) run[i] = w->first + i; /* first touch: the pages are this thread's */
    pthread_barrier_wait(w->done);
    for (int pass = 0; pass < w->passes; pass++) {
        pthread_barrier_wait(w->start);
        w->sums[pass] = w->read(run, w->count);
        pthread_barrier_wait(w->done);
    }
    return NULL;
}

/* How much of this process's memory the kernel gave as huge pages (Linux; 0 where it does not say). */
static unsigned long long huge_page_bytes(void) {
    FILE *f = fopen("/proc/self/smaps_rollup", "r");
    char line[256];
    unsigned long long kb = 0;
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "AnonHugePages: %llu kB", &kb) == 1) break;
    if (f) fclose(f);
    return kb * 1024;
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static int fail(int code, const char *message) {
    fprintf(stderr, "read_bandwidth: %s\n", message);
    return code;
}

int main(int argc, char **argv) {
    if (argc < 3 || argc > 6)
        return fail(2, "usage: read_bandwidth BYTES PASSES [THREADS [auto|avx512|avx2|scalar [huge|small]]]");
    char *end;
    errno = 0;
    unsigned long long requested = strtoull(argv[1], &end, 10);
    if (errno || *end || requested == 0 || argv[1][0] < '0' || argv[1][0] > '9')
        return fail(2, "BYTES must be a positive integer");
    long passes = strtol(argv[2], &end, 10);
    if (*end || passes < 1 || passes > MAX_PASSES) return fail(2, "PASSES must be an integer from 1 to 1000");

    cpu_set_t allowed;
    int cpus[CPU_SETSIZE], ncpus = 0;
    if (sched_getaffinity(0, sizeof allowed, &allowed) == 0)
        for (int c = 0; c < CPU_SETSIZE; c++)
            if (CPU_ISSET(c, &allowed)) cpus[ncpus++] = c;
    long threads = ncpus > 0 ? ncpus : 1;
    if (argc >= 4) {
        threads = strtol(argv[3], &end, 10);
        if (*end || threads < 1 || threads > 1024) return fail(2, "THREADS must be an integer from 1 to 1024");
    }
    const char *forced = argc >= 5 && strcmp(argv[4], "auto") ? argv[4] : NULL;
    isa_t isa = choose(forced);
    if (!isa.read) {
        fprintf(stderr, "read_bandwidth: ISA %s is not one of avx512, avx2, scalar that this CPU supports\n", forced);
        return 2;
    }
    int huge_pages = argc < 6 || !strcmp(argv[5], "huge");
    if (argc == 6 && !huge_pages && strcmp(argv[5], "small")) return fail(2, "PAGES must be huge or small");

    size_t pages_per_thread = (size_t)(requested / PAGE / (unsigned long long)threads);
    if (pages_per_thread == 0) return fail(2, "BYTES must be at least 4096 per thread");
    size_t per_thread = pages_per_thread * PAGE / sizeof(uint64_t), bytes = per_thread * threads * sizeof(uint64_t);
    size_t mapped = (bytes + (2u << 20) - 1) & ~(size_t)((2u << 20) - 1); /* 2 MB aligned, for huge pages */
    uint64_t *words = aligned_alloc(2u << 20, mapped);
    if (!words) return fail(2, "cannot allocate the buffer (out of memory?)");
#if defined(MADV_HUGEPAGE) && defined(MADV_NOHUGEPAGE)
    madvise(words, mapped, huge_pages ? MADV_HUGEPAGE : MADV_NOHUGEPAGE); /* advice: the kernel may say no */
#endif

    pthread_barrier_t start, done;
    pthread_barrier_init(&start, NULL, (unsigned)threads + 1);
    pthread_barrier_init(&done, NULL, (unsigned)threads + 1);
    worker_t *workers = calloc((size_t)threads, sizeof *workers);
    pthread_t *ids = calloc((size_t)threads, sizeof *ids);
    if (!workers || !ids) return fail(2, "cannot allocate the threads' state");
    for (long t = 0; t < threads; t++) {
        workers[t] = (worker_t){words, (size_t)t * per_thread, per_thread, ncpus > 0 ? cpus[t % ncpus] : -1,
                                isa.read, (int)passes, &start, &done, {0}};
        if (pthread_create(&ids[t], NULL, work, &workers[t])) return fail(2, "cannot start a thread");
    }
    pthread_barrier_wait(&done); /* filled */
    unsigned long long huge = huge_page_bytes();

    double seconds[MAX_PASSES];
    for (long pass = 0; pass < passes; pass++) {
        double started = now();
        pthread_barrier_wait(&start);
        pthread_barrier_wait(&done);
        seconds[pass] = now() - started;
    }
    for (long t = 0; t < threads; t++) pthread_join(ids[t], NULL);

    /* sum of 0 .. n-1, modulo 2^64 like the readers' sums */
    uint64_t n = (uint64_t)per_thread * (uint64_t)threads;
    uint64_t expected = (n % 2 == 0) ? (n / 2) * (n - 1) : n * ((n - 1) / 2);
    for (long pass = 0; pass < passes; pass++) {
        uint64_t sum = 0;
        for (long t = 0; t < threads; t++) sum += workers[t].sums[pass];
        if (sum != expected) {
            fprintf(stderr, "read_bandwidth: the %s path read the wrong words (pass %ld: sum %llu, expected %llu)\n",
                    isa.name, pass, (unsigned long long)sum, (unsigned long long)expected);
            return 1;
        }
    }
    printf("{\"bytes\": %zu, \"huge_page_bytes\": %llu, \"threads\": %ld, \"isa\": \"%s\", \"seconds\": [", bytes, huge,
           threads, isa.name);
    for (long pass = 0; pass < passes; pass++) printf("%s%.9f", pass ? ", " : "", seconds[pass]);
    printf("]}\n");
    free(workers);
    free(ids);
    free(words);
    return 0;
}
