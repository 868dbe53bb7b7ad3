"""Without a C++ compiler the kernels' API still works: one warning naming g++, then the portable path in
plain Paddle ops, with the values the kernels compute (checked against the same float64 reference)."""

from __future__ import annotations

import numpy as np

from test_kernels import assert_close, reference, run_python, stored


def test_without_a_compiler(tmp_path):
    """No compiler: one warning naming g++, then the portable path, with the kernels' values."""
    code = """
        import warnings, numpy as np, paddle
        from paddle_glm4 import kernels
        from paddle_glm4.kernels import quant
        rng = np.random.default_rng(0)
        x = rng.standard_normal((3, 200)).astype(np.float32)
        w = rng.standard_normal((9, 200)).astype(np.float32)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            q, s = quant.quantize_int4(w, 64)
            ys = [kernels.linear(paddle.to_tensor(x), paddle.to_tensor(q), paddle.to_tensor(s), fmt="int4",
                                 group_size=64, activation_dtype=act).numpy() for act in ("float32", "int8")]
            q8, s8 = quant.quantize_int8(w)
            ys.append(kernels.linear(paddle.to_tensor(x), paddle.to_tensor(q8), paddle.to_tensor(s8), fmt="int8",
                                     activation_dtype="int8").numpy())
            bf = paddle.to_tensor(quant.round_to_bfloat16(w)).astype("bfloat16")
            ys.append(kernels.linear(paddle.to_tensor(x), bf, None, fmt="bf16", activation_dtype="bfloat16").numpy())
        mine = [str(c.message) for c in caught if "paddle_glm4 kernels" in str(c.message)]
        print(len(mine), mine[0] if mine else "", kernels.available(), kernels.isa())
        np.save("%s", np.concatenate([y.ravel() for y in ys]))
    """ % (tmp_path / "portable.npy")
    done = run_python(
        code,
        {
            "XDG_CACHE_HOME": str(tmp_path / "cache"),
            "CXX": str(tmp_path / "no-such-g++"),
            "CC": str(tmp_path / "no-such-gcc"),
        },
    )
    assert done.returncode == 0, done.stderr[-3000:]
    count, _, rest = done.stdout.strip().partition(" ")
    assert count == "1" and "g++" in rest and rest.endswith("False portable"), done.stdout
    portable = np.load(tmp_path / "portable.npy")
    # the same computations through the kernels, in this process
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 200)).astype(np.float32)
    w = rng.standard_normal((9, 200)).astype(np.float32)
    ys = []
    for act in ("float32", "int8"):
        ys.append(reference(x, stored(w, "int4", 64)[2], act))
    ys.append(reference(x, stored(w, "int8", 0)[2], "int8"))
    ys.append(reference(x, stored(w, "bf16", 0)[2], "bfloat16"))
    for got, ref in zip(np.split(portable, 4), ys, strict=True):
        assert_close(got.reshape(ref.shape), ref, "portable path")
