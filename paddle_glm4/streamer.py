"""Streamers: receive each new token as `generate` picks it and turn it into text as it comes.

`generate` calls `put(ids)` with the new token of every row (a numpy array [b]) once per step and
`end()` once at the end; it stops early when `cancelled` becomes true (a client went away).
Text goes through the tokenizer's incremental detokenizer, so a character split over several tokens
is emitted whole, never as broken UTF-8.
"""

from __future__ import annotations

import queue
import sys
from typing import Iterator, TextIO


class Streamer:
    """Base class: collects nothing, can be cancelled from another thread."""

    def __init__(self):
        self.cancelled = False

    def put(self, token_ids) -> None:
        pass

    def end(self) -> None:
        pass

    def cancel(self) -> None:
        self.cancelled = True


class _TextStreamer(Streamer):
    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        super().__init__()
        self._detokenizer = tokenizer.detokenizer(skip_special_tokens=skip_special_tokens)

    def put(self, token_ids) -> None:
        if len(token_ids) != 1:
            raise ValueError(f"text streaming follows one sequence; got a batch of {len(token_ids)}")
        text = self._detokenizer.push(int(token_ids[0]))
        if text:
            self.on_text(text)

    def end(self) -> None:
        text = self._detokenizer.flush()
        if text:
            self.on_text(text)
        self.on_end()

    def on_text(self, text: str) -> None:
        raise NotImplementedError

    def on_end(self) -> None:
        pass


class TextStreamer(_TextStreamer):
    """Writes text to a stream (stdout by default) as it is generated."""

    def __init__(self, tokenizer, stream: TextIO | None = None, skip_special_tokens: bool = True):
        super().__init__(tokenizer, skip_special_tokens)
        self.stream = stream or sys.stdout

    def on_text(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


class TextIteratorStreamer(_TextStreamer):
    """An iterator over text pieces, for a consumer in another thread than `generate`:

        streamer = TextIteratorStreamer(tokenizer)
        threading.Thread(target=model.generate, args=(ids,), kwargs={"streamer": streamer}).start()
        for text in streamer: ...
    """

    _END = object()

    def __init__(self, tokenizer, skip_special_tokens: bool = True, timeout: float | None = None):
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
