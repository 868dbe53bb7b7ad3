"""Running `generate` for the server: one request at a time, on one thread, with a bounded number admitted.

Paddle's dynamic-graph model must not run from several threads at once, and the event loop must never wait
for it. So every generation runs on a single worker thread, in the order the requests came; each token goes
from there to the request's asyncio queue (`loop.call_soon_threadsafe`), which the request's handler reads
without blocking the loop.

At most `max_concurrency` requests are admitted at a time, the running one and the waiting ones together; one
more is refused with Busy (the server answers 429) rather than queued without bound. A request whose client
went away is cancelled: it stops after its current step, or never starts if it was still waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

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
    """One admitted generation; `generate` feeds it tokens, the request's handler iterates `receive()`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, prompt: list[int], settings: dict):
        super().__init__()
        self.prompt, self.settings = prompt, settings
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()

    def on_tokens(self, token_ids: np.ndarray) -> None:
        self.post(int(token_ids[0]))

    def post(self, item: object) -> None:
        """Hand a token (int), the end or an exception to the handler (from the worker thread)."""
        with contextlib.suppress(RuntimeError):  # a closed event loop: the server is shutting down, nobody listens
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    async def receive(self) -> AsyncIterator[int]:
        """The generated token ids as they come; raises APIError (500) if `generate` failed."""
        while (item := await self._queue.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item


class Worker:
    def __init__(self, model: Engine, max_concurrency: int):
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        self.model = model
        self._slots = threading.BoundedSemaphore(max_concurrency)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self._jobs: set[Job] = set()

    def submit(self, prompt: list[int], **settings: Any) -> Job:
        """Admit a generation of `prompt` with `settings` (generate's keyword arguments), or raise Busy."""
        if not self._slots.acquire(blocking=False):
            raise Busy()
        job = Job(asyncio.get_running_loop(), prompt, settings)
        self._jobs.add(job)
        self._executor.submit(self._run, job)
        return job

    def _run(self, job: Job) -> None:
        outcome = _END
        try:
            if not job.cancelled:
                started = time.perf_counter()
                self.model.generate([job.prompt], streamer=job, **job.settings)
                if job.first_token_time is not None:
                    log.info("prompt of %d tokens: time to first token %.2f s (%.1f prompt tokens/s), %d tokens",
                             len(job.prompt), job.first_token_time - started,
                             len(job.prompt) / max(job.first_token_time - started, 1e-9), job.tokens)
        except Exception:  # the request fails, the server goes on
            log.exception("generation failed")
            outcome = APIError(500, INTERNAL_ERROR, code="generation_failed")
        finally:
            self._jobs.discard(job)
            # Free the slot before the handler hears of the end, so that a client which sends its next request
            # as soon as it has this answer finds the slot free.
            self._slots.release()
        job.post(outcome)

    def close(self) -> None:
        """Stop the running generation, drop the waiting ones, and wait for the worker thread."""
        for job in list(self._jobs):
            job.cancel()
        self._executor.shutdown(wait=True, cancel_futures=True)
