"""The KV cache: preallocated keys and values of every layer, written in place at the slots the caller names.

It only stores. Which slot a new token goes to, at which position, and which slots hold real tokens is decided
by the owner of the generation (`sequences.Sequences`). Nothing is concatenated per step.
"""

from __future__ import annotations

import paddle

from .config import GLM4Config


class KVCache:
    """Per layer, keys and values [b, capacity, g, d], in `dtype`. A bfloat16 cache holds half the bytes of a
    float32 one (GLM-4-9B's 128K context: 5.4 GB, not 10.7 GB); attention reads it as stored, widening a block
    of keys at a time (ops.attention). `groups`: the key/value groups held (default all; a tensor-parallel rank
    holds its share)."""

    def __init__(
        self, config: GLM4Config, batch_size: int, capacity: int, dtype: str = "float32", groups: int | None = None
    ):
        self.num_layers = config.num_hidden_layers
        self._kv_shape = [config.num_key_value_heads if groups is None else groups, config.head_dim]
        self.dtype = dtype
        self.keys, self.values = self._allocate(batch_size, capacity)

    def _allocate(self, batch_size: int, capacity: int) -> tuple[list[paddle.Tensor], list[paddle.Tensor]]:
        shape = [batch_size, capacity, *self._kv_shape]
        return (
            [paddle.zeros(shape, dtype=self.dtype) for _ in range(self.num_layers)],
            [paddle.zeros(shape, dtype=self.dtype) for _ in range(self.num_layers)],
        )

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[1]

    def grow(self, capacity: int, filled: int) -> None:
        """Reallocate to `capacity` slots, keeping the first `filled` (a copy of everything: do it rarely)."""
        old_keys, old_values = self.keys, self.values
        self.keys, self.values = self._allocate(self.batch_size, capacity)
        for layer in range(self.num_layers):
            self.keys[layer][:, :filled] = old_keys[layer][:, :filled]
            self.values[layer][:, :filled] = old_values[layer][:, :filled]

    def update(self, layer: int, start: int, k: paddle.Tensor, v: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        """Write k, v [b, s, g, d] at slots start..start+s; return the keys/values of slots 0..start+s [b, L, g, d]."""
        end = start + k.shape[1]
        if k.dtype != self.keys[layer].dtype:  # a compact cache (bf16) rounds what it stores
            k, v = k.astype(self.dtype), v.astype(self.dtype)
        self.keys[layer][:, start:end] = k
        self.values[layer][:, start:end] = v
        return self.keys[layer][:, :end], self.values[layer][:, :end]
