"""A small GLM-4-style tokenizer the project builds itself, for tests and for the demo when no real
`tokenizer.model` is at hand.

It has the same shape as GLM-4's: a tiktoken BPE vocabulary (all 256 single bytes, so any text round-trips, plus
merges learned from a built-in English/Chinese sample with GLM-4's split pattern), followed by GLM-4's 14 special
tokens, and a tokenizer_config.json whose chat template has GLM-4's structure (or none, to use the fallback).
The result is the same on every machine: training has no randomness and breaks ties by the bytes themselves.
"""

from __future__ import annotations

import itertools
import os
from collections import Counter
from pathlib import Path

from .chat_template import STRUCTURAL_TEMPLATE
from .tokenizer import SPLIT_PATTERN, glm4_tokenizer_config, write_tokenizer_files

SAMPLE_TEXT = """\
The weather today is mild, with a light wind from the west and a few clouds over the hills.
In the morning we walked to the market, bought some tea and bread, and talked with the people there.
A good model should answer the question that was asked, and say so when it does not know the answer.
Please write a short function that returns the sum of two numbers, and add a test for it.
def add(a, b):
    return a + b

assert add(2, 3) == 5
The train leaves at 8:15 and arrives at 10:40; tickets cost 12 dollars, or 9 with a student card.
Thank you for your help! What would you like to do next? Let me know if there is anything else.
今天天气很好，我们去公园散步，看见很多人在湖边喝茶、聊天。
请你帮我写一个简单的函数，计算两个数字的和，并且说明它是怎么工作的。
这个问题的答案是什么？如果你不知道，请直接告诉我，不要编造内容。
我们在市场买了一些水果和茶叶，然后回家做饭，晚上一起看书。
人工智能可以帮助人们学习语言、写代码和回答问题，但是它也会犯错误。
你好！很高兴认识你。你今天过得怎么样？我想学习中文，也想学习编程。
"""


def train_bpe(text: str, num_merges: int | None = None) -> dict[bytes, int]:
    """Byte-level BPE: the 256 bytes (ranks 0-255), then merges of the most frequent adjacent pair within the
    pieces GLM-4's split pattern cuts `text` into, until no pair repeats or after `num_merges` merges."""
    import regex  # tiktoken's own dependency; only training needs the pattern in Python

    words = Counter(tuple(bytes([b]) for b in piece.encode("utf-8")) for piece in regex.findall(SPLIT_PATTERN, text))
    ranks = {bytes([b]): b for b in range(256)}
    for _ in itertools.repeat(None) if num_merges is None else range(num_merges):
        pairs: Counter[tuple[bytes, bytes]] = Counter()
        for word, count in words.items():
            for pair in itertools.pairwise(word):
                pairs[pair] += count
        if not pairs:
            break
        # Most frequent first; among equals, the smallest pair, so the result never depends on dict order.
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        if pairs[best] < 2:
            break
        merged = best[0] + best[1]
        # Different pairs can spell the same bytes ("a"+"bc", "ab"+"c"); such a token keeps its first rank.
        ranks.setdefault(merged, len(ranks))
        words = Counter({_merge(word, best, merged): count for word, count in words.items()})
    return ranks


def _merge(word: tuple[bytes, ...], pair: tuple[bytes, bytes], merged: bytes) -> tuple[bytes, ...]:
    out: list[bytes] = []
    i = 0
    while i < len(word):
        if word[i : i + 2] == pair:
            out.append(merged)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def write_small_vocabulary(
    directory: str | os.PathLike, *, num_merges: int | None = None, chat_template: bool = True
) -> Path:
    """Write a small GLM-4-style `tokenizer.model` and `tokenizer_config.json` into `directory`; return it.

    The base vocabulary is the 256 bytes plus every merge the built-in sample supports (a few hundred tokens),
    or at most `num_merges` merges; GLM-4's 14 special tokens follow it. `chat_template=False` leaves the
    template out of the config, so the tokenizer falls back to GLM-4's bare structure.
    """
    ranks = train_bpe(SAMPLE_TEXT, num_merges)
    config = glm4_tokenizer_config(len(ranks), STRUCTURAL_TEMPLATE if chat_template else None)
    return write_tokenizer_files(directory, sorted(ranks, key=ranks.__getitem__), config)
