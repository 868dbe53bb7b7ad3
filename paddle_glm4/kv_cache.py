"""The KV cache: preallocated keys and values of every layer, written in place at the current slots.

Slots fill left to right, the same number for every row of the batch. A left-padded prompt fills some
slots of some rows with padding; `valid` records which slots hold real tokens, so that attention skips
the others and each row's positions count only its real tokens. Nothing is concatenated per step.
"""

from __future__ import annotations

import paddle

from .config import GLM4Config

# How much room a cache made by a plain forward call (not by generate, which knows its length) leaves.
GROWTH_STEP = 256


class KVCache:
    def __init__(self, config: GLM4Config, batch_size: int, capacity: int, dtype: str = "float32"):
        self.num_layers = config.num_hidden_layers
        self._kv_shape = [config.num_key_value_heads, config.head_dim]
        self.dtype = dtype
        self.length = 0            # slots filled so far (host int: no device sync to read it)
        self.has_padding = False   # whether any filled slot is padding (host flag, set when it happens)
        self._allocate(batch_size, capacity)
        self.positions = paddle.zeros([batch_size], dtype="int64")  # real tokens seen per row

    def _allocate(self, batch_size: int, capacity: int):
        shape = [batch_size, capacity, *self._kv_shape]
        self.keys = [paddle.zeros(shape, dtype=self.dtype) for _ in range(self.num_layers)]
        self.values = [paddle.zeros(shape, dtype=self.dtype) for _ in range(self.num_layers)]
        self.valid = paddle.zeros([batch_size, capacity], dtype="bool")

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]

    def reserve(self, new_tokens: int):
        """Make room for `new_tokens` more slots, growing the buffers (a copy) only when they are full."""
        needed = self.length + new_tokens
        if needed <= self.capacity:
            return
        capacity = max(needed, 2 * self.capacity, GROWTH_STEP)
        old_keys, old_values, old_valid = self.keys, self.values, self.valid
        self._allocate(self.batch_size, capacity)
        for layer in range(self.num_layers):
            self.keys[layer][:, :self.length] = old_keys[layer][:, :self.length]
            self.values[layer][:, :self.length] = old_values[layer][:, :self.length]
        self.valid[:, :self.length] = old_valid[:, :self.length]

    def add_tokens(self, new_valid: paddle.Tensor | None, seq_len: int) -> paddle.Tensor:
        """Claim the next `seq_len` slots; `new_valid` [b, seq_len] marks real tokens (None: all real).

        Returns the positions of the new tokens [b, seq_len]. Call `commit` once the forward is done.
        """
        if new_valid is not None:
            new_valid = new_valid.astype("bool")
            if not self.has_padding and not bool(new_valid.all()):
                self.has_padding = True
            self.valid[:, self.length:self.length + seq_len] = new_valid
        else:
            self.valid[:, self.length:self.length + seq_len] = True
        positions = token_positions(new_valid, seq_len, self.positions)
        self.positions = self.positions + (seq_len if new_valid is None else new_valid.astype("int64").sum(axis=1))
        return positions

    def update(self, layer: int, start: int, k: paddle.Tensor, v: paddle.Tensor):
        """Write k, v [b, s, kv_heads, head_dim] at slots start..start+s; return all keys/values so far."""
        end = start + k.shape[1]
        self.keys[layer][:, start:end] = k
        self.values[layer][:, start:end] = v
        return self.keys[layer][:, :end], self.values[layer][:, :end]

    def commit(self, seq_len: int):
        self.length += seq_len


def token_positions(valid: paddle.Tensor | None, seq_len: int, seen: paddle.Tensor | None = None) -> paddle.Tensor:
    """Positions of `seq_len` new tokens [b, seq_len], counting only real ones (`valid`, None: all real).

    `seen` [b] is how many real tokens each row had before. Padding gets the position of the next real
    token (it is never attended to), so a left-padded prompt gets the positions it would get alone.
    """
    if valid is None:
        steps = paddle.arange(seq_len, dtype="int64").unsqueeze(0)
    else:
        steps = paddle.cumsum(valid.astype("int64"), axis=1) - valid.astype("int64")
    return steps if seen is None else seen.unsqueeze(1) + steps
