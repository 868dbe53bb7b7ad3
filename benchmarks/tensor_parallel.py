"""Tensor parallelism: GLM-4 split across 2 processes (`tensor_parallel_degree=2`, gloo on this CPU) against the
same model in one process, in the same run.

Model: GLM-4-9B's width (hidden 4096, 32 heads over 2 KV groups, FFN 13696, vocabulary 151552) with 2 layers
(quick: a tiny model), random bf16 weights computed by the C++ kernels. Each engine runs in processes of its
own: one process, then 2 ranks started by `python -m paddle.distributed.launch --nproc_per_node 2`, each
loading its half of the same checkpoint and running the same greedy generation (a prompt of PROMPT tokens,
NEW_TOKENS new ones). Figures, 2 ranks vs one process:
- decode tokens/s (after the first token). On one 2-core machine the two ranks share the cores the single
  process uses alone and pay two collectives per layer: no speedup is expected here; split across GPUs or
  machines, each rank has its own;
- each rank's resident memory once loaded (VmRSS), and its peak (VmHWM): the weights a rank holds.

    python -m benchmarks.tensor_parallel worker DIR OUT --degree N [--quick]   (one engine, in its processes)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

from benchmarks.model import ROOT, _row, benchmark_config

PROMPT, NEW_TOKENS = 32, 32


def _memory() -> dict[str, int]:
    """This process's resident memory now and at its peak, bytes."""
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status if line.startswith(("VmRSS", "VmHWM")))
    return {"rss": int(fields["VmRSS"].split()[0]) * 1024, "peak": int(fields["VmHWM"].split()[0]) * 1024}


def worker(model_dir: str, out: str, degree: int, quick: bool) -> None:
    """Load the model (this rank's part), generate greedily, write this rank's figures to OUT/rank<r>.json."""
    import numpy as np

    from paddle_glm4 import GLM4ForCausalLM
    from paddle_glm4.streamer import Streamer

    class Timing(Streamer):
        def on_tokens(self, token_ids):
            pass

        def on_end(self):
            pass

    model = GLM4ForCausalLM.from_pretrained(model_dir, tensor_parallel_degree=degree)
    loaded = _memory()
    new_tokens = 4 if quick else NEW_TOKENS
    prompt = np.random.default_rng(0).integers(3, 400, (1, 8 if quick else PROMPT))
    model.generate(prompt, max_new_tokens=2)  # warm-up: kernels built, buffers allocated
    timing = Timing()
    ids, _ = model.generate(prompt, max_new_tokens=new_tokens, eos_token_id=[], streamer=timing)
    assert timing.first_token_time is not None and timing.last_token_time is not None
    rank = 0 if model.tensor_parallel is None else model.tensor_parallel.rank
    result = {
        "decode_tokens_per_s": (new_tokens - 1) / (timing.last_token_time - timing.first_token_time),
        "loaded_rss": loaded["rss"],
        "peak_rss": _memory()["peak"],
        "tokens": ids.numpy()[0].tolist(),
    }
    with open(os.path.join(out, f"rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(result, f)


def _engine(model_dir: str, degree: int, quick: bool, work: str) -> list[dict]:
    out = tempfile.mkdtemp(dir=work)
    script = [os.path.abspath(__file__), "worker", model_dir, out, "--degree", str(degree), *(["--quick"] * quick)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    if degree == 1:
        command = [sys.executable, *script]
    else:
        command = [
            sys.executable,
            "-m",
            "paddle.distributed.launch",
            "--nproc_per_node",
            str(degree),
            "--log_dir",
            os.path.join(out, "log"),
            *script,
        ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"the {degree}-process engine failed:\n{done.stderr[-3000:]}{done.stdout[-3000:]}")
    results = []
    for rank in range(degree):
        with open(os.path.join(out, f"rank{rank}.json"), encoding="utf-8") as f:
            results.append(json.load(f))
    return results


def run(quick: bool = False) -> list[dict]:
    from benchmarks.full_depth import write_random_checkpoint

    with tempfile.TemporaryDirectory(prefix="glm4-tp-bench-") as work:
        model_dir = os.path.join(work, "model")
        config = dataclasses.replace(benchmark_config(quick), num_hidden_layers=2, dtype="bfloat16")
        write_random_checkpoint(model_dir, config)
        started = time.perf_counter()
        [alone] = _engine(model_dir, 1, quick, work)
        split = _engine(model_dir, 2, quick, work)
        print(f"tensor-parallel: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    if any(rank["tokens"] != alone["tokens"] for rank in split):
        raise RuntimeError("the split model generated other tokens than one process")
    gb = 1 << 30
    rows = [
        _row(
            "decode tokens/s, TP=2 (gloo, one machine) vs 1 process",
            split[0]["decode_tokens_per_s"],
            alone["decode_tokens_per_s"],
            "1 process",
            "tokens/s",
        )
    ]
    for rank, figures in enumerate(split):
        rows.append(
            _row(
                f"RSS once loaded, rank {rank} of 2 vs 1 process",
                figures["loaded_rss"] / gb,
                alone["loaded_rss"] / gb,
                "1 process",
                "GB",
            )
        )
    rows.append(
        _row(
            "peak RSS, the larger rank of 2 vs 1 process",
            max(r["peak_rss"] for r in split) / gb,
            alone["peak_rss"] / gb,
            "1 process",
            "GB",
        )
    )
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="one tensor-parallel benchmark engine, in its processes")
    parser.add_argument("mode", choices=["worker"], help="run one engine's process (launched by run())")
    parser.add_argument("model_dir", help="the checkpoint")
    parser.add_argument("out", help="where each rank writes its figures")
    parser.add_argument("--degree", type=int, default=1, help="tensor_parallel_degree (1: one process)")
    parser.add_argument("--quick", action="store_true", help="the tiny model's settings")
    args = parser.parse_args()
    worker(args.model_dir, args.out, args.degree, args.quick)
