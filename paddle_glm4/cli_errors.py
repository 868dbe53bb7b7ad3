"""How every command-line entry point of the project reports failure: one line on stderr, exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Callable

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
