"""Text generation: prefill the prompt through the KV cache in chunks, then one token per step.

The loop is written against a small "session" interface so that the dynamic-graph model and the Paddle
Inference predictor share it: `prefill(input_ids, attention_mask, position_ids, capacity)` and
`step(tokens)` each return the next-token logits [b, vocab] (float32). Per step, the only data that
leaves the device is the new token of each row and its log-probability (and nothing grows but the cache).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

import numpy as np
import paddle

from .config import DEFAULT_PREFILL_CHUNK, EOS, TOKEN_ID, GLM4Config
from .sampling import SamplingParams, choose_tokens
from .sequences import Sequences
from .validation import Bool, Int, Number, Object, Optional, check_seed, read_json

if TYPE_CHECKING:
    from .model import GLM4ForCausalLM
    from .streamer import Streamer

# What generate() takes for ids, masks and positions, [batch, length]: a tensor, an array or lists
Batch: TypeAlias = "paddle.Tensor | np.ndarray | Sequence[Sequence[int]]"

GENERATION_CONFIG_NAME = "generation_config.json"
# The fields read (transformers writes others too: max_length, transformers_version, ...); null means unset.
GENERATION_SCHEMA = Object(
    {
        "eos_token_id": Optional(EOS),
        "pad_token_id": Optional(TOKEN_ID),
        "do_sample": Optional(Bool()),
        "temperature": Optional(Number(min=0, max=100)),
        "top_p": Optional(Number(above=0, max=1)),
        "top_k": Optional(Int(0)),
        "repetition_penalty": Optional(Number(above=0, max=100)),
    }
)


def check_prefill_chunk(value: Any, name: str = "prefill_chunk") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer (prompt tokens per prefill forward), got {value!r}")
    return value


def prefill_in_chunks(
    run: Callable[[paddle.Tensor, paddle.Tensor | None, paddle.Tensor | None], paddle.Tensor],
    input_ids: paddle.Tensor,
    attention_mask: paddle.Tensor | None,
    position_ids: paddle.Tensor | None,
    chunk: int,
    progress: Callable[[int, int], None] | None = None,
) -> paddle.Tensor:
    """Feed the prompt [b, n] to `run(ids, mask, positions)` (a forward through the cache returning the last
    token's logits) `chunk` tokens at a time; the last chunk's logits [b, vocab]. The cache's Sequences count
    positions and padding across chunks, so the result is the one-shot prefill's. `progress(done, n)` is called
    before the first chunk and after each."""
    length = input_ids.shape[1]
    logits = None
    if progress is not None:
        progress(0, length)
    for begin in range(0, length, chunk):
        end = min(begin + chunk, length)
        logits = run(
            input_ids[:, begin:end],
            None if attention_mask is None else attention_mask[:, begin:end],
            None if position_ids is None else position_ids[:, begin:end],
        )
        if progress is not None:
            progress(end, length)
    assert logits is not None, "the prompt is not empty"
    return logits


class Session(Protocol):
    def prefill(
        self,
        input_ids: paddle.Tensor,
        attention_mask: paddle.Tensor | None,
        position_ids: paddle.Tensor | None,
        capacity: int,
        progress: Callable[[int, int], None] | None = None,
    ) -> paddle.Tensor: ...

    def step(self, tokens: paddle.Tensor) -> paddle.Tensor: ...


@dataclass
class GenerationConfig:
    """Settings for generation: a checkpoint's defaults (`generation_config.json`), and, merged over them by
    `merged`, those of one call of `generate`."""

    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0

    @classmethod
    def from_model(cls, config: GLM4Config, directory: str | None = None) -> GenerationConfig:
        values: dict[str, Any] = {"eos_token_id": list(config.eos_token_id), "pad_token_id": config.pad_token_id}
        path = os.path.join(directory, GENERATION_CONFIG_NAME) if directory else None
        if path and os.path.lexists(path):
            data = read_json(path, GENERATION_SCHEMA)
            for key in cls.__dataclass_fields__:
                if data.get(key) is not None:
                    values[key] = data[key]
            if isinstance(values["eos_token_id"], int):
                values["eos_token_id"] = [values["eos_token_id"]]
        return cls(**values)

    def merged(
        self,
        *,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        repetition_penalty: float | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
    ) -> GenerationConfig:
        """The settings of one generation: each value given (None: not set) over this config's, the checkpoint's.

        The one rule every entry point (generate, the CLI, the server, the PaddleNLP adapter) follows. Sampling is
        on when asked for (do_sample=True); when do_sample is not set, when the checkpoint samples or when a
        sampling parameter (temperature, top_p, top_k) is given, unless the temperature is 0 (greedy, as OpenAI's
        API has it). Greedy settings carry neutral sampling parameters (temperature 1, top_p 1, top_k 0).
        """
        asks_to_sample = any(value is not None for value in (temperature, top_p, top_k))
        temperature = self.temperature if temperature is None else temperature
        if do_sample is None:
            do_sample = (self.do_sample or asks_to_sample) and temperature != 0
        eos = self.eos_token_id if eos_token_id is None else eos_token_id
        settings = GenerationConfig(
            eos_token_id=[eos] if isinstance(eos, int) else list(eos),
            pad_token_id=self.pad_token_id if pad_token_id is None else pad_token_id,
            do_sample=bool(do_sample),
            repetition_penalty=self.repetition_penalty if repetition_penalty is None else repetition_penalty,
        )
        if do_sample:
            settings.temperature = temperature
            settings.top_p = self.top_p if top_p is None else top_p
            settings.top_k = self.top_k if top_k is None else top_k
        return settings

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(self.do_sample, self.temperature, self.top_k, self.top_p, self.repetition_penalty)

    def save_pretrained(self, directory: str) -> str:
        from .checkpoint import write_text_atomic

        path = os.path.join(directory, GENERATION_CONFIG_NAME)
        write_text_atomic(path, json.dumps(dataclasses.asdict(self), indent=2) + "\n")
        return path


class ModelSession:
    """A Session over the dynamic-graph GLM4ForCausalLM and the Sequences of one generation (which decide slots
    and positions, see sequences.py)."""

    def __init__(
        self, model: GLM4ForCausalLM, prefill_chunk: int = DEFAULT_PREFILL_CHUNK, kv_cache_dtype: str | None = None
    ):
        self.model = model
        self.prefill_chunk = check_prefill_chunk(prefill_chunk)
        self.kv_cache_dtype = kv_cache_dtype  # None: memory.cache_dtype's choice
        self.sequences: Sequences | None = None

    def prefill(
        self,
        input_ids: paddle.Tensor,
        attention_mask: paddle.Tensor | None,
        position_ids: paddle.Tensor | None,
        capacity: int,
        progress: Callable[[int, int], None] | None = None,
    ) -> paddle.Tensor:
        from . import memory

        batch = input_ids.shape[0]
        # the cache holds the prompt and the new tokens, no more; checked before it is allocated
        dtype = self.model.cache_dtype(capacity, self.kv_cache_dtype)
        memory.check_cache_fits(self.model.config, batch, capacity, dtype)
        self.sequences = Sequences(batch, capacity, self.model.model.new_cache(batch, capacity, dtype))
        return prefill_in_chunks(self._run, input_ids, attention_mask, position_ids, self.prefill_chunk, progress)

    def step(self, tokens: paddle.Tensor) -> paddle.Tensor:
        return self._run(tokens.unsqueeze(-1), None, None)

    def _run(
        self, input_ids: paddle.Tensor, attention_mask: paddle.Tensor | None, position_ids: paddle.Tensor | None
    ) -> paddle.Tensor:
        return self.model(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=self.sequences,
            logits_to_keep=1,
        ).logits[:, -1]  # [b, vocab]


def _as_ids(value, name: str) -> paddle.Tensor:
    tensor = value if isinstance(value, paddle.Tensor) else paddle.to_tensor(np.asarray(value, dtype="int64"))
    if tensor.ndim == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 2:
        raise ValueError(f"{name} must be [batch, length], got shape {list(tensor.shape)}")
    return tensor.astype("int64")


@paddle.no_grad()
def generate(
    session: Session,
    input_ids: Batch,
    *,
    context_length: int,
    vocab_size: int,
    defaults: GenerationConfig,
    attention_mask: Batch | None = None,
    position_ids: Batch | None = None,
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
    truncate: bool = False,
    vocab_limit: int | None = None,
) -> tuple[paddle.Tensor, paddle.Tensor]:
    """Generate up to `max_new_tokens` after each (left-padded) prompt; see GLM4ForCausalLM.generate.

    `context_length`: the most tokens (prompt + new) the engine takes. Settings left None come from `defaults`
    (the checkpoint's generation_config.json) by GenerationConfig.merged.
    """
    settings = defaults.merged(
        do_sample=do_sample,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    params = settings.sampling_params()
    if vocab_limit is not None and (
        isinstance(vocab_limit, bool) or not isinstance(vocab_limit, int) or not 0 < vocab_limit <= vocab_size
    ):
        raise ValueError(f"vocab_limit must be an int in 1..{vocab_size} (the tokenizer's len()), got {vocab_limit!r}")
    input_ids = _as_ids(input_ids, "input_ids")
    attention_mask = _as_ids(attention_mask, "attention_mask") if attention_mask is not None else None
    position_ids = _as_ids(position_ids, "position_ids") if position_ids is not None else None
    batch, prompt_len = input_ids.shape
    if attention_mask is not None and list(attention_mask.shape) != [batch, prompt_len]:
        raise ValueError(f"attention_mask has shape {list(attention_mask.shape)}, input_ids {[batch, prompt_len]}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if prompt_len == 0:
        raise ValueError("the prompt is empty")
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"token id {low if low < 0 else high} is outside the model's vocabulary [0, {vocab_size})")
    if prompt_len + max_new_tokens > context_length:
        keep = context_length - max_new_tokens
        if not truncate or keep < 1:
            raise ValueError(
                f"the prompt ({prompt_len} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the model's "
                f"context of {context_length} tokens; shorten the prompt, lower max_new_tokens, or ask for truncation "
                "(--truncate on the command line, truncate=True in Python, keeps the end of the prompt)"
            )
        input_ids = input_ids[:, -keep:]
        attention_mask = attention_mask[:, -keep:] if attention_mask is not None else None
        position_ids = None  # positions are recounted from the kept tokens
        prompt_len = keep

    check_seed(seed)
    rng_state = paddle.get_rng_state() if params.do_sample else None
    if params.do_sample and seed is not None:
        paddle.seed(seed)
    try:
        return _decode_loop(
            session,
            input_ids,
            attention_mask,
            position_ids,
            prompt_len + max_new_tokens,
            max_new_tokens,
            params,
            settings.eos_token_id,
            settings.pad_token_id,
            vocab_size,
            streamer,
            vocab_limit,
        )
    finally:
        if rng_state is not None:
            paddle.set_rng_state(rng_state)  # leave the caller's random stream as it was


def _decode_loop(
    session,
    input_ids,
    attention_mask,
    position_ids,
    capacity,
    max_new_tokens,
    params,
    eos,
    pad,
    vocab_size,
    streamer,
    vocab_limit,
):
    batch = input_ids.shape[0]
    # The embedding's rows past the tokenizer's last id (GLM-4: 151552 rows, 151343 tokens) stand for no text;
    # -inf makes them impossible for greedy and sampling alike.
    no_token = None
    if vocab_limit is not None and vocab_limit < vocab_size:
        no_token = paddle.concat(
            [
                paddle.zeros([vocab_limit], dtype="float32"),
                paddle.full([vocab_size - vocab_limit], float("-inf"), dtype="float32"),
            ]
        )
    seen = None
    if params.repetition_penalty != 1.0:
        # how often each row already holds each token (padding excluded): [b, vocab]
        real = (
            paddle.ones_like(input_ids, dtype="float32") if attention_mask is None else attention_mask.astype("float32")
        )
        seen = paddle.put_along_axis(
            paddle.zeros([batch, vocab_size], dtype="float32"), input_ids, real, axis=1, reduce="add"
        )
    # What each row chose so far, on the host, where every step's tokens come anyway: which rows chose an eos id,
    # and their scores (float32 additions, as on the device, without an op per step)
    finished = np.zeros([batch], dtype=bool)
    eos_host = np.asarray(eos, dtype=np.int64)
    scores = np.zeros([batch], dtype=np.float32)
    chosen = []

    logits = session.prefill(
        input_ids, attention_mask, position_ids, capacity, getattr(streamer, "prefill_progress", None)
    )
    for step in range(max_new_tokens):
        if no_token is not None:
            logits = logits + no_token
        tokens, log_probs = choose_tokens(logits, params, seen)
        tokens_host, log_probs_host = tokens.numpy(), log_probs.numpy()  # the step's copies: [b] each
        if finished.any():  # finished rows get the pad id and add nothing
            tokens_host = np.where(finished, pad, tokens_host)
            log_probs_host = np.where(finished, np.float32(0), log_probs_host)
            tokens = paddle.to_tensor(tokens_host)
        scores += log_probs_host
        chosen.append(tokens_host)
        finished |= (tokens_host[:, None] == eos_host).any(axis=1)  # np.isin took 12 us
        if streamer is not None:
            streamer.put(tokens_host)
        if finished.all() or step == max_new_tokens - 1 or getattr(streamer, "cancelled", False):
            break
        if seen is not None:
            seen = paddle.put_along_axis(seen, tokens.unsqueeze(-1), paddle.ones([batch, 1]), axis=1)
        logits = session.step(tokens)
    if streamer is not None:
        streamer.end()
    return paddle.to_tensor(np.stack(chosen, axis=1)), paddle.to_tensor(scores[:, None])
