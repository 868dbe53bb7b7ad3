"""Serving many users: `glm4 serve` with continuous batching against the same server one request at a time.

Model: GLM-4-9B's width with 2 layers (quick: a tiny model), random bf16 weights (the C++ kernels, the default
dtype), GLM-4's small test vocabulary (the weights are random: the text is noise either way). Two server
processes on loopback, both up for the whole run:
- batching:      `glm4 serve --max-num-seqs 16` (each step decodes one token for every running stream);
- one-at-a-time: the same server with `--max-num-seqs 1`, today's behaviour before continuous batching.
For each of 1, 4, 8 and 16 concurrent streams, one server then the other (so that the shared machine's changing
speed falls on both alike): each stream is a client sending 3 streamed completions one after the other (a
different prompt of ~32 tokens each, answers of 8 to 24 tokens, 16 on average, greedy), the clients' first
requests spread evenly over the time one request takes on an idle server (users arrive independently, not in
one burst). Measured:
- aggregate decode tokens/s: the tokens every stream got / the time from the first request to the last answer;
- time to first token (TTFT) p50 and p99: from a request to its first streamed token, over the requests after
  each client's first (the steady state: the first ones arrive within one idle request's time, a burst whose
  prompts all wait for each other's compute-bound prefill; see benchmarks/NOTES.md section 12).
Figures: batching vs one-at-a-time for each, and the batching server's p50 TTFT under load vs an idle server's
(its own with 1 stream). Both servers generate the same tokens for the same prompt (batch invariance), so
they do the same work.

    python -m benchmarks.serving write DIR [--quick]   (the checkpoint, in a process of its own)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from benchmarks.model import ROOT, _row, benchmark_config
from paddle_glm4.tokenizer import GLM4Tokenizer

STREAMS = (1, 4, 8, 16)
ROUNDS = 3  # requests per client, one after the other
SERVERS = {"batching": ["--max-num-seqs", str(max(STREAMS))], "one-at-a-time": ["--max-num-seqs", "1"]}


def settings(quick: bool) -> dict:
    if quick:
        return {"prompt": 8, "new_tokens": 4}
    return {"prompt": 32, "new_tokens": 16}


def write_checkpoint(directory: str, quick: bool) -> None:
    """Random bf16 weights at the model benchmark's geometry, with the small vocabulary's tokenizer files."""
    from benchmarks.full_depth import write_random_checkpoint
    from paddle_glm4.small_vocab import write_small_vocabulary

    tokenizer = GLM4Tokenizer.from_pretrained(write_small_vocabulary(directory))
    config = dataclasses.replace(
        benchmark_config(quick),
        dtype="bfloat16",
        eos_token_id=tokenizer.stop_token_ids,
        pad_token_id=tokenizer.pad_token_id,
    )
    write_random_checkpoint(directory, config)


# ---- a server and its clients ---------------------------------------------------------------------------
class Server:
    """`python -m paddle_glm4.server` on a free loopback port, until the `with` block ends."""

    def __init__(self, model_dir: str, flags: list[str], log_path: str):
        self.command = [
            sys.executable,
            "-m",
            "paddle_glm4.server",
            "--model",
            model_dir,
            "--port",
            "0",
            "--max-concurrency",
            str(max(STREAMS)),
            *flags,
        ]
        self.log_path = log_path

    def __enter__(self) -> str:
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                self.command,
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": ROOT},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            with open(self.log_path) as log:
                text = log.read()
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{text[-3000:]}")
            found = re.search(r"serving \S+ at (http://\S+/v1)", text)
            if found:
                return found.group(1)
            time.sleep(0.2)
        self.__exit__()
        raise RuntimeError(f"the server did not start in 300 s:\n{text[-3000:]}")

    def __exit__(self, *_exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def stream(url: str, prompt: str, new_tokens: int, started: float) -> dict:
    """One streamed completion; its time to first token and its completion tokens (the usage chunk's)."""
    import httpx

    body = {
        "model": "m",
        "prompt": prompt,
        "max_tokens": new_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    first, tokens = None, None
    with httpx.stream("POST", url + "/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            if first is None and chunk["choices"]:
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    if first is None or tokens is None:
        raise RuntimeError(f"a streamed completion from {url} had no token or no usage")
    return {"ttft": first - started, "tokens": tokens, "done": time.perf_counter()}


def load(url: str, streams: int, prompt: int, new_tokens: int, spread: float, tokenizer) -> dict:
    """`streams` clients, each sending ROUNDS streamed completions one after the other, the clients' first
    requests spread evenly over `spread` seconds; aggregate tokens/s, and the TTFT percentiles of the requests
    after each client's first (the load in its steady state, not its ramp-up)."""
    results: list[dict] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        time.sleep(index * spread / streams)
        for round_ in range(ROUNDS):
            # answers of different lengths (new_tokens/2 .. 3 new_tokens/2, new_tokens on average), as users'
            # are: equal ones would end together and keep every client's next request in one burst
            length = new_tokens // 2 + (7 * index + 3 * round_) % (new_tokens + 1)
            result = stream(url, prompt_text(tokenizer, prompt, f"{index}.{round_}"), length, time.perf_counter())
            with lock:
                results.append({**result, "round": round_})

    threads = [threading.Thread(target=client, args=(i,)) for i in range(streams)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if len(results) != streams * ROUNDS:
        raise RuntimeError(f"a stream of {streams} failed (see the server's log)")
    ttfts = sorted(result["ttft"] for result in results if result["round"] > 0)
    elapsed = max(result["done"] for result in results) - started
    return {
        "tokens_per_s": sum(result["tokens"] for result in results) / elapsed,
        "ttft_p50": statistics.median(ttfts),
        "ttft_p99": _percentile(ttfts, 0.99),
    }


def prompt_text(tokenizer, tokens: int, tag: str) -> str:
    """A prompt of about `tokens` tokens, unlike any other (`tag`)."""
    text = f"Request {tag}:"
    while len(tokenizer.encode(text)) < tokens:
        text += " and so on"
    return text


def _percentile(sorted_values: list[float], q: float) -> float:
    """The nearest-rank percentile (of 16 values, p99 is the largest)."""
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def run(quick: bool = False) -> list[dict]:
    s = settings(quick)
    with tempfile.TemporaryDirectory(prefix="glm4-serving-") as workdir, contextlib.ExitStack() as servers:
        model_dir = os.path.join(workdir, "model")
        # in a process of its own: its memory (at full width, the weights) goes back before the servers start
        command = [sys.executable, "-m", "benchmarks.serving", "write", model_dir] + (["--quick"] if quick else [])
        done = subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"writing the serving benchmark's checkpoint failed:\n{done.stderr[-3000:]}")
        urls = {
            name: servers.enter_context(Server(model_dir, flags, os.path.join(workdir, f"{name}.log")))
            for name, flags in SERVERS.items()
        }
        tokenizer = GLM4Tokenizer.from_pretrained(model_dir)
        for url in urls.values():
            load(url, 1, s["prompt"], 2, 0, tokenizer)  # warm-up: the kernels' first calls, the allocator's pools
        started = time.perf_counter()
        load(urls["batching"], 1, s["prompt"], s["new_tokens"], 0, tokenizer)
        idle_request = (time.perf_counter() - started) / ROUNDS  # one request on an idle server, about
        # both servers in turn at each load, so that a change in the machine's speed (a shared machine) falls
        # on both alike
        results: dict[str, dict] = {name: {} for name in SERVERS}
        for streams in STREAMS:
            for name, url in urls.items():
                print(f"  serving: {streams} streams, {name} server ...", file=sys.stderr, flush=True)
                results[name][streams] = load(url, streams, s["prompt"], s["new_tokens"], idle_request, tokenizer)
    batching, alone = results["batching"], results["one-at-a-time"]
    label = f"{'tiny' if quick else 'GLM-4-9B width'}, 2 layers, bf16"
    peer = "one-at-a-time (--max-num-seqs 1)"
    rows = []
    for streams in STREAMS:
        rows += [
            _row(
                f"aggregate decode tokens/s, {streams} concurrent streams ({label})",
                batching[streams]["tokens_per_s"],
                alone[streams]["tokens_per_s"],
                peer,
                "tokens/s",
            ),
            _row(
                f"time to first token p50, {streams} streams, lower is better ({label})",
                batching[streams]["ttft_p50"],
                alone[streams]["ttft_p50"],
                peer,
                "s",
            ),
            _row(
                f"time to first token p99, {streams} streams, lower is better ({label})",
                batching[streams]["ttft_p99"],
                alone[streams]["ttft_p99"],
                peer,
                "s",
            ),
        ]
    idle = batching[1]["ttft_p50"]
    rows += [
        _row(
            f"time to first token p50, {streams} streams vs an idle server, lower is better ({label})",
            batching[streams]["ttft_p50"],
            idle,
            "the same server, 1 stream",
            "s",
        )
        for streams in STREAMS[1:]
    ]
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the serving benchmark's checkpoint, in a process of its own")
    parser.add_argument("mode", choices=["write"])
    parser.add_argument("directory")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    write_checkpoint(args.directory, args.quick)
