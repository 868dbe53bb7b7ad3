"""The kernels' Python API (see the package docstring): build or load the operators, call them."""

from __future__ import annotations

from types import ModuleType

import paddle

from . import ACTIVATION_DTYPES, FORMATS, PATHS, build, portable


def load() -> ModuleType | None:
    """The compiled operators (built on first use), or None where they cannot be built. Call it before
    creating a Paddle Inference predictor that runs them: the predictor finds operators already loaded."""
    return build.load()


def available() -> bool:
    return load() is not None


def isa(cap: str = "auto") -> str:
    """The path the kernels run on this CPU (under a cap, as linear's `isa`); "portable" without them."""
    ops = load()
    if ops is None:
        return "portable"
    return PATHS[int(ops.glm4_kernel_path(paddle.zeros([1]), cap).numpy()[0])]


@paddle.jit.not_to_static  # the operator is what a traced program records, not this Python
def linear(
    x: paddle.Tensor,
    weight: paddle.Tensor,
    scales: paddle.Tensor | None = None,
    bias: paddle.Tensor | None = None,
    *,
    fmt: str = "bf16",
    group_size: int = 128,
    activation_dtype: str = "auto",
    isa: str = "auto",
    threads: int = 0,
) -> paddle.Tensor:
    """x float32 [..., K] @ W^T (+ bias) -> float32 [..., N], W stored as `fmt` says (see the package
    docstring).

    `scales` is int8's scale [N] or int4's scales [N, groups] (None for bf16). `isa` caps the path ("auto":
    the best the CPU has, or GLM4_KERNELS_ISA); `threads` 0 means every core (or GLM4_KERNELS_THREADS).
    Works in the dynamic graph and under paddle.jit.to_static (the operator is recorded in the program).
    """
    _check(fmt, activation_dtype, isa, scales, group_size)
    ops = load()
    if ops is None:
        return portable.linear(x, weight, scales, bias, fmt, group_size, activation_dtype)
    if paddle.in_dynamic_mode() and not x.is_contiguous():
        x = x.contiguous()
    if fmt == "bf16":
        return ops.glm4_linear_bf16(x, weight, bias, activation_dtype, isa, threads)
    if fmt == "int8":
        return ops.glm4_linear_int8(x, weight, scales, bias, activation_dtype, isa, threads)
    return ops.glm4_linear_int4(x, weight, scales, bias, activation_dtype, isa, threads, group_size)


@paddle.jit.not_to_static  # the operator is what a traced program records, not this Python
def attention(
    q: paddle.Tensor,
    k: paddle.Tensor,
    v: paddle.Tensor,
    start: paddle.Tensor,
    key_valid: paddle.Tensor | None = None,
    *,
    isa: str = "auto",
    threads: int = 0,
) -> paddle.Tensor:
    """Causal attention of q float32 [b, s, h, d] over a KV cache k, v [b, C, g, d] (float32 or bfloat16, read
    as stored): query i at slot start + i sees slot j <= start + i that holds a real token (`key_valid` [b, L]
    bool; None: every slot up to L = start + s does) or is its own. `start` is an int64 tensor of one value.
    -> float32 [b, s, h, d]. Memory does not grow with s or L (see attention.cc). Needs the built operators."""
    return _ops_for(isa).glm4_attention(_contiguous(q), k, v, start, key_valid, isa, threads)


# ---- Between the linear layers (elementwise.cc): float32 in, float32 out, no gradient ------------------------
def _ops_for(isa: str) -> ModuleType:
    _check_isa(isa)
    ops = load()
    if ops is None:
        raise RuntimeError(f"paddle_glm4 kernels unavailable: {build.failure()}")
    return ops


def _contiguous(x: paddle.Tensor) -> paddle.Tensor:
    return x.contiguous() if paddle.in_dynamic_mode() and not x.is_contiguous() else x


@paddle.jit.not_to_static  # the operator is what a traced program records, not this Python
def swiglu(x: paddle.Tensor, *, isa: str = "auto", threads: int = 0) -> paddle.Tensor:
    """x [..., 2F] (gate, then up) -> silu(gate) * up [..., F], as F.swiglu. Needs the built operators."""
    return _ops_for(isa).glm4_swiglu(_contiguous(x), isa, threads)


@paddle.jit.not_to_static
def rms_norm(
    x: paddle.Tensor, weight: paddle.Tensor, eps: float, *, isa: str = "auto", threads: int = 0
) -> paddle.Tensor:
    """x [..., H] * rsqrt(mean(x^2) + eps) * weight [H], as ops.rms_norm. Needs the built operators."""
    return _ops_for(isa).glm4_rms_norm(_contiguous(x), weight, eps, isa, threads)


@paddle.jit.not_to_static
def add_rms_norm(
    x: paddle.Tensor, residual: paddle.Tensor, weight: paddle.Tensor, eps: float, *, isa: str = "auto", threads: int = 0
) -> tuple[paddle.Tensor, paddle.Tensor]:
    """(rms_norm(x + residual, weight, eps), x + residual) in one pass. Needs the built operators."""
    out, total = _ops_for(isa).glm4_add_rms_norm(_contiguous(x), _contiguous(residual), weight, eps, isa, threads)
    return out, total


@paddle.jit.not_to_static
def split_rotary(
    qkv: paddle.Tensor,
    cos: paddle.Tensor,
    signed_sin: paddle.Tensor,
    heads: int,
    groups: int,
    head_dim: int,
    *,
    isa: str = "auto",
    threads: int = 0,
) -> tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]:
    """The fused projection's output qkv [b, s, (heads + 2 groups) head_dim] -> q [b, s, heads, head_dim],
    k and v [b, s, groups, head_dim], the first r dims of q and k rotated by ops.rotary_tables' cos and
    signed sine [b, s, 1, r] (as ops.apply_rotary). Needs the built operators."""
    ops = _ops_for(isa)
    q, k, v = ops.glm4_split_rotary(
        _contiguous(qkv), _contiguous(cos), _contiguous(signed_sin), heads, groups, head_dim, isa, threads
    )
    return q, k, v


@paddle.jit.not_to_static
def argmax_logsumexp(
    x: paddle.Tensor, *, isa: str = "auto", threads: int = 0
) -> tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]:
    """x float32 [..., V] (logits) -> (the index of each row's largest value, the first on ties, as paddle.argmax:
    int64 [...]; its log-probability, that value minus the next, float32 [...]; log(sum(exp(row))), as
    paddle.logsumexp: float32 [...]), in one pass of each row. Needs the built operators."""
    index, log_prob, lse = _ops_for(isa).glm4_argmax_logsumexp(_contiguous(x), isa, threads)
    return index, log_prob, lse


@paddle.jit.not_to_static
def rotary_lookup(
    positions: paddle.Tensor, cos_table: paddle.Tensor, sin_table: paddle.Tensor
) -> tuple[paddle.Tensor, paddle.Tensor]:
    """positions int64 [b, s] -> their rows of tables [P, r] (ops.rotary_tables of positions 0 .. P - 1) as
    ops.rotary_tables returns them: cos and signed sine, float32 [b, s, 1, r]; a position outside 0 .. P - 1 is
    refused. One operator where rotary_tables is ~13 small Paddle ops. Needs the built operators."""
    cos, sin = _ops_for("auto").glm4_rotary_lookup(_contiguous(positions), cos_table, sin_table)
    return cos, sin


@paddle.jit.not_to_static
def block(
    x: paddle.Tensor,
    norms: tuple[paddle.Tensor, paddle.Tensor],
    linears: tuple[list[paddle.Tensor], ...],
    qkv_bias: paddle.Tensor | None,
    cos: paddle.Tensor,
    signed_sin: paddle.Tensor,
    k_cache: paddle.Tensor,
    v_cache: paddle.Tensor,
    start: paddle.Tensor,
    key_valid: paddle.Tensor | None,
    *,
    fmt: str,
    group_size: int,
    eps: float,
    heads: int,
    groups: int,
    head_dim: int,
    keep: int = 0,
    activation_dtype: str = "auto",
    isa: str = "auto",
    threads: int = 0,
) -> paddle.Tensor:
    """A whole GLM-4 block, x + attention(norm(x)) then + mlp(norm(.)), in one operator (see block.h):
    x float32 [b, s, H] -> [b, keep or s, H] (keep > 0: the MLP on the last `keep` positions only).

    `norms`: the input and post-attention norms' weights [H]. `linears`: the tensors of qkv_proj, o_proj,
    gate_up_proj and down_proj as the linear operators take them in `fmt` ([weight] for bf16, [qweight, scales]
    for int8 / int4). cos, signed_sin [b, s, 1, r]: ops.rotary_tables. k_cache, v_cache [B >= b, C, g, d]
    float32 or bfloat16: the new keys and values are written in place at slots start .. start + s of rows
    0 .. b - 1, and attention reads them as glm4_attention does (`start`, `key_valid`). Needs the built
    operators."""
    _check(fmt, activation_dtype, isa, linears[0][1] if len(linears[0]) > 1 else None, group_size)
    scales = [tensors[1] if len(tensors) > 1 else None for tensors in linears]
    out, _, _ = _ops_for(isa).glm4_block(
        _contiguous(x),
        *norms,
        linears[0][0],
        scales[0],
        qkv_bias,
        linears[1][0],
        scales[1],
        linears[2][0],
        scales[2],
        linears[3][0],
        scales[3],
        _contiguous(cos),
        _contiguous(signed_sin),
        k_cache,
        v_cache,
        start,
        key_valid,
        fmt,
        group_size,
        eps,
        heads,
        groups,
        head_dim,
        keep,
        activation_dtype,
        isa,
        threads,
    )
    return out


@paddle.jit.not_to_static
def embedding(
    ids: paddle.Tensor,
    table: paddle.Tensor,
    scales: paddle.Tensor | None = None,
    *,
    fmt: str = "bf16",
    k: int,
    group_size: int = 128,
) -> paddle.Tensor:
    """Rows `ids` int64 [...] of a token embedding held as a weight of vocab output rows in `fmt` (see the package
    docstring; K = k columns) -> float32 [..., k]: bf16 widened, int8 / int4 dequantized as
    quantization.Packed.rows does, in one operator. An id outside the table is refused. Needs the built
    operators."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    return _ops_for("auto").glm4_embedding(_contiguous(ids), table, scales, fmt, k, group_size)


def _check_isa(isa: str) -> None:
    if isa != "auto" and isa not in PATHS:
        raise ValueError(f"isa must be 'auto' or one of {PATHS}, got {isa!r}")


def _check(fmt, activation_dtype, isa, scales, group_size) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if activation_dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"activation_dtype must be one of {ACTIVATION_DTYPES}, got {activation_dtype!r}")
    if activation_dtype == "int8" and fmt == "bf16":
        raise ValueError("activation_dtype='int8' needs int8 or int4 weights, not bf16")
    _check_isa(isa)
    if (scales is None) != (fmt == "bf16"):
        raise ValueError(f"fmt={fmt!r} {'takes no' if fmt == 'bf16' else 'needs'} scales")
    if fmt == "int4" and (group_size < 2 or group_size % 2):
        raise ValueError(f"int4 group_size must be an even number >= 2, got {group_size}")
