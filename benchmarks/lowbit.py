"""Low-bit CPU inference, ours against llama.cpp on the same weights in the same run: our bf16 / int8 / int4
kernels against llama.cpp's BF16 / Q8_0 / Q4_0.

Model: GLM-4-9B's geometry with 2 layers (section `lowbit`; quick: a tiny model) or its full 40 (section
`lowbit-full-depth`, opt-in: ~55 GB of disk), random bf16 weights written once (full_depth's writer). Ours loads
that checkpoint with `GLM4ForCausalLM.from_pretrained(dir, quantization=None | "int8" | "int4")` (bf16 stays
bf16); llama.cpp reads the same weights as a BF16 GGUF file (gguf_peer.py), and llama-quantize makes its Q8_0
and Q4_0 from it. llama.cpp is found or built in a per-user cache (llamacpp.py; quick runs never build it: 11+
minutes); where it cannot be had, its figures are skipped with the reason in the report's notes.

Every engine runs in a fresh process, each format's pair back to back; nothing else should run meanwhile (the
load average before each is recorded: a busy second core halves a 2-thread decode). Where both models fit in
memory together (`side_by_side`), llama-bench's decode runs alternate with ours from our process, so that each
pair of runs meets the same memory: this VM's read rate switches between two regimes (~33 and ~55 GB/s) within
seconds, and runs minutes apart were up to 1.6x apart. Where they do not (GLM-4-9B BF16 at 40 layers in 24 GB),
the engines run one after the other ROUNDS_APART times, and each one's runs are pooled. Figures
per format: decode tokens/s at batch 1 (llama-bench's tg: `new_tokens` tokens from an empty context; ours the
same count after an 8-token prompt), prefill tokens/s of a 512-token prompt, peak RSS, each as ours / llama.cpp;
decode against the bandwidth bound (weight bytes read per token, the embedding table excluded, at the machine's
read bandwidth: benchmarks.machine's C probe, run right before and after each decode run, each run bounded by
the higher of its two readings, the engine by the median of its runs'; the readings are taken before and after
the engine instead where the probe's buffer could push its memory-mapped weights out of the page cache; on
these shared machines the rate moves by tens of % within minutes, and an engine whose readings differ by more
than DRIFT is named in the notes) for both; at full depth also the issue's targets: peak RSS <= the weights'
bytes + 1.5 GB, int4 decode >= 5 tokens/s.
Our kernel path (paddle_glm4.kernels.isa()) is in each figure's name and in each row's details.

    python -m benchmarks.lowbit ours MODEL_DIR FORMAT [--quick]          (our engine; prints JSON)
    python -m benchmarks.lowbit peer LLAMA_BENCH GGUF [--quick]          (llama-bench, peak RSS; prints JSON)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.model import ROOT, _peak_rss, _row, _Timing, benchmark_config
from benchmarks.tokenizer import REFERENCE

# (our name, the quantization= we load with, llama.cpp's type)
FORMATS = (("bf16", None, "BF16"), ("int8", "int8", "Q8_0"), ("int4", "int4", "Q4_0"))
PROMPT = 8  # before the decoded tokens (llama-bench's tg starts from an empty context; ours needs a prompt)
RSS_ALLOWANCE = 1.5e9  # the issue's target: full-depth peak RSS <= the weights' bytes + 1.5 GB
INT4_DECODE_TARGET = 5.0  # tokens/s, 40 layers
BOUND = "read bandwidth (the higher reading around each decode run) / weight bytes per token"
ROUNDS_APART = 2  # where the two models do not fit together: ours, llama.cpp's, ours, llama.cpp's
SIDE_BY_SIDE_SPARE = 3e9  # bytes: Python, Paddle, the activations and the KV caches of both engines
DRIFT = 0.15  # the read bandwidth after an engine this far from the one before it: its bound fraction is suspect


def settings(quick: bool, layers: int) -> dict:
    if quick:
        return {"layers": layers, "prefill": 32, "new_tokens": 4, "runs": 1, "decode_runs": 1, "settle": 0.0}
    # at 40 layers a bf16 token takes ~1 s: fewer decode steps, as every one costs the same; more decode runs
    # than prefill runs, as the memory's rate (decode's bound) switches within seconds
    return {
        "layers": layers,
        "prefill": 512,
        "new_tokens": 64 if layers <= 2 else 16,
        "runs": 3,
        "decode_runs": 5,
        "settle": 3.0,  # seconds between alternated runs
    }


def lowbit_config(quick: bool, layers: int):
    return dataclasses.replace(benchmark_config(quick), num_hidden_layers=layers, dtype="bfloat16")


def _threads() -> int:
    return len(os.sched_getaffinity(0))


def _target_weight_bytes(config, quantization: str | None, stored: dict[str, int]) -> int:
    """The weights' bytes of the issue's RSS target. Quantized at load, a dense checkpoint's embedding table is
    kept as stored (bf16, memory-mapped, resident only where looked up): the target counts the table as a
    quantized checkpoint stores it, the stricter figure, so that keeping it mapped cannot loosen the target."""
    if quantization is None:
        return sum(stored.values())
    from paddle_glm4 import memory
    from paddle_glm4.config import Quantization
    from paddle_glm4.quantization import Packed

    scheme = Quantization.of(quantization)
    table = dataclasses.replace(scheme, embedding=True)
    return memory.weight_bytes(
        dataclasses.replace(config, quantization=table), Packed(scheme.scheme, scheme.group_size)
    )


# ---- the engines, each in its own process ---------------------------------------------------------------
class _Runs:
    """An engine's decode runs: their tokens/s, and, where the read bandwidth is probed, the readings right
    before and right after each run ([before, after] per run)."""

    def __init__(self):
        self.rates: list[float] = []
        self.around: list[list[float]] = []


class _Probe:
    """The machine's read bandwidth (benchmarks.machine's probe) read between decode runs, or never when
    `gigabytes` is 0. Runs of two engines that alternate share the readings between them."""

    def __init__(self, gigabytes: float):
        self.gigabytes = gigabytes
        self.last = self._read()

    def _read(self) -> float | None:
        from benchmarks import machine

        return machine.read(self.gigabytes).rate if self.gigabytes else None

    def run(self, runs: _Runs, decode) -> None:
        """One decode run (`decode()` returns its tokens/s), recorded in `runs` with the readings around it."""
        runs.rates.append(decode())
        now = self._read()
        if now is not None and self.last is not None:
            runs.around.append([self.last, now])
        self.last = now


def ours(
    model_dir: str,
    fmt: str,
    quick: bool,
    layers: int,
    probe_gigabytes: float = 0.0,
    peer_decode: tuple[str, str] | None = None,
) -> dict:
    """Our engine on `model_dir` in format `fmt`. With `peer_decode` (llama-bench, GGUF), llama-bench's decode
    runs alternate with ours (both models resident): each of its runs sits between two of ours, in the same
    minutes, and its figures come back under "peer"."""
    import numpy as np

    from paddle_glm4 import GLM4ForCausalLM, kernels

    s = settings(quick, layers)
    quantization = {name: q for name, q, _ in FORMATS}[fmt]
    model = GLM4ForCausalLM.from_pretrained(model_dir, **({"quantization": quantization} if quantization else {}))
    vocab = model.config.vocab_size

    def generate(ids, new_tokens, timing=None):
        model.generate(ids, max_new_tokens=new_tokens, eos_token_id=[], streamer=timing)

    def decode() -> float:
        timing = _Timing(skip_first_put=False)
        generate(ids, s["new_tokens"], timing)
        return (len(timing.times) - 1) / (timing.times[-1] - timing.times[0])

    def peer_run() -> float:
        # (not its peak RSS: a child's counts the memory of the process it was forked from, ours here; the
        # peer's comes from its own prefill process, started from the small parent)
        assert peer_decode is not None
        return _peer_decode(*peer_decode, s)[0]

    rng = np.random.default_rng(0)
    ids = rng.integers(3, vocab, (1, PROMPT)).astype("int64")
    generate(ids, 2)  # warm-up
    if peer_decode:
        peer_run()  # its warm-up: the GGUF's pages into the page cache
        time.sleep(s["settle"])  # as after each of its runs below: it freed its model as it exited
    probe, mine, theirs = _Probe(probe_gigabytes), _Runs(), _Runs()
    for _ in range(s["decode_runs"]):
        probe.run(mine, decode)
        if peer_decode:
            # llama-bench loads its model at each run (at Q4_0 also a repacked copy: RSS 10.2 GB at 40 layers)
            # and frees it as it exits; the kernel's reclaim and compaction that follow are given time to end
            # rather than fall on the next run (40-layer int4, without: ours 7.0, 6.9, 6.1, then 4.7 and 5.2)
            time.sleep(s["settle"])
            probe.run(theirs, peer_run)
            time.sleep(s["settle"])
    ids = rng.integers(3, vocab, (1, s["prefill"])).astype("int64")
    generate(ids, 1)
    times = []
    for _ in range(s["runs"]):
        started = time.perf_counter()
        generate(ids, 1)
        times.append(time.perf_counter() - started)
    # bytes a decode step reads: every stored weight, packed integers and scales included, but the embedding
    # table (a lookup reads one row of it)
    stored = {name: int(np.prod(t.shape)) * t.element_size() for name, t in model.state_dict().items()}
    result = {
        "decode": statistics.median(mine.rates),
        "decode_runs": mine.rates,
        "bandwidth_around": mine.around,
        "prefill": s["prefill"] / statistics.median(times),
        "peak_rss": _peak_rss(),
        "weight_bytes": _target_weight_bytes(model.config, quantization, stored),
        "bytes_per_token": sum(size for name, size in stored.items() if "embed_tokens" not in name),
        "kernel": kernels.isa(),
    }
    if peer_decode:
        result["peer"] = {
            "decode": statistics.median(theirs.rates),
            "decode_runs": theirs.rates,
            "bandwidth_around": theirs.around,
        }
    return result


def _peer_decode(llama_bench: str, gguf: str, s: dict) -> tuple[float, int]:
    """One llama-bench decode run (tg: s["new_tokens"] tokens): its tokens/s and its peak RSS."""
    decode, rss = _llama_bench(_bench_command(llama_bench, gguf, 0, s["new_tokens"], 1))
    return statistics.median(decode["samples_ts"]), rss


def _bench_command(llama_bench: str, gguf: str, prompt: int, new_tokens: int, runs: int) -> list[str]:
    common = ["-m", gguf, "-t", str(_threads()), "-r", str(runs), "-o", "json"]
    return [llama_bench, *common, "-p", str(prompt), "-n", str(new_tokens)]


def peer(
    llama_bench: str, gguf: str, quick: bool, layers: int, probe_gigabytes: float = 0.0, decode: bool = True
) -> dict:
    """llama-bench on `gguf`: pp tokens/s (the median of its runs, one call) and, unless `decode` is False (its
    decode runs alternate with ours instead, see `ours`), tg tokens/s (one call per run, the read bandwidth
    measured between them when `probe_gigabytes`); its peak RSS."""
    s = settings(quick, layers)
    prefill, peak = _llama_bench(_bench_command(llama_bench, gguf, s["prefill"], 0, s["runs"]))
    result = {
        "prefill": statistics.median(prefill["samples_ts"]),
        "peak_rss": peak,
        "build": prefill.get("build_commit"),
        "cpu_info": prefill.get("cpu_info"),
    }
    if decode:
        probe, runs, peaks = _Probe(probe_gigabytes), _Runs(), [peak]

        def run() -> float:
            rate, rss = _peer_decode(llama_bench, gguf, s)
            peaks.append(rss)
            return rate

        for _ in range(s["decode_runs"]):
            probe.run(runs, run)
        result.update(decode=statistics.median(runs.rates), decode_runs=runs.rates, bandwidth_around=runs.around)
        result["peak_rss"] = max(peaks)
    return result


def _llama_bench(command: list[str]) -> tuple[dict, int]:
    """llama-bench's one test (JSON) and its peak RSS: the rusage of that child alone (this process also runs
    the read probe, whose buffer would count in RUSAGE_CHILDREN)."""
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors)
        output = process.stdout.read()
        process.stdout.close()
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
        if process.returncode:
            errors.seek(0)
            message = errors.read().decode(errors="replace").strip()[-2000:]
            raise RuntimeError(f"llama-bench failed ({process.returncode}): {message}")
    (test,) = json.loads(output)
    return test, usage.ru_maxrss * 1024


def _run(mode: str, args: list[str], quick: bool, layers: int) -> dict:
    command = [sys.executable, "-m", "benchmarks.lowbit", mode, *args, "--layers", str(layers)] + (
        ["--quick"] if quick else []
    )
    from benchmarks import machine

    # this shared machine's memory rate drifts by tens of % within minutes: each engine's bound is measured
    # right before and right after it runs, and between its decode runs where the probe's buffer cannot push
    # the engine's memory-mapped weights out of the page cache
    gigabytes = machine.beyond_caches(0.25 if quick else 1.0)
    weights = _stored_bytes(args[0] if mode == "ours" else args[1])
    if "--peer-decode" in args:  # llama.cpp's GGUF is resident beside ours
        weights += _stored_bytes(args[args.index("--peer-decode") + 2])
    between = gigabytes if weights + gigabytes * 1e9 < machine.memory_bytes() / 2 else 0
    command += ["--probe-gigabytes", str(between)]
    load, before = os.getloadavg()[0], machine.read(gigabytes)
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True)
    if done.returncode < 0:
        raise RuntimeError(
            f"lowbit {mode} {args[1]} was killed by signal {-done.returncode} (out of memory?):\n{done.stderr[-2000:]}"
        )
    if done.returncode:
        raise RuntimeError(f"lowbit {mode} {args[1]} failed:\n{done.stderr[-3000:]}")
    after = machine.read(gigabytes)
    return {
        **json.loads(done.stdout.strip().splitlines()[-1]),
        "load_before": load,
        "bandwidth_before": before.rate,
        "bandwidth_after": after.rate,
        "bandwidth_method": before.method,
    }


def _stored_bytes(path: str) -> int:
    """The bytes of a checkpoint directory's files, or of one file."""
    path = Path(path)
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file()) if path.is_dir() else path.stat().st_size


# ---- the run --------------------------------------------------------------------------------------------
def _prepare(workdir: str, config, peer_binaries, notes: list[str], quick: bool, formats: tuple) -> dict:
    """Our checkpoint and, when the peer is there, llama.cpp's GGUF files of the same weights (BF16, and the
    quantized kinds of `formats`)."""
    from benchmarks import gguf_peer
    from benchmarks.full_depth import write_random_checkpoint

    checkpoint = os.path.join(workdir, "checkpoint")
    write_random_checkpoint(checkpoint, config)
    files = {"checkpoint": checkpoint}
    if peer_binaries is None:
        return files
    files["BF16"] = os.path.join(workdir, "model-bf16.gguf")
    # GLM-4's real tokenizer where the reference files are (the tokenizer benchmark's), else the small one
    vocab = gguf_peer.write_gguf(checkpoint, files["BF16"], str(REFERENCE) if not quick else None, progress=False)
    notes.append(f"llama.cpp's GGUF tokenizer: {vocab.source}")
    for _, quantization, kind in formats:
        if quantization is None:
            continue
        files[kind] = os.path.join(workdir, f"model-{kind.lower()}.gguf")
        gguf_peer.quantize(str(peer_binaries.quantize), files["BF16"], files[kind], kind)
    return files


def run(
    quick: bool = False, layers: int = 2, notes: list[str] | None = None, formats: list[str] | None = None
) -> list[dict]:
    """`formats`: which of bf16, int8, int4 to measure (default all)."""
    from benchmarks import gguf_peer, llamacpp
    from converters import mapping

    notes = notes if notes is not None else []
    chosen = tuple(f for f in FORMATS if formats is None or f[0] in formats)
    config = lowbit_config(quick, layers)
    try:  # a full run builds the peer when it is missing; a quick one (CI) never does
        peer_binaries = llamacpp.find_or_build(build=not quick)
    except llamacpp.PeerUnavailable as error:
        peer_binaries = None
        notes.append(f"llama.cpp peer skipped: {error}")
        print(f"lowbit: llama.cpp peer skipped: {error}", file=sys.stderr, flush=True)
    flags = " ".join(llamacpp.cpu_flags())
    notes.append(f"CPU flags: {flags}")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="glm4-lowbit-") as workdir:
        weights = 2 * sum(math.prod(shape) for shape in mapping.paddle_shapes(config).values())
        needed = weights * (1 + (1 + 0.53 + 0.3 if peer_binaries else 0)) * 1.05  # checkpoint, BF16, Q8_0, Q4_0
        free = shutil.disk_usage(workdir).free
        if free < needed:
            raise RuntimeError(
                f"lowbit needs {needed / 1e9:.0f} GB free under {workdir}, has {free / 1e9:.0f} GB "
                "(set TMPDIR elsewhere)"
            )
        files = _prepare(workdir, config, peer_binaries, notes, quick, chosen)
        for fmt, _, kind in chosen:  # each pair back to back
            if peer_binaries is None:
                results[fmt] = _run("ours", [files["checkpoint"], fmt], quick, layers)
                continue
            bench = str(peer_binaries.bench)
            alternate = side_by_side(files[kind])
            notes.append(
                f"{fmt} vs {kind}: "
                + (
                    "decode runs alternated, both models resident in one process"
                    if alternate
                    else "one engine after the other (the two models do not fit in memory together)"
                )
            )
            if alternate:  # decode runs alternate, in one process (see `ours`)
                results[fmt] = _run(
                    "ours", [files["checkpoint"], fmt, "--peer-decode", bench, files[kind]], quick, layers
                )
                prefill = _run("peer", [bench, files[kind], "--prefill-only"], quick, layers)
                results[kind] = merge_alternated(results[fmt], prefill)
            else:  # one after the other, ROUNDS_APART times: each engine meets more of the memory's regimes
                rounds = [
                    (
                        _run("ours", [files["checkpoint"], fmt], quick, layers),
                        _run("peer", [bench, files[kind]], quick, layers),
                    )
                    for _ in range(1 if quick else ROUNDS_APART)
                ]
                results[fmt] = pooled([mine for mine, _ in rounds])
                results[kind] = pooled([theirs for _, theirs in rounds])
            results[kind]["bytes_per_token"] = sum(
                size for name, size in gguf_peer.tensor_bytes(files[kind]).items() if name != "token_embd.weight"
            )
    method = next(iter(results.values()))["bandwidth_method"]
    notes.append(f"read bandwidth: {method}, around each decode run (row details: the readings, the runs' rates)")
    notes += drifted(results)
    return _rows(results, config, quick, flags, chosen)


def merge_alternated(mine: dict, prefill: dict) -> dict:
    """The peer's result from its prefill process (its peak RSS: the 512-token prompt's, the larger) and the
    decode runs it took in ours (popped from `mine`): its decode figures and their readings, and our process's
    readings before and after, which surround its decode runs."""
    return {
        **prefill,
        **mine.pop("peer"),
        "bandwidth_before": mine["bandwidth_before"],
        "bandwidth_after": mine["bandwidth_after"],
    }


def pooled(rounds: list[dict]) -> dict:
    """One engine's result over several processes: the decode runs of all and their median, each process's
    readings, the median of their prefill rates, the highest peak RSS; the readings before the first and after
    the last; the first's other fields."""
    if len(rounds) == 1:
        return rounds[0]
    runs = [rate for result in rounds for rate in result["decode_runs"]]
    return {
        **rounds[0],
        "decode": statistics.median(runs),
        "decode_runs": runs,
        "bandwidth_around": [pair for result in rounds for pair in _around(result)],
        "bandwidth_after": rounds[-1]["bandwidth_after"],
        "prefill": statistics.median(result["prefill"] for result in rounds),
        "peak_rss": max(result["peak_rss"] for result in rounds),
    }


def side_by_side(gguf: str) -> bool:
    """Whether our model and llama.cpp's `gguf` fit in memory together, with room to spare, so that their decode
    runs can alternate: on these machines the memory's rate switches between two regimes within seconds, and
    runs minutes apart can land in different ones. Our weights take about the GGUF's bytes (theirs carry a
    scale per 32 weights, ours per channel or per group)."""
    from benchmarks import machine

    return 2 * _stored_bytes(gguf) + SIDE_BY_SIDE_SPARE < machine.memory_bytes()


def _around(result: dict) -> list[list[float]]:
    """[before, after] read-bandwidth readings of each of an engine's decode runs, where they were taken
    between the runs, else one pair: before and after the engine's process."""
    return result.get("bandwidth_around") or [[result["bandwidth_before"], result["bandwidth_after"]]]


def _readings(result: dict) -> list[float]:
    """The readings of `_around`, in time order, each once."""
    readings: list[float] = []
    for before, after in _around(result):
        readings += [after] if readings and readings[-1] == before else [before, after]
    return readings


def bound(result: dict) -> float:
    """Tokens/s an engine would decode at if it read its weights at the machine's read bandwidth. Each decode run
    is bounded by the higher of the readings right before and after it (so that a drop in the machine's rate
    during the run cannot flatter it); the engine by the median of its runs' bounds."""
    highest = [max(pair) for pair in _around(result)]
    return statistics.median(highest) / result["bytes_per_token"]


def drifted(results: dict) -> list[str]:
    """A note for each engine whose read bandwidth moved by more than DRIFT while it ran."""
    notes = []
    for name, result in results.items():
        readings = _readings(result)
        if max(readings) - min(readings) > DRIFT * max(readings):
            notes.append(
                f"{name}: the read bandwidth moved while it ran ({', '.join(f'{r / 1e9:.1f}' for r in readings)} "
                "GB/s around its decode runs): its decode-vs-bound fraction is suspect"
            )
    return notes


def _rows(results: dict, config, quick: bool, flags: str, formats: tuple) -> list[dict]:
    s = settings(quick, config.num_hidden_layers)
    model = f"{'tiny' if quick else 'GLM-4-9B'}, {config.num_hidden_layers} layers"
    prefill = f"prefill tokens/s, {s['prefill']}-token prompt"
    rows = []
    for fmt, _, kind in formats:
        mine, theirs = results[fmt], results.get(kind)
        label = f"ours {fmt}, {mine['kernel']} kernels, {model}"
        details = {
            "kernel": mine["kernel"],
            "cpu_flags": flags,
            "load_before": mine["load_before"],
            "read_bandwidth_gbps_before": mine["bandwidth_before"] / 1e9,
            "read_bandwidth_gbps_after": mine["bandwidth_after"] / 1e9,
            "read_bandwidth_gbps_around_decode_runs": [r / 1e9 for r in _readings(mine)],
            "decode_runs": mine["decode_runs"],
            "weight_bytes": mine["weight_bytes"],
            "bytes_per_token": mine["bytes_per_token"],
        }
        versus = f"llama.cpp {kind}"
        pair = (
            []
            if theirs is None
            else [
                _row(f"decode tokens/s, batch 1 ({label})", mine["decode"], theirs["decode"], versus, "tokens/s"),
                _row(f"{prefill} ({label})", mine["prefill"], theirs["prefill"], versus, "tokens/s"),
                _row(
                    f"peak RSS, lower is better ({label})",
                    mine["peak_rss"] / 1e9,
                    theirs["peak_rss"] / 1e9,
                    versus,
                    "GB",
                ),
                _row(
                    f"decode batch 1 vs the bandwidth bound (llama.cpp {kind}, {model})",
                    theirs["decode"],
                    bound(theirs),
                    BOUND,
                    "tokens/s",
                ),
            ]
        )
        alone = [
            _row(
                f"decode batch 1 vs the bandwidth bound ({label})",
                mine["decode"],
                bound(mine),
                BOUND,
                "tokens/s",
            )
        ]
        if config.num_hidden_layers >= 40 or quick:  # the full-depth targets (quick: that they compute)
            alone.append(
                _row(
                    f"peak RSS vs the weights' bytes + 1.5 GB, lower is better ({label})",
                    mine["peak_rss"] / 1e9,
                    (mine["weight_bytes"] + RSS_ALLOWANCE) / 1e9,
                    "target",
                    "GB",
                )
            )
            if fmt == "int4":
                alone.append(
                    _row(
                        f"decode tokens/s, batch 1 vs the 5 tokens/s target ({label})",
                        mine["decode"],
                        INT4_DECODE_TARGET,
                        "target",
                        "tokens/s",
                    )
                )
        if theirs is not None:
            details.update(
                peer_load_before=theirs["load_before"],
                peer_build=theirs["build"],
                peer_read_bandwidth_gbps_before=theirs["bandwidth_before"] / 1e9,
                peer_read_bandwidth_gbps_after=theirs["bandwidth_after"] / 1e9,
                peer_read_bandwidth_gbps_around_decode_runs=[r / 1e9 for r in _readings(theirs)],
                peer_decode_runs=theirs["decode_runs"],
                peer_bytes_per_token=theirs["bytes_per_token"],
            )
        rows += [{**row, "details": details} for row in pair + alone]
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="one engine of the low-bit benchmark, in its own process")
    parser.add_argument("mode", choices=["ours", "peer"], help="ours: our model; peer: llama-bench")
    parser.add_argument("path", help="ours: the checkpoint directory; peer: the llama-bench binary")
    parser.add_argument("target", help="ours: bf16, int8 or int4; peer: the GGUF file")
    parser.add_argument("--layers", type=int, default=2, help="the model's depth (sets the decode length)")
    parser.add_argument("--quick", action="store_true", help="the tiny sizes of a quick run")
    parser.add_argument(
        "--probe-gigabytes",
        type=float,
        default=0.0,
        help="measure the read bandwidth with a buffer this large before and after each decode run (0: never)",
    )
    parser.add_argument(
        "--peer-decode",
        nargs=2,
        metavar=("LLAMA_BENCH", "GGUF"),
        help="ours: alternate llama-bench's decode runs on GGUF with ours, both models resident",
    )
    parser.add_argument(
        "--prefill-only", action="store_true", help="peer: prefill only (its decode runs alternate with ours)"
    )
    args = parser.parse_args()
    if args.mode == "ours":
        if args.prefill_only:
            parser.error("--prefill-only is the peer's")
        result = ours(args.path, args.target, args.quick, args.layers, args.probe_gigabytes, args.peer_decode)
    else:
        if args.peer_decode:
            parser.error("--peer-decode is ours")
        result = peer(args.path, args.target, args.quick, args.layers, args.probe_gigabytes, not args.prefill_only)
    print(json.dumps(result))
