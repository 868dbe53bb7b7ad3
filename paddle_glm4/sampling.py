"""Choosing the next token from the logits: repetition penalty, then greedy or temperature/top-k/top-p sampling.

Everything works on the device on [b, vocab] tensors; only the chosen ids [b] ever leave it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import paddle
import paddle.nn.functional as F

from . import ops


@dataclass(frozen=True)
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1.0: no nucleus cut
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def apply_repetition_penalty(logits: paddle.Tensor, seen: paddle.Tensor, penalty: float) -> paddle.Tensor:
    """Make tokens already in the sequence (`seen` [b, vocab] > 0) less likely: positive logits are
    divided by `penalty`, negative ones multiplied (the CTRL paper's rule, as transformers applies it)."""
    penalized = paddle.where(logits > 0, logits / penalty, logits * penalty)
    return paddle.where(seen > 0, penalized, logits)


def keep_top_k(logits: paddle.Tensor, k: int) -> paddle.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = paddle.topk(logits, k, axis=-1)[0][:, -1:]
    return paddle.where(logits < kth, paddle.full_like(logits, float("-inf")), logits)


def keep_top_p(logits: paddle.Tensor, p: float) -> paddle.Tensor:
    """Keep the smallest set of most likely tokens whose probabilities add up to at least p."""
    if p >= 1.0:
        return logits
    sorted_logits = paddle.sort(logits, axis=-1, descending=True)
    sorted_probs = F.softmax(sorted_logits, axis=-1)
    # keep a token while the tokens before it have not yet reached p (so the most likely one always stays)
    kept = ((paddle.cumsum(sorted_probs, axis=-1) - sorted_probs) < p).astype("int64").sum(axis=-1, keepdim=True)
    threshold = paddle.take_along_axis(sorted_logits, kept - 1, axis=-1)
    return paddle.where(logits < threshold, paddle.full_like(logits, float("-inf")), logits)


def choose_tokens(
    logits: paddle.Tensor, params: SamplingParams, seen: paddle.Tensor | None
) -> tuple[paddle.Tensor, paddle.Tensor]:
    """logits [b, vocab] fp32 -> (token ids [b] int64, their log-probabilities [b]).

    The log-probabilities are those of the model's distribution after the repetition penalty and before
    temperature/top-k/top-p, as PaddleNLP reports them."""
    if params.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    # Only the chosen tokens' log-probabilities, not the row's: subtracting the normalizer from 151552 logits was
    # an op large enough for Paddle's OpenMP team, whose idle thread then spun beside the kernels' workers.
    # (Not F.log_softmax either: Paddle 3.3's CPU kernel takes seconds on such a row.)
    most_likely, its_log_prob, normalizer = ops.argmax_logsumexp(logits)  # [b] each
    if not params.do_sample:
        return most_likely, its_log_prob
    shaped = keep_top_p(keep_top_k(logits / params.temperature, params.top_k), params.top_p)
    tokens = paddle.multinomial(F.softmax(shaped, axis=-1), num_samples=1).squeeze(-1)
    chosen = paddle.take_along_axis(logits, tokens.unsqueeze(-1), axis=-1).squeeze(-1) - normalizer
    return tokens.astype("int64"), chosen


def choose_token(
    logits: paddle.Tensor, params: SamplingParams, seen: list[int] | None, rng: np.random.Generator
) -> int:
    """One sequence's next token from its logits [1, vocab] fp32, drawing from its own generator `rng`.

    The continuous-batching engine (scheduler.py) calls this per row, so that what a sequence draws depends on
    its own seed and history only, never on the other rows of the batch. `seen`: the ids it already holds (for
    the repetition penalty). The cut-offs are `choose_tokens`'; only the draw differs: an inverse-CDF draw
    from `rng` on the host instead of paddle's global generator."""
    if params.repetition_penalty != 1.0 and seen:
        ids = paddle.to_tensor(np.asarray(seen, dtype="int64")).unsqueeze(0)
        mask = paddle.put_along_axis(paddle.zeros_like(logits), ids, paddle.ones(ids.shape, dtype=logits.dtype), axis=1)
        logits = apply_repetition_penalty(logits, mask, params.repetition_penalty)
    if not params.do_sample:
        return int(paddle.argmax(logits, axis=-1).numpy().item())
    shaped = keep_top_p(keep_top_k(logits / params.temperature, params.top_k), params.top_p)
    cdf = np.cumsum(F.softmax(shaped, axis=-1).numpy()[0].astype("float64"))
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(cdf) - 1))
