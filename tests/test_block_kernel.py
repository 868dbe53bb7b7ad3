"""The whole-block operator (kernels/block.cc, kernels.block): on every path this CPU runs and in every weight
format it equals, bit for bit, the block computed by the separate operators it replaces (the per-operator
forward of model.GLM4Block), writes the new keys and values into exactly their cache slots, and the model
decodes through it exactly where it serves, with the same tokens and scores as without it."""

import numpy as np
import paddle
import pytest

from paddle_glm4 import GLM4ForCausalLM, kernels, ops
from paddle_glm4 import model as model_module
from paddle_glm4.kernels import quant

pytestmark = pytest.mark.skipif(
    not kernels.available(),
    reason="the C++ kernels could not be built here (no compiler); the model then runs the per-operator forward",
)

H, HEADS, GROUPS, D, R, F = 64, 4, 2, 16, 8, 96  # F: an int4 group (32) does not divide every K


def paths() -> list[str]:
    best = kernels.PATHS.index(kernels.isa())
    return list(kernels.PATHS[: best + 1])


def tensor(rng, shape, scale=1.0):
    return paddle.to_tensor((rng.standard_normal(shape) * scale).astype(np.float32))


def linear_tensors(rng, fmt, n, k, group=32):
    """One Linear's tensors in `fmt`, from random float32 rows [n, k]."""
    rows = (rng.standard_normal((n, k)) * 0.2).astype(np.float32)
    if fmt == "bf16":
        return [paddle.to_tensor(quant.float32_to_bfloat16_bits(rows).view(np.int16)).view(paddle.bfloat16)]
    q, s = quant.quantize_int8(rows) if fmt == "int8" else quant.quantize_int4(rows, group)
    return [paddle.to_tensor(q), paddle.to_tensor(s)]


def per_operator(x, norms, linears, bias, cos, sin, k_cache, v_cache, start, key_valid, fmt, keep, isa, threads):
    """The block as the separate operators compute it (model.GLM4Block's per-operator forward)."""

    def linear(inputs, tensors, bias=None):
        scales = tensors[1] if len(tensors) > 1 else None
        return kernels.linear(inputs, tensors[0], scales, bias, fmt=fmt, group_size=32, isa=isa, threads=threads)

    b, s = x.shape[:2]
    normed = kernels.rms_norm(x, norms[0], 1e-5, isa=isa, threads=threads)
    q, k, v = kernels.split_rotary(
        linear(normed, linears[0], bias), cos, sin, HEADS, GROUPS, D, isa=isa, threads=threads
    )
    first = int(start.numpy()[0])
    k_cache[:b, first : first + s] = k.astype(k_cache.dtype)
    v_cache[:b, first : first + s] = v.astype(v_cache.dtype)
    length = first + s if key_valid is None else key_valid.shape[1]
    kept = keep or s  # the last `kept` queries alone, at their slots
    q, query_start = q[:, s - kept :], paddle.to_tensor([first + s - kept], dtype="int64")
    attended = kernels.attention(
        q, k_cache[:b, :length], v_cache[:b, :length], query_start, key_valid, isa=isa, threads=threads
    )
    projected = linear(attended.reshape([b, kept, HEADS * D]), linears[1])
    x = x[:, s - kept :]
    normed, total = kernels.add_rms_norm(projected, x, norms[1], 1e-5, isa=isa, threads=threads)
    return total + linear(kernels.swiglu(linear(normed, linears[2]), isa=isa, threads=threads), linears[3])


CASES = [  # b, s, first slot, keep, key_valid, cache rows beyond b
    (1, 1, 5, 0, False, 0),  # decoding one sequence
    (3, 1, 9, 0, True, 0),  # a batch with padding
    (2, 4, 0, 1, False, 0),  # a short prompt, the last position kept
    (2, 3, 6, 2, True, 1),  # a batch cache larger than the running rows (scheduler.BatchCache)
]


@pytest.mark.parametrize("fmt", kernels.FORMATS)
@pytest.mark.parametrize("cache_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", CASES)
def test_the_block_equals_the_separate_operators(fmt, cache_dtype, case):
    b, s, first, keep, masked, spare = case
    rng = np.random.default_rng(len(fmt) + 10 * b + s)
    x = tensor(rng, (b, s, H))
    norms = (tensor(rng, (H,)), tensor(rng, (H,)))
    linears = tuple(
        linear_tensors(rng, fmt, n, k) for n, k in (((HEADS + 2 * GROUPS) * D, H), (H, HEADS * D), (2 * F, H), (H, F))
    )
    bias = tensor(rng, ((HEADS + 2 * GROUPS) * D,))
    positions = paddle.to_tensor(np.arange(first, first + s)[None].repeat(b, 0))
    cos, sin = ops.rotary_tables(positions, ops.inverse_frequencies(R, 10000.0), "float32", first + s)
    capacity = first + s + 3
    key_valid = None
    if masked:
        valid = rng.random((b, first + s)) < 0.7
        key_valid = paddle.to_tensor(valid)
    start = paddle.to_tensor([first], dtype="int64")
    cache = tensor(rng, (b + spare, capacity, GROUPS, D)).astype(cache_dtype)
    for isa in paths():
        for threads in (1, 2):
            expected_k, expected_v = cache.clone(), (cache * 2).clone()
            expected = per_operator(
                x, norms, linears, bias, cos, sin, expected_k, expected_v, start, key_valid, fmt, keep, isa, threads
            )
            k_cache, v_cache = cache.clone(), (cache * 2).clone()
            out = kernels.block(
                x, norms, linears, bias, cos, sin, k_cache, v_cache, start, key_valid, fmt=fmt, group_size=32,
                eps=1e-5, heads=HEADS, groups=GROUPS, head_dim=D, keep=keep, isa=isa, threads=threads,
            )  # fmt: skip
            assert out.shape == [b, keep or s, H]
            np.testing.assert_array_equal(out.numpy(), expected.numpy(), err_msg=f"{isa}, {threads} threads")
            # the new keys and values in their slots, every other slot (and spare row) as it was
            for written, wanted in ((k_cache, expected_k), (v_cache, expected_v)):
                np.testing.assert_array_equal(
                    written.astype("float32").numpy(), wanted.astype("float32").numpy(), err_msg=isa
                )
            assert not np.array_equal(k_cache.astype("float32").numpy(), cache.astype("float32").numpy())


def test_bad_inputs_are_refused_with_the_shapes():
    rng = np.random.default_rng(0)
    linears = tuple(
        linear_tensors(rng, "int8", n, k)
        for n, k in (((HEADS + 2 * GROUPS) * D, H), (H, HEADS * D), (2 * F, H), (H, F))
    )
    x, norms = tensor(rng, (1, 1, H)), (tensor(rng, (H,)), tensor(rng, (H,)))
    cos, sin = ops.rotary_tables(paddle.zeros([1, 1], "int64"), ops.inverse_frequencies(R, 10000.0), "float32", 1)
    cache = paddle.zeros([1, 4, GROUPS, D])
    settings = {"fmt": "int8", "group_size": 32, "eps": 1e-5, "heads": HEADS, "groups": GROUPS, "head_dim": D}
    with pytest.raises(Exception, match="do not fit a cache of 4 slots"):
        kernels.block(x, norms, linears, None, cos, sin, cache, cache.clone(), paddle.to_tensor([4]), None, **settings)
    with pytest.raises(Exception, match="caches must be"):
        small = paddle.zeros([1, 4, GROUPS + 1, D])
        kernels.block(x, norms, linears, None, cos, sin, small, small.clone(), paddle.to_tensor([0]), None, **settings)
    with pytest.raises(Exception, match="do not fit H=64"):
        swapped = (linears[1], linears[0], linears[2], linears[3])
        kernels.block(x, norms, swapped, None, cos, sin, cache, cache.clone(), paddle.to_tensor([0]), None, **settings)


@pytest.mark.parametrize("kind", ["bfloat16", "int8", "int4"])
@pytest.mark.parametrize("prompt", [9, 6])  # 2 x 6 rows: the prefill too goes through the operator, keeping 1
def test_the_model_decodes_through_the_block_operator_with_the_same_results(
    float_checkpoint, kind, prompt, monkeypatch
):
    base, directory = float_checkpoint
    config = base.config
    settings = {"bfloat16": {"dtype": "bfloat16"}, "int8": {"quantization": "int8"}}.get(
        kind, {"quantization": kind, "group_size": 32}
    )
    model = GLM4ForCausalLM.from_pretrained(str(directory), **settings)
    ids = paddle.to_tensor(np.random.RandomState(1).randint(0, config.vocab_size, (2, prompt)).astype("int64"))
    mask = paddle.to_tensor(np.array([[0, 0] + [1] * (prompt - 2), [1] * prompt]))  # a left-padded row: key_valid
    calls = []
    block, fused_rows = kernels.block, model_module.BLOCK_MAX_ROWS
    monkeypatch.setattr(kernels.api, "block", lambda *a, **k: calls.append(list(a[0].shape)) or block(*a, **k))
    for cache_dtype in ("float32", "bfloat16"):
        results = []
        for rows in (fused_rows, 0):  # 0: the per-operator forward everywhere
            monkeypatch.setattr(model_module, "BLOCK_MAX_ROWS", rows)
            calls.clear()
            ids_out, scores = model.generate(
                ids, attention_mask=mask, max_new_tokens=5, eos_token_id=[], kv_cache_dtype=cache_dtype
            )
            results.append((ids_out.numpy(), scores.numpy(), list(calls)))
        (fused_ids, fused_scores, fused_calls), (plain_ids, plain_scores, plain_calls) = results
        # a prefill of 2 x 9 rows takes the per-operator forward, of 2 x 6 the operator; each decode step (2 rows)
        # the operator
        prefill = [[2, prompt, config.hidden_size]] * config.num_hidden_layers if 2 * prompt <= fused_rows else []
        assert fused_calls == prefill + [[2, 1, config.hidden_size]] * (4 * config.num_hidden_layers), fused_calls
        assert plain_calls == []
        np.testing.assert_array_equal(fused_ids, plain_ids)
        np.testing.assert_array_equal(fused_scores, plain_scores)


def test_the_block_operator_is_not_used_where_a_gradient_is_wanted(float_checkpoint, monkeypatch):
    base, directory = float_checkpoint
    config = base.config
    model = GLM4ForCausalLM.from_pretrained(str(directory), quantization="int8")
    monkeypatch.setattr(kernels.api, "block", lambda *a, **k: pytest.fail("the block operator has no gradient"))
    x = paddle.randn([1, 1, config.hidden_size])
    x.stop_gradient = False
    layer = model.model.layers[0]
    cache = model.new_cache(1, 4)
    rope = ops.rotary_tables(paddle.zeros([1, 1], "int64"), model.model.inv_freq, "float32", 1)
    out = layer(x, rope, ops.attention_mask(None, 0, 1), cache, 0)
    out.sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
