"""The C++ attention operator (paddle_glm4.kernels.attention): every path this CPU runs against plain softmax
attention, over float32 and bfloat16 caches, causal, chunked (start > 0), left-padded, grouped heads, views of
a larger cache; and what ops.attention hands it."""

import numpy as np
import paddle
import pytest

from paddle_glm4 import kernels, ops
from test_long_context import attention_case, attention_reference

pytestmark = pytest.mark.skipif(
    not kernels.available(),
    reason="the C++ kernels could not be built here "
    "(no compiler); ops.attention's portable path is tested in test_long_context.py",
)


def paths():
    best = kernels.PATHS.index(kernels.isa())
    return list(kernels.PATHS[: best + 1])


# (b, s, L, h, g, d, padded): a causal prompt, a chunk at start > 0, decode steps, head dims that are not a
# multiple of the tiles', more keys than one block, more queries than one task, keys split over tasks
CASES = [
    (1, 37, 37, 4, 2, 16, False),
    (2, 5, 200, 4, 2, 16, True),
    (1, 1, 300, 32, 2, 128, False),
    (2, 1, 70, 8, 2, 40, True),
    (2, 70, 150, 8, 2, 40, True),
    (1, 130, 130, 32, 2, 128, False),
    (3, 9, 65, 6, 3, 8, True),
    # decode steps over thousands of keys: each unit's keys split over several tasks, then merged
    (1, 1, 2500, 8, 2, 32, True),
    (2, 3, 3000, 4, 2, 16, False),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_path_computes_softmax_attention_over_the_cache(case, dtype):
    b, s, length, h, g, d, padded = case
    q, k, v, mask = attention_case(np.random.RandomState(len(CASES) * s + length), b, s, length, h, g, d, padded)
    k, v = k.astype(dtype), v.astype(dtype)
    expected = attention_reference(q, k, v, mask)  # over the stored (rounded) keys and values
    for path in paths():
        out = kernels.attention(q, k, v, mask.start_slot, mask.key_valid, isa=path).numpy()
        # a bf16 cache on AVX-512 BF16 CPUs is dotted in bf16 (q and the probabilities rounded, as the linear
        # kernels' bf16 activations): within bf16's rounding of values of size ~1
        tolerance = 2e-2 if dtype == "bfloat16" and path == "avx512bf16" else 2e-6
        assert np.abs(out - expected).max() <= tolerance, (path, case)


def test_the_cache_may_be_a_view_of_a_larger_batch_cache():
    rng = np.random.RandomState(3)
    q, k, v, mask = attention_case(rng, 2, 3, 64, padded=True)
    length = 40
    view = ops.attention_mask(mask.key_valid[:, :length], length - 3, 3)
    assert not k[:, :length].is_contiguous()
    out = kernels.attention(q, k[:, :length], v[:, :length], view.start_slot, view.key_valid).numpy()
    expected = attention_reference(q, k[:, :length].contiguous(), v[:, :length].contiguous(), view)
    assert np.abs(out - expected).max() <= 2e-6


def test_ops_attention_uses_the_kernel_unless_a_gradient_is_wanted(monkeypatch):
    q, k, v, mask = attention_case(np.random.RandomState(4), 1, 6, 20, padded=False)
    calls = []
    kernel = kernels.attention
    monkeypatch.setattr(ops.cpu_kernels, "attention", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    with paddle.no_grad():
        ops.attention(q, k, v, mask)
    ops.attention(q, k, v, mask)  # nothing requires a gradient here either
    assert len(calls) == 2
    q.stop_gradient = False
    out = ops.attention(q, k, v, mask)  # training: Paddle's ops, which have gradients
    assert len(calls) == 2 and not out.stop_gradient


def test_bad_inputs_are_refused_with_the_shapes():
    # the operator's own checks (Paddle raises them as OSError), which guard traced programs too
    q, k, v, mask = attention_case(np.random.RandomState(5), 1, 4, 10, padded=False)
    with pytest.raises(OSError, match="k and v must both be float32 or both bfloat16"):
        kernels.attention(q, k, v.astype("bfloat16"), mask.start_slot)
    with pytest.raises(OSError, match="does not fit k"):
        kernels.attention(
            q, k[:, :, :1].contiguous().tile([1, 1, 3, 1]), v.tile([1, 1, 3, 1])[:, :, :3], mask.start_slot
        )
    with pytest.raises(OSError, match="do not fit a cache of 10 slots"):
        kernels.attention(q, k, v, paddle.to_tensor(8, dtype="int64"))
    with pytest.raises(ValueError, match="isa must be"):
        kernels.attention(q, k, v, mask.start_slot, isa="sse9")
