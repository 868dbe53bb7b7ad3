"""Quantized Linear weights in the conversion pipeline, both directions (numpy only).

torch -> Paddle (`glm4-convert --quantize int8|int4`): a torch Linear weight is output-major ([N, K], or the
concatenation of q, k and v for transformers' layout), as the quantized layouts are, so each block of output
rows is quantized on its own into `<layer>.qweight`; its scales are kept aside as they are computed (at most
N x K/G floats) and written as `<layer>.scales` right after. Paddle -> torch: each block of output rows is
dequantized back to float, which is the torch weight's rows.
"""

from __future__ import annotations

import numpy as np

from paddle_glm4.config import Quantization
from paddle_glm4.quantization import Packed
from paddle_glm4.safetensors_file import to_float32

from . import mapping
from .pipeline import OutputTensor, SourceTensor


def quantized_tensors(
    spec: mapping.TensorSpec, parts: tuple[SourceTensor, ...], quantization: Quantization
) -> list[OutputTensor]:
    """`<layer>.qweight` and `<layer>.scales` for the Linear weight (or embedding table) of `spec`, from its
    torch `parts` (output rows first, as both are)."""
    fmt = Packed(quantization.scheme, quantization.group_size)
    k, n = spec.weight_shape
    qweight, scales = fmt.slots(k, n)
    kept = np.empty(scales.shape, np.float32)  # filled by qweight's blocks, then written as scales
    prefix = spec.paddle[: -len("weight")]

    def quantize(arrays, start, stop, out):
        rows = to_float32(mapping.concatenated_rows(arrays, start, stop), parts[0].dtype)
        fmt.pack({"qweight": out, "scales": kept[start:stop]}, rows, 0)

    return [
        OutputTensor(prefix + qweight.name, qweight.dtype, qweight.shape, parts, quantize, qweight.dtype),
        OutputTensor(
            prefix + scales.name,
            scales.dtype,
            scales.shape,
            parts,
            lambda arrays, start, stop, out: np.copyto(out, kept[start:stop]),
            scales.dtype,
        ),
    ]


def dequantized_tensor(
    name: str,
    spec: mapping.TensorSpec,
    qweight: SourceTensor,
    scales: SourceTensor,
    quantization: Quantization,
    dtype: str,
) -> OutputTensor:
    """The published (torch, [N, K]) weight `name` in `dtype`, dequantized from a Paddle checkpoint's
    `qweight` and `scales`."""
    fmt = Packed(quantization.scheme, quantization.group_size)
    k, n = spec.weight_shape

    def dequantize(arrays, start, stop, out):
        out[...] = fmt.rows({"qweight": arrays[0], "scales": arrays[1]}, k, start, stop)

    return OutputTensor(name, dtype, (n, k), (qweight, scales), dequantize, "float32")
