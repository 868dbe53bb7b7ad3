"""`python -m paddle_glm4.inference export --model DIR --out DIR [--dtype D | --quantize S] [--max-seq-len N]
[--overwrite]`: the same command as `glm4 export`."""

from __future__ import annotations

import argparse
import sys

from ..__main__ import EXPORT_DESCRIPTION, add_export_arguments, cmd_export
from ..cli_errors import add_debug_flag, run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m paddle_glm4.inference", description="Deploy GLM-4 with Paddle Inference."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    export = commands.add_parser(
        "export", help="export a converted checkpoint as a Paddle Inference program", description=EXPORT_DESCRIPTION
    )
    add_export_arguments(export)
    add_debug_flag(parser)
    add_debug_flag(export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: cmd_export(args), getattr(args, "debug", False))


if __name__ == "__main__":
    sys.exit(main())
