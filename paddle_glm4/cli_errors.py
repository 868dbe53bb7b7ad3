"""How every command-line entry point of the project reports failure: one line on stderr, exit code 2."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Callable, Iterator

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


class UsageError(ValueError):
    """A user-facing problem with the command's input (a path, a flag, a file's content)."""


def run_cli(command: Callable[[], int | None]) -> int:
    """Run `command`; turn expected failures into `error: <message>` and exit code 2, never a traceback.

    Expected failures are ValueError (the project's own errors derive from it: bad config, checkpoint,
    safetensors file, usage) and OSError (missing file, full disk, permissions). Ctrl-C exits 130.
    """
    try:
        return command() or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, OSError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if isinstance(err, OSError) and err.filename and err.strerror:
            message = f"{err.filename}: {err.strerror}"
        print(f"error: {message}", file=sys.stderr)
        return EXIT_ERROR


@contextlib.contextmanager
def ctrl_c_cancels(streamer) -> Iterator[None]:
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
