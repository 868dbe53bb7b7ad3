"""The one table of GLM-4's tensors: their names and layouts in each checkpoint format.

Three formats:
- "paddle":    this project's checkpoints (`GLM4ForCausalLM.state_dict()` names, Linear weights [in, out]);
- "published": THUDM's torch checkpoint (`transformer.encoder.layers.N...`, fused QKV, weights [out, in]);
- "hf":        transformers' `glm` port (`model.layers.N.self_attn.{q,k,v}_proj`, weights [out, in]).
A Paddle tensor is made from one published tensor, or from one or more HF tensors concatenated along
the output axis (q, k and v), then transposed if it is a Linear weight. Arrays are numpy and the
transforms never look at values, so bf16 (held as raw uint16 bits) passes through bit-exactly.
The transforms also work a block of rows at a time (`paddle_rows`, `torch_rows`), which is how the
converter streams a checkpoint without ever holding a whole converted tensor.
Everything else (converter, loader checks, tests) asks this module; nobody else spells tensor names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from paddle_glm4.config import GLM4Config, Quantization
from paddle_glm4.quantization import checkpoint_slots
from paddle_glm4.safetensors_file import cast, to_float32

from .transpose import transpose_into

LAYOUTS = ("published", "hf")
PUBLISHED_INV_FREQ = "transformer.rotary_pos_emb.inv_freq"  # derived from the config: checked, then dropped


@dataclass(frozen=True)
class Rule:
    paddle: str  # "{i}" stands for the layer index
    published: str
    hf: tuple[tuple[str, str], ...]  # (name, size of its slice of the output axis), concatenated in order
    shape: tuple[str, ...]  # Paddle-layout shape, in named sizes (see `_sizes`)
    linear: bool = False  # torch [out, in] <-> Paddle [in, out]
    per_layer: bool = False  # one tensor per layer ("{i}" in the names), else one in the model
    present: Callable[[GLM4Config], bool] = lambda config: True  # whether a model of this config has it


def _has_bias(config: GLM4Config) -> bool:
    return config.attention_bias


def _untied_head(config: GLM4Config) -> bool:
    return not config.tie_word_embeddings


_L = "model.layers.{i}"
_P = "transformer.encoder.layers.{i}"
RULES: tuple[Rule, ...] = (
    Rule(
        "model.embed_tokens.weight",
        "transformer.embedding.word_embeddings.weight",
        (("model.embed_tokens.weight", "vocab"),),
        ("vocab", "hidden"),
    ),
    Rule(
        f"{_L}.input_layernorm.weight",
        f"{_P}.input_layernorm.weight",
        ((f"{_L}.input_layernorm.weight", "hidden"),),
        ("hidden",),
        per_layer=True,
    ),
    Rule(
        f"{_L}.self_attn.qkv_proj.weight",
        f"{_P}.self_attention.query_key_value.weight",
        (
            (f"{_L}.self_attn.q_proj.weight", "q"),
            (f"{_L}.self_attn.k_proj.weight", "kv"),
            (f"{_L}.self_attn.v_proj.weight", "kv"),
        ),
        ("hidden", "qkv"),
        linear=True,
        per_layer=True,
    ),
    Rule(
        f"{_L}.self_attn.qkv_proj.bias",
        f"{_P}.self_attention.query_key_value.bias",
        (
            (f"{_L}.self_attn.q_proj.bias", "q"),
            (f"{_L}.self_attn.k_proj.bias", "kv"),
            (f"{_L}.self_attn.v_proj.bias", "kv"),
        ),
        ("qkv",),
        per_layer=True,
        present=_has_bias,
    ),
    Rule(
        f"{_L}.self_attn.o_proj.weight",
        f"{_P}.self_attention.dense.weight",
        ((f"{_L}.self_attn.o_proj.weight", "hidden"),),
        ("q", "hidden"),
        linear=True,
        per_layer=True,
    ),
    Rule(
        f"{_L}.post_attention_layernorm.weight",
        f"{_P}.post_attention_layernorm.weight",
        ((f"{_L}.post_attention_layernorm.weight", "hidden"),),
        ("hidden",),
        per_layer=True,
    ),
    Rule(
        f"{_L}.mlp.gate_up_proj.weight",
        f"{_P}.mlp.dense_h_to_4h.weight",
        ((f"{_L}.mlp.gate_up_proj.weight", "ffn2"),),
        ("hidden", "ffn2"),
        linear=True,
        per_layer=True,
    ),
    Rule(
        f"{_L}.mlp.down_proj.weight",
        f"{_P}.mlp.dense_4h_to_h.weight",
        ((f"{_L}.mlp.down_proj.weight", "hidden"),),
        ("ffn", "hidden"),
        linear=True,
        per_layer=True,
    ),
    Rule(
        "model.norm.weight",
        "transformer.encoder.final_layernorm.weight",
        (("model.norm.weight", "hidden"),),
        ("hidden",),
    ),
    Rule(
        "lm_head.weight",
        "transformer.output_layer.weight",
        (("lm_head.weight", "vocab"),),
        ("hidden", "vocab"),
        linear=True,
        present=_untied_head,
    ),
)


def _sizes(config: GLM4Config) -> dict[str, int]:
    return {
        "vocab": config.vocab_size,
        "hidden": config.hidden_size,
        "ffn": config.intermediate_size,
        "ffn2": 2 * config.intermediate_size,
        "q": config.num_attention_heads * config.head_dim,
        "kv": config.num_key_value_heads * config.head_dim,
        "qkv": config.qkv_size,
    }


@dataclass(frozen=True)
class TensorSpec:
    """One concrete tensor of a concrete model."""

    paddle: str
    published: str
    hf: tuple[str, ...]
    hf_sizes: tuple[int, ...]
    shape: tuple[int, ...]  # Paddle layout
    linear: bool
    layer: int | None  # None: not a per-layer tensor

    @property
    def weight_shape(self) -> tuple[int, int]:
        """(K, N) of the tensor read as a weight of N output rows: a Linear's Paddle shape [K, N]; the
        embedding table [vocab, hidden] has N = vocab rows of K = hidden (stored quantized as such)."""
        k, n = self.shape if self.linear else self.shape[::-1]
        return k, n

    def source_names(self, layout: str) -> tuple[str, ...]:
        return (self.published,) if layout == "published" else self.hf

    def source_shapes(self, layout: str) -> tuple[tuple[int, ...], ...]:
        """Shapes of the torch-layout tensors this one is made from."""
        torch_shape = self.shape[::-1] if self.linear else self.shape
        if layout == "published":
            return (torch_shape,)
        return tuple((size, *torch_shape[1:]) for size in self.hf_sizes)


def tensor_specs(config: GLM4Config) -> list[TensorSpec]:
    """Every tensor of the model, in a stable order (embedding, layers in order, final norm, output)."""
    sizes = _sizes(config)
    specs = []
    for rule in RULES:
        if not rule.present(config):
            continue
        layers: list[int | None] = list(range(config.num_hidden_layers)) if rule.per_layer else [None]
        for i in layers:  # (a name without "{i}" formats to itself)
            specs.append(
                TensorSpec(
                    paddle=rule.paddle.format(i=i),
                    published=rule.published.format(i=i),
                    hf=tuple(name.format(i=i) for name, _ in rule.hf),
                    hf_sizes=tuple(sizes[s] for _, s in rule.hf),
                    shape=tuple(sizes[s] for s in rule.shape),
                    linear=rule.linear,
                    layer=i,
                )
            )
    return specs


def paddle_shapes(config: GLM4Config) -> dict[str, tuple[int, ...]]:
    return {spec.paddle: spec.shape for spec in tensor_specs(config)}


def module_order(specs: list[TensorSpec]) -> list[TensorSpec]:
    """`specs` layer by layer: the order in which the models register their parameters (their state_dict
    order), which is the order checkpoints are written and sharded in."""

    def layer(spec: TensorSpec) -> float:
        if spec.layer is not None:
            return spec.layer
        return -1 if spec.paddle == RULES[0].paddle else float("inf")  # embedding first, norm and head last

    return sorted(specs, key=layer)  # stable: keeps the table's order within a layer


def published_order(config: GLM4Config) -> list[str]:
    """The published checkpoint's tensor names in THUDM's module order: embedding, inv_freq, the layers,
    the final norm, the output layer. `transformers` shards the published checkpoint in this order."""
    names = [spec.published for spec in module_order(tensor_specs(config))]
    return [names[0], PUBLISHED_INV_FREQ, *names[1:]]


def paddle_rows(
    spec: TensorSpec, parts: list[np.ndarray], start: int, stop: int, out: np.ndarray | None = None
) -> np.ndarray:
    """Rows [start, stop) of the Paddle-layout tensor made from the torch-layout `parts`, written into
    `out` (a new array when None) and returned."""
    if not spec.linear:
        return concatenated_rows(parts, start, stop, out)
    if out is None:
        out = np.empty((stop - start, sum(len(part) for part in parts)), parts[0].dtype)
    column = 0
    for part in parts:  # a row of the Paddle weight is a column of the torch weight(s)
        transpose_into(out[:, column : column + len(part)], part[:, start:stop])
        column += len(part)
    return out


def concatenated_rows(parts: list[np.ndarray], start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
    """Rows [start, stop) of the concatenation of `parts` along their first axis, written into `out` (a new
    array when None): a tensor's rows in the Paddle layout, or a torch Linear weight's output rows."""
    if out is None:
        out = np.empty((stop - start, *parts[0].shape[1:]), parts[0].dtype)
    offset = 0
    for part in parts:
        lo, hi = max(start - offset, 0), min(stop - offset, len(part))
        if lo < hi:
            out[offset + lo - start : offset + hi - start] = part[lo:hi]
        offset += len(part)
    return out


def quantized(spec: TensorSpec, quantization: Quantization | None) -> bool:
    """Whether a checkpoint quantized as `quantization` stores `spec` as quantized tensors: every Linear
    weight, and the embedding table when quantization.embedding."""
    if quantization is None:
        return False
    return spec.linear or (spec.paddle == RULES[0].paddle and quantization.embedding)


def checkpoint_tensors(config: GLM4Config) -> dict[str, tuple[tuple[int, ...], str | None]]:
    """Every tensor of a Paddle checkpoint of `config`, by name, in module order: as `paddle_shapes`, but
    when `config.quantization` is set each Linear weight `<layer>.weight` (and the embedding table, when
    quantization.embedding) is stored as its quantized tensors `<layer>.qweight` and `<layer>.scales` (see
    paddle_glm4.quantization). Values: (shape, dtype),
    the dtype only where it is fixed (the quantized tensors), else None (any float dtype)."""
    tensors: dict[str, tuple[tuple[int, ...], str | None]] = {}
    for spec in module_order(tensor_specs(config)):
        if quantized(spec, config.quantization):
            prefix = spec.paddle[: -len("weight")]
            for slot in checkpoint_slots(config.dtype, config.quantization, *spec.weight_shape):
                tensors[prefix + slot.name] = (slot.shape, slot.dtype)
        else:
            tensors[spec.paddle] = (spec.shape, None)
    return tensors


def torch_rows(
    spec: TensorSpec, array: np.ndarray, layout: str, part: int, start: int, stop: int, out: np.ndarray | None = None
) -> np.ndarray:
    """Rows [start, stop) of torch-layout tensor `spec.source_names(layout)[part]`, from the Paddle tensor,
    written into `out` (a new array when None) and returned."""
    offset = sum(spec.hf_sizes[:part]) if layout == "hf" else 0
    if not spec.linear:
        rows = array[offset + start : offset + stop]
        if out is None:
            return rows.copy()
        out[...] = rows
        return out
    if out is None:
        out = np.empty((stop - start, array.shape[0]), array.dtype)
    transpose_into(out, array[:, offset + start : offset + stop])
    return out


def to_paddle(spec: TensorSpec, parts: list[np.ndarray]) -> np.ndarray:
    """Torch-layout source tensor(s) -> the Paddle-layout tensor (a new contiguous array)."""
    rows = parts[0].shape[1] if spec.linear else sum(len(part) for part in parts)
    return paddle_rows(spec, parts, 0, rows)


def from_paddle(spec: TensorSpec, array: np.ndarray, layout: str) -> list[np.ndarray]:
    """The Paddle-layout tensor -> the torch-layout tensor(s) of `layout`, in `source_names` order."""
    total = array.shape[1] if spec.linear else array.shape[0]
    sizes = spec.hf_sizes if layout == "hf" else (total,)
    return [torch_rows(spec, array, layout, part, 0, size) for part, size in enumerate(sizes)]


def detect_layout(names: Iterable[str]) -> str:
    """Which format a set of tensor names is in; raises ValueError when it is neither."""
    names = set(names)
    if any(n.startswith("transformer.") for n in names):
        return "published"
    if any(n.startswith("model.layers.") and ".self_attn.q_proj." in n for n in names):
        return "hf"
    if any(n.startswith("model.layers.") and ".self_attn.qkv_proj." in n for n in names):
        raise ValueError("these tensors are already in the Paddle layout of this project; nothing to convert")
    sample = ", ".join(sorted(names)[:3]) or "no tensors"
    raise ValueError(
        f"tensor names are neither the published GLM-4 layout nor the transformers 'glm' layout (first names: {sample})"
    )


def published_inv_freq(config: GLM4Config, dtype: str) -> np.ndarray:
    """`rotary_pos_emb.inv_freq` exactly as THUDM's code computes it in `dtype` (numpy; bf16 as uint16 bits).

    Each step, `1.0 / (10000 ** (arange(0, dim, 2).to(dtype) / dim))`, runs in `dtype`: torch computes in
    float32 and rounds to `dtype` after every operation, and rounds the base 10000 itself to `dtype` first
    (to 9984 in bf16). Matches torch bit for bit in bf16 and fp16; in fp32 torch's pow may differ by 1 ulp.
    """

    def rounded(values) -> np.ndarray:
        return to_float32(cast(np.asarray(values, np.float32), "float32", dtype), dtype)

    exponents = rounded(rounded(np.arange(0, config.rotary_dim, 2)) / np.float32(config.rotary_dim))
    powers = rounded(np.power(rounded(10000.0), exponents))
    return cast(rounded(np.float32(1.0) / powers), "float32", dtype)
