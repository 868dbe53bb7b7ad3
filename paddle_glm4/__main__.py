"""The `glm4` command line: generate, chat, convert, to-torch, export, finetune, demo, serve.

Generated text goes to stdout; everything else (progress, timing, notices) goes to stderr, so that the
output can be piped. Failures print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING

from .cli_errors import UsageError, add_debug_flag, interrupt_on_termination, run_cli
from .console import LineReader, ctrl_c_cancels
from .engine import add_engine_arguments

if TYPE_CHECKING:
    from .engine import Engine
    from .streamer import Streamer
    from .tokenizer import GLM4Tokenizer


# ---- helpers ------------------------------------------------------------------------------------------
def load(args: argparse.Namespace) -> tuple[Engine, GLM4Tokenizer]:
    from .engine import load_engine_from_args
    from .validation import check_seed

    check_seed(args.seed, "--seed")  # before the model takes its time to load
    return load_engine_from_args(args)


def sampling_kwargs(args: argparse.Namespace) -> dict:
    """generate()'s settings from the flags: only those given (None lets generate take generation_config.json's,
    see GenerationConfig.merged); --greedy turns sampling off whatever the checkpoint says."""
    return {
        "do_sample": False if args.greedy else None,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
        "max_new_tokens": args.max_new_tokens,
        "truncate": args.truncate,
    }


def report_speed(prompt_tokens: int, started: float, streamer: Streamer) -> None:
    first, last = streamer.first_token_time, streamer.last_token_time
    if first is None or last is None:
        return
    prefill = first - started
    decode_tokens = streamer.tokens - 1
    decode = last - first
    line = (
        f"time to first token: {prefill:.2f} s; "
        f"prefill: {prompt_tokens} tokens in {prefill:.2f} s ({prompt_tokens / prefill:.1f} tokens/s)"
    )
    if decode_tokens > 0 and decode > 0:
        line += f"; decode: {decode_tokens} tokens in {decode:.2f} s ({decode_tokens / decode:.2f} tokens/s)"
    print(line, file=sys.stderr)


# ---- commands -------------------------------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> int:
    from .streamer import TextStreamer

    model, tokenizer = load(args)
    ids = tokenizer.encode(args.prompt)
    streamer = TextStreamer(tokenizer, sys.stdout, prefill_bar=True)
    started = time.perf_counter()
    with ctrl_c_cancels(streamer):
        model.generate([ids], streamer=streamer, vocab_limit=len(tokenizer), **sampling_kwargs(args))
    sys.stdout.write("\n")
    if streamer.cancelled:
        raise KeyboardInterrupt
    report_speed(len(ids), started, streamer)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    model, tokenizer = load(args)
    interactive = sys.stdin.isatty()
    if interactive:
        print("chat: /reset clears the history, /exit or Ctrl-D quits, Ctrl-C stops an answer", file=sys.stderr)
    with LineReader(sys.stdin.fileno(), sys.stdin.encoding or "utf-8") as reader:
        return _chat(args, model, tokenizer, reader, interactive)


def _chat(args, model, tokenizer, reader, interactive: bool) -> int:
    from .streamer import TextStreamer

    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    kwargs = sampling_kwargs(args)
    while True:
        try:
            if interactive:
                print("you> ", end="", file=sys.stderr, flush=True)
            text = reader.readline()
        except KeyboardInterrupt:  # Ctrl-C at the prompt leaves
            print(file=sys.stderr)
            return 0
        if text is None or text.strip() == "/exit":  # Ctrl-D / end of piped input
            return 0
        if text.strip() == "/reset":
            messages = list(system)
            print("(history cleared)", file=sys.stderr)
            continue
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        ids = _fit_history(tokenizer, messages, len(system), model.context_length - args.max_new_tokens)
        streamer = TextStreamer(tokenizer, sys.stdout, lstrip=True, prefill_bar=True)
        started = time.perf_counter()
        try:
            with ctrl_c_cancels(streamer):
                out, _ = model.generate(
                    [ids],
                    eos_token_id=tokenizer.stop_token_ids,
                    streamer=streamer,
                    vocab_limit=len(tokenizer),
                    **kwargs,
                )
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            messages.pop()
            continue
        if streamer.cancelled:
            print("\n(answer interrupted; that turn is forgotten)", file=sys.stderr)
            messages.pop()
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        answer = [t for t in out.numpy()[0].tolist() if t not in tokenizer.stop_token_ids]
        messages.append({"role": "assistant", "content": tokenizer.decode(answer, skip_special_tokens=True).strip()})
        if args.verbose:
            report_speed(len(ids), started, streamer)


def _fit_history(tokenizer, messages: list, keep: int, budget: int) -> list[int]:
    """The prompt ids of the conversation; the oldest turns after the first `keep` messages are dropped
    (in place) until it fits in `budget` tokens."""
    while True:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        if len(ids) <= budget or len(messages) <= keep + 1:
            return ids
        del messages[keep]
        print("(oldest turn dropped to fit the context)", file=sys.stderr)


def cmd_convert(args: argparse.Namespace) -> int:
    from converters import torch_to_paddle

    interrupt_on_termination()
    return torch_to_paddle.run(args)


def cmd_to_torch(args: argparse.Namespace) -> int:
    from converters import paddle_to_torch

    interrupt_on_termination()
    return paddle_to_torch.run(args)


def cmd_export(args: argparse.Namespace) -> int:
    from .inference.export import export_model

    if args.tensor_parallel != 1:
        raise UsageError(
            "--tensor-parallel: a split model is dynamic-graph only for now (one program per rank is not "
            "exported); export the whole model, or run it split with `glm4 generate|chat|serve --tensor-parallel`"
        )
    interrupt_on_termination()
    manifest = export_model(
        args.model,
        args.out,
        args.dtype,
        args.max_seq_len,
        quantization=args.quantize,
        group_size=args.group_size,
        activation_dtype=args.activation_dtype,
        overwrite=args.overwrite,
        kv_cache_dtype=args.kv_cache_dtype,
    )
    quantized = manifest.config.quantization
    weights = manifest.dtype if quantized is None else f"{quantized} (the rest {manifest.dtype})"
    print(
        f"exported to {args.out}: weights {weights}, computes in {manifest.compute_dtype} on "
        f"{manifest.device}{' with paddle_glm4 kernels' if manifest.kernels else ''}, max_seq_len "
        f"{manifest.max_seq_len}, KV cache in {manifest.kv_cache_dtype}",
        file=sys.stderr,
    )
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from .finetune import run

    interrupt_on_termination()
    return run(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    interrupt_on_termination()
    return run_demo(args)


# ---- argument parsing -----------------------------------------------------------------------------------
def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    parser.add_argument(
        "--max-new-tokens", type=int, default=256, metavar="N", help="most tokens to generate per answer (default: 256)"
    )
    parser.add_argument(
        "--temperature",
        type=float,
        metavar="T",
        help="sampling temperature; setting it (or --top-p/--top-k) turns sampling on, 0 means "
        "greedy (default: generation_config.json's, else greedy decoding)",
    )
    parser.add_argument(
        "--top-p",
        type=float,
        metavar="P",
        help="nucleus sampling: keep the most likely tokens that add up to probability P",
    )
    parser.add_argument("--top-k", type=int, metavar="K", help="sample among the K most likely tokens (0: all)")
    parser.add_argument(
        "--repetition-penalty",
        type=float,
        metavar="R",
        help="divide the logits of tokens already present by R (>1 discourages repeats)",
    )
    parser.add_argument("--seed", type=int, metavar="S", help="random seed, for reproducible sampling")
    parser.add_argument(
        "--greedy", action="store_true", help="always pick the most likely token, whatever generation_config.json says"
    )
    parser.add_argument(
        "--truncate",
        action="store_true",
        help="when the prompt and --max-new-tokens do not fit the model's context, drop the "
        "prompt's beginning instead of stopping with an error",
    )


EXPORT_DESCRIPTION = (
    "Trace the model and save it as a static program (PIR .json + .pdiparams) with its manifest and "
    "tokenizer files, for Paddle Inference; generate from it with `glm4 generate --model OUT "
    "--engine inference`. Same as python -m paddle_glm4.inference export."
)


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    from .config import STORAGE_DTYPES
    from .quantization import add_arguments as add_quantization_arguments

    parser.add_argument("--model", required=True, metavar="DIR", help="a checkpoint converted with glm4 convert")
    parser.add_argument("--out", required=True, metavar="DIR", help="the export directory to write")
    parser.add_argument(
        "--dtype",
        choices=STORAGE_DTYPES,
        help="how the weights are stored (default: as in the checkpoint); a CPU program computes "
        "in float32 whatever this is, a program exported on a GPU computes in it",
    )
    add_quantization_arguments(parser, "store (and compute with paddle_glm4's C++ kernels)")
    parser.add_argument(
        "--max-seq-len",
        type=int,
        metavar="N",
        help="the longest prompt + generation the export accepts (default: the config's seq_length)",
    )
    parser.add_argument(
        "--kv-cache-dtype",
        choices=("float32", "bfloat16"),
        help="how the predictor's KV cache holds keys and values (default: the compute dtype); bfloat16 "
        "(CPU exports) takes half the memory, which long contexts need: GLM-4-9B's 128K cache is 5.4 GB",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT if it is empty or an earlier export (its export.json and the files an "
        "export holds, nothing else); anything else is never replaced. The new export is "
        "built beside OUT and swapped in only once complete",
    )
    parser.add_argument(
        "--tensor-parallel",
        type=int,
        default=1,
        metavar="N",
        help="NOT SUPPORTED YET: tensor parallelism is dynamic-graph only (N other than 1 is refused "
        "with that message; the export is one program for one process)",
    )


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="glm4", description="GLM-4-9B in PaddlePaddle.")
    parser.add_argument(
        "--version", action="version", version=f"paddle_glm4 {__version__}", help="print the version and exit"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser(
        "generate",
        help="continue a prompt, streaming the text to stdout",
        description="Continue a prompt (after GLM-4's [gMASK]<sop> prefix) and stream "
        "the text to stdout; prefill and decode speed go to stderr.",
    )
    add_generation_arguments(generate)
    generate.add_argument("--prompt", required=True, metavar="TEXT", help="the text to continue")
    generate.set_defaults(handler=cmd_generate)

    chat = commands.add_parser(
        "chat",
        help="multi-turn chat with the chat template",
        description="Chat with the model: one user turn per line on stdin (a terminal or a "
        "pipe); answers stream to stdout. /reset clears the history, /exit or "
        "Ctrl-D quits, Ctrl-C interrupts an answer.",
    )
    add_generation_arguments(chat)
    chat.add_argument(
        "--system", metavar="TEXT", help="a system message that starts (and survives /reset in) the conversation"
    )
    chat.add_argument("--verbose", action="store_true", help="print the speed of each answer to stderr")
    chat.set_defaults(handler=cmd_chat)

    convert = commands.add_parser(
        "convert",
        help="convert a published torch checkpoint to Paddle",
        description="Convert GLM-4 torch safetensors (published or transformers layout) "
        "to a Paddle checkpoint; same as glm4-convert.",
    )
    from converters import torch_to_paddle

    torch_to_paddle.add_arguments(convert)
    convert.set_defaults(handler=cmd_convert)

    to_torch = commands.add_parser(
        "to-torch",
        help="convert a Paddle checkpoint back to the published torch layout",
        description="Convert a paddle_glm4 checkpoint back into the published GLM-4 "
        "torch layout (safetensors); same as python -m "
        "converters.paddle_to_torch.",
    )
    from converters import paddle_to_torch

    paddle_to_torch.add_arguments(to_torch)
    to_torch.set_defaults(handler=cmd_to_torch)

    export = commands.add_parser(
        "export", help="export a converted checkpoint for Paddle Inference", description=EXPORT_DESCRIPTION
    )
    add_export_arguments(export)
    export.set_defaults(handler=cmd_export)

    from . import finetune as finetune_module

    finetune = commands.add_parser(
        "finetune",
        help="LoRA fine-tuning on chat conversations (JSONL)",
        description="Fine-tune with LoRA on a JSONL file of conversations (OpenAI's "
        "fine-tuning layout), the loss on the assistant's tokens only; writes "
        "the merged model, the tokenizer and a loss curve (PNG) to --out.",
    )
    finetune_module.add_arguments(finetune)
    finetune.set_defaults(handler=cmd_finetune)

    from .demo import add_arguments as add_demo_arguments

    demo = commands.add_parser(
        "demo",
        help="build a small random GLM-4, convert, load and generate",
        description="The built-in demo: writes a small GLM-4 checkpoint with deterministic "
        "RANDOM weights in the published torch layout, converts it with the real "
        "converter, loads it, and generates. Needs nothing downloaded.",
    )
    add_demo_arguments(demo)
    demo.set_defaults(handler=cmd_demo)

    from .server import add_arguments as add_server_arguments
    from .server import run as run_server

    serve = commands.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP API (FastAPI + uvicorn)",
        description="Serve GLM-4 over an OpenAI-compatible HTTP API: /v1/models, "
        "/v1/chat/completions (streaming, tools), /v1/completions.",
    )
    add_server_arguments(serve)
    serve.set_defaults(handler=run_server)
    for command in (parser, *commands.choices.values()):
        add_debug_flag(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: args.handler(args), getattr(args, "debug", False))


if __name__ == "__main__":
    sys.exit(main())
