"""What this machine can do at best: memory read bandwidth and fp32 matmul rate, the bounds the model
figures are measured against.

The read bandwidth is measured by a small C program (read_bandwidth.c) that reads a buffer far larger than the
caches the way a decode step reads its weights: every core streams its own long contiguous run, with the widest
loads the CPU has (AVX-512, AVX2 or plain C, chosen at run time), best of several passes. It is compiled on first
use with the system's C compiler into a per-user cache. torch's sum, the probe before it, read 20-30% below what
the machine delivers (llama.cpp decoded at up to 1.9x "its bound"); it remains the fallback where no C compiler is
found, with the reason printed and named in the reading's `method`. The matmul rate uses torch's matmul, the
fastest CPU kernels installed here, on all cores.

    python -m benchmarks.machine [--quick]      (prints the figures as JSON)
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROBE_SOURCE = Path(__file__).resolve().with_name("read_bandwidth.c")
PROBE_FLAGS = ["-O2", "-pthread"]  # no -march: the program picks its loads by the CPU it runs on


class ProbeUnavailable(RuntimeError):
    """The C read probe cannot be built here; the message says why, in one line."""


@dataclasses.dataclass(frozen=True)
class Reading:
    rate: float  # bytes per second, the best pass
    median: float  # bytes per second, the median pass: far below `rate` means the machine was busy
    method: str  # how it was measured, for the report


def probe_binary() -> Path:
    """The compiled read probe, built on first use into ~/.cache/paddle_glm4/probe/<key>/ (XDG_CACHE_HOME
    honoured; the key hashes the source, the compiler and its flags). Raises ProbeUnavailable without a C
    compiler ($CC, else cc) or when it fails to compile the probe."""
    compiler = os.environ.get("CC") or "cc"
    path = shutil.which(compiler)
    if path is None:
        raise ProbeUnavailable(f"no C compiler ({compiler} not found): install gcc")
    digest = hashlib.sha256(PROBE_SOURCE.read_bytes())
    digest.update("\0".join([path, *PROBE_FLAGS]).encode())
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    directory = Path(base) / "paddle_glm4" / "probe" / digest.hexdigest()[:16]
    binary = directory / "read_bandwidth"
    if os.access(binary, os.X_OK):
        return binary
    directory.mkdir(parents=True, exist_ok=True)
    # each builder writes its own file and renames it into place: two at once cannot leave a half-written one
    handle, partial = tempfile.mkstemp(dir=directory, prefix=".read_bandwidth.")
    os.close(handle)
    try:
        done = subprocess.run(
            [path, *PROBE_FLAGS, "-o", partial, str(PROBE_SOURCE)], capture_output=True, text=True, timeout=120
        )
        if done.returncode:
            errors = [line for line in done.stderr.splitlines() if "error" in line] or done.stderr.splitlines() or [""]
            raise ProbeUnavailable(f"{compiler} failed to compile {PROBE_SOURCE.name}: {errors[0].strip()}")
        os.replace(partial, binary)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return binary


def stream_read(
    gigabytes: float = 1.0, passes: int = 10, threads: int | None = None, isa: str | None = None, pages: str = "huge"
) -> Reading:
    """Read `gigabytes` of memory `passes` times with the C probe on `threads` threads (default: every core this
    process may use), the `isa` path (avx512, avx2, scalar; default the widest the CPU has), in `pages` ("huge":
    2 MB pages where the kernel grants them, the machine's best; "small": 4 KB pages, what an engine reading a
    memory-mapped file gets). Raises ProbeUnavailable where the probe cannot be built, RuntimeError when it fails."""
    threads = threads or len(os.sched_getaffinity(0))
    command = [str(probe_binary()), str(int(gigabytes * 1e9)), str(passes), str(threads), isa or "auto", pages]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise RuntimeError(f"the read probe failed ({done.returncode}): {done.stderr.strip()}")
    result = json.loads(done.stdout)
    seconds = result["seconds"]
    if len(seconds) != passes or min(seconds) <= 0:
        raise RuntimeError(f"the read probe reported {seconds!r} for {passes} passes")
    huge = result["huge_page_bytes"] / result["bytes"]
    return Reading(
        rate=result["bytes"] / min(seconds),
        median=result["bytes"] / statistics.median(seconds),
        method=(
            f"C streaming read ({result['isa']}, {result['threads']} threads, {result['bytes'] / 1e9:.2f} GB, "
            f"{min(huge, 1.0):.0%} in huge pages, best of {passes})"
        ),
    )


def read(gigabytes: float = 1.0, passes: int = 10, pages: str = "huge") -> Reading:
    """The machine's read bandwidth: the C probe's, or where it cannot be built torch's sum (the reason printed)."""
    try:
        return stream_read(gigabytes, passes, pages=pages)
    except ProbeUnavailable as why:
        print(
            f"read bandwidth: {why}; falling back to torch's sum, which reads below the machine's rate", file=sys.stderr
        )
        rate, median = torch_sum_bandwidth(gigabytes, passes)
        return Reading(rate, median, f"torch's sum ({why})")


def read_bandwidth(gigabytes: float = 2.0, repeats: int = 5) -> float:
    """Bytes per second the machine reads at best (see `read`)."""
    return read(gigabytes, repeats).rate


def torch_sum_bandwidth(gigabytes: float, repeats: int) -> tuple[float, float]:
    """Bytes per second of summing a large fp32 array on all cores: (best, median) of `repeats`."""
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    data = torch.ones(int(gigabytes * 1e9 / 4), dtype=torch.float32)
    data.sum()
    times = [_timed(data.sum) for _ in range(repeats)]
    return data.numel() * 4 / min(times), data.numel() * 4 / statistics.median(times)


def matmul_rate(size: int = 2048, repeats: int = 3) -> float:
    """fp32 FLOP per second of a [size, 4096] x [4096, 4096] matmul, best of `repeats`."""
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    a, b = torch.randn(size, 4096), torch.randn(4096, 4096)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size * 4096 * 4096 / best


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def last_level_cache_bytes(caches: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int:
    """The largest CPU cache's size (Linux's sysfs; 32 MB where it does not say): from 32 MB on the EPYCs here
    to 260 MB on a Xeon."""
    sizes = []
    for index in caches.glob("index*"):
        try:
            text = (index / "size").read_text(encoding="ascii").strip()
        except OSError:
            continue
        if text[:-1].isdigit() and text[-1] in "KMG":
            sizes.append(int(text[:-1]) << {"K": 10, "M": 20, "G": 30}[text[-1]])
    return max(sizes, default=32 << 20)


def beyond_caches(gigabytes: float) -> float:
    """`gigabytes`, or 4x the last-level cache where that is more: a buffer read for the memory's rate must not
    fit in the caches."""
    return max(gigabytes, 4 * last_level_cache_bytes() / 1e9)


def memory_bytes() -> int:
    """The machine's RAM (MemTotal)."""
    return next(
        int(line.split()[1]) * 1024
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines()
        if line.startswith("MemTotal")
    )


def describe() -> dict:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cpu": model,
        "cores": len(os.sched_getaffinity(0)),
        "memory_gb": round(memory_bytes() / 2**30, 1),
        "python": platform.python_version(),
    }


def measure(quick: bool = False, pages: str = "huge") -> dict:
    bandwidth = read(beyond_caches(0.5 if quick else 2.0), pages=pages)
    return {
        **describe(),
        "read_bandwidth_gbps": bandwidth.rate / 1e9,
        "read_bandwidth_method": bandwidth.method,
        "fp32_matmul_gflops": matmul_rate(512 if quick else 2048) / 1e9,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m benchmarks.machine", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller buffers and matrices (seconds, not tens)")
    parser.add_argument(
        "--pages",
        choices=["huge", "small"],
        default="huge",
        help="read memory in 2 MB pages (the machine's best, the default) or 4 KB pages (a memory-mapped file's)",
    )
    args = parser.parse_args()
    print(json.dumps(measure(args.quick, args.pages)))
