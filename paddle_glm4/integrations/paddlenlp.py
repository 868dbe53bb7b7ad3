"""PaddleNLP integration: its Auto classes load converted GLM-4 checkpoints as this project's classes.

    import paddle_glm4                                  # or: paddle_glm4.register_paddlenlp()
    from paddlenlp.transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained("THUDM/glm-4-9b-chat")
    model = AutoModelForCausalLM.from_pretrained("THUDM/glm-4-9b-chat")
    ids, scores = model.generate(**tokenizer("Hello", return_tensors="pd"), max_new_tokens=32,
                                 decode_strategy="sampling", top_p=0.8, temperature=0.8)

How it hooks in. PaddleNLP 2.8 has no way to register a model that lives outside its own package: its Auto
classes find classes by module paths inside `paddlenlp.transformers` (left alone, they take "GLM4ForCausalLM"
for their GLM-10B family, whose name it contains) and download anything they do not hold locally. So
`register_paddlenlp()` wraps the `from_pretrained` classmethod of AutoConfig, AutoModel, AutoModelForCausalLM
and AutoTokenizer (in memory; no file of PaddleNLP changes). The wrapper answers for GLM-4 and hands every other
call, unchanged, to PaddleNLP's own method. GLM-4 means: one of `GLM4_NAMES`, or a name or directory whose files
are GLM-4's (a config.json with model_type "glm4", or THUDM's tokenizer_config.json). AutoModel gives the causal
LM too, as THUDM's published checkpoint maps it.

Where files come from, as PaddleNLP 2.8.1 resolves a name (paddlenlp/utils/env.py, utils/download/):
an existing local directory is read as it is; any other name is read from `MODEL_HOME/<name>/`, where MODEL_HOME
is `$PPNLP_HOME/models` (PPNLP_HOME defaults to ~/.paddlenlp and is read once, when paddlenlp is imported), or
from `<cache_dir>/<name>/` when from_pretrained is given `cache_dir=` (paddlenlp_home.py computes that directory
without importing PaddleNLP, for `glm4-convert` to write into). GLM-4 is never downloaded: nothing PaddleNLP could
fetch is a Paddle checkpoint of it, so a GLM-4 name with nothing converted in the cache is an error that says
how to convert, raised before anything touches the network.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import paddle

from ..config import CONFIG_NAME, MODEL_TYPE, GLM4Config
from ..engine import check_pair
from ..generation import Batch, GenerationConfig
from ..linear import Linear
from ..model import GLM4ForCausalLM
from ..tokenizer import CONFIG_FILE as TOKENIZER_CONFIG_FILE
from ..tokenizer import TOKENIZER_FILE, GLM4Tokenizer
from ..validation import read_json
from .paddlenlp_home import model_home

# The names THUDM publishes GLM-4-9B under. Any name works once its converted checkpoint is in the cache;
# these are the ones for which a missing checkpoint gets the how-to-convert error instead of a download.
GLM4_NAMES = ("THUDM/glm-4-9b", "THUDM/glm-4-9b-chat")
# The tokenizer class THUDM's tokenizer_config.json names; the converter copies that file unchanged.
PUBLISHED_TOKENIZER_CLASS = "ChatGLM4Tokenizer"
# from_pretrained arguments with which PaddleNLP users say where files are. The download switches are accepted
# and have nothing to do: GLM-4 is only ever read from local files.
LOCATION_ARGS: tuple[str, ...] = ("cache_dir", "subfolder", "from_hf_hub", "from_aistudio")


class CheckpointNotFoundError(FileNotFoundError):
    """No GLM-4 checkpoint that Paddle can load where one was asked for; the message says how to make one."""


# ---- where checkpoints are -------------------------------------------------------------------------------------


def _read_json(path: str) -> dict:
    try:
        data = read_json(path)
    except (OSError, ValueError):  # absent, unreadable or not sane JSON: not recognisably GLM-4, not ours to judge
        return {}
    return data if isinstance(data, dict) else {}


def _glm4_files(directory: str) -> str | None:
    """ "converted" (this project's checkpoint), "published" (THUDM's PyTorch one) or None (not GLM-4)."""
    if _read_json(os.path.join(directory, CONFIG_NAME)).get("model_type") == MODEL_TYPE:
        return "converted"
    if _read_json(os.path.join(directory, TOKENIZER_CONFIG_FILE)).get("tokenizer_class") == PUBLISHED_TOKENIZER_CLASS:
        return "published"
    return None


@dataclasses.dataclass(frozen=True)
class ModelCache:
    """How a library finds a model by name: where its cache is, and the glm4-convert flag that writes there."""

    library: str
    home: Callable[[], str]  # the cache's root: a name's files are in home()/<name>/
    convert_flag: str
    # what else the library needs before it reads a name from the cache, if anything (said after the command)
    reads_names: Callable[[], str | None] = lambda: None


PADDLENLP_CACHE = ModelCache("PaddleNLP", model_home, "--paddlenlp-name")


def _locate(name_or_path: str, kwargs: dict, cache: ModelCache = PADDLENLP_CACHE) -> tuple[str, str | None]:
    """The directory the library would read `name_or_path` from, and which GLM-4 files it holds."""
    if os.path.isdir(name_or_path):  # PaddleNLP and PaddleFormers too prefer a local directory to a name
        directory = name_or_path
    else:
        directory = os.path.join(kwargs.get("cache_dir") or cache.home(), name_or_path)
    if kwargs.get("subfolder"):
        directory = os.path.join(directory, kwargs["subfolder"])
    return directory, _glm4_files(directory)


def is_glm4(name_or_path: object, **kwargs: Any) -> bool:
    """Whether `from_pretrained(name_or_path, **kwargs)` is GLM-4's to answer (then PaddleNLP is not asked)."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        return False
    name_or_path = os.fspath(name_or_path)
    return name_or_path in GLM4_NAMES or _locate(name_or_path, kwargs)[1] is not None


def checkpoint_dir(
    name_or_path: str | os.PathLike, *, converted: bool = True, cache: ModelCache = PADDLENLP_CACHE, **kwargs: Any
) -> str:
    """The local directory to load GLM-4 from (`converted=False`: THUDM's published files will do too, as they
    do for the tokenizer and config), or CheckpointNotFoundError saying how to make it."""
    name_or_path = os.fspath(name_or_path)
    directory, files = _locate(name_or_path, kwargs, cache)
    if files == "converted" or (files == "published" and not converted):
        return directory
    if files == "published":
        raise CheckpointNotFoundError(
            f"{directory} holds GLM-4 as THUDM publishes it (PyTorch weights); Paddle loads it once converted:\n"
            f"  glm4-convert --src {directory} --dst <a new directory>\nthen load that directory."
        )
    if os.path.isdir(name_or_path):
        raise CheckpointNotFoundError(
            f"{directory} holds no converted GLM-4 checkpoint (a config.json with model_type {MODEL_TYPE!r}); "
            f"convert THUDM's PyTorch checkpoint into it:\n  glm4-convert --src <dir> --dst {directory}"
        )
    message = (
        f"no converted GLM-4 checkpoint for {name_or_path!r} in {directory}. There is no GLM-4 for "
        f"{cache.library} to download: convert THUDM's PyTorch checkpoint (e.g. from `huggingface-cli download "
        f"{name_or_path} --local-dir <dir>`) into that directory:\n  glm4-convert --src <dir> --dst {directory}"
    )
    if not kwargs.get("cache_dir"):
        message += f"\nor, the same: glm4-convert --src <dir> {cache.convert_flag} {name_or_path}"
    if cache.reads_names():
        message += f"\n{cache.reads_names()}"
    raise CheckpointNotFoundError(message)


def _refuse_unknown(kwargs: dict, what: str, *accepted: str, location_args: tuple[str, ...] = LOCATION_ARGS):
    unknown = sorted(set(kwargs) - set(location_args) - set(accepted))
    if unknown:
        raise TypeError(f"{what} got unsupported argument(s) {', '.join(unknown)}")


# ---- what the Auto classes return for GLM-4 --------------------------------------------------------------------


def load_config(name_or_path: str | os.PathLike, **kwargs: Any) -> GLM4Config:
    """AutoConfig for GLM-4: the checkpoint's GLM4Config; keyword arguments that name its fields override them."""
    directory = checkpoint_dir(name_or_path, converted=False, **kwargs)
    overrides = {key: value for key, value in kwargs.items() if key not in LOCATION_ARGS}
    _refuse_unknown(overrides, "GLM4Config", *(field.name for field in dataclasses.fields(GLM4Config)))
    return dataclasses.replace(GLM4Config.from_pretrained(directory), **overrides)


class PaddleNLPGLM4Tokenizer(GLM4Tokenizer):
    """GLM4Tokenizer as AutoTokenizer returns it: it also loads by PaddleNLP name."""

    model_cache = PADDLENLP_CACHE  # where a name's files are (the PaddleFormers subclass says its own)
    location_args = LOCATION_ARGS

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs: Any) -> PaddleNLPGLM4Tokenizer:
        # use_fast: PaddleNLP's switch to a compiled tokenizer; tiktoken already is one
        _refuse_unknown(kwargs, "AutoTokenizer.from_pretrained for GLM-4", "use_fast", location_args=cls.location_args)
        return super().from_pretrained(checkpoint_dir(name_or_path, converted=False, cache=cls.model_cache, **kwargs))


class PaddleNLPGLM4ForCausalLM(GLM4ForCausalLM):
    """GLM4ForCausalLM as AutoModelForCausalLM returns it: it also loads by PaddleNLP name, and `generate` takes
    PaddleNLP's arguments besides this project's (see `generate_arguments`)."""

    vocab_limit: int | None = None  # the checkpoint tokenizer's len(): ids from there on have no token
    model_cache = PADDLENLP_CACHE  # where a name's files are (the PaddleFormers subclass says its own)
    location_args = LOCATION_ARGS

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        dtype: str | None = None,
        fused: bool | None = None,
        tensor_parallel_degree: int = 1,
        tensor_parallel_rank: int | None = None,
        **kwargs: Any,
    ) -> PaddleNLPGLM4ForCausalLM:
        """`tensor_parallel_degree` N > 1 (PaddleNLP's argument): this process is one of N ranks started by
        `python -m paddle.distributed.launch --nproc_per_node N`, holding its slices of the model
        (paddle_glm4.tensor_parallel); every rank runs the same calls. `tensor_parallel_rank`, if given, must
        be the launch's rank for this process."""
        _refuse_unknown(kwargs, "AutoModelForCausalLM.from_pretrained for GLM-4", location_args=cls.location_args)
        directory = checkpoint_dir(name_or_path, cache=cls.model_cache, **kwargs)
        model = super().from_pretrained(
            directory, dtype=dtype, fused=fused, tensor_parallel_degree=tensor_parallel_degree
        )
        rank = 0 if model.tensor_parallel is None else model.tensor_parallel.rank
        if tensor_parallel_rank is not None and tensor_parallel_rank != rank:
            raise ValueError(f"tensor_parallel_rank {tensor_parallel_rank} is not this process's rank, {rank}")
        # The checkpoint's tokenizer says which ids have text: generate never picks the embedding's padding rows.
        if os.path.exists(os.path.join(directory, TOKENIZER_FILE)):
            tokenizer = GLM4Tokenizer.from_pretrained(directory)
            check_pair(model, tokenizer, directory, directory)
            model.vocab_limit = len(tokenizer)
        return model

    def generate(
        self, input_ids: Batch, attention_mask: Batch | None = None, generation_config: Any = None, **options: Any
    ) -> tuple[paddle.Tensor, paddle.Tensor]:
        """PaddleNLP's generate(): `ids, scores = model.generate(**tokenizer(texts, return_tensors="pd"), ...)`.

        `generation_config` is a paddlenlp GenerationConfig; the options its user set apply, and keyword options
        override them. ids [b * num_return_sequences, new] holds only the new tokens, as in PaddleNLP; with
        `trunc_input=False`, the prompt's ids (padding included) before them, [b * num_return_sequences, s + new].
        """
        if generation_config is not None:  # what its user set, less the version stamps of one read from a file
            chosen = generation_config.to_diff_dict()
            options = {**{k: v for k, v in chosen.items() if not k.endswith("_version")}, **options}
        keep_prompt = not options.pop("trunc_input", True)
        arguments, copies = generate_arguments({"vocab_limit": self.vocab_limit, **options}, self.generation_config)
        if copies > 1:  # PaddleNLP's order: the copies of each prompt are adjacent rows
            position_ids = arguments.pop("position_ids", None)
            input_ids, attention_mask, position_ids = (
                None if t is None else paddle.repeat_interleave(_as_batch(t), copies, axis=0)
                for t in (input_ids, attention_mask, position_ids)
            )
            arguments["position_ids"] = position_ids
        ids, scores = super().generate(input_ids, attention_mask, **arguments)
        if keep_prompt:
            ids = paddle.concat([_as_batch(input_ids).astype(ids.dtype), ids], axis=1)
        return ids, scores


# PaddleNLP generate() options for what generation here does not do, with the value that leaves each off. Another
# value is refused rather than ignored.
UNSUPPORTED_OPTIONS = {
    "num_beams": 1,
    "num_beam_groups": 1,
    "length_penalty": 1.0,
    "diversity_rate": 0.0,
    "early_stopping": False,
    "min_length": 0,
    "min_new_tokens": 0,
    "no_repeat_ngram_size": 0,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
}
# Options passed on to GLM4ForCausalLM.generate as they are, when set; generate takes the unset sampling options
# from the checkpoint's generation_config.json (GenerationConfig.merged).
SAMPLING_OPTIONS = ("temperature", "top_k", "top_p", "repetition_penalty")
PASSED_OPTIONS = (
    *SAMPLING_OPTIONS,
    "eos_token_id",
    "pad_token_id",
    "seed",
    "streamer",
    "position_ids",
    "truncate",
    "vocab_limit",
)


def generate_arguments(options: dict, defaults: GenerationConfig) -> tuple[dict, int]:
    """PaddleNLP generate() options -> (keyword arguments of GLM4ForCausalLM.generate, copies of each prompt).

    Only what the caller set is passed on; the rest is generate's to resolve, by the one rule of
    GenerationConfig.merged over the checkpoint's generation_config.json (`defaults`).
    - decode_strategy "greedy_search" | "sampling" (or do_sample); "beam_search" is refused. Unset: sampling if
      the checkpoint's generation_config.json says do_sample or a sampling option is given, else greedy.
    - max_new_tokens, or PaddleNLP's older max_length (also a count of NEW tokens); unset: this project's default.
    - temperature, top_k, top_p, repetition_penalty; unset: generation_config.json's values, else off (top_k 0,
      where PaddleNLP's own default is 50).
    - eos_token_id (an id or a list), pad_token_id, seed, streamer, position_ids, truncate, vocab_limit: as given
      (vocab_limit defaults to the len() of the checkpoint's tokenizer).
    - num_return_sequences: that many samples per prompt (sampling only).
    - use_cache: the KV cache is always used; it changes speed, not tokens.
    """
    options = dict(options)
    strategy = options.pop("decode_strategy", None)
    do_sample = options.pop("do_sample", None)
    if strategy == "beam_search":
        raise ValueError("decode_strategy='beam_search' is not supported for GLM-4; use 'greedy_search' or 'sampling'")
    if strategy not in (None, "greedy_search", "sampling"):
        raise ValueError(f"decode_strategy must be 'greedy_search' or 'sampling', got {strategy!r}")
    if strategy is not None:
        do_sample = strategy == "sampling"
    arguments: dict[str, Any] = {} if do_sample is None else {"do_sample": bool(do_sample)}

    max_new_tokens, max_length = options.pop("max_new_tokens", None), options.pop("max_length", None)
    if max_new_tokens is None and max_length:  # PaddleNLP's GenerationConfig uses max_length=0 for "unset"
        max_new_tokens = max_length
    if max_new_tokens is not None:
        arguments["max_new_tokens"] = max_new_tokens
    for name in PASSED_OPTIONS:
        value = options.pop(name, None)
        if value is not None:
            arguments[name] = value

    copies = options.pop("num_return_sequences", None) or 1
    sampling = {name: arguments.get(name) for name in ("do_sample", *SAMPLING_OPTIONS)}
    if copies > 1 and not defaults.merged(**sampling).do_sample:
        raise ValueError(
            f"num_return_sequences={copies} needs decode_strategy='sampling' (greedy copies are identical)"
        )
    options.pop("use_cache", None)
    for name, off in UNSUPPORTED_OPTIONS.items():
        value = options.pop(name, None)
        if value is not None and value != off:
            raise ValueError(f"{name}={value!r} is not supported by GLM-4 generation here")
    if options:
        raise TypeError(f"generate() got unsupported argument(s) {', '.join(sorted(options))}")
    return arguments, copies


def _as_batch(values) -> paddle.Tensor:
    tensor = values if isinstance(values, paddle.Tensor) else paddle.to_tensor(values)
    return tensor.unsqueeze(0) if tensor.ndim == 1 else tensor


# ---- registration ----------------------------------------------------------------------------------------------

AUTO_LOADERS = {
    "AutoConfig": load_config,
    "AutoModel": PaddleNLPGLM4ForCausalLM.from_pretrained,
    "AutoModelForCausalLM": PaddleNLPGLM4ForCausalLM.from_pretrained,
    "AutoTokenizer": PaddleNLPGLM4Tokenizer.from_pretrained,
}


def merge_paddlenlp_lora(lora_model: Any) -> GLM4ForCausalLM:
    """The GLM-4 model inside a `paddlenlp.peft.LoRAModel`, every LoRA update added into its weight and this
    project's Linear layers back in place, ready for `save_pretrained` (an ordinary converted checkpoint, which
    converters.paddle_to_torch turns into the published torch layout). PaddleNLP's own `restore_original_model`
    would put back plain nn.Linear layers, each with a new bias that GLM-4's o_proj and MLP do not have."""
    from paddlenlp.peft.lora import LoRALinear as PaddleNLPLoRALinear

    return merge_peft_lora(lora_model, PaddleNLPLoRALinear)


def merge_peft_lora(lora_model: Any, lora_layer_class: Any) -> GLM4ForCausalLM:
    """merge_paddlenlp_lora for the LoRAModel of a peft whose LoRA layers are `lora_layer_class`: PaddleNLP's, or
    PaddleFormers', which kept its weight, bias, lora_A, lora_B, scaling, merged and disable_lora."""
    model = lora_model.model
    for name, layer in list(model.named_sublayers()):
        if not isinstance(layer, lora_layer_class):
            continue
        *path, attribute = name.split(".")
        parent = functools.reduce(getattr, path, model)
        linear = Linear(layer.weight.shape[0], layer.weight.shape[1], model.model.kernels, bias=layer.bias is not None)
        with paddle.no_grad():
            # the model as it computes now: an update merged already, or switched off, is not added (again)
            off = layer.merged or getattr(layer, "disable_lora", False)
            update = 0 if off else paddle.matmul(layer.lora_A, layer.lora_B) * layer.scaling
            linear.weight.set_value(layer.weight + update)
            if linear.bias is not None:
                linear.bias.set_value(layer.bias)
        setattr(parent, attribute, linear)
    for param in model.parameters():
        param.stop_gradient = False
    return model.eval()


def register_paddlenlp() -> None:
    """Make PaddleNLP's AutoConfig, AutoModel, AutoModelForCausalLM and AutoTokenizer load GLM-4 (see the module
    docstring). Imports PaddleNLP; calling it again does nothing. `import paddle_glm4` already does this when
    PaddleNLP gets imported, warning if it fails; this call raises instead, so it also shows why."""
    import paddlenlp.transformers as transformers

    for class_name, load in AUTO_LOADERS.items():
        _answer_for_glm4(getattr(transformers, class_name), load)


def _answer_for_glm4(auto_class, load):
    if getattr(auto_class.from_pretrained, "answers_for_glm4", False):
        return
    original = auto_class.from_pretrained.__func__

    @functools.wraps(original)
    def from_pretrained(cls, name_or_path, *args, **kwargs):
        if not is_glm4(name_or_path, **kwargs):
            return original(cls, name_or_path, *args, **kwargs)
        if args:  # they would land on PaddleNLP-specific parameters (AutoModel's `task`, model __init__ args)
            raise TypeError(f"{auto_class.__name__}.from_pretrained for GLM-4 takes keyword arguments only")
        return load(name_or_path, **kwargs)

    from_pretrained.answers_for_glm4 = True  # type: ignore[attr-defined]
    auto_class.from_pretrained = classmethod(from_pretrained)
