"""The rows of one generation over a KV cache: the one place that decides where new tokens go.

For each batch of new tokens, `Sequences.claim` picks their cache slots, counts their positions and says which
slots attention may read; the model's forward only computes what that `Step` says. The dynamic model's
`model(..., past_key_values=...)`, its generation session and the Paddle Inference predictor's session all
claim here, so the three agree by construction.

Slots fill left to right, the same count for every row. A left-padded prompt fills some slots of some rows with
padding; `valid` records which slots hold real tokens, so that attention skips the others and each row's
positions count only its real tokens (a padded prompt gets the positions it would get alone). A scheduler that
lets rows join later marks the slots before a row's first token invalid in the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import paddle

from .kv_cache import KVCache

# How much room sequences made by a plain forward call (not by generate, which knows its length) leave.
GROWTH_STEP = 256


@dataclass
class Step:
    """Where `s` new tokens go: what the model's forward takes besides the token ids and the cache."""

    start: int  # the cache slot of the first new token
    positions: paddle.Tensor  # [b, s] int64, each token's position in its row
    key_valid: paddle.Tensor | None  # [b, start + s] bool, slots holding real tokens (None: all do)


class Sequences:
    """A batch of sequences: which slots hold real tokens, each row's next position, and their KV cache
    (None for a single forward that keeps nothing). This is what `past_key_values` is."""

    def __init__(self, batch_size: int, capacity: int, cache: KVCache | None = None):
        self.cache = cache
        self.length = 0  # slots filled so far (host int)
        self.has_padding = False  # whether any filled slot is padding
        # Until the first padding every filled slot is real and every row has seen `length` tokens, so a claim
        # (a decode step's) writes neither `valid` nor `seen`: the properties below fill them in when asked.
        self._valid = paddle.zeros([batch_size, capacity], dtype="bool")
        self._written = 0  # slots of _valid written; those after it, up to length, are real
        self._seen: paddle.Tensor | None = None  # once has_padding

    @property
    def batch_size(self) -> int:
        return self._valid.shape[0]

    @property
    def capacity(self) -> int:
        return self._valid.shape[1]

    @property
    def valid(self) -> paddle.Tensor:
        """[b, capacity] bool: the slots holding real tokens."""
        if self._written < self.length:
            self._valid[:, self._written : self.length] = True
            self._written = self.length
        return self._valid

    @property
    def seen(self) -> paddle.Tensor:
        """[b] int64: the real tokens of each row so far."""
        return self._seen if self.has_padding else paddle.full([self.batch_size], self.length, dtype="int64")

    def claim(self, seq_len: int, new_valid: paddle.Tensor | None = None) -> Step:
        """Take the next `seq_len` slots for new tokens; `new_valid` [b, seq_len] marks the real ones (None: all).

        Grows the cache (a copy) only when it is full. The caller then runs the forward with the returned Step.
        """
        start, end = self.length, self.length + seq_len
        if end > self.capacity:
            self._grow(max(end, 2 * self.capacity, GROWTH_STEP))
        if new_valid is not None:
            new_valid = new_valid.astype("bool")
            if not self.has_padding and not bool(new_valid.all()):  # one host sync, where padding can come in
                self._seen = self.seen
                self.has_padding = True
        if not self.has_padding:  # every row's tokens at positions start .. end - 1
            self.length = end
            return Step(start, _span(start, end, self.batch_size), None)
        self.valid[:, start:end] = True if new_valid is None else new_valid
        seen = self.seen  # [b]: with padding, the counts kept since it first came
        positions = seen.unsqueeze(1) + token_positions(new_valid, seq_len)
        self._seen = seen + (seq_len if new_valid is None else new_valid.astype("int64").sum(axis=1))
        self.length = self._written = end
        return Step(start, positions, self._valid[:, :end])

    def _grow(self, capacity: int) -> None:
        valid = paddle.zeros([self.batch_size, capacity], dtype="bool")
        if self._written:
            valid[:, : self._written] = self._valid[:, : self._written]
        self._valid = valid
        if self.cache is not None:
            self.cache.grow(capacity, self.length)


def _span(start: int, end: int, batch_size: int) -> paddle.Tensor:
    """Positions start .. end - 1 in every row, [b, end - start] int64. paddle.arange took 5x paddle.full's time
    (~35 us) in a decode step."""
    if end - start == 1:
        return paddle.full([batch_size, 1], start, dtype="int64")
    return paddle.to_tensor(np.tile(np.arange(start, end, dtype=np.int64), (batch_size, 1)))


def token_positions(valid: paddle.Tensor | None, seq_len: int) -> paddle.Tensor:
    """Positions [b or 1, seq_len] of new tokens counted from 0 over the real ones (`valid` [b, seq_len], None: all
    real). Padding gets the position of the next real token (it is never attended to)."""
    if valid is None:
        return paddle.arange(seq_len, dtype="int64").unsqueeze(0)
    valid = valid.astype("int64")
    return paddle.cumsum(valid, axis=1) - valid
