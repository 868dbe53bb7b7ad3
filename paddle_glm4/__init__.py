"""paddle_glm4: GLM-4-9B (base and chat) in PaddlePaddle."""

from . import device  # first: it tunes MKL before Paddle's first GEMM (see device.prefer_mkl_avx2_on_amd)
from .config import GLM4Config
from .generation import GenerationConfig
from .kv_cache import KVCache
from .model import GLM4ForCausalLM, GLM4Model
from .streamer import TextIteratorStreamer, TextStreamer
from .tokenizer import GLM4Tokenizer

__all__ = ["GLM4Config", "GLM4ForCausalLM", "GLM4Model", "GLM4Tokenizer", "GenerationConfig", "KVCache",
           "TextIteratorStreamer", "TextStreamer"]
__version__ = "0.1.0"
