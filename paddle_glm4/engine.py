"""Loading what generates text: the model (dynamic graph, or a Paddle Inference predictor) and its tokenizer.

Both engines offer the same `generate(...)` (see GLM4ForCausalLM.generate), `config` and
`generation_config`, so the CLI and the server do not care which one they hold.
"""

from __future__ import annotations

import os

from .cli_errors import UsageError

ENGINES = ("dynamic", "inference")


def load_engine(model_dir: str, engine: str = "dynamic", dtype: str | None = None, tokenizer_dir: str | None = None):
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

        model = Predictor(model_dir, precision=dtype or "float32")
    else:
        from .model import GLM4ForCausalLM

        model = GLM4ForCausalLM.from_pretrained(model_dir, dtype=dtype)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UsageError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                         f"{model.config.vocab_size}; they do not belong together")
    return model, tokenizer
