"""Loading what generates text: the model (dynamic graph, or a Paddle Inference predictor) and its tokenizer.

Both engines offer the same `generate(...)` (see GLM4ForCausalLM.generate), `config` and
`generation_config`, so the CLI and the server do not care which one they hold.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from .cli_errors import UsageError

if TYPE_CHECKING:
    from typing import TypeAlias

    from .inference import Predictor
    from .model import GLM4ForCausalLM
    from .tokenizer import GLM4Tokenizer

    Engine: TypeAlias = GLM4ForCausalLM | Predictor  # they generate alike (see above)

ENGINES = ("dynamic", "inference")


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that choose what `load_engine` loads (shared by `glm4 generate`, `chat` and `serve`)."""
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="a converted checkpoint directory (made by `glm4 convert`), or a Paddle Inference "
                             "export directory with --engine inference")
    parser.add_argument("--tokenizer", metavar="DIR",
                        help="directory with tokenizer.model and tokenizer_config.json (default: --model)")
    parser.add_argument("--engine", choices=ENGINES, default="dynamic",
                        help="dynamic: the Paddle dynamic-graph model (default); inference: a Paddle Inference "
                             "predictor over an export directory")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="compute dtype (default: float32 on CPU, the checkpoint's dtype on GPU; with "
                             "--engine inference, the predictor's precision)")


def load_engine(model_dir: str, engine: str = "dynamic", dtype: str | None = None,
                tokenizer_dir: str | None = None) -> tuple[Engine, GLM4Tokenizer]:
    """(model, tokenizer) for a converted checkpoint (engine "dynamic") or an export directory ("inference")."""
    from .tokenizer import GLM4Tokenizer

    if engine not in ENGINES:
        raise UsageError(f"engine must be one of {ENGINES}, got {engine!r}")
    if not os.path.isdir(model_dir):
        raise UsageError(f"{model_dir}: no such model directory")
    tokenizer_dir = tokenizer_dir or model_dir
    if not os.path.exists(os.path.join(tokenizer_dir, "tokenizer.model")):
        raise UsageError(f"{tokenizer_dir} has no tokenizer.model; pass --tokenizer DIR (a directory holding "
                         "GLM-4's tokenizer.model and tokenizer_config.json)")
    tokenizer = GLM4Tokenizer.from_pretrained(tokenizer_dir)
    if engine == "inference":
        from .inference import Predictor

        model: Engine = Predictor(model_dir, precision=dtype or "float32")
    else:
        from .model import GLM4ForCausalLM

        model = GLM4ForCausalLM.from_pretrained(model_dir, dtype=dtype)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UsageError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                         f"{model.config.vocab_size}; they do not belong together")
    return model, tokenizer
