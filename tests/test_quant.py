"""The stored weight formats (paddle_glm4.kernels.quant): layout, rounding, and exact round trips."""

from __future__ import annotations

import numpy as np
import pytest

from paddle_glm4.kernels import quant


def test_int8_layout_and_rounding():
    w = np.array([[0.5, -1.0, 0.25, 0.0], [3.0, 1.5, -0.7, 2.9]], dtype=np.float32)
    q, scale = quant.quantize_int8(w)
    assert q.dtype == np.int8 and q.shape == (2, 4) and scale.dtype == np.float32 and scale.shape == (2,)
    assert scale[0] == np.float32(1.0) / np.float32(127)
    assert q[0].tolist() == [64, -127, 32, 0]  # 63.5 rounds half to even: 64
    expected = np.clip(np.rint(w[1] / (np.float32(3.0) / np.float32(127))), -127, 127)
    assert q[1].tolist() == expected.tolist()
    assert np.abs(quant.dequantize_int8(q, scale) - w).max() <= scale.max() / 2 + 1e-7


def test_int8_zero_rows_and_extremes():
    w = np.zeros((3, 5), dtype=np.float32)
    w[1] = [-2.0, 2.0, 1.0, -1.0, 0.0]
    q, scale = quant.quantize_int8(w)
    assert scale[0] == 0 and scale[2] == 0 and not q[0].any() and not q[2].any()
    assert q.min() >= -127 and q[1, 0] == -127 and q[1, 1] == 127
    np.testing.assert_array_equal(quant.dequantize_int8(q, scale)[0], 0)


def test_int4_packing_nibble_order():
    q = np.array([[-8, 7, 0, 1, -1]], dtype=np.int8)  # K = 5: odd, padded with a zero weight
    packed = quant.pack_int4(q)
    assert packed.dtype == np.uint8 and packed.shape == (1, 3)
    assert packed[0].tolist() == [0 | (15 << 4), 8 | (9 << 4), 7 | (8 << 4)]
    np.testing.assert_array_equal(quant.unpack_int4(packed, 5), q)


@pytest.mark.parametrize("k, group", [(256, 128), (300, 128), (13696, 128), (200, 64), (7, 4)])
def test_int4_round_trip_error_and_scales(k, group):
    rng = np.random.default_rng(k)
    w = rng.standard_normal((5, k)).astype(np.float32)
    w[2, : min(group, k)] = 0  # an all-zero group
    packed, scales = quant.quantize_int4(w, group)
    groups = -(-k // group)
    assert packed.shape == (5, -(-k // 2)) and scales.shape == (5, groups) and scales.dtype == np.float32
    assert scales[2, 0] == 0
    deq = quant.dequantize_int4(packed, scales, k, group)
    step = np.repeat(np.abs(scales), group, axis=1)[:, :k]
    # within half a step everywhere, except values clipped from +8 to +7 (at most one step)
    assert (np.abs(deq - w) <= step + 1e-6).all()
    assert (np.abs(deq - w) <= step / 2 + 1e-6).mean() > 0.99
    # each group's largest-magnitude element is exactly representable (it maps to -8)
    for n in range(5):
        for g in range(groups):
            block = w[n, g * group : (g + 1) * group]
            i = np.abs(block).argmax()
            assert deq[n, g * group + i] == pytest.approx(block[i], rel=1e-6)
    # quantizing the dequantized weights again gives the same bytes (the format is a fixed point)
    again, again_scales = quant.quantize_int4(deq, group)
    np.testing.assert_array_equal(again, packed)
    np.testing.assert_allclose(again_scales, scales, rtol=1e-6)


def test_int4_uses_all_sixteen_levels():
    w = np.linspace(-1, 1, 128, dtype=np.float32)[None, :]
    q = quant.unpack_int4(quant.quantize_int4(w, 128)[0], 128)
    assert set(q[0].tolist()) == set(range(-8, 8))


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="2-D"):
        quant.quantize_int8(np.zeros(4, dtype=np.float32))
    with pytest.raises(ValueError, match="non-finite"):
        quant.quantize_int4(np.array([[np.nan, 1.0]], dtype=np.float32), 2)
    with pytest.raises(ValueError, match="group_size"):
        quant.quantize_int4(np.ones((2, 8), dtype=np.float32), 3)
    with pytest.raises(ValueError, match="scales"):
        quant.dequantize_int4(np.zeros((2, 4), np.uint8), np.zeros((2, 3), np.float32), 8, 4)


def test_bfloat16_rounding_half_to_even():
    x = np.array([1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-9, -2.5, np.inf], dtype=np.float32)
    bits = quant.float32_to_bfloat16_bits(x)
    back = quant.bfloat16_bits_to_float32(bits)
    # 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1.0); 1 + 3*2^-8 ties up to 1 + 2^-6
    assert back.tolist() == [1.0, 1.0, 1.0 + 2**-6, 1.0, -2.5, np.inf]
    assert np.isnan(quant.round_to_bfloat16(np.array([np.nan], dtype=np.float32)))[0]
    # raw bf16 bits (uint16) are accepted as weights
    q, scale = quant.quantize_int8(bits[None, :5])
    np.testing.assert_allclose(quant.dequantize_int8(q, scale)[0], back[:5], atol=scale[0] / 2 + 1e-7)


def test_activation_int8_matches_weight_rule():
    x = np.random.default_rng(0).standard_normal((3, 50)).astype(np.float32)
    x[1] = 0
    q, scale = quant.quantize_activations_int8(x)
    wq, wscale = quant.quantize_int8(x)
    np.testing.assert_array_equal(q, wq)
    np.testing.assert_array_equal(scale, wscale)
