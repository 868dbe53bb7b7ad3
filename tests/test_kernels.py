"""The C++ linear kernels (paddle_glm4.kernels): every format x activation dtype x path this CPU runs equals
a float32 matmul of the dequantized weights with the activations rounded as documented; the operators trace,
save and run in a Paddle Inference predictor; without a compiler the portable path gives the same values.

The reference is computed in float64 from quant.py's own dequantization and activation rounding, so each
kernel is held to the stored format's meaning, not to another kernel.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import paddle
import pytest

from paddle_glm4 import kernels
from paddle_glm4.kernels import quant

TOLERANCE = 1e-5  # max |y - reference| / max |reference|

pytestmark = pytest.mark.skipif(
    not kernels.available(),
    reason="the C++ kernels could not be built here "
    "(no compiler); the portable path is tested in test_kernels_portable.py",
)


def paths() -> list[str]:
    """Every path this CPU runs: the best one and each lower one, forced."""
    best = kernels.PATHS.index(kernels.isa())
    return list(kernels.PATHS[: best + 1])


def stored(w: np.ndarray, fmt: str, group: int):
    """(weight, scales) as the operators take them, and the float32 weights they stand for."""
    if fmt == "bf16":
        bits = quant.float32_to_bfloat16_bits(w)
        as_float = quant.bfloat16_bits_to_float32(bits)
        return paddle.to_tensor(as_float).astype("bfloat16"), None, as_float
    if fmt == "int8":
        q, scale = quant.quantize_int8(w)
        return paddle.to_tensor(q), paddle.to_tensor(scale), quant.dequantize_int8(q, scale)
    q, scales = quant.quantize_int4(w, group)
    return paddle.to_tensor(q), paddle.to_tensor(scales), quant.dequantize_int4(q, scales, w.shape[1], group)


def reference(x: np.ndarray, w: np.ndarray, act: str, bias: np.ndarray | None = None) -> np.ndarray:
    if act == "bfloat16":
        x = quant.round_to_bfloat16(x)
    elif act == "int8":
        q, scale = quant.quantize_activations_int8(x)
        x = q.astype(np.float32) * scale[:, None]
    y = x.astype(np.float64) @ w.astype(np.float64).T
    return y if bias is None else y + bias


def activation_dtypes(fmt: str) -> list[str]:
    return ["float32", "bfloat16"] + (["int8"] if fmt != "bf16" else [])


def assert_close(y: np.ndarray, ref: np.ndarray, what: str):
    error = np.abs(y.astype(np.float64) - ref).max() / np.abs(ref).max()
    assert error <= TOLERANCE, f"{what}: relative error {error:.2e}"


def check_all(m: int, k: int, n: int, fmt: str, group: int, threads: tuple = (1, 2), seed: int = 0, bias: bool = False):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(np.float32)
    weight, scales, dequantized = stored(rng.standard_normal((n, k)).astype(np.float32), fmt, group)
    b = rng.standard_normal(n).astype(np.float32) if bias else None
    for act in activation_dtypes(fmt):
        ref = reference(x, dequantized, act, b)
        for path in paths():
            for t in threads:
                y = kernels.linear(
                    paddle.to_tensor(x),
                    weight,
                    scales,
                    None if b is None else paddle.to_tensor(b),
                    fmt=fmt,
                    group_size=group,
                    activation_dtype=act,
                    isa=path,
                    threads=t,
                )
                assert y.shape == [m, n] and y.dtype == paddle.float32
                assert_close(y.numpy(), ref, f"{fmt} G{group} {act} {path} {t} threads, {m}x{k} -> {n}")


FORMATS = [("bf16", 0), ("int8", 0), ("int4", 128), ("int4", 64)]


@pytest.mark.parametrize("fmt, group", FORMATS)
@pytest.mark.parametrize("m", [1, 3, 6, 13, 16, 17, 40, 512])
def test_awkward_shapes(fmt, group, m):
    # K = 300: not a multiple of either group size, of 16, 32 or 64 (SIMD widths); N odd; 13, 17 and 40 rows:
    # the GEMM's register blocks (12 rows for bf16, 8 for int8) and a remainder
    check_all(m, 300, 37, fmt, group or 128, seed=m)


@pytest.mark.parametrize("fmt, group", [("int8", 0), ("int4", 128)])
def test_int8_activations_round_half_to_even(fmt, group):
    # x / scale lands exactly on halves (scale = 1): every path rounds them to even, as the reference does
    halves = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5], np.float32)
    x = np.zeros((2, 256), np.float32)
    x[:, 0] = 127.0
    x[0, 1 : 1 + halves.size] = halves
    x[1, 200 : 200 + halves.size] = -halves
    assert (quant.quantize_activations_int8(x)[1] == 1.0).all()
    rng = np.random.default_rng(11)
    weight, scales, dequantized = stored(rng.standard_normal((24, 256)).astype(np.float32), fmt, group or 128)
    ref = reference(x, dequantized, "int8")
    for path in paths():
        y = kernels.linear(
            paddle.to_tensor(x), weight, scales, fmt=fmt, group_size=group or 128, activation_dtype="int8", isa=path
        )
        assert_close(y.numpy(), ref, f"{fmt} {path} ties")


@pytest.mark.parametrize("fmt, group", FORMATS)
def test_odd_k_tiny_n_and_bias(fmt, group):
    # odd K leaves a padding nibble in int4 rows; N = 1; a bias is added
    check_all(3, 129, 1, fmt, group or 128, bias=True)
    check_all(20, 77, 3, fmt, group or 128, bias=True, threads=(2,))


@pytest.mark.parametrize("fmt, group", FORMATS)
def test_group_sizes_without_simd_chunks(fmt, group):
    # a group of 6 (no SIMD chunk fits): every path must still give the reference's values
    if fmt == "int4":
        check_all(2, 50, 9, fmt, 6)
        check_all(7, 50, 9, fmt, 6)


@pytest.mark.parametrize("fmt, group", [("int8", 0), ("int4", 128), ("int4", 64)])
def test_int8_tiles_with_several_groups_per_block(fmt, group):
    # past 16 rows int8 activations take the GEMM's int8 tiles, whose k-blocks hold several int4 groups (1024 k):
    # K = 1452 ends in a block of 428 = 3 x 128 + 44 (6 x 64 + 44), a short last group inside a block
    check_all(40, 1024 + 428, 37, fmt, group or 128, seed=5)
    check_all(33, 1024 + 4, 5, fmt, group or 128, seed=6, threads=(2,))  # a last block of one unit


@pytest.mark.parametrize("fmt, group", FORMATS)
def test_gemm_k_blocks_ending_in_a_short_one(fmt, group):
    # the GEMM walks k in blocks (1024 k for bf16 and int8 tiles, int4's groups for float tiles): two whole
    # blocks and a short third, whose length is no multiple of a group or a SIMD width
    check_all(40, 2 * 1024 + 300, 37, fmt, group or 128, seed=8, bias=True)


@pytest.mark.parametrize("fmt, group", FORMATS)
def test_gemv_tasks_of_several_passes(fmt, group):
    # the GEMV gives each thread long runs of channels (~512 KB of weights, whole passes of 16 channels): with
    # N = 1001 and two threads each task holds many passes and the last one ends in a short pass; 11 rows
    # take two passes of rows over each block of channels
    check_all(1, 1024, 1001, fmt, group or 128, bias=True)
    check_all(11, 1024, 1001, fmt, group or 128, seed=7, threads=(2, 3))


@pytest.mark.slow
@pytest.mark.parametrize("fmt, group", FORMATS)
@pytest.mark.parametrize("k, n", [(4096, 4608), (13696, 4096)], ids=["qkv", "down"])
def test_glm4_shapes(fmt, group, k, n):
    # GLM-4-9B's fused qkv projection and FFN down projection (K = 13696 = 107 x 128), decoding and prefill
    check_all(1, k, n, fmt, group or 128, threads=(2,))
    check_all(6, k, n, fmt, group or 128, threads=(2,), seed=1)
    check_all(17, k, n, fmt, group or 128, threads=(2,), seed=2)  # the GEMM (tiles, k-blocked activations)
    check_all(40, k, n, fmt, group or 128, threads=(2,), seed=3)  # and int8 activations' GEMM (int8 tiles)


def test_batched_input_and_auto_choice():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 256)).astype(np.float32)
    weight, scales, _ = stored(rng.standard_normal((40, 256)).astype(np.float32), "int4", 128)
    y = kernels.linear(paddle.to_tensor(x), weight, scales, fmt="int4")
    assert y.shape == [2, 3, 40]
    flat = kernels.linear(paddle.to_tensor(x.reshape(6, 256)), weight, scales, fmt="int4")
    np.testing.assert_array_equal(y.numpy().reshape(6, 40), flat.numpy())
    # "auto" is the documented choice, bit for bit: int8 activations for integer weights at any row count on
    # AVX-512 VNNI and up to 16 rows on AVX2, bfloat16 on AVX-512 BF16 CPUs, float32 otherwise
    best = kernels.isa()
    vnni = best in ("avx512vnni", "avx512bf16")
    for rows, fmt in [(1, "int4"), (1, "bf16"), (16, "int8"), (17, "int4"), (40, "int8"), (6, "bf16")]:
        w, s, _ = stored(rng.standard_normal((24, 256)).astype(np.float32), fmt, 128)
        xr = paddle.to_tensor(rng.standard_normal((rows, 256)).astype(np.float32))
        if fmt != "bf16" and best != "scalar" and (rows <= 16 or vnni):
            expected = "int8"
        else:
            expected = "bfloat16" if best == "avx512bf16" else "float32"
        auto = kernels.linear(xr, w, s, fmt=fmt, group_size=128)
        explicit = kernels.linear(xr, w, s, fmt=fmt, group_size=128, activation_dtype=expected)
        np.testing.assert_array_equal(auto.numpy(), explicit.numpy())


def test_paths_are_capped_and_reported():
    assert kernels.isa("scalar") == "scalar"
    assert kernels.isa("avx2") in ("scalar", "avx2")
    best = kernels.isa()
    assert best in kernels.PATHS
    flags = []
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read().split()
    if "avx512_bf16" in flags and "avx512_vnni" in flags:
        assert best == "avx512bf16"
    elif "avx2" in flags and "fma" in flags:
        assert best in ("avx2", "avx512vnni")
    # the environment caps the path of every call that leaves `isa` at "auto", in a predictor too
    done = run_python("from paddle_glm4 import kernels; print(kernels.isa())", {"GLM4_KERNELS_ISA": "scalar"})
    assert done.returncode == 0 and done.stdout.split()[-1] == "scalar", done.stderr[-2000:]


def test_bad_arguments_are_refused():
    x = paddle.ones([2, 8])
    q = paddle.to_tensor(np.zeros((4, 8), np.int8))
    with pytest.raises(ValueError, match="fmt"):
        kernels.linear(x, q, None, fmt="int3")
    with pytest.raises(ValueError, match="int8"):
        kernels.linear(x, paddle.ones([4, 8]).astype("bfloat16"), None, fmt="bf16", activation_dtype="int8")
    with pytest.raises(ValueError, match="scales"):
        kernels.linear(x, q, None, fmt="int8")
    with pytest.raises(ValueError, match="isa"):
        kernels.linear(x, q, paddle.ones([4]), fmt="int8", isa="sse9")
    with pytest.raises(Exception, match="input features"):
        kernels.linear(paddle.ones([2, 7]), q, paddle.ones([4]), fmt="int8")
    with pytest.raises(Exception, match="scales must be float32"):
        kernels.linear(x, paddle.to_tensor(np.zeros((4, 4), np.uint8)), paddle.ones([4, 2]), fmt="int4", group_size=2)


class ThreeLinears(paddle.nn.Layer):
    """One layer of each format, as a model would hold them (buffers in the stored formats)."""

    def __init__(self, k: int, n: int, group: int):
        super().__init__()
        rng = np.random.default_rng(7)
        self.group = group
        for fmt in ("bf16", "int8", "int4"):
            weight, scales, _ = stored(rng.standard_normal((n, k)).astype(np.float32), fmt, group)
            self.register_buffer(f"{fmt}_weight", weight)
            if scales is not None:
                self.register_buffer(f"{fmt}_scales", scales)
        self.register_buffer("bias", paddle.to_tensor(rng.standard_normal(n).astype(np.float32)))

    def forward(self, x):
        a = kernels.linear(x, self.bf16_weight, None, self.bias, fmt="bf16")
        b = kernels.linear(x, self.int8_weight, self.int8_scales, fmt="int8", activation_dtype="float32")
        c = kernels.linear(x, self.int4_weight, self.int4_scales, fmt="int4", group_size=self.group)
        return a + b + c


def test_to_static_save_and_predictor(tmp_path):
    from paddle import inference

    model = ThreeLinears(300, 45, 128)
    x = np.random.default_rng(8).standard_normal((9, 300)).astype(np.float32)
    eager = model(paddle.to_tensor(x)).numpy()
    static = paddle.jit.to_static(
        model, input_spec=[paddle.static.InputSpec([None, 300], "float32", "x")], full_graph=True
    )
    np.testing.assert_allclose(static(paddle.to_tensor(x)).numpy(), eager, rtol=0, atol=0)
    paddle.jit.save(static, str(tmp_path / "model"))
    config = inference.Config(str(tmp_path / "model.json"), str(tmp_path / "model.pdiparams"))
    config.disable_gpu()
    config.disable_glog_info()
    kernels.load()
    predictor = inference.create_predictor(config)
    for rows in (9, 1):  # the program runs again with another row count (GEMM, then GEMV)
        handle = predictor.get_input_handle(predictor.get_input_names()[0])
        handle.copy_from_cpu(x[:rows])
        predictor.run()
        out = predictor.get_output_handle(predictor.get_output_names()[0]).copy_to_cpu()
        np.testing.assert_array_equal(out, model(paddle.to_tensor(x[:rows])).numpy())


def run_python(code: str, env: dict, unset: tuple = ()) -> subprocess.CompletedProcess:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**{k: v for k, v in os.environ.items() if k not in unset}, "PYTHONPATH": root, **env}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=600
    )


def test_cached_build_is_reused():
    """A second process finds the build in the cache: no compiler runs (pointing CXX nowhere proves it)."""
    done = run_python(
        "from paddle_glm4 import kernels; print(kernels.available(), kernels.isa())",
        {"CXX": "/nonexistent/g++", "CC": "/nonexistent/gcc"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[0] == "True" and "building" not in done.stderr


def test_forked_child_runs_the_kernels():
    """A child forked after the thread pool started (a data loader, a server worker) starts its own threads."""
    code = """
        import os, numpy as np, paddle
        from paddle_glm4 import kernels
        from paddle_glm4.kernels import quant
        q, s = quant.quantize_int8(np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32))
        args = (paddle.ones([3, 256]), paddle.to_tensor(q), paddle.to_tensor(s))
        expected = kernels.linear(*args, fmt="int8", threads=2).numpy()
        pid = os.fork()
        if pid == 0:
            same = np.array_equal(kernels.linear(*args, fmt="int8", threads=2).numpy(), expected)
            os._exit(0 if same else 1)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status))
    """
    done = run_python(code, {})
    assert done.returncode == 0 and done.stdout.split()[-1] == "0", (done.stdout, done.stderr[-2000:])


def test_back_to_back_calls_with_changing_thread_counts():
    """The pool's workers spin briefly between jobs: calls that follow each other at once, with a different
    number of threads each time (a worker left out of one job must not take it, nor miss the next), each
    compute every output."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((40, 256)).astype(np.float32)
    weight, scales, as_float = stored(w, "int8", 128)
    x = rng.standard_normal((2, 256)).astype(np.float32)
    ref = reference(x, as_float, "int8")
    xs = paddle.to_tensor(x)
    for call in range(600):
        threads = (1, 2, 3, 4, 3)[call % 5]
        y = kernels.linear(xs, weight, scales, fmt="int8", activation_dtype="int8", threads=threads)
        assert_close(y.numpy(), ref, f"call {call}, {threads} threads")


def test_linear_kernels_stop_paddles_openmp_workers_spinning():
    """A thread that runs the linear kernels sets Paddle's OpenMP block time (libiomp5) to 0, so that its
    workers sleep instead of spinning on the kernels' cores; a float32 model's Paddle ops alone leave it as it
    was, and so does a KMP_BLOCKTIME the user set."""
    code = """
        import ctypes, glob, os, sys, numpy as np, paddle
        from paddle_glm4 import kernels
        from paddle_glm4.kernels import quant
        libs = glob.glob(os.path.join(os.path.dirname(paddle.__file__), "libs", "libiomp5.so"))
        if not libs:
            print("no-libiomp5"); sys.exit(0)
        blocktime = ctypes.CDLL(libs[0]).kmp_get_blocktime
        x = paddle.ones([3, 256])
        paddle.matmul(x, x, transpose_y=True)
        kernels.rms_norm(x, paddle.ones([256]), 1e-5)
        before = blocktime()
        q, s = quant.quantize_int8(np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32))
        kernels.linear(x, paddle.to_tensor(q), paddle.to_tensor(s), fmt="int8")
        print(before, blocktime())
    """
    done = run_python(code, {}, unset=("KMP_BLOCKTIME",))
    assert done.returncode == 0, done.stderr[-3000:]
    if done.stdout.split()[-1] == "no-libiomp5":
        pytest.skip("this Paddle wheel has no libiomp5 (the block time is Intel OpenMP's)")
    assert done.stdout.split()[-2:] == ["200", "0"], done.stdout
    done = run_python(code, {"KMP_BLOCKTIME": "50"})
    assert done.returncode == 0 and done.stdout.split()[-2:] == ["50", "50"], (done.stdout, done.stderr[-2000:])
