"""paddle_glm4: GLM-4-9B (base and chat) in PaddlePaddle."""

from .config import GLM4Config
from .kv_cache import KVCache
from .model import GLM4ForCausalLM, GLM4Model

__all__ = ["GLM4Config", "GLM4ForCausalLM", "GLM4Model", "KVCache"]
__version__ = "0.1.0"
