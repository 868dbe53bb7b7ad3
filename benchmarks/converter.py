"""Benchmark of the weight converter (not a test): throughput against `cp`, and peak memory.

A synthetic GLM-4 checkpoint in the published torch layout, bf16, cut into 2GB shards like the real one:
full mode has GLM-4-9B's full width (hidden 4096, ffn 13696, vocab 151552, 32 heads, 2 KV groups) and
3 layers, about 3.7 GB; quick mode is tiny. Its bytes are random (the converter never looks at values).

Compared, alternately and three times each (best time kept: this VM's disk and memory vary from run to run),
with the page cache warm and flushed first:
- `cp -r SRC DST && sync`: the same bytes copied and made durable. The converter fsyncs its output
  before renaming it into place, so `cp` alone, which returns while its data is still in the page
  cache, would compare a durable write with a pending one;
- `torch_to_paddle.convert(SRC, DST)` with verification on (the default), in a fresh process, timed
  around the call (interpreter start-up and imports excluded) and its peak RSS read from VmHWM.

    python -c "from benchmarks.converter import run; print(run())"
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in a fresh interpreter: converts, then reports its own timing and peak memory.
_CHILD = """
import json, sys, time
from converters import torch_to_paddle
def rss(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))
baseline = rss("VmRSS:")
started = time.perf_counter()
summary = torch_to_paddle.convert(sys.argv[1], sys.argv[2], verify=sys.argv[3] == "verify", progress=False)
print(json.dumps({"seconds": time.perf_counter() - started, "bytes": summary.bytes,
                  "peak_rss": rss("VmHWM:"), "baseline_rss": baseline}))
"""


def synthetic_checkpoint(directory: str, config, shard_size: str = "2GB") -> int:
    """Write a published-layout bf16 checkpoint of random bits; returns the size of its largest tensor."""
    from converters import mapping
    from converters.paddle_to_torch import canonical_plan, published_tensors
    from converters.pipeline import Plan, SourceTensor, build
    from paddle_glm4.checkpoint import parse_size

    pool = np.random.default_rng(0).integers(0, 1 << 16, size=1 << 22, dtype=np.uint16)  # 8 MB of noise

    def noise(shape):  # a tensor of random bits that takes no memory: row r is the pool from element 7r on
        return np.lib.stride_tricks.as_strided(pool, shape, (14, 2) if len(shape) == 2 else (2,), writeable=False)

    sources = {
        spec.paddle: SourceTensor("memory", spec.paddle, "bfloat16", spec.shape, lambda s=spec.shape: noise(s))
        for spec in mapping.tensor_specs(config)
    }
    tensors = published_tensors(config, sources, "bfloat16")
    files, texts = canonical_plan(config, tensors, parse_size(shard_size))
    build(directory, Plan(files, config, texts, {}, {}), overwrite=False, verify=False, progress=False)
    return max(t.nbytes for t in tensors)


def _timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - started


def _convert(src: str, dst: str, verify: bool) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, src, dst, "verify" if verify else "no-verify"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "GLOG_minloglevel": "2"},
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def _size(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(directory, name)) for name in os.listdir(directory))


def run(quick: bool = False) -> list[dict]:
    from paddle_glm4 import GLM4Config

    if quick:
        config = GLM4Config(
            vocab_size=8192,
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=32,
            pad_token_id=0,
            eos_token_id=[1],
            dtype="bfloat16",
        )
    else:
        config = GLM4Config(num_hidden_layers=3, dtype="bfloat16")  # GLM-4-9B's width
    work = tempfile.mkdtemp(prefix="glm4-convert-bench-", dir=os.environ.get("BENCH_DIR"))
    src, copy, dst = (os.path.join(work, name) for name in ("torch", "copy", "paddle"))
    try:
        largest = synthetic_checkpoint(src, config, "2GB" if not quick else "4MB")
        total = _size(src)
        subprocess.run(
            ["cat", *(os.path.join(src, f) for f in os.listdir(src))], stdout=subprocess.DEVNULL, check=True
        )  # warm the page cache for both contenders
        cp_times, ours, unverified = [], [], []
        for _ in range(3):
            subprocess.run(["sync"], check=True)
            cp_times.append(_timed(["sh", "-c", f'cp -r "{src}" "{copy}" && sync']))
            shutil.rmtree(copy)
            subprocess.run(["sync"], check=True)
            ours.append(_convert(src, dst, verify=True))
            shutil.rmtree(dst)
            subprocess.run(["sync"], check=True)
            unverified.append(_convert(src, dst, verify=False))
            shutil.rmtree(dst)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cp_rate = total / min(cp_times) / 1e6
    best = min(ours, key=lambda r: r["seconds"])
    fast = min(unverified, key=lambda r: r["seconds"])
    peak = max(r["peak_rss"] for r in ours + unverified)
    size = f"{total / 1e9:.2f} GB, {config.num_hidden_layers} layers, hidden {config.hidden_size}"
    rows = [
        {
            "figure": f"torch -> Paddle conversion throughput, verified ({size})",
            "ours": total / best["seconds"] / 1e6,
            "peer": cp_rate,
            "peer_name": "cp -r + sync",
            "unit": "MB/s",
        },
        {
            "figure": f"torch -> Paddle conversion throughput, --no-verify ({size})",
            "ours": total / fast["seconds"] / 1e6,
            "peer": cp_rate,
            "peer_name": "cp -r + sync",
            "unit": "MB/s",
        },
        {
            "figure": "converter peak RSS, as a multiple of the largest tensor",
            "ours": peak / largest,
            "peer": 2.5,
            "peer_name": "target",
            "unit": "x",
        },
        {
            "figure": "converter peak RSS",
            "ours": peak / 1e6,
            "peer": largest / 1e6,
            "peer_name": "largest tensor",
            "unit": "MB",
        },
        {
            "figure": "converter RSS before converting (interpreter, numpy, Paddle)",
            "ours": best["baseline_rss"] / 1e6,
            "peer": largest / 1e6,
            "peer_name": "largest tensor",
            "unit": "MB",
        },
    ]
    return [dict(row, ratio=row["ours"] / row["peer"]) for row in rows]


if __name__ == "__main__":
    for row in run(quick="--quick" in sys.argv):
        print(row)
