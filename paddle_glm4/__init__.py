"""paddle_glm4: GLM-4-9B (base and chat) in PaddlePaddle.

The public names below are imported on first use (PEP 562), so that what needs no Paddle (the converter, the
config, the checkpoint files) imports without it: `import paddle_glm4` costs milliseconds, not Paddle's import.
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

# Paddle warns on import that ccache (for compiling C++ extensions) is missing; this package compiles nothing
warnings.filterwarnings("ignore", message="No ccache found", category=UserWarning)

from . import device  # noqa: E402, F401 - tunes MKL before Paddle's first GEMM (device.prefer_mkl_avx2_on_amd)
from .integrations.import_hook import register_when_imported  # noqa: E402

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time, __getattr__ below
    from .config import GLM4Config as GLM4Config
    from .generation import GenerationConfig as GenerationConfig
    from .integrations.import_hook import register_paddleformers as register_paddleformers
    from .integrations.paddlenlp import register_paddlenlp as register_paddlenlp
    from .kv_cache import KVCache as KVCache
    from .model import GLM4ForCausalLM as GLM4ForCausalLM
    from .model import GLM4Model as GLM4Model
    from .sequences import Sequences as Sequences
    from .streamer import TextIteratorStreamer as TextIteratorStreamer
    from .streamer import TextStreamer as TextStreamer
    from .tokenizer import GLM4Tokenizer as GLM4Tokenizer

# public name -> the module that defines it
_EXPORTS = {
    "GLM4Config": "config",
    "GLM4ForCausalLM": "model",
    "GLM4Model": "model",
    "GLM4Tokenizer": "tokenizer",
    "GenerationConfig": "generation",
    "KVCache": "kv_cache",
    "Sequences": "sequences",
    "TextIteratorStreamer": "streamer",
    "TextStreamer": "streamer",
    "register_paddlenlp": "integrations.paddlenlp",
    "register_paddleformers": "integrations.import_hook",
}
__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # the next lookup is an ordinary one
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


# PaddleNLP's and PaddleFormers' Auto classes learn GLM-4 as soon as the library is imported (now, if it already
# is); free without them
register_when_imported()
