"""The GLM-4 transformer in Paddle: GLM4Block, GLM4Model, GLM4ForCausalLM.

Shapes: b = batch, s = new tokens in this call, L = tokens attended over (cache + new), h = query heads,
g = key/value heads (groups), d = head_dim, H = hidden size. Linear weights: see linear.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeAlias

import paddle
import paddle.nn.functional as F
from paddle import nn

from . import generation, loading, memory, ops
from . import kernels as cpu_kernels
from .config import DEFAULT_GROUP_SIZE, IGNORE_INDEX, GLM4Config, Quantization
from .device import on_gpu
from .generation import Batch, GenerationConfig
from .kv_cache import KVCache
from .linear import KERNEL_FORMATS, Linear, add_slot_parameters, lookup
from .quantization import Packed, WeightFormat, embedding_format
from .sequences import GROWTH_STEP, Sequences

if TYPE_CHECKING:
    from .streamer import Streamer
    from .tensor_parallel import TensorParallel

# The slot of the first new token: an int in the dynamic graph, a 0-d int64 tensor in the exported program
Start: TypeAlias = "int | paddle.Tensor"


@dataclass
class CausalLMOutput:
    logits: paddle.Tensor  # [b, s, vocab] float32
    past_key_values: Sequences | None = None
    loss: paddle.Tensor | None = None  # 0-d float32, when labels were given


def causal_lm_loss(logits: paddle.Tensor, labels: paddle.Tensor) -> paddle.Tensor:
    """Mean cross-entropy of predicting labels[:, t + 1] from logits[:, t], over the labels that are not
    IGNORE_INDEX (transformers' and PaddleNLP's shift). logits [b, s, vocab] float32, labels [b, s] int."""
    targets = labels[:, 1:].astype("int64")  # [b, s-1]
    counted = targets != IGNORE_INDEX
    per_token = F.cross_entropy(
        logits[:, :-1], paddle.where(counted, targets, paddle.zeros_like(targets)), reduction="none", axis=-1
    ).squeeze(-1)  # [b, s-1]
    weights = counted.astype(per_token.dtype)
    # max(1, .): a batch without a counted label has loss 0, not nan
    return (per_token * weights).sum() / paddle.clip(weights.sum(), min=1.0)


class Cache(Protocol):
    """Where the forward writes the new keys and values: the dynamic model's KVCache, or the exported program's
    cache inputs. Returns the keys and values attention reads, [b, L, g, d]."""

    def update(
        self, layer: int, start: Start, k: paddle.Tensor, v: paddle.Tensor
    ) -> tuple[paddle.Tensor, paddle.Tensor]: ...


class Embedding(nn.Layer):
    """The token embedding table [vocab, H], held in `fmt` (quantization.embedding_format): dense (bf16 beside
    bf16 Linear weights: it is looked up, not multiplied, so it is never widened as a whole; and as a dense
    checkpoint stores it beside int8 / int4 ones), or quantized beside int8 / int4 Linear weights, as a weight
    of vocab output rows (only the looked-up rows are dequantized). Its parameters are named as the format's
    slots (`weight`, or `qweight` and `scales`), which are their checkpoint names. Rows come out in
    `compute_dtype`; `dtype` is the table's dense dtype."""

    def __init__(self, vocab_size: int, hidden_size: int, fmt: WeightFormat, dtype: str, compute_dtype: str):
        super().__init__()
        self.vocab_size, self.hidden_size, self.format = vocab_size, hidden_size, fmt
        self.slots = fmt.slots(hidden_size, vocab_size)
        add_slot_parameters(self, self.slots, trainable=not isinstance(fmt, Packed))  # a quantized table does not train
        self.dtype, self.compute_dtype = dtype, compute_dtype

    def forward(self, ids: paddle.Tensor) -> paddle.Tensor:
        tensors = [getattr(self, slot.name) for slot in self.slots]
        return lookup(self.format, ids, tensors, self.hidden_size, self.compute_dtype)  # [b, s, H]


class RMSNorm(nn.Layer):
    def __init__(self, dim: int, eps: float, kernels: ops.Kernels):
        super().__init__()
        self.weight = self.create_parameter([dim], default_initializer=nn.initializer.Constant(1.0))
        self.eps, self.kernels = eps, kernels

    def forward(
        self, x: paddle.Tensor, residual: paddle.Tensor | None = None
    ) -> paddle.Tensor | tuple[paddle.Tensor, paddle.Tensor]:
        """norm(x); with `residual`: (norm(x + residual), x + residual), in one pass where the kernels serve."""
        if residual is None:
            return self.kernels.rms_norm(x, self.weight, self.eps)
        return self.kernels.add_rms_norm(x, residual, self.weight, self.eps)


class Attention(nn.Layer):
    def __init__(self, config: GLM4Config, layer_idx: int, kernels: ops.Kernels):
        super().__init__()
        self.layer_idx, self.kernels = layer_idx, kernels
        self.heads, self.groups, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        # one fused projection: [H] -> [h*d queries | g*d keys | g*d values]
        self.qkv_proj = Linear(config.hidden_size, config.qkv_size, kernels, bias=config.attention_bias)
        self.o_proj = Linear(self.heads * self.head_dim, config.hidden_size, kernels)

    def forward(
        self,
        x: paddle.Tensor,
        rope: tuple,
        mask: ops.Mask,
        cache: Cache | None,
        start: Start,
        keep: int = 0,
    ) -> paddle.Tensor:
        """[b, s, H] -> [b, s, H], or [b, keep, H] for the last `keep` queries alone where s is known here (every
        key and value is still computed and written)."""
        d, h, g = self.head_dim, self.heads, self.groups
        q, k, v = self.kernels.split_rotary(self.qkv_proj(x), rope, h, g, d)  # q [b, s, h, d]; k, v [b, s, g, d]
        if cache is not None:
            k, v = cache.update(self.layer_idx, start, k, v)  # [b, L, g, d], in the cache's dtype
        if keep and isinstance(mask.seq_len, int) and keep < mask.seq_len:
            q, mask = q[:, -keep:], ops.last_queries(mask, keep)
        out = ops.attention(q, k, v, mask)  # [b, s or keep, h, d]
        return self.o_proj(out.reshape([0, 0, h * d]))


class MLP(nn.Layer):
    def __init__(self, config: GLM4Config, kernels: ops.Kernels):
        super().__init__()
        self.kernels = kernels
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, kernels)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, kernels)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        # [H] -> [gate | up], silu(gate) * up -> [H]
        return self.down_proj(self.kernels.swiglu(self.gate_up_proj(x)))


# Up to this many rows (batch x new tokens) a block runs as one operator (kernels.block) where it can: decoding,
# where the calls between a layer's dozen small operators cost as much as the operators (~0.7 ms a layer). A
# prefill keeps the per-operator forward, whose intermediates are freed as it goes.
BLOCK_MAX_ROWS = 16


class GLM4Block(nn.Layer):
    """Pre-norm transformer block: x + attention(norm(x)), then + mlp(norm(.))."""

    def __init__(self, config: GLM4Config, layer_idx: int, kernels: ops.Kernels):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, kernels)
        self.self_attn = Attention(config, layer_idx, kernels)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, kernels)
        self.mlp = MLP(config, kernels)

    def forward(
        self,
        x: paddle.Tensor,
        rope: tuple,
        mask: ops.Mask,
        cache: Cache | None,
        start: Start,
        keep: int = 0,
    ) -> paddle.Tensor:
        """[b, s, H] -> [b, s, H], or only the last `keep` positions when keep > 0 (attention's queries, its
        output projection and the MLP then run on those alone: nothing after attention mixes positions, and
        attention still writes every key and value)."""
        if isinstance(cache, KVCache) and self._one_operator(x):
            return self._as_one_operator(x, rope, mask, cache, keep)
        attended = self.self_attn(self.input_layernorm(x), rope, mask, cache, start, keep)
        if keep:  # attention kept its last queries already where it could
            attended, x = attended[:, -keep:], x[:, -keep:]
        normed, x = self.post_attention_layernorm(attended, x)  # the residual add and the norm, in one pass
        return x + self.mlp(normed)

    def _linears(self) -> tuple[Linear, ...]:
        return self.self_attn.qkv_proj, self.self_attn.o_proj, self.mlp.gate_up_proj, self.mlp.down_proj

    def _one_operator(self, x: paddle.Tensor) -> bool:
        """Whether kernels.block computes a call with a KVCache to write: few rows in the dynamic graph (an
        exported program records the per-operator forward), and the four Linears plain ones (not LoRA's, nor a
        tensor-parallel rank's) in a format of the C++ kernels, where they are built and no gradient is wanted."""
        if not paddle.in_dynamic_mode():
            return False
        if ops.size(x, 0) * ops.size(x, 1) > BLOCK_MAX_ROWS:
            return False
        fmt = self.self_attn.kernels.weights
        if not isinstance(fmt, Packed) or any(type(layer) is not Linear for layer in self._linears()):
            return False
        norms = (self.input_layernorm.weight, self.post_attention_layernorm.weight)
        bias = self.self_attn.qkv_proj.bias
        return ops.kernel_serves(x, *norms, *([] if bias is None else [bias]))

    def _as_one_operator(
        self, x: paddle.Tensor, rope: tuple, mask: ops.Mask, cache: KVCache, keep: int
    ) -> paddle.Tensor:
        attn, fmt = self.self_attn, self.self_attn.kernels.weights
        assert isinstance(fmt, Packed)
        cos, signed_sin = rope
        return cpu_kernels.block(
            x,
            (self.input_layernorm.weight, self.post_attention_layernorm.weight),
            tuple([getattr(layer, slot.name) for slot in layer.slots] for layer in self._linears()),
            attn.qkv_proj.bias,
            cos,
            signed_sin,
            cache.keys[self.layer_idx],
            cache.values[self.layer_idx],
            mask.start_slot,
            mask.key_valid,
            fmt=KERNEL_FORMATS[fmt.kind],
            group_size=fmt.group_size or DEFAULT_GROUP_SIZE,
            eps=self.input_layernorm.eps,
            heads=attn.heads,
            groups=attn.groups,
            head_dim=attn.head_dim,
            keep=keep,
            activation_dtype=fmt.activation_dtype,
        )


class GLM4Model(nn.Layer):
    def __init__(self, config: GLM4Config, fused: bool | None = None, weights: WeightFormat | None = None):
        super().__init__()
        self.config = config
        # fused GPU kernels on GPU, portable ones elsewhere; Linear weights in `weights`; chosen once, here
        self.kernels = ops.kernels(on_gpu() if fused is None else fused, weights)
        weights = self.kernels.weights
        self.embed_tokens = Embedding(
            config.vocab_size,
            config.hidden_size,
            embedding_format(weights, config.dtype, config.tie_word_embeddings, config.quantization),
            weights.embedding_dtype(config.dtype),
            weights.compute_dtype,
        )
        self.layers = nn.LayerList([GLM4Block(config, i, self.kernels) for i in range(config.num_hidden_layers)])
        self.kv_groups = config.num_key_value_heads  # those this process holds (tensor_parallel.shard: its share)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, self.kernels)
        self.register_buffer(
            "inv_freq", ops.inverse_frequencies(config.rotary_dim, config.rope_theta), persistable=False
        )
        # recompute (activation checkpointing): in training, keep only each layer's input and run the layer
        # again during the backward pass; memory for long sequences, at the cost of a second forward
        self.recompute = False

    def new_cache(self, batch_size: int, capacity: int, dtype: str | None = None) -> KVCache:
        """A KV cache holding keys and values in `dtype` (default: the compute dtype)."""
        return KVCache(
            self.config, batch_size, capacity, dtype=dtype or self.kernels.weights.compute_dtype, groups=self.kv_groups
        )

    def forward(
        self,
        input_ids: paddle.Tensor,
        positions: paddle.Tensor,
        start: Start = 0,
        key_valid: paddle.Tensor | None = None,
        cache: Cache | None = None,
        keep: int = 0,
    ) -> paddle.Tensor:
        """The network over new tokens: hidden states [b, s, H] after the final norm (only the last `keep`
        positions when keep > 0: the last layer's MLP runs on those alone, as llama.cpp's graphs do).

        input_ids, positions [b, s]: the tokens and their positions in their rows. start: the cache slot of the
        first new token (an int; a 0-d int64 tensor in a static program). key_valid [b, L] bool: which slots
        attention reads hold real tokens (None: all do, L = start + s). cache: where each layer writes its new
        keys and values at slots start..start+s (None: attend over the new tokens only; start must be 0).
        Nothing is decided here: `sequences.Sequences.claim` gives start, positions and key_valid.
        """
        seq_len = ops.size(input_ids, 1)
        x = self.embed_tokens(input_ids)  # [b, s, H]
        mask = ops.attention_mask(key_valid, start, seq_len)
        key_len = start + seq_len if key_valid is None else ops.size(key_valid, 1)
        rope = self.kernels.rotary_tables(positions, self.inv_freq, x.dtype, key_len)
        for i, layer in enumerate(self.layers):
            layer_keep = keep if i == len(self.layers) - 1 else 0
            if self.recompute and self.training and cache is None and paddle.in_dynamic_mode():
                from paddle.distributed.fleet.utils import recompute

                x = recompute(layer, x, rope, mask, cache, start, layer_keep, use_reentrant=False)
            else:
                x = layer(x, rope, mask, cache, start, layer_keep)
        return self.norm(x)


class GLM4ForCausalLM(nn.Layer):
    def __init__(self, config: GLM4Config, fused: bool | None = None, weights: WeightFormat | None = None):
        super().__init__()
        self.config = config
        self.model = GLM4Model(config, fused, weights)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, self.model.kernels)
        self.generation_config = GenerationConfig.from_model(config)
        self.prefill_chunk = generation.DEFAULT_PREFILL_CHUNK  # generate's defaults
        self.kv_cache_dtype: str | None = None
        self.tensor_parallel: TensorParallel | None = None  # this rank's part of a split model (tensor_parallel.py)

    def forward(
        self,
        input_ids: paddle.Tensor,
        attention_mask: paddle.Tensor | None = None,
        position_ids: paddle.Tensor | None = None,
        past_key_values: Sequences | None = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
        labels: paddle.Tensor | None = None,
    ) -> CausalLMOutput:
        """The transformers/PaddleNLP call: logits [b, s, vocab] float32 (only the last `logits_to_keep`
        positions when it is > 0) and, with use_cache or past_key_values, the Sequences to pass back.
        With `labels` [b, s] (IGNORE_INDEX where no loss is wanted), also the loss (causal_lm_loss).

        attention_mask [b, s] or [b, past + s] (1 = real token, 0 = padding); position_ids [b, s] (default:
        counted over the real tokens); past_key_values: the Sequences of an earlier call, extended in place.
        """
        batch, seq_len = input_ids.shape
        sequences = past_key_values
        if sequences is None:
            capacity = max(seq_len, GROWTH_STEP) if use_cache else seq_len
            sequences = Sequences(batch, capacity, self.model.new_cache(batch, capacity) if use_cache else None)
        step = sequences.claim(seq_len, attention_mask[:, -seq_len:] if attention_mask is not None else None)
        positions = step.positions if position_ids is None else position_ids
        logits = self.logits(input_ids, positions, step.start, step.key_valid, sequences.cache, logits_to_keep)
        loss = None if labels is None else causal_lm_loss(logits, labels[:, -logits.shape[1] :])
        return CausalLMOutput(logits, sequences if sequences.cache is not None else None, loss)

    def logits(
        self,
        input_ids: paddle.Tensor,
        positions: paddle.Tensor,
        start: Start = 0,
        key_valid: paddle.Tensor | None = None,
        cache: Cache | None = None,
        logits_to_keep: int = 0,
    ) -> paddle.Tensor:
        """The one forward (GLM4Model.forward's arguments), through the head: logits [b, s, vocab] float32, only
        the last `logits_to_keep` positions when it is > 0. The exported program traces this very function."""
        hidden = self.model(input_ids, positions, start, key_valid, cache, logits_to_keep)  # [b, s or keep, H]
        if self.config.tie_word_embeddings:
            weight = self.model.embed_tokens.weight  # [vocab, H]
            if weight.dtype != hidden.dtype:  # stored narrow, computed wider (see inference.export)
                weight = weight.astype(hidden.dtype)
            logits = paddle.matmul(hidden, weight, transpose_y=True)
        else:
            logits = self.lm_head(hidden)
        if self.tensor_parallel is not None:  # each rank computed its slice of the vocabulary
            logits = self.tensor_parallel.gather_vocab(logits)
        return logits if logits.dtype == paddle.float32 else logits.astype("float32")

    @property
    def context_length(self) -> int:
        """The most tokens (prompt + new) one generation takes: the config's seq_length."""
        return self.config.seq_length

    def new_cache(self, batch_size: int, capacity: int, dtype: str | None = None) -> KVCache:
        """A KV cache for this model's generations (GLM4Model.new_cache)."""
        return self.model.new_cache(batch_size, capacity, dtype)

    def cache_dtype(self, capacity: int, requested: str | None = None) -> str:
        """The KV cache's dtype for a generation of `capacity` slots: `requested`, else `kv_cache_dtype`, else
        memory.cache_dtype's choice (bfloat16 for a long context on CPU, else the compute dtype)."""
        return memory.cache_dtype(
            requested or self.kv_cache_dtype, capacity, self.model.kernels.weights.compute_dtype, on_gpu()
        )

    def generate(
        self,
        input_ids: Batch,
        attention_mask: Batch | None = None,
        max_new_tokens: int = 128,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        seed: int | None = None,
        streamer: Streamer | None = None,
        position_ids: Batch | None = None,
        truncate: bool = False,
        vocab_limit: int | None = None,
        prefill_chunk: int | None = None,
        kv_cache_dtype: str | None = None,
    ) -> tuple[paddle.Tensor, paddle.Tensor]:
        """Generate after each prompt of a (left-padded) batch; returns (ids, scores) as PaddleNLP does.

        ids [b, new] int64 holds only the new tokens, rows that stopped early padded with the pad id;
        scores [b, 1] is the sum of the log-probabilities of the chosen tokens. Settings left None come from
        `generation_config` (generation_config.json; see GenerationConfig.merged): greedy unless it samples or
        do_sample, temperature, top_p or top_k is given; temperature 0 is greedy. Stops at any id of
        `eos_token_id`. `seed` makes sampling reproducible; greedy decoding is deterministic. A prompt longer
        than `context_length` allows is refused, unless `truncate` (then its beginning is dropped). `vocab_limit`:
        ids from there on are never generated; pass `len(tokenizer)`, since the embedding has rows past the
        tokenizer's last id (GLM-4: 151552 rows, 151343 tokens) that stand for no text. `prefill_chunk`: prompt
        tokens per forward of the prefill (default: `self.prefill_chunk`), which bounds its activation memory
        whatever the prompt's length; the logits are those of one forward over the whole prompt. The KV cache
        holds prompt + max_new_tokens slots in `kv_cache_dtype` ("float32" | "bfloat16"; default: bfloat16 past
        memory.LONG_CONTEXT slots on CPU, else the compute dtype), and a cache that cannot fit in the available
        memory is refused before any work (memory.InsufficientMemoryError).
        """
        chunk = self.prefill_chunk if prefill_chunk is None else prefill_chunk
        cache_dtype = self.kv_cache_dtype if kv_cache_dtype is None else kv_cache_dtype
        session = generation.ModelSession(self, chunk, cache_dtype)
        # rank 0 of the command line leads the other ranks' forwards
        led = session if self.tensor_parallel is None else self.tensor_parallel.session(session)
        return generation.generate(
            led,
            input_ids,
            context_length=self.context_length,
            vocab_size=self.config.vocab_size,
            defaults=self.generation_config,
            attention_mask=attention_mask,
            position_ids=position_ids,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            seed=seed,
            streamer=streamer,
            truncate=truncate,
            vocab_limit=vocab_limit,
        )

    @property
    def dtype(self) -> str:
        return self.model.embed_tokens.dtype

    @property
    def quantization(self) -> Quantization | None:
        """How the weights are held quantized, as a checkpoint's config.json records it (the embedding table
        with them or not); None when the Linear weights are not int8 / int4 CPU weights."""
        held = self.model.kernels.weights.quantization if isinstance(self.model.kernels.weights, Packed) else None
        if held is None:
            return None
        return dataclasses.replace(held, embedding=isinstance(self.model.embed_tokens.format, Packed))

    # ---- checkpoints (paddle_glm4.loading) ---------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str,
        dtype: str | None = None,
        fused: bool | None = None,
        storage_only: bool = False,
        quantization: str | None = None,
        group_size: int | None = None,
        activation_dtype: str = "auto",
        max_seq_len: int | None = None,
        check_memory: bool = True,
        tensor_parallel_degree: int = 1,
    ) -> GLM4ForCausalLM:
        """Load a converted checkpoint directory (safetensors only), one tensor at a time into parameters
        created empty.

        On CPU, a bf16 checkpoint stays bf16 and computes with paddle_glm4.kernels (GLM-4-9B: 18.8 GB);
        `dtype="float32"` widens it for Paddle's own float32 path (37.6 GB); `quantization="int8" | "int4"`
        (int4: one scale per `group_size` input rows, default 128) quantizes the Linear weights at load, the
        lm_head included (the embedding stays as stored, norms in float32). A quantized checkpoint (glm4-convert
        --quantize) loads as it is, or dequantized with a float `dtype`. `activation_dtype`: how activations
        enter the kernels' dot products ("float32": exact; "bfloat16" | "int8": rounded, faster; "auto": the
        kernels pick per CPU). On GPU: the stored dtype, quantized through Paddle's weight_only_linear
        (unverified). Before anything is read, the memory the model needs (weights + a KV cache for
        `max_seq_len` tokens, default min(seq_length, 8192)) is compared with what is available; a model that
        cannot fit is refused with the formats that would (memory.InsufficientMemoryError), unless not
        `check_memory`. `storage_only`: hold the weights densely in `dtype` (None: as stored) whatever this
        device computes in (for exporting). `tensor_parallel_degree` N > 1: this process is one of N ranks
        started by `python -m paddle.distributed.launch --nproc_per_node N` and loads only its slice of the
        weights (see tensor_parallel.py); call the model alike on every rank."""
        return loading.from_pretrained(
            cls,
            path,
            dtype,
            fused,
            storage_only,
            quantization,
            group_size,
            activation_dtype,
            max_seq_len,
            check_memory,
            tensor_parallel_degree,
        )

    def save_pretrained(
        self, directory: str, max_shard_size: int | str = "5GB", dtype: str | None = None, overwrite: bool = False
    ) -> list[str]:
        """Write config.json and safetensors weights (sharded above `max_shard_size`) in `dtype`
        (default: the model's); a quantized model's Linear weights as they are (config.json records the
        scheme). Refuses a directory that already holds a checkpoint unless `overwrite`."""
        return loading.save_pretrained(self, directory, max_shard_size, dtype, overwrite)
