"""paddle_glm4: GLM-4-9B (base and chat) in PaddlePaddle."""

import warnings

# Paddle warns on import that ccache (for compiling C++ extensions) is missing; this package compiles nothing
warnings.filterwarnings("ignore", message="No ccache found", category=UserWarning)

from . import device  # noqa: E402 - first: it tunes MKL before Paddle's first GEMM (see device.prefer_mkl_avx2_on_amd)
from .config import GLM4Config
from .generation import GenerationConfig
from .integrations.paddlenlp import register_paddlenlp, register_paddlenlp_when_imported
from .kv_cache import KVCache
from .model import GLM4ForCausalLM, GLM4Model
from .streamer import TextIteratorStreamer, TextStreamer
from .tokenizer import GLM4Tokenizer

__all__ = ["GLM4Config", "GLM4ForCausalLM", "GLM4Model", "GLM4Tokenizer", "GenerationConfig", "KVCache",
           "TextIteratorStreamer", "TextStreamer", "register_paddlenlp"]
__version__ = "0.1.0"

# PaddleNLP's Auto classes learn GLM-4 as soon as paddlenlp is imported (now, if it already is); free without it
register_paddlenlp_when_imported()
