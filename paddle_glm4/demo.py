"""The built-in demo: the whole pipeline on a machine with nothing downloaded.

1. write a small GLM-4 checkpoint with deterministic RANDOM weights, in the published torch layout
   (bf16 safetensors shards + index, config.json of model_type "chatglm"), with a tokenizer;
2. convert it with the real converter (`glm4 convert`);
3. load the converted checkpoint, tokenize a prompt, generate, and print text, ids and speed.
The text is gibberish, since the weights are random; the point is that every stage runs for real.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from .config import GLM4Config

if TYPE_CHECKING:
    from .tokenizer import GLM4Tokenizer

DEFAULT_PROMPT = "GLM-4 runs on PaddlePaddle. 你好，"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tokenizer",
        metavar="DIR",
        help="use GLM-4's real vocabulary from DIR/tokenizer.model (and tokenizer_config.json); "
        "default: a small vocabulary that the demo builds itself",
    )
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, metavar="TEXT", help="the prompt to continue")
    parser.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="tokens to generate (default 32)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the random weights (default 0)")
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="keep the published and converted checkpoints in DIR/published and DIR/paddle "
        "(default: a temporary directory, removed at the end). A later run replaces them "
        "only if they are still the demo's own output (or empty); anything else there is "
        "refused, never deleted",
    )


def demo_config(tokenizer: GLM4Tokenizer) -> GLM4Config:
    """Small, but every structural feature of GLM-4-9B: GQA, partial interleaved RoPE, QKV bias, SwiGLU."""
    return GLM4Config(
        vocab_size=-(-tokenizer.vocab_size // 64) * 64,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        rope_ratio=1.0,
        seq_length=2048,
        dtype="bfloat16",
        eos_token_id=tokenizer.stop_token_ids,
        pad_token_id=tokenizer.pad_token_id,
    )


def random_weights(config: GLM4Config, seed: int) -> Iterator[tuple[str, np.ndarray]]:
    """(Paddle name, float32 array) for every tensor, drawn from a seeded generator, one at a time."""
    from converters import mapping

    rng = np.random.default_rng(seed)
    for spec in mapping.tensor_specs(config):
        if spec.paddle.endswith("norm.weight"):
            yield spec.paddle, (1.0 + 0.1 * rng.standard_normal(spec.shape)).astype(np.float32)
        else:
            yield spec.paddle, (0.05 * rng.standard_normal(spec.shape)).astype(np.float32)


def run_demo(args: argparse.Namespace) -> int:
    from converters import paddle_to_torch, torch_to_paddle
    from converters.pipeline import check_destination

    from .model import GLM4ForCausalLM
    from .small_vocab import write_small_vocabulary
    from .streamer import Streamer
    from .tokenizer import GLM4Tokenizer

    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731 - progress notes, not output
    scratch = tempfile.mkdtemp(prefix="glm4-demo-")  # ours alone: removed at the end
    workdir = args.out or scratch
    published, paddle_dir = os.path.join(workdir, "published"), os.path.join(workdir, "paddle")
    try:
        # Both are replaced only if they are an earlier run's output (the converter's rule): checked before
        # anything is written, so that a refusal costs nothing.
        for directory in (published, paddle_dir):
            check_destination(directory, overwrite=True)
        if args.tokenizer:
            tokenizer = GLM4Tokenizer.from_pretrained(args.tokenizer)
            source = f"GLM-4's vocabulary from {args.tokenizer}"
        else:
            tokenizer = GLM4Tokenizer.from_pretrained(write_small_vocabulary(os.path.join(scratch, "small_vocab")))
            source = "a small vocabulary built by the demo (pass --tokenizer DIR for GLM-4's real one)"
        config = demo_config(tokenizer)
        tokenizer_files = tokenizer.save_pretrained(os.path.join(scratch, "tokenizer"))

        say(
            f"[1/3] writing a GLM-4 checkpoint with RANDOM weights (seed {args.seed}) in the published torch "
            f"layout: {config.num_hidden_layers} layers, hidden {config.hidden_size}, vocab {config.vocab_size}"
        )
        paddle_to_torch.write_published_checkpoint(
            published,
            config,
            random_weights(config, args.seed),
            dtype="bfloat16",
            max_shard_size="4MB",
            overwrite=True,
            extra_files={p.name: str(p) for p in tokenizer_files.iterdir()},
        )

        say("[2/3] converting it to Paddle with the converter")
        summary = torch_to_paddle.convert(published, paddle_dir, overwrite=True, progress=False)
        say(
            f"      {summary.tensors} tensors, {summary.bytes / 1e6:.1f} MB, {summary.layout} layout -> "
            f"{paddle_dir} ({summary.dtype}, verified)"
        )

        say("[3/3] loading the Paddle checkpoint and generating (greedy)")
        model = GLM4ForCausalLM.from_pretrained(paddle_dir)
        tokenizer = GLM4Tokenizer.from_pretrained(paddle_dir)
        ids = tokenizer.encode(args.prompt)
        streamer = Streamer()
        started = time.perf_counter()
        out, _ = model.generate(
            [ids], max_new_tokens=args.max_new_tokens, streamer=streamer, vocab_limit=len(tokenizer)
        )
        finished = time.perf_counter()
        new = out.numpy()[0].tolist()
        print("NOTE: the weights are random, so the text is meaningless; every stage above ran for real.")
        print(f"tokenizer: {source}")
        print(f"prompt:    {args.prompt!r}")
        print(f"prompt ids ({len(ids)}): {ids}")
        print(f"new ids ({len(new)}):    {new}")
        print(f"new text:  {tokenizer.decode(new, skip_special_tokens=True)!r}")
        if new and new[-1] in model.generation_config.eos_token_id:
            print(
                f"stopped:   at end-of-sequence id {new[-1]} {tokenizer.decode([new[-1]])}, after {len(new)} "
                f"of at most {args.max_new_tokens} new tokens"
            )
        first_token = streamer.first_token_time or finished  # (None: no token came)
        prefill = first_token - started
        decode = finished - first_token
        print(
            f"speed:     prefill {len(ids) / prefill:.1f} tokens/s, decode "
            f"{(len(new) - 1) / decode if decode > 0 else float('nan'):.1f} tokens/s "
            f"(float32 on CPU, {os.cpu_count()} threads)"
        )
        if args.out:
            print(
                f"kept:      {paddle_dir} is a converted checkpoint the README's examples run on, e.g.\n"
                f"           python -m paddle_glm4 generate --model {paddle_dir} --prompt 'Hello'"
            )
        return 0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
