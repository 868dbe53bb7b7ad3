"""The formats a Linear weight is held and stored in, and conversion between them (numpy only: the
converter uses this module without Paddle; paddle_glm4/linear.py computes with the formats).

- `Dense(dtype)`: Paddle's layout, weight [K, N] (in_features x out_features), in float32, bf16 or fp16.
- `Packed(kind)`: the layouts of the CPU kernels in paddle_glm4.kernels, output-major:
      bfloat16  weight  bf16  [N, K]
      int8      qweight int8  [N, K],            scales float32 [N]            w[n, k] = q * scales[n]
      int4      qweight uint8 [N, ceil(K / 2)],  scales float32 [N, ceil(K / G)]
                (element 2j in the low nibble, 2j + 1 in the high one, each stored as q + 8, q in [-8, 7];
                 w[n, k] = q * scales[n, k // G]; the last group is shorter when G does not divide K)
- `WeightOnlyGPU(scheme)`: Paddle's `weight_only_linear` on a GPU, in `weight_quantize`'s layout, made at
  load (UNVERIFIED, see linear.py).

A checkpoint stores a dense Linear weight in Paddle's layout ([K, N], any float dtype) under `<layer>.weight`,
and a quantized one as its packed tensors under `<layer>.qweight` and `<layer>.scales` (`checkpoint_slots`).
Any format converts to any other a block of output rows at a time, through float32 (`convert`): each row of W
(column of Paddle's [K, N]) is quantized and dequantized on its own, so peak memory is the output plus a block.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import numpy as np

from converters.transpose import transpose_into

from .config import DEFAULT_GROUP_SIZE, QUANTIZATION_SCHEMES, ConfigError, Quantization
from .kernels import quant
from .safetensors_file import cast, numpy_dtype, to_float32

PACKED_KINDS = ("bfloat16", *QUANTIZATION_SCHEMES)
# How activations enter the kernels' dot products (paddle_glm4.kernels): float32 is exact (only the weights
# are widened); bfloat16 and int8 (one scale per row) round the activations first, for faster instructions;
# auto lets the kernels pick per CPU.
ACTIVATION_DTYPES = ("auto", "float32", "bfloat16", "int8")
CONVERT_BLOCK_BYTES = 64 << 20  # float32 rows converted at once


@dataclass(frozen=True)
class Slot:
    """One tensor of a Linear: `name` is its attribute and the last part of its checkpoint name."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * numpy_dtype(self.dtype).itemsize


class WeightFormat:
    """Which tensors a Linear holds (`slots`), and the float32 rows of W^T through which every format
    converts to every other (`rows`, `pack`)."""

    @property
    def compute_dtype(self) -> str:
        """The dtype of the activations and the KV cache."""
        return "float32"

    @property
    def bias_dtype(self) -> str:
        """The dtype of the bias, and of the norms' weights beside these Linears."""
        return "float32"

    def slots(self, k: int, n: int) -> list[Slot]:
        raise NotImplementedError

    def rows(self, arrays: dict[str, np.ndarray], k: int, start: int, stop: int) -> np.ndarray:
        """Output rows start..stop of the weight, float32 [stop - start, K]."""
        raise NotImplementedError

    def pack(self, arrays: dict[str, np.ndarray], rows: np.ndarray, start: int) -> None:
        """Write float32 output rows [start, start + len(rows)) into this format's arrays."""
        raise NotImplementedError

    def embedding_dtype(self, stored: str) -> str:
        """The dtype the embedding table is held in, given the checkpoint's (widened after the lookup)."""
        return stored

    def nbytes(self, k: int, n: int) -> int:
        return sum(slot.nbytes for slot in self.slots(k, n))


@dataclass(frozen=True)
class Dense(WeightFormat):
    """Paddle's Linear layout, weight [K, N] in `dtype`. `fused`: computed in `dtype` by Paddle's own
    kernels (a GPU), rather than in float32 on the CPU (a narrow dtype is widened where it is used)."""

    dtype: str = "float32"
    fused: bool = False

    @property
    def compute_dtype(self) -> str:
        return self.dtype if self.fused else "float32"

    @property
    def bias_dtype(self) -> str:
        return self.dtype

    def slots(self, k: int, n: int) -> list[Slot]:
        return [Slot("weight", (k, n), self.dtype)]

    def embedding_dtype(self, stored: str) -> str:
        return self.dtype

    def rows(self, arrays: dict[str, np.ndarray], k: int, start: int, stop: int) -> np.ndarray:
        weight = arrays["weight"]
        block = np.empty((stop - start, k), weight.dtype)
        transpose_into(block, weight[:, start:stop])  # the stored bits, moved fast; widened after
        return to_float32(block, self.dtype)

    def pack(self, arrays: dict[str, np.ndarray], rows: np.ndarray, start: int) -> None:
        arrays["weight"][:, start : start + len(rows)] = cast(np.ascontiguousarray(rows), "float32", self.dtype).T


@dataclass(frozen=True)
class Packed(WeightFormat):
    """The CPU kernels' output-major layouts (see the module docstring)."""

    kind: str = "bfloat16"
    group_size: int | None = None
    activation_dtype: str = "auto"

    def __post_init__(self):
        if self.kind not in PACKED_KINDS:
            raise ValueError(f"packed weight kind must be one of {PACKED_KINDS}, got {self.kind!r}")
        if self.activation_dtype not in ACTIVATION_DTYPES:
            raise ValueError(f"activation_dtype must be one of {ACTIVATION_DTYPES}, got {self.activation_dtype!r}")
        if self.kind == "bfloat16" and self.activation_dtype == "int8":
            raise ValueError("activation_dtype='int8' needs int8 or int4 weights (integer dot products), not bf16")
        if self.kind != "bfloat16":
            Quantization(self.kind, self.group_size)  # validates the group size

    @property
    def quantization(self) -> Quantization | None:
        return None if self.kind == "bfloat16" else Quantization(self.kind, self.group_size)

    @property
    def group(self) -> int:
        """int4's group size (validated at construction)."""
        if self.group_size is None:
            raise ValueError(f"{self.kind} weights have no groups")
        return self.group_size

    def slots(self, k: int, n: int) -> list[Slot]:
        if self.kind == "bfloat16":
            return [Slot("weight", (n, k), "bfloat16")]
        if self.kind == "int8":
            return [Slot("qweight", (n, k), "int8"), Slot("scales", (n,), "float32")]
        return [Slot("qweight", (n, (k + 1) // 2), "uint8"), Slot("scales", (n, -(-k // self.group)), "float32")]

    def embedding_dtype(self, stored: str) -> str:
        if self.kind == "bfloat16":
            return "bfloat16"
        return stored if stored in ("float32", "bfloat16") else "float32"

    def rows(self, arrays: dict[str, np.ndarray], k: int, start: int, stop: int) -> np.ndarray:
        if self.kind == "bfloat16":
            return to_float32(arrays["weight"][start:stop], "bfloat16")
        qweight, scales = arrays["qweight"][start:stop], arrays["scales"][start:stop]
        if self.kind == "int8":
            return quant.dequantize_int8(qweight, scales)
        return quant.dequantize_int4(qweight, scales, k, self.group)

    def pack(self, arrays: dict[str, np.ndarray], rows: np.ndarray, start: int) -> None:
        stop = start + len(rows)
        if self.kind == "bfloat16":
            arrays["weight"][start:stop] = cast(rows, "float32", "bfloat16")
            return
        packed = quant.quantize_int8(rows) if self.kind == "int8" else quant.quantize_int4(rows, self.group)
        arrays["qweight"][start:stop], arrays["scales"][start:stop] = packed


@dataclass(frozen=True)
class WeightOnlyGPU(WeightFormat):
    """Paddle's weight-only quantized matmul on a GPU (UNVERIFIED; see linear.py). The tensors are made on
    the device by `weight_quantize` at load, from the float32 weight; activations compute in `dtype`."""

    scheme: str = "int8"
    group_size: int | None = None
    dtype: str = "bfloat16"

    @property
    def compute_dtype(self) -> str:
        return self.dtype

    @property
    def bias_dtype(self) -> str:
        return self.dtype

    @property
    def algo(self) -> str:
        return f"weight_only_{self.scheme}"

    def slots(self, k: int, n: int) -> list[Slot]:
        # as documented: the weight comes back transposed ([N, K]; int4 two per byte), one float32 scale
        # per output channel, or per group of input rows ([K / G, N])
        rows = n if self.scheme == "int8" else n // 2
        scales = (n,) if self.group_size is None else (-(-k // self.group_size), n)
        return [Slot("qweight", (rows, k), "int8"), Slot("scales", scales, "float32")]


@dataclass(frozen=True)
class Rows(WeightFormat):
    """A dense table stored row by row, [N, K] in `dtype`: the token embedding [vocab, hidden] when it is not
    quantized (quantized, it is `Packed`: its vocab rows are the output channels)."""

    dtype: str = "float32"

    def slots(self, k: int, n: int) -> list[Slot]:
        return [Slot("weight", (n, k), self.dtype)]

    def rows(self, arrays: dict[str, np.ndarray], k: int, start: int, stop: int) -> np.ndarray:
        return to_float32(arrays["weight"][start:stop], self.dtype)

    def pack(self, arrays: dict[str, np.ndarray], rows: np.ndarray, start: int) -> None:
        arrays["weight"][start : start + len(rows)] = cast(np.ascontiguousarray(rows), "float32", self.dtype)


def embedding_format(weights: WeightFormat, dtype: str, tied: bool, quantization: Quantization | None) -> WeightFormat:
    """The format the token embedding is held in beside Linear weights held in `weights`, from a checkpoint
    whose table is stored in `dtype`, or quantized when config.json's `quantization` says so.

    With int8 / int4 CPU weights (and an lm_head that does not share the table, `tied`), a quantized table is
    held quantized (only the looked-up rows are dequantized; GLM-4-9B's table is 1.24 GB in bf16, 0.62 GB int8,
    0.35 GB int4), and a dense one stays as stored where it can be looked up as stored (bf16, float32):
    memory-mapped, only the rows looked up are ever read, and they stay the page cache's (reclaimable, shared),
    where quantizing it at load would make all of it the process's own memory. A float16 table, which would be
    widened, is quantized with the weights. Otherwise dense in `weights.embedding_dtype(dtype)`."""
    dense = weights.embedding_dtype(dtype)
    stored_quantized = quantization is not None and quantization.embedding
    if isinstance(weights, Packed) and weights.kind != "bfloat16" and not tied and (stored_quantized or dense != dtype):
        return Packed(weights.kind, weights.group_size)
    return Rows(dense)


# ---- checkpoints ---------------------------------------------------------------------------------------
def stored_embedding_format(dtype: str, quantization: Quantization | None) -> WeightFormat:
    """The format of a checkpoint's embedding table: quantized when config.json says so, else dense in the
    stored tensor's `dtype`."""
    if quantization is not None and quantization.embedding:
        return Packed(quantization.scheme, quantization.group_size)
    return Rows(dtype)


def stored_format(dtype: str, quantization: Quantization | None) -> WeightFormat:
    """The format of a checkpoint's Linear weights: dense in `dtype` (Paddle's layout), or quantized."""
    return Dense(dtype) if quantization is None else Packed(quantization.scheme, quantization.group_size)


def checkpoint_slots(dtype: str, quantization: Quantization | None, k: int, n: int) -> list[Slot]:
    """The tensors a checkpoint holds for a Linear weight [K, N]."""
    return stored_format(dtype, quantization).slots(k, n)


def same_layout(source: WeightFormat, target: WeightFormat, k: int, n: int) -> bool:
    """Whether `target` holds `source`'s tensors as they are (`convert` hands them over without a copy)."""
    return type(source) is type(target) and source.slots(k, n) == target.slots(k, n)


def convert(
    source: WeightFormat, arrays: dict[str, np.ndarray], target: WeightFormat, k: int, n: int
) -> dict[str, np.ndarray]:
    """A Linear's arrays in `source` format -> `target`'s, a block of output rows at a time. When both hold
    the same tensors in the same layout, they are returned as they are (no copy). A source array may be a
    safetensors_file.StoredTensor: then only the block being converted is read."""
    if same_layout(source, target, k, n):
        return arrays
    out = {slot.name: np.empty(slot.shape, numpy_dtype(slot.dtype)) for slot in target.slots(k, n)}
    if (
        isinstance(source, Dense)
        and source.dtype == "bfloat16"
        and isinstance(target, Packed)
        and target.kind == "bfloat16"
    ):  # the same values, transposed: moved as bits, a block of columns at a time
        step = max(1, CONVERT_BLOCK_BYTES // (2 * k))
        for start in range(0, n, step):
            transpose_into(out["weight"][start : start + step], arrays["weight"][:, start : start + step])
        return out
    step = max(1, CONVERT_BLOCK_BYTES // (4 * k))
    for start in range(0, n, step):
        target.pack(out, source.rows(arrays, k, start, min(start + step, n)), start)
    return out


def choose_format(
    stored_dtype: str,
    stored_quantization: Quantization | None,
    dtype: str | None,
    quantization: str | None,
    group_size: int | None,
    activation_dtype: str,
    gpu: bool,
    fused: bool,
) -> WeightFormat:
    """The format a model loaded with these arguments holds its Linear weights in (see from_pretrained):

    - `quantization` "int8" | "int4" (+ `group_size`): quantized at load (a checkpoint quantized otherwise
      is refused: re-quantizing compounds the rounding);
    - else a quantized checkpoint stays quantized, unless `dtype` asks for a float dtype (dequantized);
    - else on CPU: bf16 is kept in bf16 for the kernels (a bf16 checkpoint by default, or dtype="bfloat16"),
      float32 gives Paddle's own float32 path;
    - on a GPU: Paddle's kernels in the checkpoint's dtype, quantized through weight_only_linear.
    """
    if activation_dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"activation_dtype must be one of {ACTIVATION_DTYPES}, got {activation_dtype!r}")
    wanted: Quantization | None
    if quantization is not None:
        wanted = Quantization.of(quantization, group_size)
        if stored_quantization is not None and not wanted.same_rounding(stored_quantization):
            raise ConfigError(
                f"this checkpoint is quantized as {stored_quantization}; re-quantizing it as "
                f"{wanted} would compound the rounding. Load it as it is, or quantize from a "
                "float checkpoint"
            )
    elif group_size is not None:
        raise ConfigError("group_size is for quantization='int4'")
    else:
        wanted = stored_quantization if dtype is None else None
    if gpu:
        if wanted is not None:
            return WeightOnlyGPU(wanted.scheme, wanted.group_size, dtype or "bfloat16")
        return Dense(dtype or (stored_dtype if stored_quantization is None else "bfloat16"), fused=fused)
    if wanted is not None:
        return Packed(wanted.scheme, wanted.group_size, activation_dtype)
    if dtype == "float16":
        raise ValueError(
            "dtype='float16' cannot compute on CPU (Paddle has no float16 CPU kernels); use "
            "bfloat16 (computed by paddle_glm4.kernels) or float32"
        )
    if dtype == "bfloat16" or (dtype is None and stored_dtype == "bfloat16"):
        return Packed("bfloat16", None, activation_dtype)
    return Dense("float32")


def add_arguments(parser: argparse.ArgumentParser, action: str, activations: bool = True) -> None:
    """--quantize, --group-size and (with `activations`) --activation-dtype, worded once for every command
    that takes them; `action` says what the command does with the weights ("quantize at load", ...)."""
    parser.add_argument(
        "--quantize",
        choices=QUANTIZATION_SCHEMES,
        help=f"{action} the Linear weights (attention, MLP and the lm_head), weight-only and "
        "symmetric: int8 with one float32 scale per output channel (GLM-4-9B: 9.4 GB of "
        "weights), int4 with one per --group-size input rows (5.0 GB). A converted checkpoint "
        "stores the token embedding in the same scheme (unless the lm_head shares it); "
        "quantizing at load keeps a bf16 or float32 table as stored, memory-mapped; norms and "
        "biases are not quantized. A checkpoint converted with --quantize is quantized already "
        "and needs no flag",
    )
    parser.add_argument(
        "--group-size",
        type=int,
        metavar="G",
        help=f"with --quantize int4: input rows per scale, an even number (default "
        f"{DEFAULT_GROUP_SIZE}; the kernels are tuned for 64 and 128)",
    )
    if activations:
        parser.add_argument(
            "--activation-dtype",
            choices=ACTIVATION_DTYPES,
            default="auto",
            help="how activations enter the bf16/int8/int4 kernels' dot products: float32 is "
            "exact; bfloat16, or int8 with one scale per row, rounds them for the CPU's "
            "faster instructions; auto (default) picks per CPU",
        )
