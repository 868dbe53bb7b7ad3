"""CPU kernels for GLM-4's linear layers: y = x @ W^T (+ bias) with W in bfloat16, int8 or int4; its
attention over a float32 or bfloat16 KV cache in bounded memory (`attention`, see attention.cc); and the
float32 passes between them (`swiglu`, `rms_norm`, `add_rms_norm`, `split_rotary`, see elementwise.cc), the
token embedding's and the rotary tables' lookups (`embedding`, `rotary_lookup`), and the sampler's
`argmax_logsumexp` of the logits; and `block`, a whole transformer block in one operator (decoding's layers,
see block.h).

THE CONTRACT (shared with the loader, converter and export; quant.py writes and reads these formats):

Weights are output-major, [N, K] row-major (N output channels, K input features), like torch and GGUF.
Paddle's Linear stores [K, N], so a Paddle checkpoint's weight is transposed once at load. The kernels read
these stored layouts as they are (zero-copy from a checkpoint): no repacking at load.

- "bf16":  weight bfloat16 [N, K]; no scales.
- "int8":  qweight int8 [N, K], scale float32 [N]; w = q * scale, q in [-127, 127].
- "int4":  qweight uint8 [N, ceil(K/2)], scales float32 [N, ceil(K/G)] (G = group_size, 64 or 128; the
           last group shorter when G does not divide K); element 2j is the low nibble of byte j, 2j+1 the
           high one, stored as q + 8, q in [-8, 7]; w = (nibble - 8) * scale.
- bias, when given: float32 [N]. x: float32 [..., K]; y: float32 [..., N].

Rounding rules and scale choices are in quant.py (numpy only; no paddle import there).

activation_dtype says how activations enter the dot products:
- "float32": exact; the weights are widened, nothing else is rounded.
- "bfloat16": activations rounded to bfloat16 (half to even), products summed in float32 (vdpbf16ps).
- "int8": each row of x quantized as quant.quantize_activations_int8 (absmax / 127, half to even), integer
  dot products per weight group (VNNI / vpmaddubsw), scaled in float32. Integer weights only.
- "auto" (default): chosen per CPU, format and row count by measurement (benchmarks/NOTES.md): int8 for
  int8/int4 weights on AVX-512 VNNI at every row count, and at up to 16 rows (decoding) on AVX2; else
  bfloat16 on CPUs with AVX-512 BF16; else float32. Resolved inside the operator, so an exported program
  picks for the CPU it runs on.

Paths, chosen at run time from the CPU's flags: "avx512bf16" > "avx512vnni" > "avx2" (AVX2 + FMA) >
"scalar" (plain C++, any CPU). GLM4_KERNELS_ISA=<path> (or linear(..., isa=<path>)) caps the path, so
tests run every path the CPU has; GLM4_KERNELS_THREADS sets the thread count (default: every core).

The operators build on first use (build.py) into a per-user cache; without a C++ compiler, one warning and
`linear` computes the same values in plain Paddle ops (portable.py).
"""

from __future__ import annotations

FORMATS = ("bf16", "int8", "int4")
ACTIVATION_DTYPES = ("auto", "float32", "bfloat16", "int8")
PATHS = ("scalar", "avx2", "avx512vnni", "avx512bf16")
_API = (
    "add_rms_norm",
    "argmax_logsumexp",
    "attention",
    "available",
    "embedding",
    "block",
    "isa",
    "linear",
    "load",
    "rms_norm",
    "rotary_lookup",
    "split_rotary",
    "swiglu",
)


def __getattr__(name: str):
    # the operators' API lives in api.py, imported on first use: quant.py must stay importable without paddle
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
