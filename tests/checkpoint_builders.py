"""Small torch checkpoints, written the way users get them, for the converter tests.

- published layout: what THUDM's code + transformers' save_pretrained produce: torch tensors saved by the
  `safetensors` library, cut into shards by huggingface_hub as transformers does, indexed as transformers
  indexes them, `inv_freq` computed by torch THUDM's way, and a THUDM-style config.json (with keys we do
  not read, like `auto_map`);
- transformers' `glm` layout: written by `GlmForCausalLM.save_pretrained` itself.
Tensor names are the real GLM-4-9B names (from converters.mapping); only the sizes are reduced.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from conftest import small_config
from converters import mapping
from paddle_glm4 import GLM4Config
from paddle_glm4.safetensors_file import SafetensorsWriter

TORCH_DTYPES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def thudm_inv_freq(config: GLM4Config, dtype: str):
    """rotary_pos_emb.inv_freq as THUDM's RotaryEmbedding registers it (computed in the checkpoint dtype)."""
    import torch

    dim = config.rotary_dim
    return 1.0 / (10000 ** (torch.arange(0, dim, 2).to(dtype=torch_dtype(dtype)) / dim))


def published_state(config: GLM4Config, paddle: dict[str, np.ndarray], dtype: str) -> dict:
    """Published-layout torch tensors in THUDM's module order, from Paddle-layout fp32 arrays."""
    import torch

    specs = {spec.published: spec for spec in mapping.tensor_specs(config)}
    state = {}
    for name in mapping.published_order(config):
        if name == mapping.PUBLISHED_INV_FREQ:
            state[name] = thudm_inv_freq(config, dtype)
        else:
            spec = specs[name]
            [array] = mapping.from_paddle(spec, paddle[spec.paddle], "published")
            state[name] = torch.from_numpy(np.ascontiguousarray(array)).to(torch_dtype(dtype))
    return state


def write_published(
    directory,
    config: GLM4Config,
    paddle: dict[str, np.ndarray],
    dtype: str = "float32",
    max_shard_size: int | str | None = None,
    side_files: bool = True,
) -> Path:
    """A published-layout checkpoint in `directory` (sharded when `max_shard_size` is given)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = published_state(config, paddle, dtype)
    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size or 10**15)
    for filename, names in split.filename_to_tensors.items():
        save_file({name: state[name] for name in names}, directory / filename, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    thudm = {
        "_name_or_path": "THUDM/glm-4-9b-chat",
        "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig"},
        **config.to_published_dict(),
        "torch_dtype": dtype,
        "transformers_version": "4.42.4",
    }
    (directory / "config.json").write_text(json.dumps(thudm, indent=2))
    if side_files:
        write_side_files(directory)
    return directory


def write_hf(directory, model, max_shard_size: str | None = None, side_files: bool = True) -> Path:
    """transformers' own `glm` layout checkpoint of `model` (a GlmForCausalLM)."""
    directory = Path(directory)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    if side_files:
        write_side_files(directory)
    return directory


def write_side_files(directory: Path):
    """Stand-ins for the tokenizer and generation files, which the converter copies unchanged."""
    (directory / "tokenizer.model").write_bytes(bytes(range(256)) * 4)
    (directory / "tokenizer_config.json").write_text('{"model_max_length": 128000}\n')
    (directory / "generation_config.json").write_text('{"do_sample": true, "temperature": 0.8}\n')


def tree_digest(directory) -> dict[str, str] | None:
    """{relative path: sha256 (or '<dir>')} of everything under `directory`; None if it does not exist."""
    directory = Path(directory)
    if not directory.exists():
        return None
    digest = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            digest[os.path.relpath(os.path.join(root, name), directory)] = "<dir>"
        for name in files:
            path = os.path.join(root, name)
            digest[os.path.relpath(path, directory)] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return digest


def big_checkpoint(directory: Path, megabytes: int = 400) -> Path:
    """A published-layout fp32 checkpoint of about `megabytes` of random bits (written directly, fast)."""
    config = small_config(
        vocab_size=megabytes * 1024 // 8,
        hidden_size=512,
        intermediate_size=512,
        num_hidden_layers=1,
        num_attention_heads=8,
        head_dim=64,
    )
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config.to_published_dict()))
    names = mapping.published_order(config)
    specs = {spec.published: spec for spec in mapping.tensor_specs(config)}
    shapes = {name: specs[name].source_shapes("published")[0] for name in names if name in specs}
    shapes[mapping.PUBLISHED_INV_FREQ] = (config.rotary_dim // 2,)
    rng = np.random.default_rng(0)
    with SafetensorsWriter(str(directory / "model.safetensors"), [(n, "float32", shapes[n]) for n in names]) as writer:
        for name in names:
            if name == mapping.PUBLISHED_INV_FREQ:
                writer.write(name, mapping.published_inv_freq(config, "float32"))
            else:
                writer.write(name, rng.random(shapes[name], dtype=np.float32))
    return directory
