"""Microbenchmark of the C++ linear kernels (paddle_glm4.kernels) on GLM-4-9B's shapes.

For each shape, format, activation dtype, path and row count: the time of one y = x @ W^T, as GB/s of
stored weight bytes read (what bounds decoding) and GFLOP/s (what bounds prefill), beside the machine's
read bandwidth (benchmarks.machine, torch) and Paddle's float32 matmul of the same shape in the same run.
Weights are random bytes in the stored formats (speed does not depend on their values); each call takes the
next of enough copies to fill 4x the last-level cache, so that weights stream from memory as a model's do.

    python -m benchmarks.kernels [--quick] [--shapes qkv,o,...] [--formats bf16,int8,int4] [--rows 1,16,512]
                                 [--paths auto,avx2,...] [--acts auto,float32,...] [--threads N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

SHAPES = {
    "qkv": (4096, 4608),
    "o": (4096, 4096),
    "gate_up": (4096, 27392),
    "down": (13696, 4096),
    "lm_head": (4096, 151552),
}


def timed(fn, seconds: float = 1.0, at_least: int = 3) -> float:
    """Best time of fn() over a few runs (at least `at_least`, up to ~`seconds` in all)."""
    fn()
    best, spent, runs = float("inf"), 0.0, 0
    while runs < at_least or spent < seconds:
        started = time.perf_counter()
        fn()
        took = time.perf_counter() - started
        best, spent, runs = min(best, took), spent + took, runs + 1
        if runs >= 50:
            break
    return best


def stored_weights(fmt: str, k: int, n: int, group: int, rng):
    import paddle

    if fmt == "bf16":
        bits = rng.integers(0x3C00, 0x3F00, (n, k), dtype=np.int32).astype(np.int16)  # values in [2^-7, 0.5)
        return paddle.to_tensor(bits).view(paddle.bfloat16), None, n * k * 2
    if fmt == "int8":
        q = rng.integers(-127, 128, (n, k), dtype=np.int8)
        return paddle.to_tensor(q), paddle.to_tensor(rng.random(n, dtype=np.float32)), n * k + 4 * n
    groups = -(-k // group)
    q = rng.integers(0, 256, (n, (k + 1) // 2), dtype=np.uint8)
    scales = rng.random((n, groups), dtype=np.float32)
    return paddle.to_tensor(q), paddle.to_tensor(scales), q.size + scales.size * 4


def rotating(linear, x, copies, **options):
    """A call of linear on x that takes the next weight copy each time."""
    turn = iter(range(1 << 62))

    def call():
        weight, scales, _ = copies[next(turn) % len(copies)]
        return linear(x, weight, scales, **options)

    return call


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two small shapes, fewer combinations")
    parser.add_argument("--shapes", default="qkv,o,gate_up,down,lm_head", help="comma-separated: " + ",".join(SHAPES))
    parser.add_argument("--formats", default="bf16,int8,int4", help="comma-separated: bf16,int8,int4")
    parser.add_argument("--group", type=int, default=128, help="int4 group size")
    parser.add_argument("--rows", default="1,16,512", help="comma-separated row counts (512 skips lm_head)")
    parser.add_argument("--paths", default="auto", help="comma-separated: auto or scalar,avx2,avx512vnni,avx512bf16")
    parser.add_argument("--acts", default="auto", help="comma-separated: auto,float32,bfloat16,int8")
    parser.add_argument("--threads", type=int, default=0, help="kernel threads (0: every core)")
    parser.add_argument("--json", help="also write the rows as JSON to this file")
    args = parser.parse_args(argv)

    import paddle

    from benchmarks import machine
    from paddle_glm4 import kernels
    from paddle_glm4.device import use_all_cores

    if not kernels.available():
        print("the C++ kernels could not be built here", file=sys.stderr)
        return 2
    threads = use_all_cores(args.threads or None)
    shapes = ["qkv", "down"] if args.quick else args.shapes.split(",")
    rows_list = [1, 16] if args.quick else [int(r) for r in args.rows.split(",")]
    bandwidth = machine.read_bandwidth(machine.beyond_caches(0.5 if args.quick else 2.0)) / 1e9
    copies_bytes = int(machine.beyond_caches(0.128) * 1e9)
    print(f"CPU path {kernels.isa()}, {threads} threads, read bandwidth {bandwidth:.1f} GB/s (torch sum)")
    print(
        f"{'shape':8} {'rows':>4} {'format':6} {'act':8} {'path':10} {'ms':>8} {'GB/s':>6} {'%bw':>5} "
        f"{'GFLOP/s':>8} {'paddle fp32 GFLOP/s':>19}"
    )
    rng = np.random.default_rng(0)
    results = []
    for shape in shapes:
        k, n = SHAPES[shape]
        w32 = paddle.to_tensor(rng.standard_normal((k, n), dtype=np.float32) * 0.02)
        for rows in rows_list:
            if rows > 64 and shape == "lm_head":
                continue
            x = paddle.to_tensor(rng.standard_normal((rows, k), dtype=np.float32))
            peer = timed(lambda x=x, w32=w32: paddle.matmul(x, w32))
            for fmt in args.formats.split(","):
                copies = [stored_weights(fmt, k, n, args.group, rng)]
                nbytes = copies[0][2]
                copies += [stored_weights(fmt, k, n, args.group, rng) for _ in range(-(-copies_bytes // nbytes) - 1)]
                for act in args.acts.split(","):
                    if act == "int8" and fmt == "bf16":
                        continue
                    for path in args.paths.split(","):
                        took = timed(
                            rotating(
                                kernels.linear,
                                x,
                                copies,
                                fmt=fmt,
                                group_size=args.group,
                                activation_dtype=act,
                                isa=path,
                                threads=threads,
                            )
                        )
                        row = {
                            "shape": shape,
                            "k": k,
                            "n": n,
                            "rows": rows,
                            "format": fmt,
                            "act": act,
                            "path": kernels.isa(path),
                            "ms": took * 1e3,
                            "gbps": nbytes / took / 1e9,
                            "bandwidth_fraction": nbytes / took / 1e9 / bandwidth,
                            "gflops": 2 * rows * k * n / took / 1e9,
                            "paddle_fp32_gflops": 2 * rows * k * n / peer / 1e9,
                        }
                        results.append(row)
                        print(
                            f"{shape:8} {rows:4} {fmt:6} {act:8} {row['path']:10} {row['ms']:8.2f} "
                            f"{row['gbps']:6.1f} {100 * row['bandwidth_fraction']:4.0f}% {row['gflops']:8.1f} "
                            f"{row['paddle_fp32_gflops']:19.1f}",
                            flush=True,
                        )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"read_bandwidth_gbps": bandwidth, "threads": threads, "rows": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
