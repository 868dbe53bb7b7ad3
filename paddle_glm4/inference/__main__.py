"""`python -m paddle_glm4.inference export --model DIR --out DIR [--dtype D | --quantize S] [--max-seq-len N]`."""

from __future__ import annotations

import argparse
import sys

from ..cli_errors import run_cli
from ..config import DEFAULT_GROUP_SIZE, QUANTIZATION_SCHEMES, STORAGE_DTYPES
from ..quantization import ACTIVATION_DTYPES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m paddle_glm4.inference",
                                     description="Deploy GLM-4 with Paddle Inference.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    export = commands.add_parser(
        "export", help="export a converted checkpoint as a Paddle Inference program",
        description="Trace the model and save it as a static program (PIR .json + .pdiparams) with its "
                    "manifest and tokenizer files; generate from it with `python -m paddle_glm4 generate "
                    "--model OUT --engine inference`.")
    export.add_argument("--model", required=True, metavar="DIR", help="a checkpoint converted with glm4 convert")
    export.add_argument("--out", required=True, metavar="DIR", help="the export directory to write")
    export.add_argument("--dtype", choices=STORAGE_DTYPES,
                        help="how the weights are stored (default: as in the checkpoint); a CPU program computes "
                             "in float32 whatever this is, a program exported on a GPU computes in it")
    export.add_argument("--quantize", choices=QUANTIZATION_SCHEMES,
                        help="store the Linear weights quantized (int8: one scale per output channel; int4: one "
                             "per --group-size input rows); the program computes them with paddle_glm4's C++ "
                             "kernels. A checkpoint from `glm4 convert --quantize` exports quantized without it")
    export.add_argument("--group-size", type=int, metavar="G",
                        help=f"with --quantize int4: input rows per scale (default {DEFAULT_GROUP_SIZE})")
    export.add_argument("--activation-dtype", choices=ACTIVATION_DTYPES, default="auto",
                        help="how activations enter the bf16/int8/int4 kernels' dot products: float32 exact; "
                             "bfloat16 or int8 rounded, faster; auto (default) picks per CPU where it runs")
    export.add_argument("--max-seq-len", type=int, metavar="N",
                        help="the longest prompt + generation the export accepts (default: the config's "
                             "seq_length)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def export() -> int:
        from .export import export_model

        manifest = export_model(args.model, args.out, args.dtype, args.max_seq_len, quantization=args.quantize,
                                group_size=args.group_size, activation_dtype=args.activation_dtype)
        quantized = manifest.config.quantization
        weights = manifest.dtype if quantized is None else f"{quantized} (the rest {manifest.dtype})"
        print(f"exported to {args.out}: weights {weights}, computes in {manifest.compute_dtype} on "
              f"{manifest.device}{' with paddle_glm4 kernels' if manifest.kernels else ''}, max_seq_len "
              f"{manifest.max_seq_len}", file=sys.stderr)
        return 0

    return run_cli(export)


if __name__ == "__main__":
    sys.exit(main())
