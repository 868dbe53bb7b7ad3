"""Model speed and memory, ours against transformers' GlmForCausalLM on torch, on the same weights.

Model: GLM-4-9B's geometry (hidden 4096, 32 heads, 2 KV groups, ffn 13696, vocab 151552) with 2 layers
(quick: a tiny model), random fp32 weights made once by torch and converted with our converter, so
every engine computes with the same numbers. Each engine runs in a fresh process (so its peak RSS is
its own), one after the other:
- torch:            transformers' GlmForCausalLM.generate, fp32, all cores;
- paddle:           our dynamic-graph GLM4ForCausalLM.generate, fp32;
- inference-fp32:   our Paddle Inference predictor (static export) with float32 weights, Paddle's CPU kernels;
- inference-bf16:   the same with bf16-stored weights, widened to float32 where used (this CPU has no
                    AVX-512, so oneDNN's bf16 mode is not available; see the README).
Figures, each the median of several runs after a warm-up: decode tokens/s at batch 1 and 8 after a
128-token prompt (greedy, no early stop), prefill tokens/s of a 512-token prompt, peak RSS; each of ours
against torch, the predictor also against our dynamic graph, and against the machine's bounds.

    python -m benchmarks.model worker ENGINE MODEL_DIR [--quick]   (one engine; prints JSON)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINES = ("torch", "paddle", "inference-fp32", "inference-bf16")
PROMPT, PREFILL = 128, 512


def settings(quick: bool) -> dict:
    if quick:
        return {"layers": 2, "new_tokens": 4, "runs": 1, "prompt": 16, "prefill": 32, "tiny": True}
    return {"layers": 2, "new_tokens": 32, "runs": 3, "prompt": PROMPT, "prefill": PREFILL, "tiny": False}


def benchmark_config(quick: bool):
    from paddle_glm4 import GLM4Config

    if quick:
        return GLM4Config(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            seq_length=1024,
            pad_token_id=0,
            eos_token_id=[1],
            dtype="float32",
        )
    return GLM4Config(num_hidden_layers=settings(quick)["layers"], seq_length=8192, dtype="float32")


# ---- the engines, each measured in its own process ------------------------------------------------------
class _Timing:
    """Times the first and the last new token; works as our streamer and as a transformers streamer."""

    def __init__(self, skip_first_put: bool):
        self.skip, self.times, self.cancelled = skip_first_put, [], False

    def put(self, _tokens):
        if self.skip:  # transformers hands the prompt to the streamer first
            self.skip = False
            return
        self.times.append(time.perf_counter())

    def end(self):
        pass


def _torch_engine(model_dir: str):
    import torch
    from transformers import GlmForCausalLM

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    model = GlmForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def generate(ids, new_tokens, timing=None):
        with torch.no_grad():
            model.generate(
                torch.from_numpy(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
                streamer=timing,
            )

    return generate, True


def _paddle_engine(model_dir: str, engine: str):
    if engine == "paddle":
        from paddle_glm4 import GLM4ForCausalLM

        model = GLM4ForCausalLM.from_pretrained(model_dir)
    else:
        from paddle_glm4.inference import Predictor

        model = Predictor(model_dir, precision="bfloat16" if engine == "inference-bf16" else "float32")

    def generate(ids, new_tokens, timing=None):
        model.generate(ids, max_new_tokens=new_tokens, eos_token_id=[], streamer=timing)

    return generate, False


def worker(engine: str, model_dir: str, quick: bool) -> dict:
    import numpy as np

    s = settings(quick)
    # the bf16-stored predictor decodes ~15x slower (each weight widened per use; see the README): fewer steps,
    # as every step costs the same (the cache is allocated once, each step attends over all of it)
    new_tokens = max(4, s["new_tokens"] // 4) if engine == "inference-bf16" else s["new_tokens"]
    generate, skips_prompt = _torch_engine(model_dir) if engine == "torch" else _paddle_engine(model_dir, engine)
    vocab = 512 if quick else 151552
    rng = np.random.default_rng(0)
    result = {"engine": engine}
    for batch in (1, 8):
        ids = rng.integers(3, vocab, (batch, s["prompt"])).astype("int64")
        generate(ids, 2)  # warm-up
        rates = []
        for _ in range(s["runs"]):
            timing = _Timing(skips_prompt)
            generate(ids, new_tokens, timing)
            rates.append(batch * (len(timing.times) - 1) / (timing.times[-1] - timing.times[0]))
        result[f"decode_b{batch}"] = statistics.median(rates)
    ids = rng.integers(3, vocab, (1, s["prefill"])).astype("int64")
    generate(ids, 1)
    times = []
    for _ in range(s["runs"]):
        started = time.perf_counter()
        generate(ids, 1)
        times.append(time.perf_counter() - started)
    result["prefill"] = s["prefill"] / statistics.median(times)
    result["peak_rss"] = _peak_rss()
    return result


def _peak_rss() -> int:
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over from the parent across fork/exec
    with open("/proc/self/status", encoding="utf-8") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


# ---- the run: weights once, every engine, figures -------------------------------------------------------
def _make_weights(workdir: str, quick: bool) -> dict:
    """Random fp32 weights: the transformers layout for torch, converted to ours, exported for the predictor."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from conftest import reference_model  # the same random reference model the parity tests use
    from converters import torch_to_paddle

    config = benchmark_config(quick)
    dirs = {"torch": os.path.join(workdir, "hf"), "paddle": os.path.join(workdir, "paddle")}
    reference = reference_model(config, seed=0, std=0.02)
    reference.save_pretrained(dirs["torch"])
    del reference
    torch_to_paddle.convert(dirs["torch"], dirs["paddle"], progress=False)
    try:
        from paddle_glm4.inference import export_model
    except ImportError:  # the predictor is optional in this run
        return dirs
    for engine, dtype in (("inference-fp32", "float32"), ("inference-bf16", "bfloat16")):
        dirs[engine] = os.path.join(workdir, engine)
        export_model(dirs["paddle"], dirs[engine], dtype=dtype, max_seq_len=max(PREFILL, PROMPT) + 64)
    return dirs


def _run_worker(engine: str, model_dir: str, quick: bool) -> dict:
    command = [sys.executable, "-m", "benchmarks.model", "worker", engine, model_dir] + (["--quick"] if quick else [])
    env = {**os.environ, "PYTHONPATH": ROOT}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"benchmark worker {engine} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(quick: bool = False, machine: dict | None = None) -> list[dict]:
    from benchmarks.machine import measure

    machine = machine or measure(quick)
    config = benchmark_config(quick)
    with tempfile.TemporaryDirectory(prefix="glm4-bench-") as workdir:
        # in a process of its own, which returns the memory of the models it builds (at full width ~10 GB)
        # before the engines run
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            dirs = pool.submit(_make_weights, workdir, quick).result()
        results = {engine: _run_worker(engine, dirs[engine], quick) for engine in ENGINES if engine in dirs}
    torch, dynamic = results["torch"], results["paddle"]
    # bytes read per decoded token: every weight except the embedding table (a lookup reads one row)
    weights = sum(n for n in _parameter_counts(config).values())
    bound = {
        dtype: machine["read_bandwidth_gbps"] * 1e9 / (weights * size) for dtype, size in (("fp32", 4), ("bf16", 2))
    }
    # prefill FLOPs: every layer weight multiplies every prompt token, the lm_head only the last one (the
    # prompt's other logits are never computed); attention's own products (~2% at 512 tokens) are left out
    head = _parameter_counts(config)["lm_head.weight"]
    prompt = settings(quick)["prefill"]
    flops_per_token = 2 * ((weights - head) * prompt + head) / prompt
    rows = []
    for engine, r in results.items():
        if engine == "torch":
            continue
        label = {
            "paddle": "ours, dynamic graph",
            "inference-fp32": "ours, Paddle Inference fp32",
            "inference-bf16": "ours, Paddle Inference bf16",
        }[engine]
        rows += [
            _row(f"decode tokens/s, batch 1 ({label})", r["decode_b1"], torch["decode_b1"], "torch fp32", "tokens/s"),
            _row(f"decode tokens/s, batch 8 ({label})", r["decode_b8"], torch["decode_b8"], "torch fp32", "tokens/s"),
            _row(
                f"prefill tokens/s, {settings(quick)['prefill']}-token prompt ({label})",
                r["prefill"],
                torch["prefill"],
                "torch fp32",
                "tokens/s",
            ),
            _row(
                f"peak RSS, lower is better ({label})", r["peak_rss"] / 1e9, torch["peak_rss"] / 1e9, "torch fp32", "GB"
            ),
            _row(
                f"decode batch 1 vs the bandwidth bound ({label})",
                r["decode_b1"],
                bound["bf16" if engine == "inference-bf16" else "fp32"],
                "read bandwidth / weight bytes",
                "tokens/s",
            ),
            _row(
                f"prefill vs this machine's fp32 matmul rate ({label})",
                r["prefill"] * flops_per_token / 1e9,
                machine["fp32_matmul_gflops"],
                "torch matmul",
                "GFLOP/s",
            ),
        ]
    for engine in ("inference-fp32", "inference-bf16"):
        if engine in results:
            r, label = results[engine], f"Paddle Inference {engine[-4:]} vs our dynamic graph"
            rows += [
                _row(f"{figure} ({label})", r[key] * scale, dynamic[key] * scale, "ours, dynamic graph", unit)
                for key, figure, unit, scale in (
                    ("decode_b1", "decode tokens/s, batch 1", "tokens/s", 1),
                    ("decode_b8", "decode tokens/s, batch 8", "tokens/s", 1),
                    ("prefill", f"prefill tokens/s, {settings(quick)['prefill']}-token prompt", "tokens/s", 1),
                    ("peak_rss", "peak RSS, lower is better", "GB", 1e-9),
                )
            ]
    rows += [
        _row(
            "decode batch 1 vs the bandwidth bound (torch fp32)",
            torch["decode_b1"],
            bound["fp32"],
            "read bandwidth / weight bytes",
            "tokens/s",
        ),
        _row(
            "prefill vs this machine's fp32 matmul rate (torch fp32)",
            torch["prefill"] * flops_per_token / 1e9,
            machine["fp32_matmul_gflops"],
            "torch matmul",
            "GFLOP/s",
        ),
    ]
    return rows


def _parameter_counts(config) -> dict[str, int]:
    import numpy as np

    from converters import mapping

    return {
        spec.paddle: int(np.prod(spec.shape))
        for spec in mapping.tensor_specs(config)
        if spec.paddle != "model.embed_tokens.weight"
    }


def _row(figure: str, ours: float, peer: float, peer_name: str, unit: str) -> dict:
    return {"figure": figure, "ours": ours, "peer": peer, "peer_name": peer_name, "unit": unit, "ratio": ours / peer}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="one model benchmark engine, in its own process")
    parser.add_argument("mode", choices=["worker"])
    parser.add_argument("engine", choices=ENGINES)
    parser.add_argument("model_dir")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(json.dumps(worker(args.engine, args.model_dir, args.quick)))
