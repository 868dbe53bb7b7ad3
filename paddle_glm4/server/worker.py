"""Running generations for the server: many at once through the continuous-batching engine (scheduler.py).

Paddle's dynamic-graph model must not run from several threads at once, and the event loop must never wait
for it. So one engine thread runs every step of the Scheduler: each step decodes one token for all running
requests in one batched forward, and lets new ones join. Each token goes from there to the request's asyncio
queue (`loop.call_soon_threadsafe`), which the request's handler reads without blocking the loop. Both engines
batch (the dynamic model's `logits`, the Paddle Inference predictor's over its exported program); a model split
over ranks (whose other ranks follow generate's forwards only) and an engine with `generate` only (a test
double) run `generate` one request at a time on that thread instead, in arrival order.

At most `max_concurrency` requests are admitted at a time, running and waiting together; one more is refused
with Busy (the server answers 429) rather than queued without bound. Of those, at most `max_num_seqs` run in
the batch; the others wait for a row, or for KV memory (`kv_cache_memory`). A request whose client went away is
cancelled: it leaves the batch after the current step, or never starts if it was still waiting. A request whose
generation raises fails alone (500); the others go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from ..scheduler import Request, Scheduler
from ..streamer import Streamer
from .errors import INTERNAL_ERROR, APIError

if TYPE_CHECKING:
    import numpy as np

    from ..engine import Engine

log = logging.getLogger("paddle_glm4.server")

_END = object()


class Busy(Exception):
    """All slots are taken."""


class Job(Streamer):
    """One admitted generation; the engine feeds it tokens, the request's handler iterates `receive()`.
    It ends once (`end`, or `fail` with the error), which frees its admission slot."""

    def __init__(self, loop: asyncio.AbstractEventLoop, prompt: list[int], settings: dict, release: Callable[[], None]):
        super().__init__()
        self.prompt, self.settings = prompt, settings
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self._release = release
        self._over = threading.Lock()
        self._admitted = time.perf_counter()
        self.on_token_timed: Callable[[float, float | None], None] | None = None  # (admitted, previous token)

    def put(self, token_ids: np.ndarray) -> None:
        previous = self.last_token_time
        super().put(token_ids)
        if self.on_token_timed is not None:
            self.on_token_timed(self._admitted, previous)

    def on_tokens(self, token_ids: np.ndarray) -> None:
        self.post(int(token_ids[0]))

    def on_end(self) -> None:
        self._close(_END)

    def fail(self, error: BaseException) -> None:
        self._close(APIError(500, INTERNAL_ERROR, code="generation_failed"))

    def _close(self, outcome: object) -> None:
        if not self._over.acquire(blocking=False):
            return  # already ended
        # Free the slot before the handler hears of the end, so that a client which sends its next request
        # as soon as it has this answer finds the slot free.
        self._release()
        if outcome is _END and self.first_token_time is not None:
            waited = self.first_token_time - self._admitted
            log.info(
                "prompt of %d tokens: time to first token %.2f s (%.1f prompt tokens/s), %d tokens",
                len(self.prompt),
                waited,
                len(self.prompt) / max(waited, 1e-9),
                self.tokens,
            )
        self.post(outcome)

    def post(self, item: object) -> None:
        """Hand a token (int), the end or an exception to the handler (from the engine thread)."""
        with contextlib.suppress(RuntimeError):  # a closed event loop: the server is shutting down, nobody listens
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    async def receive(self) -> AsyncIterator[int]:
        """The generated token ids as they come; raises APIError (500) if the generation failed."""
        while (item := await self._queue.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item


class Worker:
    def __init__(self, model: Engine, max_concurrency: int, max_num_seqs: int = 8, kv_cache_memory: int | None = None):
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        self.model = model
        self._slots = threading.BoundedSemaphore(max_concurrency)
        self._jobs: set[Job] = set()  # admitted and not over
        self._lock = threading.Lock()
        self.engine: Scheduler | None = None
        self._closing = False
        self.on_token: Callable[[float, float | None], None] | None = None  # each token's timing (metrics)
        # a split model's other ranks run generate's forwards only (tensor_parallel.lead): one request at a time
        if hasattr(model, "logits") and getattr(model, "tensor_parallel", None) is None:
            self.engine = Scheduler(model, max_num_seqs, kv_cache_memory)
            self._thread = threading.Thread(target=self._serve, name="engine", daemon=True)
            self._thread.start()
        else:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")

    def submit(self, prompt: list[int], **settings: Any) -> Job:
        """Admit a generation of `prompt` with `settings` (generate's keyword arguments), or raise Busy
        (or ValueError: a request the engine can never hold)."""
        if not self._slots.acquire(blocking=False):
            raise Busy()
        job: Job = Job(asyncio.get_running_loop(), prompt, settings, lambda: self._done(job))
        job.on_token_timed = self.on_token
        with self._lock:
            self._jobs.add(job)
        try:
            if self.engine is not None:
                self.engine.submit(self._request(job))
            else:
                self._executor.submit(self._run_alone, job)
        except BaseException:
            self._done(job)
            raise
        return job

    def admitted(self) -> int:
        with self._lock:
            return len(self._jobs)

    def _done(self, job: Job) -> None:
        with self._lock:
            self._jobs.discard(job)
        self._slots.release()

    def _request(self, job: Job) -> Request:
        options = dict(job.settings)
        generation = self.model.generation_config.merged(
            temperature=options.pop("temperature", None),
            top_p=options.pop("top_p", None),
            top_k=options.pop("top_k", None),
            repetition_penalty=options.pop("repetition_penalty", None),
            eos_token_id=options.pop("eos_token_id", None),
        )
        return Request(
            job.prompt,
            options.pop("max_new_tokens"),
            generation,
            seed=options.pop("seed", None),
            vocab_limit=options.pop("vocab_limit", None),
            streamer=job,
            **options,
        )

    def _serve(self) -> None:
        """The engine thread: step while there is work, sleep while there is none."""
        assert self.engine is not None
        while True:
            with self.engine.wakeup:
                while not self.engine.busy and not self._closing:
                    self.engine.wakeup.wait()
                if not self.engine.busy:
                    return
            try:
                self.engine.step()
            except Exception as error:
                log.exception("the engine failed")
                self.engine.abort(error)

    def _run_alone(self, job: Job) -> None:
        try:
            if not job.cancelled:
                self.model.generate([job.prompt], streamer=job, **job.settings)
        except Exception as error:
            log.exception("generation failed")
            job.fail(error)
        finally:
            job.on_end()

    def close(self) -> None:
        """Stop the running generations, drop the waiting ones, and wait for the engine thread."""
        with self._lock:
            jobs = list(self._jobs)
        for job in jobs:
            job.cancel()
        if self.engine is not None:
            with self.engine.wakeup:
                self._closing = True
                self.engine.wakeup.notify()
            self._thread.join()
        else:
            self._executor.shutdown(wait=True, cancel_futures=True)
