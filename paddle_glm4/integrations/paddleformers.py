"""PaddleFormers integration: its Auto classes load converted GLM-4 checkpoints as this project's classes.

    import paddle_glm4                                  # or: paddle_glm4.register_paddleformers()
    from paddleformers.transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained("THUDM/glm-4-9b-chat")      # offline: PF_HOME set, download_hub=
    model = AutoModelForCausalLM.from_pretrained("THUDM/glm-4-9b-chat")   # "aistudio" (README, paddleformers_home)
    ids, scores = model.generate(**tokenizer("Hello", return_tensors="pd"), max_new_tokens=32,
                                 decode_strategy="sampling", top_p=0.8, temperature=0.8)

How it hooks in: through PaddleFormers 1.2.0's public registration API only, nothing of it wrapped.
- `AutoConfig.register("glm4", PaddleFormersGLM4Config)`: a checkpoint's config.json with model_type "glm4" (what
  this project writes) loads as that PretrainedConfig subclass; `.to_glm4_config()` gives the GLM4Config. PaddleFormers
  itself has no "glm4" (its GLM models are "glm4_moe", "glm4v_moe", "glm_moe_dsa", "glm_ocr"); Qwen2 and the rest stay
  its own, their mappings untouched.
- `AutoModel.register` and `AutoModelForCausalLM.register(PaddleFormersGLM4Config, PaddleFormersGLM4ForCausalLM)`: the
  causal LM for both (as THUDM's checkpoint maps it; PaddleFormers keeps one mapping for all its Auto model classes).
- `AutoTokenizer.register(PaddleFormersGLM4Config, slow_tokenizer_class=ChatGLM4Tokenizer)`: PaddleFormers'
  AutoTokenizer is transformers' (it subclasses it), and so is its register; it picks a tokenizer by the
  `tokenizer_class` of tokenizer_config.json, which is "ChatGLM4Tokenizer" in THUDM's files and this project's, and
  looks that name up among the registered classes. ChatGLM4Tokenizer already is Paddle-native (its tensors are
  Paddle's): it says so by deriving from PaddleFormers' PaddleTokenizerMixin, after GLM4Tokenizer, so that
  PaddleFormers leaves it as it is instead of mixing its own conversions in.
The model and tokenizer are the PaddleNLP adapter's classes (same loading rules, same generate arguments, which
PaddleFormers kept) with PaddleFormers' model cache and from_pretrained arguments.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from paddleformers.transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig
from paddleformers.transformers.tokenizer_utils import PaddleTokenizerMixin

from ..config import MODEL_TYPE, GLM4Config
from ..model import GLM4ForCausalLM
from .paddleformers_home import model_home, reads_names
from .paddlenlp import LOCATION_ARGS, ModelCache, PaddleNLPGLM4ForCausalLM, PaddleNLPGLM4Tokenizer, merge_peft_lora

PUBLISHED_MODEL_TYPE = "chatglm"  # THUDM's config.json; PaddleFormers (and transformers) have no such model_type
PADDLEFORMERS_CACHE = ModelCache("PaddleFormers", model_home, "--paddleformers-name", reads_names)
# from_pretrained arguments PaddleFormers passes or its users give to say where files are; GLM-4 is only ever read
# from local files, so the download switches have nothing to do
PADDLEFORMERS_LOCATION_ARGS = (*LOCATION_ARGS, "download_hub", "from_modelscope", "_from_auto", "_commit_hash")


class PaddleFormersGLM4Config(PretrainedConfig):
    """A GLM-4 config.json as PaddleFormers' AutoConfig reads it; `to_glm4_config()` is this project's config."""

    model_type = MODEL_TYPE

    def to_glm4_config(self) -> GLM4Config:
        data = {**self.to_dict(), "dtype": self.dtype}  # to_dict() spells it torch_dtype, as transformers does
        if self.model_type == MODEL_TYPE:  # this project's schema admits its own fields only (THUDM's, any more)
            fields = {"model_type", *(field.name for field in dataclasses.fields(GLM4Config))}
            data = {key: value for key, value in data.items() if key in fields}
        return GLM4Config.from_dict(data, source=f"{type(self).__name__} ({self.model_type})")


class PaddleFormersPublishedGLM4Config(PaddleFormersGLM4Config):
    """THUDM's config.json (model_type "chatglm"), registered so that PaddleFormers hands a directory of THUDM's
    PyTorch checkpoint to this project's classes: its tokenizer loads, and the model says how to convert it."""

    model_type = PUBLISHED_MODEL_TYPE


class ChatGLM4Tokenizer(PaddleNLPGLM4Tokenizer, PaddleTokenizerMixin):
    """GLM4Tokenizer as PaddleFormers' AutoTokenizer returns it; named as tokenizer_config.json names it."""

    model_cache = PADDLEFORMERS_CACHE
    location_args = PADDLEFORMERS_LOCATION_ARGS


class PaddleFormersGLM4ForCausalLM(PaddleNLPGLM4ForCausalLM):
    """GLM4ForCausalLM as PaddleFormers' AutoModelForCausalLM returns it: it loads by PaddleFormers name, and
    `generate` takes PaddleFormers' arguments and returns (ids, scores) as PaddleFormers' does."""

    # no `config_class`: it loads both registered configs' checkpoints (AutoModel*.register checks the pairing by it)
    model_cache = PADDLEFORMERS_CACHE
    location_args = PADDLEFORMERS_LOCATION_ARGS

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        name_or_path: Any,
        *args: Any,
        config: Any = None,
        **kwargs: Any,
    ) -> PaddleFormersGLM4ForCausalLM:
        if args:  # they would land on PaddleFormers-specific model __init__ arguments
            raise TypeError("AutoModelForCausalLM.from_pretrained for GLM-4 takes keyword arguments only")
        if config is not None:  # a config object may only restate the checkpoint's: anything else is not loadable
            raise TypeError(
                "AutoModelForCausalLM.from_pretrained for GLM-4 reads the checkpoint's config.json; "
                "config= is not supported"
            )
        return super().from_pretrained(name_or_path, **kwargs)

    def get_hardware_flops(self) -> float:
        """PaddleFormers' Trainer asks every model for its FLOPs per token, to log throughput; NotImplementedError
        is its convention (PretrainedModel's own) for a model that does not count them, and it logs none."""
        raise NotImplementedError("GLM-4 does not count its FLOPs per token for PaddleFormers' throughput log")


def merge_paddleformers_lora(lora_model: Any) -> GLM4ForCausalLM:
    """The GLM-4 model inside a `paddleformers.peft.LoRAModel`, every LoRA update added into its weight and this
    project's Linear layers back in place, ready for `save_pretrained` (see merge_paddlenlp_lora: PaddleFormers'
    `restore_original_model` would likewise put back nn.Linear layers with new biases)."""
    from paddleformers.peft.lora import LoRALinear

    return merge_peft_lora(lora_model, LoRALinear)


def register_with_auto_classes() -> None:
    """Register GLM-4 with PaddleFormers' AutoConfig, AutoModel, AutoModelForCausalLM and AutoTokenizer (see the
    module docstring); calling it again changes nothing. `paddle_glm4.register_paddleformers()` calls it."""
    for config_class in (PaddleFormersGLM4Config, PaddleFormersPublishedGLM4Config):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        for auto_class in (AutoModel, AutoModelForCausalLM):
            auto_class.register(config_class, PaddleFormersGLM4ForCausalLM, exist_ok=True)
        AutoTokenizer.register(config_class, slow_tokenizer_class=ChatGLM4Tokenizer, exist_ok=True)


# Importing this module imports PaddleFormers, whose import hook (import_hook.py) then finds this module incomplete
# and leaves the registration to it: whichever comes first, GLM-4 is registered once both are imported.
register_with_auto_classes()
