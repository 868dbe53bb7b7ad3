"""What this machine can do at best: memory read bandwidth and fp32 matmul rate, the bounds the model
figures are measured against. Both use torch, the fastest CPU kernels installed here, on all cores.

    python -m benchmarks.machine      (prints the figures as JSON)
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path


def read_bandwidth(gigabytes: float = 2.0, repeats: int = 5) -> float:
    """Bytes per second of summing a large fp32 array (bigger than any cache), best of `repeats`."""
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    data = torch.ones(int(gigabytes * 1e9 / 4), dtype=torch.float32)
    data.sum()
    best = min(_timed(data.sum) for _ in range(repeats))
    return data.numel() * 4 / best


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


def describe() -> dict:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    memory = next(
        int(line.split()[1]) * 1024
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines()
        if line.startswith("MemTotal")
    )
    return {
        "cpu": model,
        "cores": len(os.sched_getaffinity(0)),
        "memory_gb": round(memory / 2**30, 1),
        "python": platform.python_version(),
    }


def measure(quick: bool = False) -> dict:
    return {
        **describe(),
        "read_bandwidth_gbps": read_bandwidth(0.5 if quick else 2.0) / 1e9,
        "fp32_matmul_gflops": matmul_rate(512 if quick else 2048) / 1e9,
    }


if __name__ == "__main__":
    print(json.dumps(measure(quick="--quick" in os.sys.argv)))
