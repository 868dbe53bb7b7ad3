"""The C++ operators between the linear layers (kernels/elementwise.cc): swiglu, rms_norm, add_rms_norm and
split_rotary, the rotary tables' lookup, and the sampler's argmax_logsumexp, on every path this CPU runs, against a
float64 reference and against the model's Paddle ops (ops.py) that they replace; multi-threaded results equal
single-threaded ones; they trace, save and run in a Paddle Inference predictor; and the model takes them exactly
where they serve."""

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from paddle_glm4 import kernels, ops
from paddle_glm4.kernels import api

pytestmark = pytest.mark.skipif(
    not kernels.available(),
    reason="the C++ kernels could not be built here "
    "(no compiler); the model then runs ops.py's Paddle forms, tested by test_model.py",
)


def paths() -> list[str]:
    best = kernels.PATHS.index(kernels.isa())
    return list(kernels.PATHS[: best + 1])


def tensor(rng, shape, scale=1.0):
    return paddle.to_tensor((rng.standard_normal(shape) * scale).astype(np.float32))


# leading shapes x last width: one row, 17 rows, a batch, odd widths, GLM-4-9B's FFN (13696) and hidden (4096)
SHAPES = [((1,), 1), ((17,), 37), ((2, 3), 9), ((1, 1), 13696), ((17,), 4096), ((64,), 100)]


@pytest.mark.parametrize("lead, width", SHAPES)
def test_swiglu(lead, width):
    rng = np.random.default_rng(width)
    x = tensor(rng, (*lead, 2 * width), scale=4.0)
    x64 = x.numpy().astype(np.float64)
    gate, up = x64[..., :width], x64[..., width:]
    expected = gate / (1 + np.exp(-gate)) * up
    paddle_ops = F.swiglu(x).numpy()
    for path in paths():
        one = kernels.swiglu(x, isa=path, threads=1).numpy()
        assert one.shape == (*lead, width)
        np.testing.assert_allclose(one, expected, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(one, paddle_ops, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(kernels.swiglu(x, isa=path, threads=2).numpy(), one)


def test_swiglu_saturates_like_silu():
    x = paddle.to_tensor(np.array([[-200.0, -90.0, -1e-30, 0.0, 90.0, 200.0] + [3.0] * 6], dtype=np.float32))
    for path in paths():
        np.testing.assert_allclose(kernels.swiglu(x, isa=path).numpy(), F.swiglu(x).numpy(), rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("lead, width", SHAPES)
def test_rms_norm_and_add_rms_norm(lead, width):
    rng = np.random.default_rng(width + 1)
    x, residual, weight = tensor(rng, (*lead, width)), tensor(rng, (*lead, width), 3.0), tensor(rng, (width,))
    eps = 1.5625e-07
    total = x.numpy() + residual.numpy()  # float32, as the operator adds
    t64 = total.astype(np.float64)
    expected = t64 / np.sqrt((t64 * t64).mean(-1, keepdims=True) + eps) * weight.numpy()
    paddle_ops = ops.rms_norm(paddle.to_tensor(total), weight, eps).numpy()
    for path in paths():
        out, summed = kernels.add_rms_norm(x, residual, weight, eps, isa=path, threads=1)
        np.testing.assert_array_equal(summed.numpy(), total)
        np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out.numpy(), paddle_ops, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(kernels.rms_norm(summed, weight, eps, isa=path).numpy(), out.numpy())
        threaded, _ = kernels.add_rms_norm(x, residual, weight, eps, isa=path, threads=2)
        np.testing.assert_array_equal(threaded.numpy(), out.numpy())


# (b, s, heads, groups, head_dim, rotary_dim): GLM-4-9B's (half of each head rotated), a whole head rotated,
# rotary and head widths that are not multiples of the SIMD width, one token, a batch
ROTARY = [
    (1, 1, 32, 2, 128, 64),
    (1, 17, 32, 2, 128, 64),
    (2, 5, 4, 1, 16, 16),
    (2, 3, 6, 2, 10, 6),
    (1, 9, 3, 3, 4, 2),
]


@pytest.mark.parametrize("b, s, heads, groups, head_dim, rotary_dim", ROTARY)
def test_split_rotary_equals_the_paddle_ops(b, s, heads, groups, head_dim, rotary_dim):
    rng = np.random.default_rng(rotary_dim * 7 + s)
    qkv = tensor(rng, (b, s, (heads + 2 * groups) * head_dim))
    positions = paddle.to_tensor(rng.integers(0, 5000, (b, s)).astype(np.int64))
    tables = ops.rotary_tables(positions, ops.inverse_frequencies(rotary_dim, 10000.0), "float32", 5000)
    expected = [t.numpy() for t in ops.split_rotary(qkv, tables, heads, groups, head_dim)]
    for path in paths():
        for threads in (1, 2):
            got = kernels.split_rotary(qkv, *tables, heads, groups, head_dim, isa=path, threads=threads)
            for mine, theirs in zip(got, expected, strict=True):
                np.testing.assert_array_equal(mine.numpy(), theirs)  # the same operations, in the same order


def logsumexp64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    top = x.max(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore"):  # a row of -inf: -inf - -inf
        return np.where(np.isinf(top[..., 0]), top[..., 0], top[..., 0] + np.log(np.exp(x - top).sum(axis=-1)))


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (3, 37), (2, 3, 64), (2, 151552), (5, 100003)])
def test_argmax_logsumexp(shape):
    rng = np.random.default_rng(shape[-1])
    x = tensor(rng, shape, scale=8.0)
    expected_index = paddle.argmax(x, axis=-1).numpy()
    for path in paths():
        index, log_prob, lse = kernels.argmax_logsumexp(x, isa=path, threads=1)
        assert index.dtype == paddle.int64 and lse.dtype == paddle.float32 and list(lse.shape) == list(shape[:-1])
        np.testing.assert_array_equal(index.numpy(), expected_index)
        # the chosen logit minus the normalizer, one float subtraction as the Paddle ops would do it
        np.testing.assert_array_equal(log_prob.numpy(), (paddle.max(x, axis=-1) - lse).numpy())
        np.testing.assert_allclose(lse.numpy(), logsumexp64(x.numpy()), rtol=1e-6)
        np.testing.assert_allclose(lse.numpy(), paddle.logsumexp(x, axis=-1).numpy(), rtol=1e-6)
        for threads in (2, 3):  # rows over the threads give the one-thread result, to the bit
            again = kernels.argmax_logsumexp(x, isa=path, threads=threads)
            for a, b in zip(again, (index, log_prob, lse), strict=True):
                np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_argmax_logsumexp_ties_and_infinities():
    rows = np.full((5, 50), -3.0, dtype=np.float32)
    rows[0, [41, 14, 17, 30]] = 2.5  # ties in different SIMD lanes and blocks: the first wins, as paddle.argmax
    rows[1, [48, 49]] = 2.5  # ties in the scalar tail only
    rows[2] = -np.inf  # nothing possible
    rows[3, 20:] = -np.inf  # a vocab_limit cut
    rows[4, 33] = np.inf
    x = paddle.to_tensor(rows)
    for path in paths():
        index, log_prob, lse = kernels.argmax_logsumexp(x, isa=path)
        np.testing.assert_array_equal(index.numpy(), [14, 48, 0, 0, 33])
        np.testing.assert_array_equal(index.numpy(), paddle.argmax(x, axis=-1).numpy())
        with np.errstate(invalid="ignore"):  # inf - inf, as the float subtraction gives it (nan)
            np.testing.assert_array_equal(log_prob.numpy(), np.float32([2.5, 2.5, -np.inf, -3.0, np.inf]) - lse.numpy())
        np.testing.assert_allclose(lse.numpy(), logsumexp64(rows), rtol=1e-6)
        assert lse.numpy()[2] == -np.inf and lse.numpy()[4] == np.inf


def test_argmax_ties_far_apart_and_a_late_maximum():
    # GLM-4's vocabulary: the first of equal maxima far apart wins, a long run of -inf, the maximum last
    rows = np.full((3, 151552), -1.0, dtype=np.float32)
    rows[0, [140000, 20000, 20001, 90000]] = 4.0
    rows[1, :16000] = -np.inf
    rows[1, 151551] = 0.5  # the last value
    rows[2, 16383:16386] = [3.0, 3.0, 3.0]
    x = paddle.to_tensor(rows)
    for path in paths():
        for threads in (1, 2):
            index, log_prob, lse = kernels.argmax_logsumexp(x, isa=path, threads=threads)
            np.testing.assert_array_equal(index.numpy(), paddle.argmax(x, axis=-1).numpy())
            np.testing.assert_array_equal(log_prob.numpy(), np.float32([4.0, 0.5, 3.0]) - lse.numpy())
            np.testing.assert_allclose(lse.numpy(), logsumexp64(rows), rtol=1e-6)


# positions a decode over a short cache has, GLM-4's 128K context (rope_ratio 500: base 5e6), and the tables'
# growth past their first size
@pytest.mark.parametrize("rotary_dim, base, high", [(64, 10000.0, 40), (64, 5e6, 131072), (32, 10000.0, 3000)])
def test_rotary_lookup_equals_rotary_tables_to_the_bit(rotary_dim, base, high):
    rng = np.random.default_rng(high)
    inv_freq = ops.inverse_frequencies(rotary_dim, base)
    table_cos, table_sin = ops.rotary_tables(paddle.arange(high).unsqueeze(0), inv_freq, "float32", high)
    table_cos, table_sin = table_cos.reshape([high, rotary_dim]), table_sin.reshape([high, rotary_dim])
    for shape in ((1, 1), (3, 1), (2, 17)):
        positions = paddle.to_tensor(rng.integers(0, high, shape).astype(np.int64))
        expected = ops.rotary_tables(positions, inv_freq, "float32", high)  # the Paddle ops, on these positions
        got = kernels.rotary_lookup(positions, table_cos, table_sin)
        for a, b in zip(got, expected, strict=True):
            assert a.shape == b.shape == [*shape, 1, rotary_dim]
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    with pytest.raises(OSError, match=f"position {high} is outside the tables' 0 .. {high - 1}"):
        kernels.rotary_lookup(paddle.to_tensor([[0, high]]), table_cos, table_sin)
    with pytest.raises(OSError, match="position -1 is outside"):
        kernels.rotary_lookup(paddle.to_tensor([[-1]]), table_cos, table_sin)


def test_rotary_cache_serves_what_it_can_and_equals_rotary_tables(monkeypatch):
    """ops.RotaryCache, the CPU model's rotary_tables: positions a forward over `table_len` slots has come from
    its tables (grown on demand); others (negative, far past table_len), other dtypes and rotary dims that are
    not multiples of 16 take rotary_tables itself; every result equals rotary_tables' to the bit."""
    lookups = []
    original = api.rotary_lookup
    monkeypatch.setattr(api, "rotary_lookup", lambda *a: lookups.append(a[0].numpy().max()) or original(*a))
    inv_freq = ops.inverse_frequencies(64, 10000.0)
    cache = ops.RotaryCache()
    cases = [([[0, 1, 2]], 3, True), ([[7]], 8, True), ([[300]], 301, True), ([[5000]], 301, False), ([[-2]], 4, False)]
    for positions, table_len, served in cases:
        lookups.clear()
        ids = paddle.to_tensor(positions, dtype="int64")
        got = cache(ids, inv_freq, paddle.float32, table_len)
        for a, b in zip(got, ops.rotary_tables(ids, inv_freq, "float32", table_len), strict=True):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
        assert bool(lookups) == served, positions
    assert cache.cos.shape == [512, 64]  # 256, doubled once for position 300
    assert cache(paddle.to_tensor([[3]]), inv_freq, "bfloat16", 4)[0].dtype == paddle.bfloat16
    other = ops.inverse_frequencies(64, 500.0)  # tables of another model's frequencies are rebuilt
    got = cache(paddle.to_tensor([[9]]), other, paddle.float32, 10)
    expected = ops.rotary_tables(paddle.to_tensor([[9]]), other, "float32", 10)
    np.testing.assert_array_equal(got[0].numpy(), expected[0].numpy())
    assert lookups and cache.inv_freq is other
    lookups.clear()  # 12 rotary dims: Paddle's cos of a position's row depends on the batch's shape (see ops.py)
    cache(paddle.to_tensor([[5]]), ops.inverse_frequencies(12, 10000.0), paddle.float32, 6)
    assert not lookups


def test_bad_arguments_are_refused():
    # the operators' own checks (Paddle raises them as OSError), which guard traced programs too
    with pytest.raises(OSError, match="last dimension must be even"):
        kernels.swiglu(paddle.ones([2, 7]))
    with pytest.raises(OSError, match=r"weight \[7\] must match x's last dimension \(8\)"):
        kernels.rms_norm(paddle.ones([2, 8]), paddle.ones([7]), 1e-6)
    with pytest.raises(OSError, match="residual must have x's shape"):
        kernels.add_rms_norm(paddle.ones([2, 8]), paddle.ones([3, 8]), paddle.ones([8]), 1e-6)
    with pytest.raises(OSError, match="qkv must be"):
        kernels.split_rotary(paddle.ones([1, 2, 40]), paddle.ones([1, 2, 1, 4]), paddle.ones([1, 2, 1, 4]), 2, 1, 8)
    with pytest.raises(OSError, match="must be float32"):
        kernels.swiglu(paddle.ones([2, 8], dtype="float64"))
    with pytest.raises(OSError, match=r"last dimension must hold 1 \.\. 2"):
        kernels.argmax_logsumexp(paddle.ones([2, 0]))
    with pytest.raises(ValueError, match="isa"):
        kernels.swiglu(paddle.ones([2, 8]), isa="sse9")


class Glue(paddle.nn.Layer):
    """Every operator of the family in one traced program."""

    def __init__(self, heads=4, groups=2, head_dim=8):
        super().__init__()
        self.heads, self.groups, self.head_dim = heads, groups, head_dim
        self.weight = self.create_parameter([(heads + 2 * groups) * head_dim])
        self.inv_freq = ops.inverse_frequencies(head_dim // 2, 10000.0)

    def forward(self, qkv, positions):
        normed, total = kernels.add_rms_norm(qkv, qkv * 2.0, self.weight, 1e-6)
        tables = ops.rotary_tables(positions, self.inv_freq, "float32", 64)
        q, k, v = kernels.split_rotary(
            kernels.rms_norm(normed, self.weight, 1e-6), *tables, self.heads, self.groups, self.head_dim
        )
        return kernels.swiglu(paddle.concat([q.flatten(2), k.flatten(2), v.flatten(2)], axis=-1)) + total[..., :32]


def test_to_static_save_and_predictor(tmp_path):
    from paddle import inference

    layer = Glue()
    rng = np.random.default_rng(3)
    qkv = rng.standard_normal((2, 5, 64)).astype(np.float32)
    positions = rng.integers(0, 64, (2, 5)).astype(np.int64)
    with paddle.no_grad():
        eager = layer(paddle.to_tensor(qkv), paddle.to_tensor(positions)).numpy()
    spec = [
        paddle.static.InputSpec([None, None, 64], "float32", "qkv"),
        paddle.static.InputSpec([None, None], "int64", "positions"),
    ]
    static = paddle.jit.to_static(layer, input_spec=spec, full_graph=True)
    paddle.jit.save(static, str(tmp_path / "glue"))
    config = inference.Config(str(tmp_path / "glue.json"), str(tmp_path / "glue.pdiparams"))
    config.disable_gpu()
    config.disable_glog_info()
    kernels.load()
    predictor = inference.create_predictor(config)
    for name, value in zip(predictor.get_input_names(), (qkv, positions), strict=True):
        predictor.get_input_handle(name).copy_from_cpu(value)
    predictor.run()
    out = predictor.get_output_handle(predictor.get_output_names()[0]).copy_to_cpu()
    np.testing.assert_array_equal(out, eager)


def test_the_model_uses_them_where_they_serve(monkeypatch):
    """CPU kernels' set: the operators compute float32 calls without a gradient; a call that needs one goes to
    Paddle's ops (the operators have no backward)."""
    calls = []
    monkeypatch.setattr(api, "swiglu", lambda x: calls.append("swiglu") or F.swiglu(x))
    k = ops.kernels(False)
    x = paddle.ones([2, 8])
    with paddle.no_grad():
        k.swiglu(x)
    assert calls == ["swiglu"]
    x.stop_gradient = False
    k.swiglu(x).sum().backward()
    assert calls == ["swiglu"] and x.grad is not None


def test_float32_model_through_the_operators_matches_the_reference(monkeypatch):
    """The float32 model computes its norms, rotary and SwiGLU with the operators when no gradient is wanted
    (as generation does), and stays within parity of transformers' GlmForCausalLM."""
    from conftest import reference_logits, small_config
    from test_model import CONFIGS, build, logits, random_ids

    calls = {}
    for name in ("swiglu", "rms_norm", "add_rms_norm", "split_rotary"):
        original = getattr(api, name)
        monkeypatch.setattr(
            api, name, lambda *a, _f=original, _n=name, **k: calls.update({_n: calls.get(_n, 0) + 1}) or _f(*a, **k)
        )
    for overrides, seq_len in CONFIGS:
        config = small_config(**overrides)
        ref, model = build(config)
        ids = random_ids(config, (2, seq_len))
        calls.clear()
        with paddle.no_grad():
            ours = logits(model, ids)
        layers = config.num_hidden_layers
        assert calls == {"rms_norm": layers + 1, "add_rms_norm": layers, "split_rotary": layers, "swiglu": layers}
        assert np.abs(ours - reference_logits(ref, ids)).max() <= 1e-4


# (format, K, group size): GLM-4's hidden width, and widths that are odd or not a multiple of the group
@pytest.mark.parametrize(
    "kind, k, group", [("bfloat16", 4096, None), ("int8", 37, None), ("int4", 4096, 128), ("int4", 203, 64)]
)
def test_embedding_equals_the_paddle_lookup(kind, k, group):
    from paddle_glm4 import linear
    from paddle_glm4.kernels import quant
    from paddle_glm4.quantization import Packed, Rows

    rng = np.random.default_rng(k)
    table = rng.standard_normal((50, k)).astype(np.float32)
    if kind == "bfloat16":
        fmt = Rows("bfloat16")
        tensors = [paddle.to_tensor(table).astype("bfloat16")]
    elif kind == "int8":
        fmt = Packed("int8")
        tensors = [paddle.to_tensor(a) for a in quant.quantize_int8(table)]
    else:
        fmt = Packed("int4", group)
        tensors = [paddle.to_tensor(a) for a in quant.quantize_int4(table, group)]
    ids = paddle.to_tensor(rng.integers(0, 50, (2, 3)).astype(np.int64))
    expected = linear._lookup(fmt, ids, tensors, k).astype("float32")  # the Paddle ops
    settings = {"fmt": linear.KERNEL_FORMATS[kind], "k": k, "group_size": group or 128}
    got = kernels.embedding(ids, *tensors, **settings)
    assert got.shape == [2, 3, k] and got.dtype == paddle.float32
    np.testing.assert_array_equal(got.numpy(), expected.numpy())
    with paddle.no_grad():  # what the model's lookup takes
        np.testing.assert_array_equal(linear.lookup(fmt, ids, tensors, k, "float32").numpy(), expected.numpy())
    with pytest.raises(OSError, match=r"token id 50 is outside the table's 0 \.\. 49"):
        kernels.embedding(paddle.to_tensor([[50]]), *tensors, **settings)


def test_the_embedding_takes_the_operator_without_a_gradient_only(monkeypatch):
    from paddle_glm4 import linear
    from paddle_glm4.quantization import Rows

    calls = []
    monkeypatch.setattr(api, "embedding", lambda *a, **k: calls.append(1) or paddle.zeros([1, 1, 8]))
    table = paddle.ones([4, 8]).astype("bfloat16")
    table.stop_gradient = False
    ids = paddle.to_tensor([[1]])
    with paddle.no_grad():
        linear.lookup(Rows("bfloat16"), ids, [table], 8, "float32")
    assert calls == [1]
    linear.lookup(Rows("bfloat16"), ids, [table], 8, "float32")  # a gradient wanted: Paddle's ops
    linear.lookup(Rows("float32"), ids, [table.astype("float32")], 8, "float32")  # already one Paddle op
    assert calls == [1]
