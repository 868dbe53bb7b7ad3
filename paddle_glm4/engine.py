"""Loading what generates text: the model (dynamic graph, or a Paddle Inference predictor) and its tokenizer.

Both engines offer the same `generate(...)` (see GLM4ForCausalLM.generate), `config`, `generation_config` and
`context_length` (the most tokens, prompt + new, one generation takes: the config's seq_length, or an export's
smaller max_seq_len), so the CLI and the server do not care which one they hold.
"""

from __future__ import annotations

import argparse
import atexit
import os
from typing import TYPE_CHECKING

from .cli_errors import UsageError
from .config import DEFAULT_PREFILL_CHUNK
from .quantization import add_arguments as add_quantization_arguments

if TYPE_CHECKING:
    from typing import TypeAlias

    from .inference import Predictor
    from .model import GLM4ForCausalLM
    from .tokenizer import GLM4Tokenizer

    Engine: TypeAlias = GLM4ForCausalLM | Predictor  # they generate alike (see above)

ENGINES = ("dynamic", "inference")


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that choose what `load_engine` loads (shared by `glm4 generate`, `chat` and `serve`)."""
    parser.add_argument(
        "--model",
        required=True,
        metavar="DIR",
        help="a converted checkpoint directory (made by `glm4 convert`), or a Paddle Inference "
        "export directory with --engine inference",
    )
    parser.add_argument(
        "--tokenizer", metavar="DIR", help="directory with tokenizer.model and tokenizer_config.json (default: --model)"
    )
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="dynamic",
        help="dynamic: the Paddle dynamic-graph model (default); inference: a Paddle Inference "
        "predictor over an export directory",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        help="how the weights are held: on CPU, bfloat16 computes with the package's C++ kernels "
        "and float32 with Paddle's own (default: bfloat16 for a bf16 checkpoint, else "
        "float32); on GPU, the compute dtype (default: the checkpoint's). With --engine "
        "inference: the predictor's precision",
    )
    parser.add_argument(
        "--prefill-chunk",
        type=int,
        metavar="N",
        help="prompt tokens per forward of the prefill: a long prompt goes through the KV cache "
        "N tokens at a time, which bounds the memory its activations take (default: "
        f"{DEFAULT_PREFILL_CHUNK})",
    )
    parser.add_argument(
        "--kv-cache-dtype",
        choices=("float32", "bfloat16"),
        help="how the KV cache stores keys and values (dynamic engine): bfloat16 takes half the "
        "memory (default: bfloat16 for more than 8192 tokens on CPU, else the compute dtype)",
    )
    add_quantization_arguments(parser, "quantize at load")
    parser.add_argument(
        "--tensor-parallel",
        type=int,
        default=1,
        metavar="N",
        help="split the model across N processes, each holding about 1/N of the weights (dynamic engine; "
        "start them with `python -m paddle.distributed.launch --nproc_per_node N glm4 ...`, N per machine "
        "with --ips for several): rank 0 reads the input, prints and serves, the others run its forwards "
        "(default: 1, one process)",
    )


def load_engine(
    model_dir: str,
    engine: str = "dynamic",
    dtype: str | None = None,
    tokenizer_dir: str | None = None,
    quantization: str | None = None,
    group_size: int | None = None,
    activation_dtype: str = "auto",
    prefill_chunk: int | None = None,
    kv_cache_dtype: str | None = None,
    tensor_parallel: int = 1,
) -> tuple[Engine, GLM4Tokenizer]:
    """(model, tokenizer) for a converted checkpoint (engine "dynamic") or an export directory ("inference").
    `quantization`, `group_size`, `activation_dtype`: as GLM4ForCausalLM.from_pretrained's (dynamic only: an
    export holds its weights as it was exported). `prefill_chunk`: the engine's default for generate (None:
    DEFAULT_PREFILL_CHUNK). `kv_cache_dtype`: the dynamic model's default for generate (see its docstring).
    `tensor_parallel` N > 1: this process is one of N ranks (tensor_parallel.py); rank 0 gets the engine, whose
    generate has the other ranks run its forwards; on the other ranks this call does not return: they follow
    rank 0 until it ends, then exit."""
    from .generation import check_prefill_chunk
    from .tokenizer import GLM4Tokenizer

    if prefill_chunk is not None:
        try:
            check_prefill_chunk(prefill_chunk, "--prefill-chunk")
        except ValueError as err:
            raise UsageError(str(err)) from None

    if engine not in ENGINES:
        raise UsageError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "inference" and tensor_parallel != 1:
        raise UsageError("--tensor-parallel runs the dynamic engine only: an export is one program for one process")
    if engine == "inference" and kv_cache_dtype is not None:
        raise UsageError(
            "--kv-cache-dtype applies to the dynamic engine; an export's cache dtype is chosen when it is exported "
            "(glm4 export --kv-cache-dtype)"
        )
    if engine == "inference" and (quantization or group_size or activation_dtype != "auto"):
        raise UsageError(
            "--quantize, --group-size and --activation-dtype choose how a checkpoint is loaded; an "
            "export keeps the format it was exported in (export it with --quantize)"
        )
    if not os.path.isdir(model_dir):
        raise UsageError(f"{model_dir}: no such model directory")
    tokenizer_dir = tokenizer_dir or model_dir
    if not os.path.exists(os.path.join(tokenizer_dir, "tokenizer.model")):
        raise UsageError(
            f"{tokenizer_dir} has no tokenizer.model; pass --tokenizer DIR (a directory holding "
            "GLM-4's tokenizer.model and tokenizer_config.json)"
        )
    tokenizer = GLM4Tokenizer.from_pretrained(tokenizer_dir)
    if engine == "inference":
        from .inference import Predictor

        model: Engine = Predictor(model_dir, precision=dtype or "float32")
    else:
        from .model import GLM4ForCausalLM
        from .tensor_parallel import TensorParallelError

        try:
            model = GLM4ForCausalLM.from_pretrained(
                model_dir,
                dtype=dtype,
                quantization=quantization,
                group_size=group_size,
                activation_dtype=activation_dtype,
                tensor_parallel_degree=tensor_parallel,
            )
        except TensorParallelError as err:
            raise UsageError(f"--tensor-parallel: {err}") from None
        model.kv_cache_dtype = kv_cache_dtype
    check_pair(model, tokenizer, model_dir, tokenizer_dir)
    if prefill_chunk is not None:
        model.prefill_chunk = prefill_chunk
    ranks = getattr(model, "tensor_parallel", None)
    if ranks is not None and isinstance(model, GLM4ForCausalLM):  # an export refuses tensor parallelism
        from .tensor_parallel import follow, lead

        if ranks.rank != 0:  # a follower: rank 0 runs the command
            follow(model)
            raise SystemExit(0)
        atexit.register(lead(model).close)
    return model, tokenizer


def load_engine_from_args(args: argparse.Namespace) -> tuple[Engine, GLM4Tokenizer]:
    """`load_engine` with the flags `add_engine_arguments` defined (`glm4 generate`, `chat` and `serve`)."""
    return load_engine(
        args.model,
        args.engine,
        args.dtype,
        args.tokenizer,
        quantization=args.quantize,
        group_size=args.group_size,
        activation_dtype=args.activation_dtype,
        prefill_chunk=args.prefill_chunk,
        kv_cache_dtype=args.kv_cache_dtype,
        tensor_parallel=args.tensor_parallel,
    )


def check_pair(model: Engine, tokenizer: GLM4Tokenizer, model_dir: str, tokenizer_dir: str) -> None:
    """Refuse a tokenizer that does not belong to the model: more tokens than the model has rows, or stop ids
    (the model's generation_config / config eos_token_id) that are not the tokenizer's special tokens, with
    which generation would never stop, or stop at ordinary text."""
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UsageError(
            f"the tokenizer in {tokenizer_dir} has {tokenizer.vocab_size} tokens but the model in "
            f"{model_dir} only {model.config.vocab_size}; they do not belong together"
        )
    specials = {token_id: text for text, token_id in tokenizer.special_tokens.items()}
    eos = model.generation_config.eos_token_id
    for token_id in eos:
        if token_id not in specials:
            raise UsageError(
                f"the model in {model_dir} stops at id {token_id}, which is not a special token of the "
                f"tokenizer in {tokenizer_dir} (its special ids are {min(specials)}..{max(specials)}); "
                "they do not belong together"
            )
    if eos and tokenizer.eos_token_id not in eos:
        raise UsageError(
            f"the tokenizer in {tokenizer_dir} ends text with {tokenizer.eos_token!r} (id "
            f"{tokenizer.eos_token_id}), which is not among the model's stop ids {eos} in {model_dir}; "
            "they do not belong together"
        )
