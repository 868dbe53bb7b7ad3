"""Tokenizer throughput: GLM4Tokenizer against tiktoken used directly with the same ranks and split pattern.

Uses GLM-4's published vocabulary from ../shared when it is there, else the project's small vocabulary. The text
is a few MB (quick: a few hundred KB) of documents mixing English, Chinese, code, numbers and emoji, generated
from a fixed seed. Each figure is the median of several runs, in MB of UTF-8 text per second.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import tiktoken

from paddle_glm4.small_vocab import write_small_vocabulary
from paddle_glm4.tokenizer import SPLIT_PATTERN, TOKENIZER_FILE, GLM4Tokenizer, read_tokenizer_model

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "glm4_reference" / "glm-4-9b-chat"

ENGLISH = [
    "the",
    "model",
    "answers",
    "questions",
    "about",
    "weather",
    "travel",
    "history",
    "science",
    "and",
    "code",
    "while",
    "keeping",
    "context",
    "from",
    "earlier",
    "turns",
    "of",
    "the",
    "conversation",
    "it",
    "was",
    "trained",
    "on",
    "public",
    "text",
]
CHINESE = "今天天气很好我们去公园散步人工智能可以帮助人们学习语言写代码和回答问题但是它也会犯错误"
CODE = [
    "def f(x):\n    return x * 2\n",
    "for i in range(10):\n\tprint(i)\n",
    "if (a && b) { x += 1; }\n",
    '{"key": "value", "n": 42}\n',
]
EMOJI = ["🙂", "👍🏽", "👨‍👩‍👧", "🇨🇳", "🚀"]


def mixed_documents(total_bytes: int, seed: int = 0) -> list[str]:
    """Documents of 1-8 KB mixing scripts, until `total_bytes` of UTF-8 text."""
    rng = random.Random(seed)
    documents, size = [], 0
    while size < total_bytes:
        parts, length = [], rng.randint(1000, 8000)
        while sum(len(p.encode()) for p in parts) < length:
            kind = rng.random()
            if kind < 0.45:
                parts.append(" ".join(rng.choices(ENGLISH, k=rng.randint(5, 20))).capitalize() + ". ")
            elif kind < 0.8:
                parts.append("".join(rng.choices(CHINESE, k=rng.randint(8, 40))) + "。")
            elif kind < 0.9:
                parts.append(rng.choice(CODE))
            elif kind < 0.95:
                parts.append(f"{rng.randint(0, 10**6)} {rng.random():.4f} ")
            else:
                parts.append(rng.choice(EMOJI) + "\n")
        documents.append("".join(parts))
        size += len(documents[-1].encode())
    return documents


def _median_seconds(contenders: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time of each contender. Runs alternate between contenders, in reversed order every other
    round, so that load from other processes falls on all of them alike; one warm-up run each is not counted."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for round_ in range(repeats + 1):
        order = list(contenders.items())
        for name, work in order[::-1] if round_ % 2 else order:
            start = time.perf_counter()
            work()
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def run(quick: bool = False) -> list[dict]:
    """Measure encode throughput (one text at a time, and batches on all cores); return one dict per figure."""
    with tempfile.TemporaryDirectory() as scratch:
        directory = REFERENCE if (REFERENCE / TOKENIZER_FILE).exists() else write_small_vocabulary(scratch)
        vocabulary = "GLM-4 vocabulary" if directory == REFERENCE else "small vocabulary"
        tokenizer = GLM4Tokenizer.from_pretrained(directory)
        raw = tiktoken.Encoding(
            "raw",
            pat_str=SPLIT_PATTERN,
            special_tokens={},
            mergeable_ranks=read_tokenizer_model(directory / TOKENIZER_FILE),
        )

    documents = mixed_documents(300_000 if quick else 3_000_000)
    megabytes = sum(len(d.encode()) for d in documents) / 1e6
    assert tokenizer.encode_batch(documents, add_special_tokens=False) == raw.encode_ordinary_batch(documents)

    def one_by_one(encode: Callable[[str], list[int]]) -> Callable[[], object]:
        return lambda: [encode(d) for d in documents]

    timings = _median_seconds(
        {
            "ours": one_by_one(tokenizer.encode),
            "raw": one_by_one(raw.encode_ordinary),
            "ours batch": lambda: tokenizer.encode_batch(documents),
            "raw batch": lambda: raw.encode_ordinary_batch(documents),
        },
        repeats=7,
    )
    speed = {name: megabytes / seconds for name, seconds in timings.items()}
    label = f"{megabytes:.1f} MB mixed text, {vocabulary}"
    figures = [
        ("encode, one text at a time", "ours", "raw", "tiktoken encode_ordinary"),
        ("encode_batch (all cores) vs one text at a time", "ours batch", "raw", "tiktoken encode_ordinary, 1 thread"),
        (
            "encode_batch (all cores) vs tiktoken's batch",
            "ours batch",
            "raw batch",
            "tiktoken encode_ordinary_batch (8 threads)",
        ),
    ]
    return [
        {
            "figure": f"{figure} ({label})",
            "ours": round(speed[ours], 2),
            "peer": round(speed[peer], 2),
            "peer_name": peer_name,
            "unit": "MB/s",
            "ratio": round(speed[ours] / speed[peer], 3),
        }
        for figure, ours, peer, peer_name in figures
    ]
