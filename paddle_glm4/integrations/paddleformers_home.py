"""Where PaddleFormers finds a model by name on local disk, computed without importing PaddleFormers or Paddle
(the converter writes there).

PaddleFormers 1.2.0 reads a name from `$PF_HOME/<name>/` when that directory exists (check_repo in
paddleformers/utils/download/download.py, and the tokenizer's file lookup); anything else it fetches from a hub.
Unlike PaddleNLP, it consults that directory only while the PF_HOME environment variable is set: the converter
writes to `$PF_HOME/<name>` (PF_HOME defaulting to ~/.paddleformers, PaddleFormers' own home) and says so. Online,
PaddleFormers first fetches THUDM's config.json (or tokenizer_config.json) from a hub, which hands the name to this
project's classes; they read `<home>/<name>` whether PF_HOME is set or not.
"""

from __future__ import annotations

import os

from .paddlenlp_home import checked_name


def model_home() -> str:
    """PaddleFormers' home, $PF_HOME (default ~/.paddleformers): a name's files are in <home>/<name>/."""
    return os.environ.get("PF_HOME") or os.path.join(os.path.expanduser("~"), ".paddleformers")


def cache_dir(name: str) -> str:
    """The directory PaddleFormers' `from_pretrained(name)` reads while PF_HOME is set, e.g.
    ~/.paddleformers/THUDM/glm-4-9b: where `glm4-convert --paddleformers-name NAME` puts the checkpoint."""
    return os.path.join(model_home(), checked_name(name))


def reads_names() -> str | None:
    """What a user must do before PaddleFormers reads a name from its home: export PF_HOME, if it is not set."""
    if os.environ.get("PF_HOME"):
        return None
    return (
        f"then export PF_HOME={model_home()}: PaddleFormers reads a model name from its home only while PF_HOME "
        "is set (otherwise it asks a hub first)"
    )
