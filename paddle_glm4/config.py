"""GLM4Config: the geometry of a GLM-4 model.

Three spellings of the same model exist in the wild:
- the published checkpoint's `config.json` (model_type "chatglm", THUDM's own code),
- Hugging Face transformers' port (model_type "glm"),
- this project's canonical form (model_type "glm4"), which is what `save_pretrained` writes.
`GLM4Config.from_dict` reads all three; `to_dict` writes the canonical one.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import ClassVar

from .validation import AnyOf, Bool, Int, List, Number, Object, Optional, SchemaError, Str, read_json, validate

# Prompt tokens per forward in a prefill. A forward's activations grow with its tokens (the MLP's intermediate
# alone is 110 KB a token at GLM-4-9B's width, in float32), so a long prompt goes through the cache a chunk at a
# time. Measured at GLM-4-9B's width (README, "Long prompts"): chunks of 256 to 2048 tokens prefill at the same
# rate within this machine's noise, so the default is a small one.
DEFAULT_PREFILL_CHUNK = 512

CONFIG_NAME = "config.json"
MODEL_TYPE = "glm4"
# GLM-4 scales a fixed RoPE base by `rope_ratio` (500 for the 128K chat model).
ROPE_BASE = 10000.0
STORAGE_DTYPES = ("float32", "bfloat16", "float16")
# The Linear layers of a GLM-4 block, by their attribute (and checkpoint) names: what LoRA adapts (lora.py)
TARGET_MODULES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
# A label the training loss skips (padding, prompt tokens): transformers' and PaddleNLP's value
IGNORE_INDEX = -100
# Weight-only quantization of the Linear weights (see paddle_glm4/linear.py for the layouts).
QUANTIZATION_SCHEMES = ("int8", "int4")
DEFAULT_GROUP_SIZE = 128  # int4: one scale per 128 input rows; GLM-4's FFN width 13696 = 107 x 128


class ConfigError(SchemaError):
    """A config file or value that does not describe a GLM-4 model this project can run."""


# What each field may be, in each spelling. The bounds are far beyond any GLM-4 (the 1M-context variant has
# seq_length 2^20) yet keep a downloaded config from asking for absurd sizes; that the sizes agree with the
# checkpoint's tensors is checked when loading and converting.
VOCAB, HIDDEN, FFN = Int(1, 1 << 22), Int(1, 1 << 16), Int(1, 1 << 18)
LAYERS, HEADS, HEAD_DIM, SEQ = Int(1, 1024), Int(1, 1024), Int(1, 1024), Int(1, 1 << 24)
TOKEN_ID = Int(0)  # below vocab_size: checked with it
EOS = AnyOf(TOKEN_ID, List(TOKEN_ID, 0, 64))
ROPE_RATIO, ROPE_FACTOR = Number(above=0, max=1e9), Number(above=0, max=1)
EPS = Number(above=0, below=1)
DTYPE = Str(STORAGE_DTYPES)
# Weights stored quantized: int8 (group_size null, one scale per output channel) or int4 (one scale per
# `group_size` input rows); absent: stored as `dtype`. Which scheme takes which group size is the quantizer's rule.
# "embedding": the token embedding table is stored quantized too (absent: false, as checkpoints written before).
QUANTIZATION = Object(
    {"scheme": Str(("int8", "int4")), "group_size": Optional(Int(1, 1 << 16)), "embedding": Bool()},
    required=("scheme",),
    closed=True,
)
CANONICAL_SCHEMA = Object(
    {
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS,
        "head_dim": HEAD_DIM,
        "partial_rotary_factor": ROPE_FACTOR,
        "rope_ratio": ROPE_RATIO,
        "seq_length": SEQ,
        "rms_norm_eps": EPS,
        "attention_bias": Bool(),
        "tie_word_embeddings": Bool(),
        "pad_token_id": TOKEN_ID,
        "eos_token_id": EOS,
        "dtype": DTYPE,
        "quantization": Optional(QUANTIZATION),
    }
)
PUBLISHED_SCHEMA = Object(
    {
        "padded_vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "ffn_hidden_size": FFN,
        "num_layers": LAYERS,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "multi_query_attention": Bool(),
        "multi_query_group_num": HEADS,
        "kv_channels": HEAD_DIM,
        "rope_ratio": ROPE_RATIO,
        "seq_length": SEQ,
        "layernorm_epsilon": EPS,
        "add_qkv_bias": Bool(),
        "tie_word_embeddings": Bool(),
        "torch_dtype": DTYPE,
        "eos_token_id": Optional(EOS),
        "pad_token_id": Optional(TOKEN_ID),
    }
)
HF_SCHEMA = Object(
    {
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": Optional(HEADS),
        "head_dim": Optional(HEAD_DIM),
        "partial_rotary_factor": ROPE_FACTOR,
        "rope_theta": Number(above=0, max=1e13),
        "rope_parameters": Optional(
            Object({"rope_type": Str(), "rope_theta": Number(above=0, max=1e13), "partial_rotary_factor": ROPE_FACTOR})
        ),
        "max_position_embeddings": SEQ,
        "rms_norm_eps": EPS,
        "attention_bias": Bool(),
        "tie_word_embeddings": Bool(),
        "dtype": Optional(DTYPE),
        "torch_dtype": Optional(DTYPE),
        "eos_token_id": Optional(EOS),
        "pad_token_id": Optional(TOKEN_ID),
    }
)


@dataclass(frozen=True)
class Quantization:
    """How a checkpoint's Linear weights are stored: `config.json`'s {"quantization": {"scheme", "group_size",
    "embedding"}}.

    int8: one float32 scale per output channel (group_size None); int4: one per `group_size` input rows.
    `embedding`: the token embedding table [vocab, hidden] is stored in the same scheme (its rows are the
    output channels), as llama.cpp stores it; checkpoints quantized before it existed keep it dense.
    """

    scheme: str
    group_size: int | None = None
    embedding: bool = False

    def __post_init__(self):
        if self.scheme not in QUANTIZATION_SCHEMES:
            raise ConfigError(f"quantization scheme must be one of {QUANTIZATION_SCHEMES}, got {self.scheme!r}")
        if self.scheme == "int8" and self.group_size is not None:
            raise ConfigError(
                f"int8 quantization has one scale per output channel; group_size must be null, got {self.group_size!r}"
            )
        if self.scheme == "int4" and not (
            isinstance(self.group_size, int)
            and not isinstance(self.group_size, bool)
            and self.group_size >= 2
            and self.group_size % 2 == 0
        ):
            raise ConfigError(f"int4 quantization needs an even group_size >= 2, got {self.group_size!r}")

    @classmethod
    def of(cls, scheme: str, group_size: int | None = None) -> Quantization:
        """`scheme` with its group size (int4: `group_size` or the default; int8: none)."""
        if scheme == "int4":
            return cls(scheme, DEFAULT_GROUP_SIZE if group_size is None else group_size)
        if group_size is not None:
            raise ConfigError("group_size applies to int4 only (int8 has one scale per output channel)")
        return cls(scheme)

    @classmethod
    def from_dict(cls, data: object) -> Quantization:
        if not isinstance(data, dict) or set(data) - {"scheme", "group_size", "embedding"} or "scheme" not in data:
            raise ConfigError(
                f'quantization must be an object {{"scheme": ..., "group_size": ..., "embedding": ...}}, got {data!r}'
            )
        embedding = data.get("embedding", False)
        if not isinstance(embedding, bool):
            raise ConfigError(f"quantization.embedding must be true or false, got {embedding!r}")
        return cls(data["scheme"], data.get("group_size"), embedding)

    def same_rounding(self, other: Quantization) -> bool:
        """The same scheme and groups (whether or not the embedding is quantized too)."""
        return (self.scheme, self.group_size) == (other.scheme, other.group_size)

    def __str__(self) -> str:
        return self.scheme if self.group_size is None else f"{self.scheme} (group size {self.group_size})"


@dataclass
class GLM4Config:
    vocab_size: int = 151552
    hidden_size: int = 4096
    intermediate_size: int = 13696
    num_hidden_layers: int = 40
    num_attention_heads: int = 32
    num_key_value_heads: int = 2
    head_dim: int = 128
    # RoPE rotates the first `partial_rotary_factor * head_dim` dims of each head, on interleaved pairs.
    partial_rotary_factor: float = 0.5
    rope_ratio: float = 1.0
    seq_length: int = 8192
    rms_norm_eps: float = 1.5625e-07
    attention_bias: bool = True
    tie_word_embeddings: bool = False
    pad_token_id: int = 151329
    eos_token_id: list[int] = field(default_factory=lambda: [151329, 151336, 151338])
    # dtype the weights are stored in; computation dtype is chosen at load time (see device.py).
    dtype: str = "bfloat16"
    # Weight-only quantization of the Linear weights; None: they are stored in `dtype` like the rest.
    quantization: Quantization | None = None
    # Asked by PaddleNLP's and PaddleFormers' peft (LoRAModel; PaddleFormers renamed the degree
    # tensor_model_parallel_size): this model never splits its layers across devices.
    tensor_parallel_degree: ClassVar[int] = 1
    tensor_model_parallel_size: ClassVar[int] = 1
    tensor_parallel_rank: ClassVar[int] = 0

    def __post_init__(self):
        if isinstance(self.eos_token_id, int) and not isinstance(self.eos_token_id, bool):
            self.eos_token_id = [self.eos_token_id]
        elif isinstance(self.eos_token_id, tuple):
            self.eos_token_id = list(self.eos_token_id)
        validate(dataclasses.asdict(self), CANONICAL_SCHEMA, "", ConfigError)
        # what relates the fields
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        rotary = self.head_dim * self.partial_rotary_factor
        if rotary != int(rotary) or int(rotary) % 2:
            raise ConfigError(
                f"partial_rotary_factor {self.partial_rotary_factor} with head_dim {self.head_dim} gives "
                f"{rotary} rotary dims; it must be an even integer in (0, head_dim]"
            )
        if self.quantization is not None and not isinstance(self.quantization, Quantization):
            self.quantization = Quantization.from_dict(self.quantization)
        if self.quantization is not None and self.quantization.embedding and self.tie_word_embeddings:
            raise ConfigError("quantization.embedding needs an untied lm_head (tie_word_embeddings is true)")
        for token in [self.pad_token_id, *self.eos_token_id]:
            if not token < self.vocab_size:
                raise ConfigError(f"special token id {token!r} is outside the vocabulary [0, {self.vocab_size})")

    # Derived geometry: properties, so that nothing can disagree with the fields above.
    @property
    def rope_theta(self) -> float:
        return ROPE_BASE * self.rope_ratio

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def qkv_size(self) -> int:
        return (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim

    # ---- reading ----------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> GLM4Config:
        """Build from any of the three spellings; `source` names the file in error messages."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object")
        model_type = data.get("model_type")
        if model_type == MODEL_TYPE:
            validate(data, CANONICAL_SCHEMA, source, ConfigError)
            fields = {f.name for f in dataclasses.fields(cls)}
            kwargs = {k: v for k, v in data.items() if k in fields}
        elif model_type == "chatglm":
            validate(data, PUBLISHED_SCHEMA, source, ConfigError)
            kwargs = _from_published(data, source)
        elif model_type == "glm":
            validate(data, HF_SCHEMA, source, ConfigError)
            kwargs = _from_hf_glm(data)
        else:
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not GLM-4 (expected 'chatglm', 'glm' or '{MODEL_TYPE}')"
            )
        try:
            return cls(**kwargs)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    @classmethod
    def from_file(cls, path: str) -> GLM4Config:
        try:
            data = read_json(path, error=ConfigError)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        return cls.from_dict(data, source=path)

    @classmethod
    def from_pretrained(cls, path: str) -> GLM4Config:
        """`path` is a checkpoint directory or a config file."""
        if os.path.isdir(path):
            path = os.path.join(path, CONFIG_NAME)
        return cls.from_file(path)

    # ---- writing ----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"model_type": MODEL_TYPE, "architectures": ["GLM4ForCausalLM"], **dataclasses.asdict(self)}

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def save_pretrained(self, directory: str) -> str:
        from .checkpoint import write_text_atomic

        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, CONFIG_NAME)
        write_text_atomic(path, self.to_json_string())
        return path

    def to_published_dict(self) -> dict:
        """The published checkpoint's `config.json` (model_type "chatglm"), for writing torch checkpoints back."""
        return {
            "model_type": "chatglm",
            "architectures": ["ChatGLMModel"],
            "add_bias_linear": False,
            "add_qkv_bias": self.attention_bias,
            "apply_query_key_layer_scaling": True,
            "apply_residual_connection_post_layernorm": False,
            "attention_dropout": 0.0,
            "attention_softmax_in_fp32": True,
            "ffn_hidden_size": self.intermediate_size,
            "fp32_residual_connection": False,
            "hidden_dropout": 0.0,
            "hidden_size": self.hidden_size,
            "kv_channels": self.head_dim,
            "layernorm_epsilon": self.rms_norm_eps,
            "multi_query_attention": self.num_key_value_heads != self.num_attention_heads,
            "multi_query_group_num": self.num_key_value_heads,
            "num_attention_heads": self.num_attention_heads,
            "num_layers": self.num_hidden_layers,
            "original_rope": True,
            "padded_vocab_size": self.vocab_size,
            "post_layer_norm": True,
            "rmsnorm": True,
            "rope_ratio": self.rope_ratio,
            "seq_length": self.seq_length,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": self.dtype,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }

    def to_hf_glm_dict(self) -> dict:
        """transformers' `GlmConfig` keyword arguments for the same model (used to build the reference)."""
        return {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.seq_length,
            "rms_norm_eps": self.rms_norm_eps,
            "attention_bias": self.attention_bias,
            "tie_word_embeddings": self.tie_word_embeddings,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": self.eos_token_id,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": self.rope_theta,
                "partial_rotary_factor": self.partial_rotary_factor,
            },
        }


def _require(data: dict, key: str, source: str):
    if key not in data:
        raise ConfigError(f"{source}: missing field {key!r}")
    return data[key]


def _from_published(data: dict, source: str) -> dict:
    """THUDM's ChatGLM config. Only the GLM-4 variant of that architecture is accepted."""
    # Switches that ChatGLM's code supports but GLM-4 never sets; refuse rather than compute something else.
    fixed = {
        "add_bias_linear": False,
        "rmsnorm": True,
        "post_layer_norm": True,
        "apply_residual_connection_post_layernorm": False,
        "original_rope": True,
    }
    for key, expected in fixed.items():
        if key in data and data[key] != expected:
            raise ConfigError(f"{source}: {key}={data[key]!r} is not supported (GLM-4 uses {expected!r})")
    heads = _require(data, "num_attention_heads", source)
    kwargs = {
        "vocab_size": _require(data, "padded_vocab_size", source),
        "hidden_size": _require(data, "hidden_size", source),
        "intermediate_size": _require(data, "ffn_hidden_size", source),
        "num_hidden_layers": data.get("num_layers", data.get("num_hidden_layers")),
        "num_attention_heads": heads,
        "num_key_value_heads": data.get("multi_query_group_num", heads) if data.get("multi_query_attention") else heads,
        "head_dim": data.get("kv_channels", _require(data, "hidden_size", source) // heads),
        "rope_ratio": data.get("rope_ratio", 1.0),
        "seq_length": _require(data, "seq_length", source),
        "rms_norm_eps": data.get("layernorm_epsilon", 1e-5),
        "attention_bias": data.get("add_qkv_bias", False),
        "tie_word_embeddings": data.get("tie_word_embeddings", False),
        "dtype": data.get("torch_dtype", "bfloat16"),
    }
    if kwargs["num_hidden_layers"] is None:
        raise ConfigError(f"{source}: missing field 'num_layers'")
    return _with_special_tokens(kwargs, data)


def _from_hf_glm(data: dict) -> dict:
    """transformers' GlmConfig, old (top-level rope_theta) or new (rope_parameters) style."""
    rope = data.get("rope_parameters") or {}
    rope_theta = rope.get("rope_theta", data.get("rope_theta", ROPE_BASE))
    heads = data.get("num_attention_heads", 32)
    kwargs = {
        "vocab_size": data.get("vocab_size", 151552),
        "hidden_size": data.get("hidden_size", 4096),
        "intermediate_size": data.get("intermediate_size", 13696),
        "num_hidden_layers": data.get("num_hidden_layers", 40),
        "num_attention_heads": heads,
        "num_key_value_heads": data.get("num_key_value_heads") or heads,
        "head_dim": data.get("head_dim") or data.get("hidden_size", 4096) // heads,
        "partial_rotary_factor": rope.get("partial_rotary_factor", data.get("partial_rotary_factor", 0.5)),
        "rope_ratio": rope_theta / ROPE_BASE,
        "seq_length": data.get("max_position_embeddings", 131072),
        "rms_norm_eps": data.get("rms_norm_eps", 1.5625e-07),
        "attention_bias": data.get("attention_bias", True),
        "tie_word_embeddings": data.get("tie_word_embeddings", False),
        "dtype": data.get("dtype", data.get("torch_dtype")) or "bfloat16",
    }
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(f"rope_type {rope['rope_type']!r} is not supported (GLM-4 uses 'default')")
    return _with_special_tokens(kwargs, data)


def _with_special_tokens(kwargs: dict, data: dict) -> dict:
    if data.get("eos_token_id") is not None:
        kwargs["eos_token_id"] = data["eos_token_id"]
    if data.get("pad_token_id") is not None:
        kwargs["pad_token_id"] = data["pad_token_id"]
    return kwargs
