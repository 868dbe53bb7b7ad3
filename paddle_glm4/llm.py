"""Offline batch generation in the style of vLLM's `LLM.generate(prompts, sampling_params)`.

    llm = LLM.load("checkpoint_dir")
    outputs = llm.generate(["Hello", "Tell me a story"], [Options(max_tokens=32), Options(temperature=0.8, seed=1)])
    outputs[1].text, outputs[1].token_ids, outputs[1].finish_reason

Every prompt goes through the continuous-batching engine (scheduler.py) together with the others: up to
`max_num_seqs` at once, each with its own length, stop ids and strings, max_tokens, sampling parameters and
seed, and each gets what it would get alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .scheduler import Request, Scheduler
from .streamer import Streamer

if TYPE_CHECKING:
    import numpy as np

    from .engine import Engine
    from .tokenizer import GLM4Tokenizer


@dataclass(frozen=True)
class Options:
    """One prompt's settings; those left None come from the checkpoint's generation_config
    (GenerationConfig.merged: a temperature, top_p or top_k asks for sampling, temperature 0 is greedy)."""

    max_tokens: int = 16
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()  # the text ends before the first of these


@dataclass
class Output:
    prompt_token_ids: list[int]
    token_ids: list[int]  # as generated (a stop string may end the text inside the last ones)
    text: str
    finish_reason: str  # "stop" (a stop id or string) or "length" (max_tokens)


class _Text(Streamer):
    """Detokenizes one sequence as it is generated and cancels it at a stop string."""

    def __init__(self, tokenizer: GLM4Tokenizer, stop: Sequence[str]):
        super().__init__()
        self._detokenizer = tokenizer.detokenizer(skip_special_tokens=True)
        self._stops = [s for s in stop if s]
        self._hold = max(map(len, self._stops), default=1) - 1
        self.text = ""
        self.stopped = False

    def on_tokens(self, token_ids: np.ndarray) -> None:
        self._add(self._detokenizer.push(int(token_ids[0])))

    def on_end(self) -> None:
        if not self.stopped:
            self._add(self._detokenizer.flush())

    def _add(self, piece: str) -> None:
        start = max(len(self.text) - self._hold, 0)  # the earliest a stop string ending in `piece` can start
        self.text += piece
        hits = [i for i in (self.text.find(stop, start) for stop in self._stops) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
            self.cancel()


class LLM:
    def __init__(
        self,
        model: Engine,
        tokenizer: GLM4Tokenizer,
        max_num_seqs: int = 8,
        kv_cache_memory: int | None = None,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.engine = Scheduler(model, max_num_seqs, kv_cache_memory)

    @classmethod
    def load(
        cls,
        model_dir: str,
        tokenizer_dir: str | None = None,
        max_num_seqs: int = 8,
        kv_cache_memory: int | None = None,
        **load_options: Any,
    ) -> LLM:
        """A checkpoint directory (and its tokenizer) through engine.load_engine; `load_options`: its dtype,
        quantization, group_size, activation_dtype; engine="inference" for a Paddle Inference export directory."""
        from .engine import load_engine

        model, tokenizer = load_engine(model_dir, tokenizer_dir=tokenizer_dir, **load_options)
        return cls(model, tokenizer, max_num_seqs, kv_cache_memory)

    def generate(
        self, prompts: Sequence[str | Sequence[int]], options: Options | Sequence[Options] | None = None
    ) -> list[Output]:
        """Generate after every prompt (text, or token ids), all together; one Options for all, or one each.
        A request that fails raises its error once all are done."""
        each = [options or Options()] * len(prompts) if not isinstance(options, Sequence) else list(options)
        if len(each) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(each)} options")
        eos = self.model.generation_config.eos_token_id or [self.tokenizer.eos_token_id]
        requests = []
        for prompt, option in zip(prompts, each, strict=True):
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
            settings = self.model.generation_config.merged(
                temperature=option.temperature,
                top_p=option.top_p,
                top_k=option.top_k,
                repetition_penalty=option.repetition_penalty,
                eos_token_id=eos,
            )
            requests.append(
                Request(
                    ids,
                    option.max_tokens,
                    settings,
                    option.seed,
                    vocab_limit=len(self.tokenizer),
                    streamer=_Text(self.tokenizer, option.stop),
                )
            )
        self.engine.run(requests)
        for request in requests:
            if request.error is not None:
                raise request.error
        return [self._output(request) for request in requests]

    @staticmethod
    def _output(request: Request) -> Output:
        text = request.streamer
        assert isinstance(text, _Text)
        stopped = text.stopped or (bool(request.output) and request.output[-1] in request.settings.eos_token_id)
        return Output(request.prompt, request.output, text.text, "stop" if stopped else "length")
