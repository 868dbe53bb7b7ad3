"""Where the model runs and in which dtype: the one place that looks at the hardware.

Paddle 3.3's CPU build has no bf16/fp16 compute kernels (matmul, softmax, silu), so on CPU the model
computes in float32 whatever the checkpoint stores; on GPU it computes in the checkpoint's half dtype.

`import paddle_glm4` imports this module (to tune MKL before Paddle's first GEMM) and must not import Paddle,
so the functions that ask Paddle import it themselves.
"""

from __future__ import annotations

import os

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def on_gpu() -> bool:
    import paddle

    return paddle.is_compiled_with_cuda() and paddle.device.get_device().startswith("gpu")


def compute_dtype(requested: str | None, stored: str) -> str:
    """The dtype to hold weights and activations in, given what the caller asked for and the checkpoint stores."""
    import paddle

    if requested is not None and requested not in COMPUTE_DTYPES:
        raise ValueError(f"dtype must be one of {COMPUTE_DTYPES}, got {requested!r}")
    if on_gpu():
        return requested or stored
    if requested in ("bfloat16", "float16"):
        raise ValueError(
            f"dtype={requested!r} cannot compute on CPU: Paddle {paddle.__version__} has no {requested} CPU kernels. "
            "Use float32 (the CPU default), or the Paddle Inference predictor with precision='bfloat16'."
        )
    return "float32"


def prefer_mkl_avx2_on_amd() -> bool:
    """Let MKL use its AVX2 kernels on AMD CPUs; returns whether it was switched on.

    Paddle's CPU build does its fp32 GEMMs in MKL, which on AMD CPUs takes a generic code path that is
    3-6x slower (measured here: an AMD EPYC with AVX2). MKL_DEBUG_CPU_TYPE=5 selects the AVX2 path; MKL
    reads it at its first call, so this runs when paddle_glm4 is imported. Only on AMD CPUs that do have
    AVX2 and FMA, and never over a value the user set.
    """
    if "MKL_DEBUG_CPU_TYPE" in os.environ:
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            info = f.read(1 << 16)
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    if "AuthenticAMD" not in info or "avx2" not in flags or "fma" not in flags:
        return False
    os.environ["MKL_DEBUG_CPU_TYPE"] = "5"
    return True


prefer_mkl_avx2_on_amd()


# mallopt(3)'s parameters (<malloc.h>)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
REUSED_BLOCK = 256 << 20  # the largest freed block kept for reuse; a 512-token chunk's largest activation is 56 MB
THRESHOLDS = ("mmap_threshold", "trim_threshold")  # as GLIBC_TUNABLES names them; MALLOC_<NAME>_ in upper case


def reuse_freed_memory() -> bool:
    """Let glibc keep freed blocks of up to 256 MB for the next allocation; returns whether it was switched on.

    Paddle's CPU allocator takes every tensor from malloc, and glibc gives a block above its mmap threshold
    (which it raises by itself, to 32 MB at most) back to the kernel when it is freed. So each layer of a
    prefill mapped its large activations anew (a 512-token chunk's gate_up output is 56 MB), the kernel faulted
    them in 4 KB at a time and zeroed every page: 31k page faults per 512-token prefill at GLM-4-9B's width, and
    with the blocks kept, none and 5-8% more tokens/s (benchmarks/NOTES.md). The heap's free top is given back
    beyond twice that size, glibc's own ratio. Called once the weights are loaded, which keep their own
    mappings. Only where glibc's malloc is the one in use (not another C library, nor an allocator put in front
    of it with LD_PRELOAD), and never over a threshold the user set (MALLOC_MMAP_THRESHOLD_,
    MALLOC_TRIM_THRESHOLD_ or their GLIBC_TUNABLES names).
    """
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if any(os.environ.get(f"MALLOC_{name.upper()}_") or f"glibc.malloc.{name}" in tunables for name in THRESHOLDS):
        return False
    import ctypes

    try:
        process = ctypes.CDLL(None)  # the symbols as the process resolves them
        if not hasattr(process, "gnu_get_libc_version"):  # another C library: its mallopt takes other parameters
            return False
        glibc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    if ctypes.cast(process.malloc, ctypes.c_void_p).value != ctypes.cast(glibc.malloc, ctypes.c_void_p).value:
        return False  # another allocator was preloaded: glibc's thresholds would not apply to it
    mallopt = glibc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, REUSED_BLOCK) and mallopt(M_TRIM_THRESHOLD, 2 * REUSED_BLOCK))


_cpu_threads = 1


def use_all_cores(threads: int | None = None) -> int:
    """Paddle runs one CPU thread unless told otherwise; GEMM and GEMV scale with cores, so use them all."""
    import paddle

    global _cpu_threads
    _cpu_threads = threads or len(os.sched_getaffinity(0))
    paddle.base.core.set_num_threads(_cpu_threads)
    return _cpu_threads


def cpu_threads() -> int:
    """The CPU threads Paddle's kernels run on (set by use_all_cores)."""
    return _cpu_threads
