"""`glm4 finetune`: LoRA fine-tuning on chat conversations, ending in an ordinary merged checkpoint.

    glm4 finetune --model glm-4-9b-chat-paddle --data train.jsonl --lora-rank 8 --epochs 2 --out tuned

The data is a JSONL file in the layout of OpenAI's fine-tuning files: one conversation per line,
{"messages": [{"role": "system" | "user" | "assistant" | "observation", "content": ...}, ...]}. Each conversation
is rendered with the tokenizer's chat template; the loss counts the assistant's tokens only (each assistant turn,
and the token that ends it: the next turn's role token, or <|endoftext|> after the last), so the model learns to
answer and to stop, not to write the user's part. An assistant message with "weight": 0 is context, not taught.

The output directory (written aside and moved into place whole, see output_dir.py) holds the merged model
(config.json, safetensors: load it like any converted checkpoint, or turn it into the published torch layout with
`glm4 to-torch`), the tokenizer files, loss_curve.png, and finetune.json (the settings, the loss of every step,
and the list of files, which marks the directory as ours).

`--trainer paddlenlp` or `--trainer paddleformers` runs the same training (data, LoRA, settings, output) through
that library's `Trainer` where it is installed (integrations/trainer.py); the default is this module's loop.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, cast

import numpy as np

from .chat_template import ChatTemplateError
from .cli_errors import UsageError
from .config import IGNORE_INDEX, TARGET_MODULES
from .output_dir import OutputKind
from .source_files import open_regular
from .validation import parse_json

if TYPE_CHECKING:
    from .model import GLM4ForCausalLM
    from .tokenizer import GLM4Tokenizer

MANIFEST = "finetune.json"
TRAINER_CHOICES = ("builtin", "paddlenlp", "paddleformers")
LOSS_CURVE = "loss_curve.png"
MAX_DATA_BYTES = 4 << 30  # a fine-tuning file far larger than anything trained on a CPU: a wrong path, refused
MAX_LINE_BYTES = 64 << 20


class DataError(UsageError):
    """A line of the data file that cannot be trained on; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    ids: list[int]
    labels: list[int]  # IGNORE_INDEX where the loss does not count (the labels are the ids, shifted in the loss)


# ---- data ---------------------------------------------------------------------------------------------------
def encode_conversation(tokenizer: GLM4Tokenizer, messages: list) -> Example:
    """A conversation's ids and labels: the assistant turns' ids (and their ending token) labelled, the rest
    IGNORE_INDEX. A conversation that cannot be taught raises ValueError (the caller names the line)."""
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        raise ValueError("no assistant turn to learn from")
    ids = _chat_ids(tokenizer, messages)
    labels = [IGNORE_INDEX] * len(ids)
    taught = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("weight", 1) != 0]
    for index in taught:
        # the conversation through this answer must extend the one before it (the template only appends)
        start = len(_chat_ids(tokenizer, messages[:index], add_generation_prompt=True))
        through = _chat_ids(tokenizer, messages[: index + 1])
        if ids[: len(through)] != through or len(through) <= start:
            raise ValueError(
                f"the chat template does not render message {index} as an addition to the ones "
                "before it, so its tokens cannot be told apart"
            )
        labels[start : len(through) + 1] = ids[start : len(through) + 1]  # + 1: the next role token ends the answer
    if taught and labels[-1] != IGNORE_INDEX:  # the last turn is an answer: it ends with <|endoftext|>
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    return Example(ids, labels)


def _chat_ids(tokenizer: GLM4Tokenizer, messages: list, add_generation_prompt: bool = False) -> list[int]:
    return cast("list[int]", tokenizer.apply_chat_template(messages, add_generation_prompt))  # tokenize=True: ids


def read_conversations(path: str, tokenizer: GLM4Tokenizer, max_length: int) -> list[Example]:
    """Every conversation of the JSONL file `path`, encoded; blank lines are skipped. A conversation longer than
    `max_length` tokens is cut at its end. Any line that is not a conversation with an assistant turn is an error
    naming the line."""
    if not os.path.isfile(path):
        raise UsageError(f"--data {path}: {'not a file' if os.path.exists(path) else 'no such file'}")
    if os.path.getsize(path) > MAX_DATA_BYTES:
        raise UsageError(f"--data {path}: {os.path.getsize(path)} bytes, more than the {MAX_DATA_BYTES} accepted")
    examples = []
    with open_regular(path) as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}:{number}"
            if len(raw) > MAX_LINE_BYTES:
                raise DataError(f"{where}: a line of {len(raw)} bytes, more than the {MAX_LINE_BYTES} accepted")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{where}: not UTF-8 text ({err.reason} at byte {err.start})") from None
            if not line.strip():
                continue
            record = parse_json(line, where, error=DataError)  # no nesting bombs, NaN or repeated keys
            if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
                raise DataError(
                    f'{where}: expected an object with a "messages" list, as in OpenAI\'s fine-tuning files'
                )
            try:
                example = encode_conversation(tokenizer, record["messages"])
            except (ChatTemplateError, ValueError) as err:
                raise DataError(f"{where}: {err}") from None
            example = Example(example.ids[:max_length], example.labels[:max_length])
            if all(label == IGNORE_INDEX for label in example.labels[1:]):
                raise DataError(f"{where}: no assistant token within the first {max_length} tokens (--max-length)")
            examples.append(example)
    if not examples:
        raise DataError(f"{path}: no conversation in the file")
    return examples


def batches(
    examples: list[Example], batch_size: int, pad_id: int, rng: np.random.RandomState
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """One epoch of left-padded batches in a random order: (input_ids, attention_mask, labels), each [b, s]."""
    order = rng.permutation(len(examples))
    for first in range(0, len(order), batch_size):
        yield pad_batch([examples[i] for i in order[first : first + batch_size]], pad_id)


def pad_batch(chosen: list[Example], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Examples left-padded to the longest: (input_ids, attention_mask, labels), each [b, s]."""
    width = max(len(e.ids) for e in chosen)
    ids = np.full((len(chosen), width), pad_id, dtype="int64")
    mask = np.zeros((len(chosen), width), dtype="int64")
    labels = np.full((len(chosen), width), IGNORE_INDEX, dtype="int64")
    for row, example in enumerate(chosen):
        n = len(example.ids)
        ids[row, width - n :], mask[row, width - n :], labels[row, width - n :] = example.ids, 1, example.labels
    return ids, mask, labels


# ---- training ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainSettings:
    lr: float = 1e-4
    epochs: int = 1
    steps: int | None = None  # optimizer steps in all; None: `epochs` passes over the data
    batch_size: int = 1
    max_grad_norm: float = 1.0
    seed: int = 0

    def total_steps(self, examples: int) -> int:
        return self.steps if self.steps is not None else self.epochs * math.ceil(examples / self.batch_size)


def train(
    model: GLM4ForCausalLM, examples: list[Example], settings: TrainSettings, progress: bool = True
) -> list[float]:
    """Train the parameters of `model` that are not frozen (see lora.add_lora) with AdamW; returns the loss of
    every step."""
    import paddle
    from tqdm import tqdm

    paddle.seed(settings.seed)
    rng = np.random.RandomState(settings.seed)
    trainable = [p for p in model.parameters() if not p.stop_gradient]
    optimizer = paddle.optimizer.AdamW(
        settings.lr, parameters=trainable, grad_clip=paddle.nn.ClipGradByGlobalNorm(settings.max_grad_norm)
    )
    pad_id = model.config.pad_token_id
    total = settings.total_steps(len(examples))
    losses: list[float] = []
    model.train()
    with tqdm(total=total, desc="fine-tuning", unit="step", disable=not progress, file=sys.stderr) as bar:
        while len(losses) < total:
            for ids, mask, labels in batches(examples, settings.batch_size, pad_id, rng):
                loss = model(
                    paddle.to_tensor(ids), attention_mask=paddle.to_tensor(mask), labels=paddle.to_tensor(labels)
                ).loss
                loss.backward()
                optimizer.step()
                optimizer.clear_grad()
                losses.append(float(loss))
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                bar.update()
                if len(losses) == total:
                    break
    model.eval()
    return losses


def plot_losses(losses: list[float], path: str) -> None:
    """The loss of each step as a PNG line chart (matplotlib's object API: no global backend state)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=100)
    axes = figure.subplots()
    axes.plot(range(1, len(losses) + 1), losses, marker="." if len(losses) <= 50 else None)
    axes.set_xlabel("step")
    axes.set_ylabel("loss (assistant tokens)")
    axes.set_title("glm4 finetune")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, format="png")


def _listed_files(manifest: object) -> list[str] | None:
    if (
        isinstance(manifest, dict)
        and str(manifest.get("tool", "")).startswith("paddle_glm4 ")
        and isinstance(manifest.get("files"), list)
    ):
        return manifest["files"]
    return None


FINETUNED = OutputKind("a fine-tuned model", MANIFEST, _listed_files)


# ---- command line -----------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        metavar="DIR",
        help="the checkpoint to fine-tune (converted with "
        "glm4 convert; loaded in float32, which training needs: GLM-4-9B takes 37.6 GB)",
    )
    parser.add_argument(
        "--data",
        required=True,
        metavar="FILE",
        help='JSONL, one {"messages": [...]} conversation per line (OpenAI\'s fine-tuning layout)',
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="the directory to write the merged model into")
    parser.add_argument("--tokenizer", metavar="DIR", help="where the tokenizer files are (default: --model)")
    parser.add_argument("--lora-rank", type=int, default=8, metavar="R", help="rank of each LoRA update (default: 8)")
    parser.add_argument(
        "--lora-alpha",
        type=float,
        metavar="A",
        help="LoRA scale numerator: updates are scaled by A / R (default: twice the rank)",
    )
    parser.add_argument(
        "--lora-dropout",
        type=float,
        default=0.0,
        metavar="P",
        help="dropout on the LoRA path's input while training (default: 0)",
    )
    parser.add_argument(
        "--lora-targets",
        default=",".join(TARGET_MODULES),
        metavar="NAMES",
        help=f"comma-separated Linear layers to adapt (default: {','.join(TARGET_MODULES)})",
    )
    parser.add_argument("--epochs", type=int, default=1, metavar="N", help="passes over the data (default: 1)")
    parser.add_argument("--steps", type=int, metavar="N", help="train exactly N optimizer steps instead of --epochs")
    parser.add_argument("--lr", type=float, default=1e-4, metavar="LR", help="AdamW learning rate (default: 1e-4)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=1,
        metavar="B",
        help="conversations per step, left-padded to the longest (default: 1)",
    )
    parser.add_argument(
        "--max-length",
        type=int,
        default=2048,
        metavar="N",
        help="cut each conversation to its first N tokens (default: 2048)",
    )
    parser.add_argument(
        "--max-grad-norm",
        type=float,
        default=1.0,
        metavar="G",
        help="clip the gradients' global norm to G (default: 1.0)",
    )
    parser.add_argument(
        "--recompute",
        action="store_true",
        help="recompute each layer's activations in the backward pass: less memory for long "
        "conversations, for a second forward pass per layer",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="S",
        help="seed for the LoRA initialisation and the data order (default: 0)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out if it is empty or an earlier glm4 finetune output (nothing else)",
    )
    parser.add_argument(
        "--trainer",
        choices=TRAINER_CHOICES,
        default="builtin",
        help="the training loop: builtin (this module's), or the Trainer of PaddleNLP or PaddleFormers, where that "
        "library is installed (same data, LoRA, settings and output; default: builtin)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _check_numbers(args: argparse.Namespace) -> None:
    for flag, value, least in (
        ("--epochs", args.epochs, 1),
        ("--steps", args.steps, 1),
        ("--batch-size", args.batch_size, 1),
        ("--max-length", args.max_length, 2),
    ):
        if value is not None and value < least:
            raise UsageError(f"{flag} {value}: must be at least {least}")
    for flag, value in (("--lr", args.lr), ("--max-grad-norm", args.max_grad_norm)):
        if not (math.isfinite(value) and value > 0):
            raise UsageError(f"{flag} {value}: must be a positive number")


def run(args: argparse.Namespace) -> int:
    """The command: check everything the user gave, load, train, merge, write."""
    from . import __version__
    from .integrations.trainer import model_class, train_with_trainer, trainer_module
    from .lora import LoRASettings, add_lora, merge_lora
    from .model import GLM4ForCausalLM
    from .output_dir import check_destination, staged
    from .tokenizer import GLM4Tokenizer

    _check_numbers(args)
    targets = tuple(name.strip() for name in args.lora_targets.split(",") if name.strip())
    lora = LoRASettings(
        args.lora_rank,
        args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora_rank,
        args.lora_dropout,
        targets,
    )
    settings = TrainSettings(args.lr, args.epochs, args.steps, args.batch_size, args.max_grad_norm, args.seed)
    try:
        import matplotlib  # noqa: F401  (before hours of training: the loss curve needs it at the end)
    except ImportError:
        raise UsageError("the loss curve needs matplotlib: pip install 'paddle-glm4[finetune]'") from None
    if args.trainer != "builtin":  # before hours of loading: the library must import
        trainer_module(args.trainer)
    check_destination(args.out, args.overwrite, FINETUNED, "--out")
    tokenizer = GLM4Tokenizer.from_pretrained(args.tokenizer or args.model)
    examples = read_conversations(args.data, tokenizer, args.max_length)

    import paddle

    paddle.seed(args.seed)
    loaded_as = GLM4ForCausalLM if args.trainer == "builtin" else model_class(args.trainer)
    model = loaded_as.from_pretrained(args.model, dtype="float32")
    model.model.recompute = args.recompute
    trainable = add_lora(model, lora)
    print(
        f"{args.data}: {len(examples)} conversations, {sum(len(e.ids) for e in examples)} tokens; training "
        f"{len(trainable)} LoRA matrices (rank {lora.rank}) for {settings.total_steps(len(examples))} steps",
        file=sys.stderr,
    )
    if args.trainer == "builtin":
        losses = train(model, examples, settings, progress=not args.no_progress)
    else:
        losses = train_with_trainer(args.trainer, model, examples, settings, progress=not args.no_progress)
    merge_lora(model)
    with staged(args.out, args.overwrite, FINETUNED, "--out") as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        plot_losses(losses, os.path.join(staging, LOSS_CURVE))
        files = sorted(name for name in os.listdir(staging) if not name.startswith("."))
        manifest = {
            "tool": f"paddle_glm4 {__version__} finetune",
            "files": files,
            "base_model": args.model,
            "data": args.data,
            "conversations": len(examples),
            "lora": asdict(lora),
            "training": asdict(settings),
            "trainer": args.trainer,
            "losses": losses,
        }
        with open(os.path.join(staging, MANIFEST), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}; merged model written to {args.out}", file=sys.stderr)
    return 0
