"""Continuous batching: one engine owns generation for many requests at once.

The scheduler keeps a running batch. Each `step()`:
  1. admits waiting requests while there is a free row (`max_num_seqs`) and KV memory for them;
  2. prefills up to `prefill_chunk` prompt tokens, from the oldest admitted prompts on, each prompt in a cache
     and a forward of its own: several short prompts in one step (so that a burst of requests all get their
     first token before the next decode step), a long one a chunk per step (so that it delays the running
     streams by one chunk per step, not by its whole length); a prompt whose last chunk is done draws its
     first token and joins the batch at this token boundary;
  3. decodes one token for every running sequence in ONE batched forward (`GLM4ForCausalLM.logits`, or the
     Paddle Inference predictor's `logits`, which runs the exported program that traces it);
  4. drops the sequences that finished (a stop id, max_tokens) or were cancelled; their row is reused.

Layout of the batch cache: row r holds sequence r's keys and values, right-aligned at the shared write slot
`length` (the model's forward writes every row at the same slot); the slots before a row's first token are
marked invalid in key_valid, exactly as a left-padded prompt's padding is (see sequences.py), and each row has
its own positions. When `length` reaches the capacity, all rows shift left by the room every row leaves; when a
prompt longer than `length` joins, the rows shift right. Both are copies, rare next to the steps.

Batch-invariance: a sequence's prompt is prefilled alone, its decode reads only its own row's valid slots, and
it samples with its own numpy Generator (seeded by its `seed`, see sampling.choose_token): so what a request
gets does not depend on who else is in the batch (greedy: the same tokens as alone; seeded sampling: the same
draws as alone). A seeded draw here is not the same stream as `generate(seed=...)`, which uses paddle's.

KV memory: the cache holds (running rows) x (the longest prompt + max_tokens among them) slots, allocated when
needed and released when the batch empties. A request is admitted only if that bound, with it, stays within
`kv_cache_memory` bytes (default: max_num_seqs full contexts, at most half the memory available now); otherwise
it waits. One that could never fit is refused when submitted (ValueError).

Faults: a request whose prefill, sampling or streamer raises fails alone (its streamer's `fail(error)` is
called, if it has one); a failing batched forward fails the rows in it, and the engine goes on.
"""

from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import paddle

from .generation import DEFAULT_PREFILL_CHUNK, GenerationConfig, check_prefill_chunk
from .kv_cache import KVCache
from .memory import check_cache_fits, kv_bytes_per_token, kv_pool_bytes
from .sampling import choose_token
from .sequences import Sequences
from .streamer import Streamer

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger("paddle_glm4.scheduler")


@dataclass
class Request:
    """One generation: `prompt` ids, at most `max_tokens` new ones, `settings` (GenerationConfig.merged: stop ids,
    sampling parameters), `seed` for its own random generator, ids from `vocab_limit` on never generated. Its
    new tokens go to `streamer` (put / end; it stops early when the streamer is cancelled) and to `output`."""

    prompt: list[int]
    max_tokens: int
    settings: GenerationConfig
    seed: int | None = None
    vocab_limit: int | None = None
    streamer: Streamer | None = None
    prefill_chunk: int | None = None  # at most this many prompt tokens per forward (within the engine's)
    output: list[int] = field(default_factory=list)
    error: BaseException | None = None
    # engine state
    rng: np.random.Generator = field(init=False)
    prefill: Sequences | None = field(default=None, init=False, repr=False)
    prefilled: int = field(default=0, init=False)

    def __post_init__(self):
        self.rng = np.random.default_rng(self.seed)
        self.params = self.settings.sampling_params()

    @property
    def need(self) -> int:
        """The cache slots this sequence can ever fill."""
        return len(self.prompt) + self.max_tokens

    @property
    def cancelled(self) -> bool:
        return self.streamer is not None and self.streamer.cancelled


class BatchCache(KVCache):
    """A KVCache whose first `rows` rows are the running batch: the forward writes and reads only those."""

    def __init__(self, cache: KVCache):
        vars(self).update(vars(cache))  # the buffers of the engine's cache (its new_cache: a rank holds its share)
        self.rows = 0

    def update(self, layer: int, start: int, k: paddle.Tensor, v: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        end = start + k.shape[1]
        self.keys[layer][: self.rows, start:end] = k
        self.values[layer][: self.rows, start:end] = v
        return self.keys[layer][: self.rows, :end], self.values[layer][: self.rows, :end]

    def move(self, source: slice, target_start: int, rows: slice) -> None:
        """Copy the slots `source` of `rows` to start at `target_start` (the ranges may overlap)."""
        for cache in (self.keys, self.values):
            for layer in range(self.num_layers):
                block = cache[layer][rows, source].clone()
                cache[layer][rows, target_start : target_start + block.shape[1]] = block


class Scheduler:
    """The engine: `submit` requests (from any thread), `step()` them (from one thread), or `run(requests)`."""

    def __init__(
        self,
        model: Engine,
        max_num_seqs: int = 8,
        kv_cache_memory: int | None = None,
        prefill_chunk: int | None = None,
    ):
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {max_num_seqs}")
        self.prefill_chunk = check_prefill_chunk(
            getattr(model, "prefill_chunk", DEFAULT_PREFILL_CHUNK) if prefill_chunk is None else prefill_chunk
        )
        # one dtype for the prompts' caches and the batch's, so that a joined row holds what it held alone
        self.cache_dtype = model.cache_dtype(model.context_length)
        self.bytes_per_token = kv_bytes_per_token(model.config, self.cache_dtype)
        if kv_cache_memory is None:
            kv_cache_memory = kv_pool_bytes(model.config, self.cache_dtype, max_num_seqs, model.context_length)
        self.model = model
        self.max_num_seqs = max_num_seqs
        self.kv_cache_tokens = kv_cache_memory // self.bytes_per_token  # the pool, in cache slots
        self.waiting: collections.deque[Request] = collections.deque()
        self.prefilling: list[Request] = []
        self.running: list[Request] = []
        self.cache: BatchCache | None = None
        self.length = 0  # the shared write slot: every row's tokens end here
        self.first_slot: list[int] = []  # per running row: its first real slot
        self._lock = threading.Lock()
        self.wakeup = threading.Condition(self._lock)

    # ---- requests ------------------------------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        if request.max_tokens < 1 or not request.prompt:
            raise ValueError("a request needs a non-empty prompt and max_tokens >= 1")
        if request.prefill_chunk is not None:
            check_prefill_chunk(request.prefill_chunk)
        if request.need > self.model.context_length:
            raise ValueError(
                f"the prompt ({len(request.prompt)} tokens) plus max_tokens ({request.max_tokens}) "
                f"exceeds the model's context of {self.model.context_length} tokens"
            )
        if request.need > self.kv_cache_tokens:
            raise ValueError(
                f"the prompt plus max_tokens ({request.need} tokens) exceeds the KV cache pool of "
                f"{self.kv_cache_tokens} tokens (--kv-cache-memory)"
            )
        with self.wakeup:
            self.waiting.append(request)
            self.wakeup.notify()

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    @property
    def kv_bytes(self) -> int:
        """The KV cache memory held now."""
        if self.cache is None:
            return 0
        return sum(int(t.numel()) * t.element_size() for t in (*self.cache.keys, *self.cache.values))

    def run(self, requests: list[Request]) -> list[Request]:
        """Generate all of `requests` together (the offline batch call); each gets its `output` (or `error`)."""
        for request in requests:
            self.submit(request)
        while self.busy:
            self.step()
        return requests

    # ---- one step ------------------------------------------------------------------------------------------
    @paddle.no_grad()
    def step(self) -> None:
        self._admit()
        self._drop_cancelled()
        budget = self.prefill_chunk  # prompt tokens this step, from the oldest prompts on
        for request in list(self.prefilling):
            budget -= self._prefill_chunk(request, budget)
            if budget <= 0:
                break
        if self.running:
            self._decode()
        if not self.busy:
            self.cache, self.length, self.first_slot = None, 0, []  # idle: give the memory back

    def abort(self, error: BaseException) -> None:
        """Fail every request (the engine itself broke) and start afresh."""
        with self._lock:
            requests = [*self.waiting, *self.prefilling, *self.running]
            self.waiting.clear()
        self.prefilling, self.running = [], []
        self.cache, self.length, self.first_slot = None, 0, []
        for request in requests:
            self._fail(request, error)

    def _admitted(self) -> list[Request]:
        return self.prefilling + self.running

    def _admit(self) -> None:
        with self._lock:
            while self.waiting and len(self._admitted()) < self.max_num_seqs:
                request = self.waiting[0]
                admitted = [*self._admitted(), request]
                if len(admitted) * max(r.need for r in admitted) > self.kv_cache_tokens:
                    break  # waits (in order) until sequences leave
                self.prefilling.append(self.waiting.popleft())

    def _drop_cancelled(self) -> None:
        with self._lock:
            gone = [r for r in self.waiting if r.cancelled]
            for request in gone:
                self.waiting.remove(request)
        for request in gone:
            self._finish(request)
        for request in [r for r in self.prefilling if r.cancelled]:
            self.prefilling.remove(request)
            self._finish(request)
        for row in reversed(range(len(self.running))):
            if self.running[row].cancelled:
                self._finish(self.running[row])
                self._leave(row)

    def _prefill_chunk(self, request: Request, budget: int) -> int:
        """Prefill `request`'s next chunk (at most `budget` tokens); the tokens it took."""
        taken = 0
        try:
            if request.prefill is None:
                cache = self.model.new_cache(1, len(request.prompt), self.cache_dtype)
                request.prefill = Sequences(1, len(request.prompt), cache)
                if request.streamer is not None:
                    request.streamer.prefill_progress(0, len(request.prompt))
            prompt = request.prefill
            assert prompt.cache is not None
            end = min(request.prefilled + min(request.prefill_chunk or budget, budget), len(request.prompt))
            ids = paddle.to_tensor([request.prompt[request.prefilled : end]], dtype="int64")
            taken = end - request.prefilled
            step = prompt.claim(ids.shape[1])
            logits = self.model.logits(ids, step.positions, step.start, step.key_valid, prompt.cache, 1)[:, -1]
            request.prefilled = end
            if request.streamer is not None:
                request.streamer.prefill_progress(end, len(request.prompt))
            if end == len(request.prompt):
                self.prefilling.remove(request)
                if self._emit(request, logits):
                    self._join(request)
        except Exception as error:  # noqa: BLE001 - this request fails, the others go on
            if request in self.prefilling:
                self.prefilling.remove(request)
            self._fail(request, error)
        return taken

    def _join(self, request: Request) -> None:
        """Copy the prefilled prompt into a new row of the batch cache, right-aligned at `length`."""
        prompt = request.prefill
        size = len(request.prompt)
        rows = len(self.running)
        capacity = max(r.need for r in [*self.running, request])
        if self.cache is None or self.cache.batch_size < rows + 1 or self.cache.capacity < capacity:
            self._reallocate(
                max(rows + 1, self.cache.batch_size if self.cache else 0),
                max(capacity, self.cache.capacity if self.cache else 0),
            )
        assert self.cache is not None and prompt is not None and prompt.cache is not None
        if size > self.length:  # the rows move right so that the new one fits before the write slot
            shift = size - self.length
            self.cache.move(slice(0, self.length), shift, slice(0, rows))
            self.first_slot = [slot + shift for slot in self.first_slot]
            self.length = size
        for target, source in ((self.cache.keys, prompt.cache.keys), (self.cache.values, prompt.cache.values)):
            for layer in range(self.cache.num_layers):
                target[layer][rows, self.length - size : self.length] = source[layer][0, :size]
        self.first_slot.append(self.length - size)
        self.running.append(request)
        request.prefill = None
        self.cache.rows = len(self.running)

    def _reallocate(self, rows: int, capacity: int) -> None:
        # within the pool, but the machine's free memory may have shrunk since: a clear error for the request
        # that joins (it fails alone) rather than the process killed for want of memory
        check_cache_fits(self.model.config, rows, capacity, self.cache_dtype)
        old = self.cache
        self.cache = BatchCache(self.model.new_cache(rows, capacity, self.cache_dtype))
        if old is not None and self.length:
            for target, source in ((self.cache.keys, old.keys), (self.cache.values, old.values)):
                for layer in range(old.num_layers):
                    target[layer][: old.batch_size, : self.length] = source[layer][:, : self.length]

    def _decode(self) -> None:
        assert self.cache is not None
        if self.length == self.cache.capacity:  # no slot left: shift every row left by the room all of them leave
            shift = min(self.first_slot)
            self.cache.move(slice(shift, self.length), 0, slice(0, len(self.running)))
            self.first_slot = [slot - shift for slot in self.first_slot]
            self.length -= shift
        rows = len(self.running)
        tokens = paddle.to_tensor([[r.output[-1]] for r in self.running], dtype="int64")  # [n, 1]
        positions = paddle.to_tensor([[len(r.prompt) + len(r.output) - 1] for r in self.running], dtype="int64")
        slots = np.arange(self.length + 1)
        key_valid = paddle.to_tensor(slots[None, :] >= np.asarray(self.first_slot)[:, None])  # [n, L]
        try:
            logits = self.model.logits(tokens, positions, self.length, key_valid, self.cache, 1)[:, -1]
        except Exception as error:  # noqa: BLE001 - no telling which row broke it: all of them fail
            for row in reversed(range(rows)):
                self._fail(self.running[row], error)
                self._leave(row)
            return
        self.length += 1
        staying = [self._emit(request, logits[row : row + 1]) for row, request in enumerate(self.running)]
        for row in reversed(range(rows)):
            if not staying[row]:
                self._leave(row)

    def _emit(self, request: Request, logits: paddle.Tensor) -> bool:
        """Choose `request`'s next token from its logits [1, vocab] and hand it on; whether it goes on."""
        try:
            if request.vocab_limit is not None and request.vocab_limit < logits.shape[-1]:
                logits = logits.clone()
                logits[:, request.vocab_limit :] = float("-inf")
            token = choose_token(logits, request.params, request.prompt + request.output, request.rng)
            request.output.append(token)
            if request.streamer is not None:
                request.streamer.put(np.asarray([token]))
        except Exception as error:  # noqa: BLE001 - this request fails, the others go on
            self._fail(request, error)
            return False
        done = token in request.settings.eos_token_id or len(request.output) >= request.max_tokens
        if done or request.cancelled:
            self._finish(request)
            return False
        return True

    def _leave(self, row: int) -> None:
        """Remove running row `row`: the last row moves into its place, so that rows 0..n-1 stay the batch."""
        last = len(self.running) - 1
        assert self.cache is not None
        if row != last:
            for cache in (self.cache.keys, self.cache.values):
                for layer in range(self.cache.num_layers):
                    cache[layer][row, : self.length] = cache[layer][last, : self.length]
            self.running[row], self.first_slot[row] = self.running[last], self.first_slot[last]
        self.running.pop()
        self.first_slot.pop()
        self.cache.rows = len(self.running)

    def _finish(self, request: Request) -> None:
        if request.streamer is not None:
            request.streamer.end()

    def _fail(self, request: Request, error: BaseException) -> None:
        log.error("generation failed", exc_info=error)
        request.error = error
        fail = getattr(request.streamer, "fail", None)
        if fail is not None:
            fail(error)
