"""The command line of both conversion directions, `glm4-convert` (torch_to_paddle) and
`python -m converters.paddle_to_torch`: the flags they share, worded once, and how a run starts and fails.

Each direction says only what differs: what its two directories hold and its --max-shard-size default.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from paddle_glm4.cli_errors import add_debug_flag, interrupt_on_termination, run_cli
from paddle_glm4.config import STORAGE_DTYPES


def add_source_and_destination(
    parser: argparse.ArgumentParser, source: str, destination: str, dst_required: bool = True
) -> None:
    """--src and --dst; `source` and `destination` describe the two directories (a phrase, no final period).
    `dst_required` False is for a direction that offers another way to name the destination."""
    parser.add_argument("--src", required=True, metavar="SRC_DIR", help=f"{source}. Only read, never written to.")
    parser.add_argument(
        "--dst",
        required=dst_required,
        metavar="DST_DIR",
        help=f"{destination}. It is built in a temporary directory beside it and appears only "
        "once complete and verified.",
    )


def add_output_options(
    parser: argparse.ArgumentParser, max_shard_size: str | None, shard_default: str | None = None
) -> None:
    """--dtype, --max-shard-size (default `max_shard_size`; `shard_default` is a phrase that explains a default
    other than a plain size), --overwrite and --no-verify."""
    parser.add_argument(
        "--dtype",
        choices=STORAGE_DTYPES,
        default=None,
        help="dtype of the written weights (default: the source's). Widening is exact; "
        "narrowing rounds to nearest even, like torch and Paddle.",
    )
    parser.add_argument(
        "--max-shard-size",
        default=max_shard_size,
        metavar="SIZE",
        help="largest weight file to write, e.g. 5GB, 500MB, 2GiB; a tensor bigger than that gets "
        f"a file of its own. Default: {shard_default or max_shard_size}.",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace DST_DIR if it is empty or holds a conversion's output (its "
        "conversion_manifest.json lists every file in it); anything else is never replaced. "
        "The old one is swapped out only after the new one is complete and verified",
    )
    parser.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip the check that re-reads every written tensor and compares it with its source "
        "(faster; the sha256 manifest is written either way)",
    )


def main(
    argv: list[str] | None,
    prog: str,
    purpose: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int],
) -> int:
    """A direction's entry point: `purpose` (a sentence) opens its --help, `add_arguments` adds its flags, `run`
    converts. A failure is one `error:` line and exit code 2 (see run_cli)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=f"{purpose} Streams tensor by tensor, verifies the "
        "result, and writes it atomically: on any error DST_DIR is left as it was "
        "(exit code 2).",
    )
    add_arguments(parser)
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    interrupt_on_termination()
    return run_cli(lambda: run(args), getattr(args, "debug", False))
