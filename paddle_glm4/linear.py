"""The model's Linear layer: y = x @ W (+ bias), W held in one of the formats of quantization.py, and
the one place that decides how each format computes (`linear`).

- Dense float32: ops.linear (MKL's GEMM, split across cores for few rows); narrow Dense weights (an export
  for bf16/fp16 storage) are widened to the activations' dtype where they are used; `fused` (GPU): F.linear.
- Packed bf16 / int8 / int4: the C++ kernels of paddle_glm4.kernels (built on first use; without a compiler,
  their portable path in Paddle ops: the same values, slowly).
- WeightOnlyGPU: Paddle's weight_only_linear. UNVERIFIED: written against paddle.nn.quant's documented API;
  there is no GPU here and a CPU build cannot even trace it.
"""

from __future__ import annotations

import paddle
import paddle.nn.functional as F
from paddle import nn

from . import kernels, ops
from .config import DEFAULT_GROUP_SIZE
from .device import on_gpu
from .quantization import Dense, Packed, Rows, Slot, WeightFormat, WeightOnlyGPU, convert

KERNEL_FORMATS = {"bfloat16": "bf16", "int8": "int8", "int4": "int4"}  # paddle_glm4.kernels' names


class Linear(nn.Linear):
    """A Linear whose weight is held in the format `kernels.weights` (see quantization.py): its tensors are
    parameters named as the format's slots (`weight`, or `qweight` and `scales`), which are also their names
    in a checkpoint of that format.

    It is an nn.Linear to code that looks for one (PaddleNLP's peft wraps only nn.Linear layers): with dense
    weights, `weight` [in, out] and `bias` are what nn.Linear holds, and F.linear computes the same product.
    nn.Linear's own constructor is skipped: it would create a float32 weight of its own."""

    def __init__(self, in_features: int, out_features: int, kernels: ops.Kernels, bias: bool = False):
        nn.Layer.__init__(self)
        self.name = None
        fmt = kernels.weights
        self.in_features, self.out_features, self.format = in_features, out_features, fmt
        self.slots = fmt.slots(in_features, out_features)
        add_slot_parameters(self, self.slots, trainable=isinstance(fmt, Dense))  # only dense weights train
        self.bias = self.create_parameter([out_features], dtype=fmt.bias_dtype, is_bias=True) if bias else None

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return linear(self.format, x, [getattr(self, slot.name) for slot in self.slots], self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}"


def add_slot_parameters(layer: nn.Layer, slots: list[Slot], trainable: bool) -> None:
    """`layer`'s parameters for a weight format's `slots`, named as the slots (integer ones start at zero)."""
    for slot in slots:
        integer = slot.dtype in ("int8", "uint8")
        param = layer.create_parameter(
            list(slot.shape), dtype=slot.dtype, default_initializer=nn.initializer.Constant(0) if integer else None
        )
        param.stop_gradient = not trainable
        layer.add_parameter(slot.name, param)


def linear(
    fmt: WeightFormat, x: paddle.Tensor, tensors: list[paddle.Tensor], bias: paddle.Tensor | None
) -> paddle.Tensor:
    """x [..., K] @ the weight held in `tensors` (+ bias) -> [..., N], computed as `fmt` says."""
    if isinstance(fmt, Dense):
        [weight] = tensors
        if weight.dtype != x.dtype:  # stored narrower than the activations: widened where used
            weight = weight.astype(x.dtype)
            bias = None if bias is None else bias.astype(x.dtype)
        return F.linear(x, weight, bias) if fmt.fused else ops.linear(x, weight, bias)
    if isinstance(fmt, Packed):  # the C++ kernels; without a compiler, their portable Paddle path
        weight, scales = (tensors[0], None) if fmt.kind == "bfloat16" else tensors
        return kernels.linear(
            x,
            weight,
            scales,
            bias,
            fmt=KERNEL_FORMATS[fmt.kind],
            group_size=fmt.group_size or DEFAULT_GROUP_SIZE,
            activation_dtype=fmt.activation_dtype,
        )
    if isinstance(fmt, WeightOnlyGPU):  # UNVERIFIED (no GPU here)
        from paddle.nn.quant import weight_only_linear

        weight, scales = tensors
        return weight_only_linear(
            x, weight, bias=bias, weight_scale=scales, weight_dtype=fmt.scheme, group_size=fmt.group_size or -1
        )
    raise TypeError(f"no computation for weight format {fmt!r}")


def lookup(fmt: WeightFormat, ids: paddle.Tensor, tensors: list[paddle.Tensor], k: int, dtype: str) -> paddle.Tensor:
    """Rows `ids` [...] of a table of K columns held in `tensors` as `fmt` -> [..., K] in `dtype`: a dense table's
    rows as stored, a quantized one's dequantized exactly as quantization.Packed.rows does (q as float32 times its
    scale, one multiplication), only the rows looked up. A bf16, int8 or int4 table read into float32 rows on
    CPU without a gradient is one kernels operator (a decode step's lookup was 2 Paddle ops for bf16, ~15 for
    int4)."""
    kind = fmt.dtype if isinstance(fmt, Rows) else fmt.kind if isinstance(fmt, Packed) else None
    if dtype == "float32" and kind in KERNEL_FORMATS and _kernels_serve(tensors[0]):
        scales = tensors[1] if len(tensors) > 1 else None
        group_size = fmt.group_size if isinstance(fmt, Packed) and fmt.group_size else DEFAULT_GROUP_SIZE
        return kernels.embedding(ids, tensors[0], scales, fmt=KERNEL_FORMATS[kind], k=k, group_size=group_size)
    return _lookup(fmt, ids, tensors, k).astype(dtype)


@paddle.jit.not_to_static
def _kernels_serve(table: paddle.Tensor) -> bool:
    """Whether the kernels' lookup serves: on CPU where they could be built, no gradient wanted for the table."""
    if on_gpu() or (paddle.in_dynamic_mode() and paddle.is_grad_enabled() and not table.stop_gradient):
        return False
    return kernels.available()


def _lookup(fmt: WeightFormat, ids: paddle.Tensor, tensors: list[paddle.Tensor], k: int) -> paddle.Tensor:
    if isinstance(fmt, Rows):
        [weight] = tensors
        return F.embedding(ids, weight)
    if not (isinstance(fmt, Packed) and fmt.kind in ("int8", "int4")):
        raise TypeError(f"no lookup for table format {fmt!r}")
    qweight, scales = tensors
    flat = ids.reshape([-1])
    q = paddle.gather(qweight, flat).astype("int32")  # [t, K] int8, or [t, ceil(K/2)] bytes
    s = paddle.gather(scales, flat)  # [t] or [t, groups]
    if fmt.kind == "int8":
        rows = q.astype("float32") * s.unsqueeze(-1)
    else:  # element 2j in the low nibble of byte j, 2j+1 in the high one, each stored as q + 8
        nibbles = paddle.stack([q % 16, q // 16], axis=-1).reshape([q.shape[0], -1])[:, :k] - 8
        rows = nibbles.astype("float32") * paddle.repeat_interleave(s, fmt.group, axis=-1)[:, :k]
    # back to ids' shape: a tensor, so that an exported program keeps its dynamic batch and length
    return rows.reshape(paddle.concat([paddle.shape(ids), paddle.full([1], k, dtype=paddle.shape(ids).dtype)]))


def load_weight(source: WeightFormat, arrays: dict, target: WeightFormat, k: int, n: int) -> dict:
    """A Linear's checkpoint arrays in `source` format -> the tensors a Linear in `target` format holds:
    numpy arrays (see quantization.convert), or, for WeightOnlyGPU, Paddle tensors made on the GPU by
    `weight_quantize` from the float32 weight (UNVERIFIED)."""
    if not isinstance(target, WeightOnlyGPU):
        return convert(source, arrays, target, k, n)
    from paddle.nn.quant import weight_quantize

    dense = convert(source, arrays, Dense("float32"), k, n)["weight"]  # [K, N]
    qweight, scales = weight_quantize(
        paddle.to_tensor(dense).astype(target.dtype), algo=target.algo, group_size=target.group_size or -1
    )
    return {"qweight": qweight, "scales": scales}
