"""The kernels' arithmetic in plain Paddle ops: dequantize the weights, round the activations as the chosen
activation_dtype says, matmul. Used where the C++ kernels cannot be built (no compiler); slow, but the
same values as the kernels (to float32 rounding) and it runs everywhere Paddle does, GPU included."""

from __future__ import annotations

import paddle


def dequantize(weight: paddle.Tensor, scales: paddle.Tensor | None, fmt: str, group_size: int, k: int) -> paddle.Tensor:
    """The stored weight (see the package docstring) -> float32 [N, K]."""
    if fmt == "bf16":
        return weight.astype("float32")
    if scales is None:
        raise ValueError(f"{fmt} weights need their scales")
    if fmt == "int8":
        return weight.astype("float32") * scales.unsqueeze(1)
    packed = weight.astype("int32")  # [N, ceil(K/2)]
    nibbles = paddle.stack([packed % 16, packed // 16], axis=-1).reshape([packed.shape[0], -1])[:, :k]
    per_element = paddle.repeat_interleave(scales, group_size, axis=1)[:, :k]
    return (nibbles - 8).astype("float32") * per_element


def round_half_even(v: paddle.Tensor) -> paddle.Tensor:
    # paddle.round rounds halves away from zero; the kernels (and numpy's rint) round them to even
    floor = paddle.floor(v)
    frac = v - floor
    odd = paddle.remainder(floor, paddle.full([], 2.0, v.dtype)) == 1
    up = (frac > 0.5) | ((frac == 0.5) & odd)
    return floor + up.astype(v.dtype)


def round_activations(x: paddle.Tensor, activation_dtype: str) -> paddle.Tensor:
    """x float32 rounded as the kernels round it: to bfloat16, or to int8 with one scale per row."""
    if activation_dtype == "bfloat16":
        return x.astype("bfloat16").astype("float32")
    if activation_dtype == "int8":
        scale = x.abs().max(axis=-1, keepdim=True) / 127.0
        safe = paddle.where(scale == 0, paddle.ones_like(scale), scale)
        q = paddle.clip(round_half_even(x / safe), -127.0, 127.0)
        return q * scale
    return x


def linear(
    x: paddle.Tensor,
    weight: paddle.Tensor,
    scales: paddle.Tensor | None,
    bias: paddle.Tensor | None,
    fmt: str,
    group_size: int,
    activation_dtype: str,
) -> paddle.Tensor:
    act = "float32" if activation_dtype == "auto" else activation_dtype
    w = dequantize(weight, scales, fmt, group_size, x.shape[-1])
    y = paddle.matmul(round_activations(x, act), w, transpose_y=True)
    return y if bias is None else y + bias
