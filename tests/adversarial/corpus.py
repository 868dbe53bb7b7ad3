"""The checkpoints the adversarial tests attack, built without torch (so that these tests run in every
environment, numpy 1.x included): a published-layout GLM-4 checkpoint written by the project's own numpy writer,
with a tokenizer and a generation config, and the Paddle checkpoint converted from it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import small_config
from converters import paddle_to_torch, torch_to_paddle
from paddle_glm4.demo import random_weights
from paddle_glm4.small_vocab import write_small_vocabulary

SHARD = "60KB"  # cuts the small model into several files

# File names an attacker might write into an index or a manifest: each must be refused, before anything is written.
UNSAFE_NAMES = [
    "../escaped.safetensors",
    "../../escaped.safetensors",
    "/tmp/escaped.safetensors",
    "sub/escaped.safetensors",
    "./escaped.safetensors",
    "..",
    ".",
    "",
    "a\\..\\escaped.safetensors",
    "escaped\0.safetensors",
    "x" * 300 + ".safetensors",
    17,
    None,
    ["model.safetensors"],
    {"name": "model.safetensors"},
]


def build_published(directory: Path, dtype: str = "bfloat16") -> Path:
    """A sharded published-layout checkpoint in `directory`: config, index, shards, tokenizer, generation config."""
    config = small_config(dtype=dtype)
    tokenizer_dir = write_small_vocabulary(directory.parent / f".{directory.name}-vocab")
    extra = {p.name: str(p) for p in Path(tokenizer_dir).iterdir()}
    paddle_to_torch.write_published_checkpoint(
        str(directory), config, random_weights(config, 0), dtype=dtype, max_shard_size=SHARD, extra_files=extra
    )
    shutil.rmtree(tokenizer_dir)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2], "do_sample": False}))
    manifest = directory / "conversion_manifest.json"
    manifest.unlink()  # as downloaded: a published checkpoint carries no manifest of ours
    return directory


def build_paddle(source: Path, directory: Path) -> Path:
    """The Paddle checkpoint converted from the published one (with its manifest, which records the layout)."""
    torch_to_paddle.convert(str(source), str(directory), progress=False)
    return directory


def copy_tree(template: Path, directory: Path) -> Path:
    return Path(shutil.copytree(template, directory, symlinks=True))


def build_templates(tmp_path_factory) -> tuple[Path, Path]:
    """(published-layout checkpoint, the Paddle checkpoint converted from it), for a module's `templates` fixture:
    never attacked themselves, only copied (copy_tree) into each test's sandbox."""
    root = tmp_path_factory.mktemp("templates")
    published = build_published(root / "published")
    return published, build_paddle(published, root / "paddle")
