"""Weight-only quantization in numpy: the stored formats of paddle_glm4.kernels, and their exact inverses.

No paddle import: the converter quantizes with this module alone. Every weight is output-major, [N, K]
(N output channels, K input features), like torch and GGUF. The formats (see the package docstring):

- int8: q int8 [N, K], scale float32 [N]; w = q * scale. scale = absmax(row) / 127, q = round(w / scale)
  in [-127, 127] (-128 is never produced, so that the kernels may negate q and activations freely).
- int4: qweight uint8 [N, ceil(K/2)], scales float32 [N, ceil(K/G)] for groups of G consecutive inputs (the
  last group shorter when G does not divide K); element 2j is the low nibble of byte j, element 2j+1 its
  high nibble, each stored as q + 8 with q in [-8, 7]; w = (nibble - 8) * scale. An odd K pads the last
  high nibble with 8 (a zero weight). As llama.cpp's Q4_0, a group's scale is m / -8, where m is its
  element of largest magnitude: m itself is exact (q = -8) and all 16 levels are used, where absmax / 7
  would leave -8 unused and make every step 8/7 as large. Values of the other sign that would round to +8
  clip to +7. The scale may therefore be negative; only scale * q matters.

Rounding, everywhere: the quotient w / scale is computed in float32 (an IEEE division, not a multiply by a
reciprocal) and rounded half to even (numpy's rint). An all-zero row or group gets scale 0 and q 0, never a
division by zero. Inputs must be finite.
"""

from __future__ import annotations

import numpy as np

INT8_MAX = 127
INT4_LEVELS = 8  # q in [-8, 7]; nibble = q + 8
GROUP_SIZES = (64, 128)  # the ones the SIMD paths are built for; any group >= 2 works in the reference path


def _as_weight(w: np.ndarray, name: str = "weight") -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 2 or 0 in w.shape:
        raise ValueError(f"{name} must be a non-empty 2-D [N, K] array, got shape {w.shape}")
    if w.dtype == np.uint16:  # raw bfloat16 bits, as safetensors readers without bf16 hand them over
        w = bfloat16_bits_to_float32(w)
    w = w.astype(np.float32, copy=False)
    if not np.isfinite(w).all():
        raise ValueError(f"{name} has non-finite values: cannot quantize")
    return w


def _divide(w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """w / scale in float32, 0 where scale is 0."""
    out = np.zeros_like(w, dtype=np.float32)
    np.divide(w, scale, out=out, where=scale != 0)
    return out


def quantize_int8(w_nk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float [N, K] -> (q int8 [N, K], scale float32 [N]), one symmetric scale per output channel."""
    w = _as_weight(w_nk)
    scale = (np.abs(w).max(axis=1) / np.float32(INT8_MAX)).astype(np.float32)
    q = np.rint(_divide(w, scale[:, None]))
    return np.clip(q, -INT8_MAX, INT8_MAX).astype(np.int8), scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(q int8 [N, K], scale float32 [N]) -> float32 [N, K]."""
    return q.astype(np.float32) * np.asarray(scale, dtype=np.float32)[:, None]


def int4_groups(k: int, group_size: int) -> int:
    if group_size < 2 or group_size % 2:
        raise ValueError(f"int4 group_size must be an even number >= 2, got {group_size}")
    return -(-k // group_size)


def quantize_int4(w_nk: np.ndarray, group_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """float [N, K] -> (qweight uint8 [N, ceil(K/2)], scales float32 [N, ceil(K/group_size)])."""
    w = _as_weight(w_nk)
    n, k = w.shape
    groups = int4_groups(k, group_size)
    padded = np.zeros((n, groups * group_size), dtype=np.float32)
    padded[:, :k] = w
    blocks = padded.reshape(n, groups, group_size)
    # the signed element of largest magnitude (the first one on ties, as argmax picks)
    extreme = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=2)[..., None], axis=2)[..., 0]
    scales = (extreme / np.float32(-INT4_LEVELS)).astype(np.float32)  # [N, groups]
    q = np.rint(_divide(blocks, scales[..., None]))
    q = np.clip(q, -INT4_LEVELS, INT4_LEVELS - 1).reshape(n, -1)[:, :k]
    return pack_int4(q.astype(np.int8)), scales


def pack_int4(q: np.ndarray) -> np.ndarray:
    """q int [N, K] in [-8, 7] -> uint8 [N, ceil(K/2)], element 2j low nibble, 2j+1 high, stored as q + 8."""
    n, k = q.shape
    nibbles = np.full((n, k + k % 2), INT4_LEVELS, dtype=np.uint8)
    nibbles[:, :k] = (q.astype(np.int16) + INT4_LEVELS).astype(np.uint8)
    return (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).astype(np.uint8)


def unpack_int4(qweight: np.ndarray, k: int) -> np.ndarray:
    """uint8 [N, ceil(K/2)] -> q int8 [N, K] in [-8, 7]."""
    if qweight.ndim != 2 or qweight.shape[1] != -(-k // 2):
        raise ValueError(f"int4 qweight must be [N, ceil({k}/2)], got shape {qweight.shape}")
    nibbles = np.empty((qweight.shape[0], qweight.shape[1] * 2), dtype=np.int8)
    nibbles[:, 0::2] = qweight & 0x0F
    nibbles[:, 1::2] = qweight >> 4
    return nibbles[:, :k] - np.int8(INT4_LEVELS)


def dequantize_int4(qweight: np.ndarray, scales: np.ndarray, k: int, group_size: int = 128) -> np.ndarray:
    """(qweight uint8 [N, ceil(K/2)], scales float32 [N, ceil(K/G)]) -> float32 [N, K]."""
    n = qweight.shape[0]
    groups = int4_groups(k, group_size)
    if scales.shape != (n, groups):
        raise ValueError(f"int4 scales must be [{n}, {groups}] for K={k}, group {group_size}; got {scales.shape}")
    per_element = np.repeat(np.asarray(scales, dtype=np.float32), group_size, axis=1)[:, :k]
    return unpack_int4(qweight, k).astype(np.float32) * per_element


# ---- bfloat16 ------------------------------------------------------------------------------------------
# numpy has no bfloat16: these work on its bits (the high half of a float32), held as uint16.
def float32_to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 to the nearest bfloat16, half to even (as the kernels and torch do); NaN stays NaN."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16
    nan = np.isnan(x)
    return np.where(nan, (bits >> 16) | np.uint32(0x40), rounded).astype(np.uint16)


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def round_to_bfloat16(x: np.ndarray) -> np.ndarray:
    """float32 -> float32 holding the nearest bfloat16 value (how activation_dtype='bfloat16' rounds)."""
    return bfloat16_bits_to_float32(float32_to_bfloat16_bits(x))


def quantize_activations_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 [M, K] -> (q int8 [M, K], scale float32 [M]): how activation_dtype='int8' rounds each row.

    The same rule as quantize_int8 (absmax / 127, float32 division, half to even), applied per row."""
    x = np.asarray(x, dtype=np.float32)
    scale = (np.abs(x).max(axis=1) / np.float32(INT8_MAX)).astype(np.float32)
    q = np.clip(np.rint(_divide(x, scale[:, None])), -INT8_MAX, INT8_MAX)
    return q.astype(np.int8), scale
