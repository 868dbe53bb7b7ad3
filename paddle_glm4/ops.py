"""The model's numerical building blocks, each in a portable form and, where Paddle has one, a fused GPU form.

`kernels(fused)` is the one switch between them; the model picks once, at construction. Paddle 3.3's
`fused_rotary_position_embedding` has no CPU kernel and its `fused_rms_norm` CPU kernel dies with SIGILL
on CPUs without AVX-512 (this project's machines), so the fused set is for GPUs. On CPU the norms, rotary,
SwiGLU and the sampler's argmax and log-sum-exp are paddle_glm4.kernels' operators (one multi-threaded pass
each, where Paddle runs several single-threaded ops) wherever those serve the call (`kernel_serves`), else
these Paddle forms.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import paddle
import paddle.incubate.nn.functional as IF
import paddle.nn.functional as F

from . import kernels as cpu_kernels
from .device import cpu_threads, on_gpu
from .quantization import Dense, WeightFormat

# ---- Linear --------------------------------------------------------------------------------------------
# A matmul of a few rows (decoding) only streams the weight through memory, and MKL's GEMV does that on one
# core at ~18 GB/s here, while two cores read ~25 GB/s. Cutting the weight [K, N] along K into one block per
# thread (a free view: the rows are contiguous) makes it a batched matmul, which Paddle runs one block per
# thread; the partial products are then summed. Measured on GLM-4's shapes: +15-50% GB/s at 1-8 rows, but
# 5-10% fewer GFLOP/s than one GEMM at 512 rows, hence the row limit.
SPLIT_MAX_ROWS = 16


def linear(x: paddle.Tensor, weight: paddle.Tensor, bias: paddle.Tensor | None) -> paddle.Tensor:
    """x [..., K] @ weight [K, N] (+ bias), with the weight read by every CPU thread for few rows."""
    k, n = weight.shape
    threads = cpu_threads()
    rows = 1
    for dim in x.shape[:-1]:
        rows *= dim
    if threads == 1 or rows > SPLIT_MAX_ROWS or k % threads or not paddle.in_dynamic_mode():
        return F.linear(x, weight, bias)
    blocks = x.reshape([rows, threads, k // threads]).transpose([1, 0, 2])  # [T, rows, K/T]
    out = paddle.matmul(blocks, weight.reshape([threads, k // threads, n])).sum(axis=0)  # [rows, N]
    out = out.reshape([*x.shape[:-1], n])
    return out if bias is None else out + bias


# ---- RMSNorm -------------------------------------------------------------------------------------------
def rms_norm(x: paddle.Tensor, weight: paddle.Tensor, eps: float) -> paddle.Tensor:
    # statistics in fp32 whatever the activation dtype, as the reference does
    x32 = x if x.dtype == paddle.float32 else x.astype("float32")
    x32 = x32 * paddle.rsqrt((x32 * x32).mean(axis=-1, keepdim=True) + eps)
    return weight * (x32 if x.dtype == paddle.float32 else x32.astype(x.dtype))


def fused_rms_norm(x: paddle.Tensor, weight: paddle.Tensor, eps: float) -> paddle.Tensor:
    return IF.fused_rms_norm(x, weight, None, eps, begin_norm_axis=x.ndim - 1)[0]


def add_rms_norm(
    x: paddle.Tensor, residual: paddle.Tensor, weight: paddle.Tensor, eps: float, norm: Callable = rms_norm
) -> tuple[paddle.Tensor, paddle.Tensor]:
    """A block's residual add and the norm after it: (norm(x + residual), x + residual)."""
    total = x + residual
    return norm(total, weight, eps), total


def cpu_rms_norm(x: paddle.Tensor, weight: paddle.Tensor, eps: float) -> paddle.Tensor:
    return cpu_kernels.rms_norm(x, weight, eps) if kernel_serves(x, weight) else rms_norm(x, weight, eps)


def cpu_add_rms_norm(
    x: paddle.Tensor, residual: paddle.Tensor, weight: paddle.Tensor, eps: float
) -> tuple[paddle.Tensor, paddle.Tensor]:
    if kernel_serves(x, residual, weight):
        return cpu_kernels.add_rms_norm(x, residual, weight, eps)
    return add_rms_norm(x, residual, weight, eps)


# ---- SwiGLU --------------------------------------------------------------------------------------------
def cpu_swiglu(x: paddle.Tensor) -> paddle.Tensor:
    """x [..., 2F] (gate, then up) -> silu(gate) * up [..., F]."""
    return cpu_kernels.swiglu(x) if kernel_serves(x) else F.swiglu(x)


# ---- The sampler's statistics of the logits ---------------------------------------------------------------
def argmax_logsumexp(logits: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]:
    """logits [b, vocab] -> (each row's most likely token [b] int64, its log-probability [b], log(sum(exp(row)))
    [b]): the greedy choice and the log-probabilities' normalizer, in one pass of each row where the kernels
    serve."""
    if kernel_serves(logits):
        return cpu_kernels.argmax_logsumexp(logits)
    normalizer = paddle.logsumexp(logits, axis=-1)
    return paddle.argmax(logits, axis=-1), paddle.max(logits, axis=-1) - normalizer, normalizer


# ---- Rotary position embedding -------------------------------------------------------------------------
# GLM-4 rotates the first `rotary_dim` dims of each head, on interleaved pairs (x[2i], x[2i+1]) by the angle
# position * theta_i, theta_i = base^(-2i / rotary_dim); the rest of the head passes through unchanged.
# The tables are built once per forward and shared by every layer.
def inverse_frequencies(rotary_dim: int, base: float) -> paddle.Tensor:
    # computed in fp32 exactly as the reference does, so that angles agree to the last bit
    exponents = paddle.arange(0, rotary_dim, 2, dtype="float32") / rotary_dim
    return 1.0 / (paddle.full([], base, dtype="float32") ** exponents)


def rotary_tables(
    position_ids: paddle.Tensor, inv_freq: paddle.Tensor, dtype: str | paddle.dtype, table_len: int
) -> tuple:
    """position_ids [b, s] -> (cos, signed sin), each [b, s, 1, rotary_dim] (the 1 broadcasts over heads).

    Per dim, each pair's angle twice; the sine is negated on even dims, so that a pair (x0, x1) rotates to
    x * cos + (x1, x0) * sin = (x0 cos - x1 sin, x1 cos + x0 sin): the reference's formula, bit for bit.
    """
    angles = paddle.repeat_interleave(position_ids.astype("float32").unsqueeze(-1) * inv_freq, 2, axis=-1)
    signs = paddle.to_tensor([-1.0, 1.0], dtype="float32").tile([inv_freq.shape[0]])
    return paddle.cos(angles).unsqueeze(2).astype(dtype), (paddle.sin(angles) * signs).unsqueeze(2).astype(dtype)


class RotaryCache:
    """The CPU forward's rotary tables: `rotary_tables` of every position below a bound, built once (grown by
    doubling), so that a forward copies its positions' rows in one operator instead of running ~13 small Paddle
    ops (a decode step's largest share of them outside the layers). Paddle's cos and sin are SLEEF's, which a
    kernel cannot call: a copy of the table rotary_tables built is its result to the bit, where rotary_tables
    computes every element alike. It does so when rotary_dim is a multiple of 16: Paddle computes 8 or 16
    values at a time and a remainder with SLEEF's scalar function, whose results differ in the last bit, so with
    another rotary_dim an element's bits would depend on the batch's shape.

    Called as rotary_tables is. Positions a forward over a cache of `table_len` slots cannot have (negative, or
    past both the table and table_len: position ids a caller gave), other rotary dims and dtypes, traced
    programs and a machine without the kernels take rotary_tables itself."""

    MIN_POSITIONS = 256

    def __init__(self):
        self.inv_freq: paddle.Tensor | None = None  # what the tables were built from
        self.cos = self.sin = None  # [P, rotary_dim] float32

    @paddle.jit.not_to_static
    def __call__(
        self, position_ids: paddle.Tensor, inv_freq: paddle.Tensor, dtype: str | paddle.dtype, table_len: int
    ) -> tuple:
        if not (
            paddle.in_dynamic_mode() and _is_float32(dtype) and inv_freq.shape[0] % 8 == 0 and kernel_serves(inv_freq)
        ):
            return rotary_tables(position_ids, inv_freq, dtype, table_len)
        positions = position_ids.numpy()  # b x s ids to the host: a copy of a few bytes on CPU
        held = 0 if self.cos is None or self.inv_freq is not inv_freq else self.cos.shape[0]
        if positions.size == 0 or positions.min() < 0 or positions.max() >= max(held, table_len):
            return rotary_tables(position_ids, inv_freq, dtype, table_len)
        if positions.max() >= held:
            self._build(inv_freq, max(int(positions.max()) + 1, 2 * held, self.MIN_POSITIONS))
        return cpu_kernels.rotary_lookup(position_ids, self.cos, self.sin)

    def _build(self, inv_freq: paddle.Tensor, size: int) -> None:
        cos, sin = rotary_tables(paddle.arange(size, dtype="int64").unsqueeze(0), inv_freq, "float32", size)
        self.cos, self.sin = cos.reshape([size, -1]), sin.reshape([size, -1])
        self.inv_freq = inv_freq


def _is_float32(dtype: str | paddle.dtype) -> bool:
    return dtype in ("float32", paddle.float32)


def apply_rotary(x: paddle.Tensor, tables: tuple) -> paddle.Tensor:
    """x [b, s, h, d] -> x with its first rotary_dim dims rotated pairwise."""
    cos, signed_sin = tables
    rotary_dim = cos.shape[-1]
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    # each pair swapped: (x0, x1) -> (x1, x0); 0 in a shape keeps that dim as it is (dynamic b, s)
    swapped = x_rot.reshape([0, 0, 0, rotary_dim // 2, 2]).flip(-1).reshape([0, 0, 0, rotary_dim])
    return paddle.concat([x_rot * cos + swapped * signed_sin, x_pass], axis=-1)


def split_rotary(
    qkv: paddle.Tensor, tables: tuple, heads: int, groups: int, head_dim: int, apply: Callable = apply_rotary
) -> tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]:
    """The fused projection's output [b, s, (h + 2g) d] -> q [b, s, h, d], k, v [b, s, g, d], queries and keys
    rotated (together, in one `apply` call)."""
    h, g, d = heads, groups, head_dim
    qk, v = paddle.split(qkv, [(h + g) * d, g * d], axis=-1)
    q, k = paddle.split(apply(qk.reshape([0, 0, h + g, d]), tables), [h, g], axis=2)
    return q, k, v.reshape([0, 0, g, d])


def cpu_split_rotary(
    qkv: paddle.Tensor, tables: tuple, heads: int, groups: int, head_dim: int
) -> tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]:
    cos, signed_sin = tables
    if kernel_serves(qkv, cos, signed_sin):
        return cpu_kernels.split_rotary(qkv, cos, signed_sin, heads, groups, head_dim)
    return split_rotary(qkv, tables, heads, groups, head_dim)


def fused_rotary_tables(
    position_ids: paddle.Tensor, inv_freq: paddle.Tensor, dtype: str | paddle.dtype, table_len: int
) -> tuple:
    # Paddle's kernel looks angles up by position in a [1, table_len, 1, rotary_dim] table holding each
    # pair's angle twice; `table_len` covers every position in the batch (at most the cache length).
    angles = paddle.arange(table_len, dtype="float32").unsqueeze(-1) * inv_freq
    per_dim = paddle.repeat_interleave(angles, 2, axis=-1).unsqueeze(0).unsqueeze(2)
    return paddle.cos(per_dim).astype(dtype), paddle.sin(per_dim).astype(dtype), position_ids


def fused_apply_rotary(x: paddle.Tensor, tables: tuple) -> paddle.Tensor:
    # `use_neox_rotary_style=True` is Paddle's name for the adjacent-pairs scheme (fused_rope_utils.h)
    cos, sin, position_ids = tables
    rotary_dim = cos.shape[-1]
    rotated, _, _ = IF.fused_rotary_position_embedding(
        x[..., :rotary_dim].contiguous(), sin=sin, cos=cos, position_ids=position_ids, use_neox_rotary_style=True
    )
    return paddle.concat([rotated, x[..., rotary_dim:]], axis=-1)


# ---- Attention -----------------------------------------------------------------------------------------
# On CPU, scaled_dot_product_attention computes the whole score matrix [b, h, s, L] in float32: 137 GB for a
# 32K-token prompt at GLM-4-9B's 32 heads. So a CPU forward attends through paddle_glm4.kernels' operator,
# which walks the keys in blocks with an online softmax and reads a bf16 cache as stored (its memory does not
# grow with s or L; see kernels/attention.cc); it runs in the dynamic graph and in an exported program alike.
# Where the operator cannot serve (no C++ compiler, or a gradient is wanted: it has none), queries go in blocks
# small enough that one block's scores stay under this many floats (256 MB); each block reads every key it may
# see. On GPU, Paddle's flash kernel.
SCORE_BUDGET = 1 << 26


class Mask(NamedTuple):
    """Which keys each new token's query sees: query i sits at cache slot start + i and sees slot j <= start + i
    that holds a real token (key_valid [b, L] bool; None: every slot up to L = start + s does) or is its own
    (so that padding rows stay finite, and unused). `start` is an int, or a 0-d tensor in a static program
    (which always passes key_valid); `start_slot` is it as an int64 tensor, for the kernel."""

    start: int | paddle.Tensor
    seq_len: int | paddle.Tensor
    key_valid: paddle.Tensor | None
    start_slot: paddle.Tensor


@paddle.jit.not_to_static
def attention_mask(key_valid: paddle.Tensor | None, start: int | paddle.Tensor, seq_len: int | paddle.Tensor) -> Mask:
    """The Mask of a forward over `seq_len` new tokens at slots start.. (computed once, shared by the layers)."""
    # paddle.full, not to_tensor: a quarter of its time in a decode step
    start_slot = start if isinstance(start, paddle.Tensor) else paddle.full([], start, dtype="int64")
    return Mask(start, seq_len, key_valid, start_slot)


def last_queries(mask: Mask, keep: int) -> Mask:
    """The Mask of the last `keep` of its seq_len new tokens (keep < seq_len, both ints): they sit `seq_len - keep`
    slots further on and see the same keys."""
    skip = mask.seq_len - keep
    return Mask(mask.start + skip, keep, mask.key_valid, mask.start_slot + skip)


def attention(q: paddle.Tensor, k: paddle.Tensor, v: paddle.Tensor, mask: Mask) -> paddle.Tensor:
    """q [b, s, h, d]; k, v [b, L, g, d] (the cache's first L slots, float32 or bfloat16) with h a multiple of
    g (GQA: K/V are not repeated here) -> [b, s, h, d] in q's dtype."""
    if kernel_serves(q, k, v):
        return cpu_kernels.attention(q, k, v, mask.start_slot, mask.key_valid)
    if k.dtype != q.dtype:  # a compact cache, widened one layer at a time on this path
        k, v = k.astype(q.dtype), v.astype(q.dtype)
    additive, is_causal = additive_mask(mask, q.dtype)
    if on_gpu() or not paddle.in_dynamic_mode():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=additive, is_causal=is_causal, training=False)
    return _attention_in_blocks(q, k, v, additive, is_causal)


@paddle.jit.not_to_static
def kernel_serves(first: paddle.Tensor, *others: paddle.Tensor) -> bool:
    """Whether paddle_glm4.kernels computes a call on these tensors: on CPU, where the operators could be built,
    `first` in float32 (the others in float32 too, but attention's cache may be bf16), when no gradient is
    wanted (the operators have none)."""
    if on_gpu() or first.dtype != paddle.float32:
        return False
    if paddle.in_dynamic_mode() and paddle.is_grad_enabled() and not all(t.stop_gradient for t in (first, *others)):
        return False
    return cpu_kernels.available()


@paddle.jit.not_to_static
def _attention_in_blocks(
    q: paddle.Tensor, k: paddle.Tensor, v: paddle.Tensor, mask: paddle.Tensor | None, is_causal: bool
) -> paddle.Tensor:
    b, s, h, _ = q.shape
    block = max(1, SCORE_BUDGET // (b * h * k.shape[1]))
    if s <= block:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, training=False)
    outs = []
    for lo in range(0, s, block):
        hi = min(lo + block, s)
        if is_causal:  # the block's queries see keys 0..hi only: the triangle, offset to the block
            block_mask = slot_mask(
                paddle.arange(lo, hi, dtype="int64"), paddle.arange(hi, dtype="int64"), None, q.dtype
            )
            outs.append(
                F.scaled_dot_product_attention(q[:, lo:hi], k[:, :hi], v[:, :hi], attn_mask=block_mask, training=False)
            )
        else:
            outs.append(
                F.scaled_dot_product_attention(
                    q[:, lo:hi], k, v, training=False, attn_mask=None if mask is None else mask[:, :, lo:hi]
                )
            )
    return paddle.concat(outs, axis=1)


class Kernels(NamedTuple):
    weights: WeightFormat  # how the Linear layers hold and compute their weights (linear.py)
    rms_norm: Callable  # (x, weight, eps) -> norm
    add_rms_norm: Callable  # (x, residual, weight, eps) -> (norm of x + residual, x + residual)
    rotary_tables: Callable  # (positions, inv_freq, dtype, table_len) -> tables
    split_rotary: Callable  # (qkv, tables, heads, groups, head_dim) -> q, k, v
    swiglu: Callable  # [..., 2F] -> [..., F]


def kernels(fused: bool, weights: WeightFormat | None = None) -> Kernels:
    """The fused set (GPU) or the CPU one; Linear weights in `weights` (default: dense, in Paddle's
    default dtype)."""
    weights = weights or Dense(paddle.get_default_dtype(), fused=fused)
    if fused:
        return Kernels(
            weights,
            fused_rms_norm,
            functools.partial(add_rms_norm, norm=fused_rms_norm),
            fused_rotary_tables,
            functools.partial(split_rotary, apply=fused_apply_rotary),
            F.swiglu,
        )
    return Kernels(weights, cpu_rms_norm, cpu_add_rms_norm, RotaryCache(), cpu_split_rotary, cpu_swiglu)


# The two below decide with Python conditions on what is known while tracing; converting them to graph
# conditionals (what tracing does to a function's `if`s) would fail on their differing returns.
@paddle.jit.not_to_static
def size(x: paddle.Tensor, axis: int) -> int | paddle.Tensor:
    """x's size along `axis`: an int, or a tensor in a static program whose size there is dynamic."""
    n = x.shape[axis]
    return n if n >= 0 else paddle.shape(x)[axis]


@paddle.jit.not_to_static
def additive_mask(mask: Mask, dtype: str | paddle.dtype) -> tuple:
    """`mask` as scaled_dot_product_attention takes it: (additive [b or 1, 1, s, L] or None, is_causal).
    Paddle's causal mode aligns the triangle top-left, which is only right when s == L."""
    key_valid, start, seq_len = mask.key_valid, mask.start, mask.seq_len
    if key_valid is None:
        if isinstance(start, int) and start == 0:
            return None, True  # plain causal attention, square
        if seq_len == 1:
            return None, False  # one new token sees every earlier slot
        key_slots = paddle.arange(start + seq_len, dtype="int64")
    else:
        key_slots = paddle.arange(size(key_valid, 1), dtype="int64")
    return slot_mask(paddle.arange(start, start + seq_len, dtype="int64"), key_slots, key_valid, dtype), False


def slot_mask(
    query_slots: paddle.Tensor, key_slots: paddle.Tensor, key_valid: paddle.Tensor | None, dtype: str | paddle.dtype
) -> paddle.Tensor:
    """The rule of `Mask`: queries at `query_slots` [s] over keys at `key_slots` [L] -> [b or 1, 1, s, L]."""
    query_slots, key_slots = query_slots.unsqueeze(1), key_slots.unsqueeze(0)
    allowed = (key_slots <= query_slots).unsqueeze(0)  # [1, s, L]
    if key_valid is not None:
        allowed = allowed & (key_valid.unsqueeze(1) | (key_slots == query_slots))  # [b, s, L]
    # shape [1], not 0-d: in a Paddle Inference program `where` broadcasts through oneDNN's add, which fails on 0-d
    zero = paddle.zeros([1], dtype=dtype)
    return paddle.where(allowed, zero, paddle.full([1], float("-inf"), dtype=dtype)).unsqueeze(1)
