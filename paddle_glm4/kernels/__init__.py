"""CPU kernels for GLM-4's linear layers: y = x @ W^T (+ bias) with W in bfloat16, int8 or int4.

THE CONTRACT (shared with the loader, converter and export; quant.py writes and reads these formats):

Weights are output-major, [N, K] row-major (N output channels, K input features), like torch and GGUF.
Paddle's Linear stores [K, N], so a Paddle checkpoint's weight is transposed once at load.

- "bf16":  weight bfloat16 [N, K]; no scales.
- "int8":  qweight int8 [N, K], scale float32 [N]; w = q * scale, q in [-127, 127].
- "int4":  qweight uint8 [N, ceil(K/2)], scales float32 [N, ceil(K/G)] (G = group_size, 64 or 128; the
           last group shorter when G does not divide K); element 2j is the low nibble of byte j, 2j+1 the
           high one, stored as q + 8, q in [-8, 7]; w = (nibble - 8) * scale.

Rounding rules and scale choices are in quant.py (numpy only; no paddle import there).
"""
