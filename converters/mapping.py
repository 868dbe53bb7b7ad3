"""The one table of GLM-4's tensors: their names and layouts in each checkpoint format.

Three formats:
- "paddle":    this project's checkpoints (`GLM4ForCausalLM.state_dict()` names, Linear weights [in, out]);
- "published": THUDM's torch checkpoint (`transformer.encoder.layers.N...`, fused QKV, weights [out, in]);
- "hf":        transformers' `glm` port (`model.layers.N.self_attn.{q,k,v}_proj`, weights [out, in]).
A Paddle tensor is made from one published tensor, or from one or more HF tensors concatenated along
the output axis (q, k and v), then transposed if it is a Linear weight. Arrays are numpy and the
transforms never look at values, so bf16 (held as raw uint16 bits) passes through bit-exactly.
Everything else (converter, loader checks, tests) asks this module; nobody else spells tensor names.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from paddle_glm4.config import GLM4Config

LAYOUTS = ("published", "hf")
PUBLISHED_INV_FREQ = "transformer.rotary_pos_emb.inv_freq"  # derived from the config: checked, then dropped


@dataclass(frozen=True)
class Rule:
    paddle: str                       # "{i}" stands for the layer index
    published: str
    hf: tuple[tuple[str, str], ...]   # (name, size of its slice of the output axis), concatenated in order
    shape: tuple[str, ...]            # Paddle-layout shape, in named sizes (see `_sizes`)
    linear: bool = False              # torch [out, in] <-> Paddle [in, out]


_L = "model.layers.{i}"
_P = "transformer.encoder.layers.{i}"
RULES: tuple[Rule, ...] = (
    Rule("model.embed_tokens.weight", "transformer.embedding.word_embeddings.weight",
         (("model.embed_tokens.weight", "vocab"),), ("vocab", "hidden")),
    Rule(f"{_L}.input_layernorm.weight", f"{_P}.input_layernorm.weight",
         ((f"{_L}.input_layernorm.weight", "hidden"),), ("hidden",)),
    Rule(f"{_L}.self_attn.qkv_proj.weight", f"{_P}.self_attention.query_key_value.weight",
         ((f"{_L}.self_attn.q_proj.weight", "q"), (f"{_L}.self_attn.k_proj.weight", "kv"),
          (f"{_L}.self_attn.v_proj.weight", "kv")), ("hidden", "qkv"), linear=True),
    Rule(f"{_L}.self_attn.qkv_proj.bias", f"{_P}.self_attention.query_key_value.bias",
         ((f"{_L}.self_attn.q_proj.bias", "q"), (f"{_L}.self_attn.k_proj.bias", "kv"),
          (f"{_L}.self_attn.v_proj.bias", "kv")), ("qkv",)),
    Rule(f"{_L}.self_attn.o_proj.weight", f"{_P}.self_attention.dense.weight",
         ((f"{_L}.self_attn.o_proj.weight", "hidden"),), ("q", "hidden"), linear=True),
    Rule(f"{_L}.post_attention_layernorm.weight", f"{_P}.post_attention_layernorm.weight",
         ((f"{_L}.post_attention_layernorm.weight", "hidden"),), ("hidden",)),
    Rule(f"{_L}.mlp.gate_up_proj.weight", f"{_P}.mlp.dense_h_to_4h.weight",
         ((f"{_L}.mlp.gate_up_proj.weight", "ffn2"),), ("hidden", "ffn2"), linear=True),
    Rule(f"{_L}.mlp.down_proj.weight", f"{_P}.mlp.dense_4h_to_h.weight",
         ((f"{_L}.mlp.down_proj.weight", "hidden"),), ("ffn", "hidden"), linear=True),
    Rule("model.norm.weight", "transformer.encoder.final_layernorm.weight",
         (("model.norm.weight", "hidden"),), ("hidden",)),
    Rule("lm_head.weight", "transformer.output_layer.weight",
         (("lm_head.weight", "vocab"),), ("hidden", "vocab"), linear=True),
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
    shape: tuple[int, ...]   # Paddle layout
    linear: bool

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
        layers = range(config.num_hidden_layers) if "{i}" in rule.paddle else [None]
        for i in layers:
            fmt = (lambda s: s.format(i=i)) if i is not None else (lambda s: s)
            if rule.paddle.endswith(".bias") and not config.attention_bias:
                continue
            if rule.paddle == "lm_head.weight" and config.tie_word_embeddings:
                continue
            specs.append(TensorSpec(
                paddle=fmt(rule.paddle), published=fmt(rule.published),
                hf=tuple(fmt(name) for name, _ in rule.hf), hf_sizes=tuple(sizes[s] for _, s in rule.hf),
                shape=tuple(sizes[s] for s in rule.shape), linear=rule.linear))
    return specs


def paddle_shapes(config: GLM4Config) -> dict[str, tuple[int, ...]]:
    return {spec.paddle: spec.shape for spec in tensor_specs(config)}


def to_paddle(spec: TensorSpec, parts: list[np.ndarray]) -> np.ndarray:
    """Torch-layout source tensor(s) -> the Paddle-layout tensor (a new contiguous array)."""
    array = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
    return np.ascontiguousarray(array.T if spec.linear else array)


def from_paddle(spec: TensorSpec, array: np.ndarray, layout: str) -> list[np.ndarray]:
    """The Paddle-layout tensor -> the torch-layout tensor(s) of `layout`, in `source_names` order."""
    torch_array = np.ascontiguousarray(array.T) if spec.linear else array
    if layout == "published":
        return [torch_array]
    bounds = np.cumsum(spec.hf_sizes)[:-1]
    return [np.ascontiguousarray(part) for part in np.split(torch_array, bounds, axis=0)]


def detect_layout(names) -> str:
    """Which format a set of tensor names is in; raises ValueError when it is neither."""
    names = set(names)
    if any(n.startswith("transformer.") for n in names):
        return "published"
    if any(n.startswith("model.layers.") and ".self_attn.q_proj." in n for n in names):
        return "hf"
    if any(n.startswith("model.layers.") and ".self_attn.qkv_proj." in n for n in names):
        raise ValueError("these tensors are already in the Paddle layout of this project; nothing to convert")
    sample = ", ".join(sorted(names)[:3]) or "no tensors"
    raise ValueError(f"tensor names are neither the published GLM-4 layout nor the transformers 'glm' "
                     f"layout (first names: {sample})")


def expected_inv_freq(config: GLM4Config) -> np.ndarray:
    """What the published checkpoint stores as `rotary_pos_emb.inv_freq`: 1 / 10000^(2i / rotary_dim).

    THUDM's code registers this buffer with the base 10000 (rope_ratio is applied only when it builds the
    angle cache, which it recomputes in fp32), and in the checkpoint's dtype, so compare with bf16 slack.
    """
    exponents = np.arange(0, config.rotary_dim, 2, dtype=np.float32) / np.float32(config.rotary_dim)
    return (1.0 / np.power(np.float32(10000.0), exponents)).astype(np.float32)
