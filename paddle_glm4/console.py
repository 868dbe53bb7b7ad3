"""The interactive console: reading the user's lines, and Ctrl-C, which must always get through.

A process with threads (Paddle's, OpenMP's, tqdm's monitor) receives SIGINT on whichever thread the kernel
picks. Python runs its handler on the main thread at the next bytecode, which is fine while the main thread
computes, but a main thread blocked in read() on stdin is only woken if the signal happened to land on it:
otherwise Ctrl-C at the prompt does nothing. `LineReader` therefore waits in select() on stdin and on the
wakeup pipe that Python writes to on every signal, whatever the thread.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
from collections.abc import Iterator

from .streamer import Streamer


class LineReader:
    """Lines from a file descriptor (default: stdin), interruptible by Ctrl-C; use it as a context manager,
    from the main thread. `readline()` returns the line without its newline, or None at end of input."""

    def __init__(self, fd: int = 0, encoding: str = "utf-8"):
        self._fd, self._encoding = fd, encoding
        self._buffer, self._eof = b"", False

    def __enter__(self) -> LineReader:
        self._wakeup, write_end = os.pipe()
        for end in (self._wakeup, write_end):
            os.set_blocking(end, False)  # Python writes it from a signal handler; we drain it without waiting
        self._write_end = write_end
        self._previous = signal.set_wakeup_fd(write_end)
        return self

    def __exit__(self, *exc) -> None:
        signal.set_wakeup_fd(self._previous)
        os.close(self._wakeup)
        os.close(self._write_end)

    def readline(self) -> str | None:
        while b"\n" not in self._buffer and not self._eof:
            ready, _, _ = select.select([self._fd, self._wakeup], [], [])
            if self._wakeup in ready:
                os.read(self._wakeup, 4096)  # a signal came: its Python handler runs as this returns
            if self._fd in ready:
                chunk = os.read(self._fd, 65536)
                self._buffer += chunk
                self._eof = not chunk
        if not self._buffer:
            return None
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.removesuffix(b"\r").decode(self._encoding, errors="replace")


@contextlib.contextmanager
def ctrl_c_cancels(streamer: Streamer) -> Iterator[None]:
    """While generating, Ctrl-C cancels `streamer` (generation stops after the current token) instead of
    raising KeyboardInterrupt somewhere inside Paddle's kernels; a second Ctrl-C interrupts as usual.
    Whether it was pressed is `streamer.cancelled` afterwards."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def on_ctrl_c(signum, frame):
        if streamer.cancelled:
            raise KeyboardInterrupt
        streamer.cancel()

    previous = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
