"""Export a converted checkpoint as a static program for Paddle Inference: `export_model` and what it traces.

One program serves both phases of generation, because its sequence and cache lengths are dynamic: the prefill
runs it on the whole prompt over a cache just as long, each decode step on one token over the full cache.
Two programs would each carry a copy of the weights in memory, since Paddle Inference does not share
parameters between predictors of different programs.

The cache goes in and out explicitly: per layer, keys and values [b, L, g, d] are inputs that the program
writes in place at the new tokens' slots (Paddle Inference shares input tensors passed to
`predictor.run([...])` with the caller, and the write is an in-place `set_value`), then attends over all L
slots under a mask. The predictor allocates the cache once per generation, for the prompt and every new
token (at most the export's max_seq_len), so a decode step has the same shapes, and the same cost, at every
step of it: step 1000 costs what step 1 does.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings

import paddle
from paddle import nn
from paddle.static import InputSpec

from .. import kernels
from ..checkpoint import require_converted, weight_map, write_text_atomic
from ..config import CONFIG_NAME, MODEL_TYPE, STORAGE_DTYPES, ConfigError, GLM4Config
from ..device import on_gpu
from ..model import GLM4ForCausalLM, RMSNorm
from ..output_dir import check_destination, staged
from ..source_files import copy_source, permission_bits, source_path
from ..validation import read_json
from .manifest import EXPORT, MANIFEST_NAME, PROGRAM, TOKENIZER_FILES, ExportError, Manifest, input_names


class CacheSlots:
    """The cache the blocks see inside the program (the dynamic model's KVCache has the same `update`)."""

    def __init__(self, keys: list, values: list):
        self.keys, self.values = keys, values

    def update(
        self, layer: int, start: int | paddle.Tensor, k: paddle.Tensor, v: paddle.Tensor
    ) -> tuple[paddle.Tensor, paddle.Tensor]:
        """Write k, v [b, s, g, d] at slots start..start+s of the layer's buffers, in place; return the buffers."""
        end = start + paddle.shape(k)[1]
        if k.dtype != self.keys[layer].dtype:  # a compact cache (bf16) rounds what it stores
            k, v = k.astype(self.keys[layer].dtype), v.astype(self.values[layer].dtype)
        self.keys[layer][:, start:end] = k
        self.values[layer][:, start:end] = v
        return self.keys[layer], self.values[layer]


class StepProgram(nn.Layer):
    """The model's one forward (GLM4ForCausalLM.logits) with the cache as explicit inputs: what is traced and saved.

    input_ids, position_ids [b, s]; start [] the cache slot of the first new token; key_valid [b, L] bool,
    which slots hold real tokens (the new ones included); keys, values: per layer [b, L, g, d], written in
    place at slots start..start+s. Returns the float32 logits of the last new token [b, vocab].
    """

    def __init__(self, model: GLM4ForCausalLM, kv_cache_dtype: str):
        super().__init__()
        self.model, self.kv_cache_dtype = model, kv_cache_dtype

    def forward(
        self,
        input_ids: paddle.Tensor,
        position_ids: paddle.Tensor,
        start: paddle.Tensor,
        key_valid: paddle.Tensor,
        keys: list,
        values: list,
    ) -> paddle.Tensor:
        logits = self.model.logits(
            input_ids, position_ids, start, key_valid, CacheSlots(keys, values), logits_to_keep=1
        )  # [b, 1, vocab] float32
        return logits[:, -1]

    def input_spec(self) -> list:
        config = self.model.config
        layers, names = config.num_hidden_layers, input_names(config.num_hidden_layers)
        cache = [
            InputSpec([None, None, config.num_key_value_heads, config.head_dim], self.kv_cache_dtype, name)
            for name in names[4:]
        ]
        return [
            InputSpec([None, None], "int64", names[0]),
            InputSpec([None, None], "int64", names[1]),
            InputSpec([], "int64", names[2]),
            InputSpec([None, None], "bool", names[3]),
            cache[:layers],
            cache[layers:],
        ]


def norms_in_float32(model: GLM4ForCausalLM) -> None:
    """Make the norm weights of a model stored narrow (bf16, fp16) float32, in place: one vector per norm,
    so that the norms compute in float32 on a CPU. (Narrow Linear weights are widened where they are used,
    see linear.py; the embedding rows after the lookup.)"""
    for layer in model.sublayers(include_self=True):
        if isinstance(layer, RMSNorm):
            layer.to(dtype="float32")


def check_checkpoint(model_dir: str) -> GLM4Config:
    """The config of a converted checkpoint directory; a clear error for anything else."""
    if not os.path.isdir(model_dir):
        raise ExportError(f"{model_dir}: no such directory")
    if os.path.exists(os.path.join(model_dir, MANIFEST_NAME)):
        raise ExportError(f"{model_dir} is already an export directory; export takes a converted checkpoint")
    path = os.path.join(model_dir, CONFIG_NAME)
    if not os.path.exists(path):
        raise ExportError(f"{model_dir}: no {CONFIG_NAME}; export takes a checkpoint converted with glm4 convert")
    require_converted(model_dir, ExportError)
    data = read_json(path, error=ConfigError)
    model_type = data.get("model_type") if isinstance(data, dict) else None
    if model_type != MODEL_TYPE:
        raise ExportError(
            f"{model_dir} is not a converted checkpoint ({CONFIG_NAME} has model_type "
            f"{model_type!r}); convert it first with glm4 convert"
        )
    return GLM4Config.from_dict(data, source=path)


def export_model(
    model_dir: str,
    out_dir: str,
    dtype: str | None = None,
    max_seq_len: int | None = None,
    progress: bool = True,
    quantization: str | None = None,
    group_size: int | None = None,
    activation_dtype: str = "auto",
    overwrite: bool = False,
    kv_cache_dtype: str | None = None,
) -> Manifest:
    """Export the converted checkpoint in `model_dir` to `out_dir` (see the module docstring).

    `dtype`: how the weights are stored (default: as in the checkpoint). On CPU the program computes in
    float32: bf16 weights (and int8/int4 ones, with `quantization` and `group_size`, or from a quantized
    checkpoint) through paddle_glm4.kernels' operators, which the program calls (`activation_dtype` as in
    from_pretrained); float16 ones are widened where they are used. On a GPU it computes in `dtype` with the
    fused kernels and flash attention. `max_seq_len`: the longest prompt + generation the export accepts
    (default: the config's seq_length). `kv_cache_dtype`: how the predictor's KV cache holds keys and values,
    the compute dtype (default) or, on CPU, "bfloat16" (half the memory; the attention operator reads it as
    stored). The export is built in a temporary directory beside `out_dir` and
    renamed into place when complete; an existing `out_dir` is replaced only with `overwrite`, and only if it
    is empty or an export.
    """
    config = check_checkpoint(model_dir)
    dtype = dtype or (config.dtype if quantization is None and config.quantization is None else None)
    if dtype is not None and dtype not in STORAGE_DTYPES:
        raise ExportError(f"dtype must be one of {STORAGE_DTYPES}, got {dtype!r}")
    max_seq_len = config.seq_length if max_seq_len is None else max_seq_len
    if type(max_seq_len) is not int or max_seq_len < 1:
        raise ExportError(f"max_seq_len must be a positive integer, got {max_seq_len!r}")
    if max_seq_len > config.seq_length:
        raise ExportError(
            f"max_seq_len {max_seq_len} exceeds the model's context (seq_length {config.seq_length} in {CONFIG_NAME})"
        )
    model_real, out_real = os.path.realpath(model_dir), os.path.realpath(out_dir)
    if out_real == model_real or out_real.startswith(model_real + os.sep):
        raise ExportError(
            f"--out {out_dir} is inside the checkpoint {model_dir}, which is never written to; "
            "choose a directory outside it"
        )
    if kv_cache_dtype not in (None, "float32", "bfloat16"):
        raise ExportError(f"kv_cache_dtype must be float32 or bfloat16, got {kv_cache_dtype!r}")
    if kv_cache_dtype == "bfloat16" and on_gpu():
        raise ExportError("kv_cache_dtype='bfloat16' is for CPU exports; a GPU program's cache is in its compute dtype")
    check_destination(out_dir, overwrite, EXPORT, "--out")
    copies = {
        name: source_path(model_dir, name) for name in TOKENIZER_FILES if os.path.lexists(os.path.join(model_dir, name))
    }
    sources = weight_map(model_dir).values()  # the copies keep their own sources' modes
    if progress:
        print(f"tracing the model and saving the program to {out_dir}", file=sys.stderr, flush=True)
    with staged(out_dir, overwrite, EXPORT, "--out", mode_limit=permission_bits(sources)) as staging:
        manifest = _export(
            model_dir, staging, config, dtype, max_seq_len, quantization, group_size, activation_dtype, kv_cache_dtype
        )
        for name, path in copies.items():
            copy_source(path, os.path.join(staging, name))
        write_text_atomic(os.path.join(staging, MANIFEST_NAME), manifest.to_json())
    return manifest


def _export(
    model_dir: str,
    out_dir: str,
    config: GLM4Config,
    dtype: str | None,
    max_seq_len: int,
    quantization: str | None,
    group_size: int | None,
    activation_dtype: str,
    kv_cache_dtype: str | None,
) -> Manifest:
    """Trace the checkpoint's model and save the program into `out_dir`; the manifest that describes it."""
    device = "gpu" if on_gpu() else "cpu"
    widened = device == "cpu" and dtype == "float16"  # no float16 kernels on CPU: stored so, widened at use
    if widened or (device == "gpu" and quantization is None and config.quantization is None):
        model = GLM4ForCausalLM.from_pretrained(model_dir, dtype=dtype, storage_only=True)
        if widened:
            norms_in_float32(model)
    else:
        model = GLM4ForCausalLM.from_pretrained(
            model_dir,
            dtype=dtype,
            quantization=quantization,
            group_size=group_size,
            activation_dtype=activation_dtype,
            max_seq_len=max_seq_len,
        )
    weights = model.model.kernels.weights
    compute_dtype = weights.compute_dtype
    # the program calls the kernels' operators (attention on CPU; low-bit Linear weights) wherever they were built,
    # else their portable ops are traced
    uses_kernels = device == "cpu" and kernels.available()
    kv_cache_dtype = kv_cache_dtype or compute_dtype
    program = StepProgram(model, kv_cache_dtype)
    program.eval()
    with warnings.catch_warnings():
        # Paddle remarks on its own calls while tracing (`contiguous`, `place` have no meaning in a static
        # graph); nothing here to act on
        warnings.filterwarnings("ignore", category=UserWarning, module="paddle")
        static = paddle.jit.to_static(program, input_spec=program.input_spec(), full_graph=True)
        paddle.jit.save(static, os.path.join(out_dir, PROGRAM))
    return Manifest(
        config=dataclasses.replace(config, quantization=model.quantization),
        dtype=model.dtype,
        compute_dtype=compute_dtype,
        device=device,
        max_seq_len=max_seq_len,
        inputs=input_names(config.num_hidden_layers),
        kernels=uses_kernels,
        kv_cache_dtype=kv_cache_dtype,
    )
