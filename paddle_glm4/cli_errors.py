"""How every command-line entry point of the project reports failure and ends: one line on stderr, exit code 2;
`--debug` (or GLM4_DEBUG=1) adds the traceback behind the line."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from collections.abc import Callable

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
DEBUG_ENV = "GLM4_DEBUG"


class UsageError(ValueError):
    """A user-facing problem with the command's input (a path, a flag, a file's content)."""


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """--debug on `parser` (on a subcommand too: it then keeps a --debug given before the subcommand)."""
    parser.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help=f"on an error, print the full traceback as well as the one-line message (or set {DEBUG_ENV}=1)",
    )


def run_cli(command: Callable[[], int | None], debug: bool = False) -> int:
    """Run `command`; turn expected failures into `error: <message>` and exit code 2, never a traceback
    (unless `debug` or GLM4_DEBUG=1, which print it first).

    Expected failures are ValueError (the project's own errors derive from it: bad config, checkpoint,
    safetensors file, usage) and OSError (missing file, full disk, permissions). Ctrl-C exits 130.
    """
    debug = debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        return command() or 0
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, OSError) as err:
        if debug:
            traceback.print_exc()
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if isinstance(err, OSError) and err.filename and err.strerror:
            message = f"{err.filename}: {err.strerror}"
        print(f"error: {message}", file=sys.stderr)
        return EXIT_ERROR


def interrupt_on_termination() -> None:
    """Let `kill` (SIGTERM) and a closed terminal (SIGHUP) clean up like Ctrl-C does: for commands that write
    output atomically, so that they leave no partial output behind."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupt)
