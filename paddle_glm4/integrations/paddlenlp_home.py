"""Where PaddleNLP keeps models, computed without importing PaddleNLP or Paddle (the converter writes there).

PaddleNLP 2.8.1 reads a model name from `MODEL_HOME/<name>/`, MODEL_HOME being `$PPNLP_HOME/models`
(PPNLP_HOME defaults to ~/.paddlenlp and is read once, when paddlenlp is imported; see paddlenlp/utils/env.py).
"""

from __future__ import annotations

import os
import sys


def model_home() -> str:
    """PaddleNLP's model cache: its MODEL_HOME once paddlenlp is imported (the value is fixed then), else the same
    rule computed here: `$PPNLP_HOME/models`, PPNLP_HOME defaulting to ~/.paddlenlp."""
    env = sys.modules.get("paddlenlp.utils.env")
    if env is not None:
        return env.MODEL_HOME
    home = (
        os.environ["PPNLP_HOME"] if "PPNLP_HOME" in os.environ else os.path.join(os.path.expanduser("~"), ".paddlenlp")
    )
    return os.path.join(home, "models")


def cache_dir(name: str) -> str:
    """The directory PaddleNLP's `from_pretrained(name)` reads, e.g. ~/.paddlenlp/models/THUDM/glm-4-9b: where
    `glm4-convert --dst` puts the converted checkpoint for that name."""
    return os.path.join(model_home(), checked_name(name))


def checked_name(name: str) -> str:
    """`name` if it is a model name such as 'THUDM/glm-4-9b' (relative, no empty, '.' or '..' part), else
    ValueError: it becomes a path inside a model cache."""
    if (
        not isinstance(name, str)
        or os.path.isabs(name)
        or any(part in ("", ".", "..") for part in name.replace("\\", "/").split("/"))
    ):
        raise ValueError(f"{name!r} is not a model name such as 'THUDM/glm-4-9b'")
    return name
