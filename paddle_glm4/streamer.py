"""Streamers: receive each new token as `generate` picks it and turn it into text as it comes.

`generate` calls `put(ids)` with the new token of every row (a numpy array [b]) once per step and
`end()` once at the end; it stops early when `cancelled` becomes true (a client went away).
Text goes through the tokenizer's incremental detokenizer, so a character split over several tokens
is emitted whole, never as broken UTF-8.
"""

from __future__ import annotations

import queue
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    import numpy as np

    from .tokenizer import GLM4Tokenizer


class Streamer:
    """Base class: times the tokens as they come and can be cancelled from another thread.

    Subclasses handle the tokens in `on_tokens` and the end in `on_end`."""

    def __init__(self):
        self.cancelled = False
        self.tokens = 0
        self.first_token_time: float | None = None  # time.perf_counter() of the first and the latest token
        self.last_token_time: float | None = None

    def put(self, token_ids: np.ndarray) -> None:
        now = time.perf_counter()
        self.first_token_time = self.first_token_time or now
        self.last_token_time = now
        self.tokens += 1
        self.on_tokens(token_ids)

    def end(self) -> None:
        self.on_end()

    def prefill_progress(self, done: int, total: int) -> None:
        """`generate` calls this before the prompt's prefill (done 0) and after each chunk of it."""
        self.on_prefill(done, total)

    def cancel(self) -> None:
        self.cancelled = True

    def on_tokens(self, token_ids: np.ndarray) -> None:
        pass

    def on_end(self) -> None:
        pass

    def on_prefill(self, done: int, total: int) -> None:
        pass


class _TextStreamer(Streamer):
    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        super().__init__()
        self._tokenizer = tokenizer
        self._detokenizer = tokenizer.detokenizer(skip_special_tokens=skip_special_tokens)

    def on_tokens(self, token_ids) -> None:
        if len(token_ids) != 1:
            raise ValueError(f"text streaming follows one sequence; got a batch of {len(token_ids)}")
        token_id = int(token_ids[0])
        text = "" if self._tokenizer.is_padding_id(token_id) else self._detokenizer.push(token_id)
        if text:
            self.on_text(text)

    def end(self) -> None:
        text = self._detokenizer.flush()
        if text:
            self.on_text(text)
        self.on_end()

    def on_text(self, text: str) -> None:
        raise NotImplementedError


class TextStreamer(_TextStreamer):
    """Writes text to a stream (stdout by default) as it is generated. `lstrip` drops the whitespace a chat
    answer starts with (GLM-4 begins each answer with a newline). `prefill_bar`: a progress bar on stderr
    (prompt tokens done / total, tokens/s) for a prefill that takes more than a second."""

    def __init__(
        self,
        tokenizer: GLM4Tokenizer,
        stream: TextIO | None = None,
        skip_special_tokens: bool = True,
        lstrip: bool = False,
        prefill_bar: bool = False,
    ):
        super().__init__(tokenizer, skip_special_tokens)
        self.stream = stream or sys.stdout
        self._lstrip = lstrip
        self._prefill_bar = prefill_bar
        self._bar: Any = None  # the tqdm bar of the prefill under way

    def on_prefill(self, done: int, total: int) -> None:
        if not self._prefill_bar:
            return
        if self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc="prefill", unit="tok", file=sys.stderr, delay=1.0, leave=False)
        self._bar.update(done - self._bar.n)
        if done >= total:
            self._bar.close()
            self._bar = None

    def on_text(self, text: str) -> None:
        if self._lstrip:
            text = text.lstrip()
            self._lstrip = not text
        self.stream.write(text)
        self.stream.flush()


class TextIteratorStreamer(_TextStreamer):
    """An iterator over text pieces, for a consumer in another thread than `generate`:

    streamer = TextIteratorStreamer(tokenizer)
    threading.Thread(target=model.generate, args=(ids,), kwargs={"streamer": streamer}).start()
    for text in streamer: ...
    """

    _END = object()

    def __init__(self, tokenizer: GLM4Tokenizer, skip_special_tokens: bool = True, timeout: float | None = None):
        super().__init__(tokenizer, skip_special_tokens)
        self._queue: queue.Queue = queue.Queue()
        self.timeout = timeout

    def on_text(self, text: str) -> None:
        self._queue.put(text)

    def on_end(self) -> None:
        self._queue.put(self._END)

    def fail(self, error: BaseException) -> None:
        """Hand an exception raised by `generate` to the consumer, which re-raises it."""
        self._queue.put(error)

    def __iter__(self) -> Iterator[str]:
        while True:
            item = self._queue.get(timeout=self.timeout)
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
