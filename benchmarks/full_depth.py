"""GLM-4-9B at its real size on this machine: 40 layers, random bf16 weights (18.8 GB), through the bf16
Paddle Inference predictor on CPU, within this machine's RAM.

Each step runs in a process of its own, so each peak RSS is that step's:
1. write the checkpoint (Paddle layout, bf16) tensor by tensor, random bits of a plausible magnitude;
2. export it with bf16 storage (what makes the model fit: float32 would be 37.6 GB);
3. load the predictor and decode a few tokens at batch 1.
Figures: decode tokens/s against the bandwidth bound (bf16 weight bytes per token / read bandwidth), and the
peak RSS of the export and of the predictor against the machine's RAM. Needs twice the checkpoint's size in
free disk under $TMPDIR (the checkpoint and its export). --quick: a tiny model, 40 layers all the same.

    python -m benchmarks.full_depth worker {write,export,decode} DIR [--quick]   (one step; prints JSON)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile

from benchmarks.model import ROOT, _paddle_engine, _parameter_counts, _peak_rss, _row, _Timing, benchmark_config

PROMPT, NEW_TOKENS, LAYERS = 16, 4, 40


def full_depth_config(quick: bool):
    """The model benchmark's geometry (GLM-4-9B's width; quick: tiny) at GLM-4-9B's depth, stored in bf16."""
    return dataclasses.replace(benchmark_config(quick), num_hidden_layers=LAYERS, dtype="bfloat16")


# ---- the steps, each in its own process -----------------------------------------------------------------
def write_random_checkpoint(directory: str, config) -> int:
    """Random bf16 weights, streamed to disk; returns the bytes written. Bits, not sampled floats: sign and
    mantissa random, exponent fixed, so every weight is +-[1/128, 1/64) (norm weights are 1), drawn at
    memory speed rather than a normal sampler's ~0.2 G values/s."""
    import numpy as np

    from converters import mapping
    from paddle_glm4.checkpoint import write_checkpoint

    specs = mapping.module_order(mapping.tensor_specs(config))
    rng = np.random.default_rng(0)

    def tensors():
        for spec in specs:
            if "norm" in spec.paddle:
                yield spec.paddle, np.full(spec.shape, 0x3F80, np.uint16)  # 1.0
            else:
                bits = rng.integers(0, 1 << 16, spec.shape, dtype=np.uint16)
                bits &= 0x807F  # sign and mantissa, in place: one tensor in memory (the embedding: 1.24 GB)
                bits |= 0x3C00  # the 2^-7 exponent
                yield spec.paddle, bits

    write_checkpoint(directory, [(s.paddle, "bfloat16", s.shape) for s in specs], tensors(), "5GB")
    config.save_pretrained(directory)
    return sum(2 * int(np.prod(s.shape)) for s in specs)


def _worker(step: str, workdir: str, quick: bool) -> dict:
    checkpoint, export = os.path.join(workdir, "checkpoint"), os.path.join(workdir, "export")
    config = full_depth_config(quick)
    if step == "write":
        return {"bytes": write_random_checkpoint(checkpoint, config)}
    if step == "export":
        from paddle_glm4.inference import export_model

        export_model(checkpoint, export, dtype="bfloat16", max_seq_len=PROMPT + NEW_TOKENS, progress=False)
        shutil.rmtree(checkpoint)  # the export holds the weights now; frees the disk before the decode
        return {"peak_rss": _peak_rss()}
    import numpy as np

    generate, _ = _paddle_engine(export, "inference-bf16")
    ids = np.random.default_rng(0).integers(3, config.vocab_size, (1, PROMPT)).astype("int64")
    timing = _Timing(skip_first_put=False)
    generate(ids, NEW_TOKENS, timing)
    decode = (len(timing.times) - 1) / (timing.times[-1] - timing.times[0])
    return {"decode_b1": decode, "peak_rss": _peak_rss()}


def _run_step(step: str, workdir: str, quick: bool) -> dict:
    command = [sys.executable, "-m", "benchmarks.full_depth", "worker", step, workdir] + (["--quick"] if quick else [])
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True)
    if done.returncode < 0:
        raise RuntimeError(
            f"full-depth step {step} was killed by signal {-done.returncode} (out of memory?):\n{done.stderr[-2000:]}"
        )
    if done.returncode:
        raise RuntimeError(f"full-depth step {step} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(quick: bool = False, machine: dict | None = None) -> list[dict]:
    from benchmarks.machine import measure

    machine = machine or measure(quick)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    config = full_depth_config(quick)
    # bytes read per decoded token: every weight but the embedding table, as in the model benchmark
    per_token = 2 * sum(_parameter_counts(config).values())
    weight_bytes = per_token + 2 * config.vocab_size * config.hidden_size
    with tempfile.TemporaryDirectory(prefix="glm4-full-depth-") as workdir:
        free = shutil.disk_usage(workdir).free
        if free < 2.1 * weight_bytes:
            raise RuntimeError(
                f"full-depth needs {2.1 * weight_bytes / 1e9:.0f} GB free under {workdir}, "
                f"has {free / 1e9:.0f} GB (set TMPDIR elsewhere)"
            )
        _run_step("write", workdir, quick)
        exported = _run_step("export", workdir, quick)
        decoded = _run_step("decode", workdir, quick)
    label = (
        f"{'tiny' if quick else 'GLM-4-9B'}, {LAYERS} layers, bf16 weights {weight_bytes / 1e9:.1f} GB, "
        "Paddle Inference bf16"
    )
    return [
        _row(
            f"decode tokens/s, batch 1 ({label}) vs the bandwidth bound",
            decoded["decode_b1"],
            machine["read_bandwidth_gbps"] * 1e9 / per_token,
            "read bandwidth / weight bytes",
            "tokens/s",
        ),
        _row(
            f"peak RSS of the predictor, decoding ({label})",
            decoded["peak_rss"] / 1e9,
            ram / 1e9,
            "this machine's RAM",
            "GB",
        ),
        _row(f"peak RSS of the export ({label})", exported["peak_rss"] / 1e9, ram / 1e9, "this machine's RAM", "GB"),
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="one step of the full-depth benchmark, in its own process")
    parser.add_argument("mode", choices=["worker"])
    parser.add_argument("step", choices=["write", "export", "decode"])
    parser.add_argument("workdir")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(json.dumps(_worker(args.step, args.workdir, args.quick)))
