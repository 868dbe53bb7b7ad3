"""`python -m paddle_glm4.server --model DIR ...`: the same server as `glm4 serve`."""

from __future__ import annotations

import argparse
import sys

from ..cli_errors import add_debug_flag, run_cli
from . import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m paddle_glm4.server", description="Serve GLM-4 over an OpenAI-compatible HTTP API."
    )
    add_arguments(parser)
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    return run_cli(lambda: run(args), getattr(args, "debug", False))


if __name__ == "__main__":
    sys.exit(main())
