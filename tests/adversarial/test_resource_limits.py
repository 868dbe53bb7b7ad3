"""Resource limits: nothing a file says makes the project allocate, read or wait without bound.

- A config whose sizes contradict its checkpoint (num_hidden_layers: 1000, or 10^9) is refused by comparing it
  with the checkpoint's index and headers before the model is built: the model class is never instantiated
  (it used to allocate layer after layer until the machine ran out of memory).
- JSON files are read with a size bound and only if regular: a FIFO in place of config.json is refused at once
  instead of blocking, and neither a nesting bomb nor a 5000-digit number reaches a recursive or quadratic step.
- Sizes in a config are bounded far beyond GLM-4's, so that no single field asks for the impossible.
"""

from __future__ import annotations

import json
import os
import time

import pytest
from corpus import build_templates, copy_tree
from sandbox import no_hang, refused  # noqa: F401 (no_hang: an autouse fixture)

from converters import torch_to_paddle
from paddle_glm4 import __main__ as glm4_cli
from paddle_glm4.config import CANONICAL_SCHEMA, GLM4Config
from paddle_glm4.finetune import DataError, read_conversations
from paddle_glm4.integrations.paddlenlp import is_glm4
from paddle_glm4.model import GLM4ForCausalLM
from paddle_glm4.output_dir import OWNER_FILE
from paddle_glm4.server.tool_calls import parse_reply
from paddle_glm4.small_vocab import write_small_vocabulary
from paddle_glm4.tokenizer import MAX_TOKENIZER_BYTES, GLM4Tokenizer
from paddle_glm4.validation import MAX_DEPTH, SchemaError, parse_json

pytestmark = pytest.mark.torch_free


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    return build_templates(tmp_path_factory)


def set_fields(path, **fields):
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


@pytest.mark.parametrize(
    "layers, message",
    [
        (3, "missing tensor 'model.layers.2."),  # within the bounds: the headers say no
        (1000, "missing tensor 'model.layers.2."),
        (10**9, "num_hidden_layers: must be an integer in [1, 1024], got 1000000000"),
    ],
)
def test_a_config_bigger_than_its_checkpoint_is_refused_before_the_model_is_built(
    capsys, tmp_path, templates, monkeypatch, layers, message
):
    model = copy_tree(templates[1], tmp_path / "model")
    set_fields(model / "config.json", num_hidden_layers=layers)

    def never(*args, **kwargs):
        raise AssertionError("the model was built before the config was checked against the checkpoint")

    monkeypatch.setattr(GLM4ForCausalLM, "__init__", never)
    refused(capsys, glm4_cli.main, ["generate", "--model", str(model), "--prompt", "hi"], tmp_path, str(model), message)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"num_layers": 1000}, "missing tensor 'transformer.encoder.layers.2."),
        ({"num_layers": 10**9}, "num_layers: must be an integer in [1, 1024]"),
        ({"padded_vocab_size": 1 << 40}, "padded_vocab_size: must be an integer in [1, 4194304]"),
        ({"seq_length": 1 << 40}, "seq_length: must be an integer in [1, 16777216]"),
        ({"hidden_size": 1 << 20}, "hidden_size: must be an integer in [1, 65536]"),
    ],
)
def test_a_published_config_bigger_than_its_checkpoint_is_refused(capsys, tmp_path, templates, fields, message):
    src = copy_tree(templates[0], tmp_path / "src")
    set_fields(src / "config.json", **fields)
    refused(
        capsys,
        torch_to_paddle.main,
        ["--src", str(src), "--dst", str(tmp_path / "dst")],
        tmp_path,
        str(src / "config.json" if "must be" in message else src),
        message,
    )


@pytest.mark.parametrize(
    "name", ["config.json", "generation_config.json", "tokenizer_config.json", "model.safetensors.index.json"]
)
def test_a_fifo_in_place_of_a_json_file_is_refused_at_once(capsys, tmp_path, templates, name):
    model = copy_tree(templates[1], tmp_path / "model")
    os.unlink(model / name)
    os.mkfifo(model / name)  # nobody ever writes to it: opening it to read would block
    refused(
        capsys,
        glm4_cli.main,
        ["generate", "--model", str(model), "--prompt", "hi"],
        tmp_path,
        str(model / name),
        "not a regular file",
    )


def test_the_canonical_bounds_hold_glm4_and_its_long_context_variant():
    """The bounds refuse absurd sizes, not real ones: GLM-4-9B, and the 1M-context chat model's geometry."""
    GLM4Config(seq_length=1 << 20, rope_ratio=10000)
    for field, limit in [
        ("vocab_size", 1 << 22),
        ("hidden_size", 1 << 16),
        ("num_hidden_layers", 1024),
        ("seq_length", 1 << 24),
    ]:
        assert CANONICAL_SCHEMA.fields[field].max == limit


@pytest.mark.parametrize(
    "text",
    [
        "[" * 1_000_000,  # recursion: RecursionError in json.loads, or a crash with a raised limit
        '{"a":' * 1_000_000,
        "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1),
        "1" * 100_000,  # Python refuses to convert more than 4300 digits
        '["' + '\\"' * 1_000_000,  # an unterminated string of escapes
    ],
)
def test_hostile_json_is_refused_quickly(text):
    started = time.process_time()
    with pytest.raises(SchemaError, match=r"^x\.json: not valid JSON"):
        parse_json(text, "x.json")
    assert time.process_time() - started < 5, "linear work, even for a megabyte of hostile text"


BOMB = "[" * 100_000 + "]" * 100_000


def test_a_nesting_bomb_from_the_model_is_not_a_tool_call():
    """A tool call's arguments are the model's text, which a prompt can steer: parsed with the same limits."""
    assert parse_reply(["get_weather\n" + BOMB], {"get_weather"}) is None
    assert parse_reply(['get_weather\n{"city": NaN}'], {"get_weather"}) is None  # not JSON to an OpenAI client
    assert parse_reply(['get_weather\n{"city": "Paris"}'], {"get_weather"}) is not None


def test_recognising_a_checkpoint_survives_hostile_files(tmp_path):
    """PaddleNLP's Auto classes ask paddle_glm4 whether a directory is GLM-4: a bomb or a FIFO means no."""
    (tmp_path / "config.json").write_text('{"model_type": "glm4", "x": ' + BOMB + "}")
    os.mkfifo(tmp_path / "tokenizer_config.json")
    assert not is_glm4(str(tmp_path))


def test_a_tokenizer_model_far_too_big_is_refused_unread(capsys, tmp_path, templates):
    """GLM-4's tokenizer.model is 2.6 MB; one past the limit (sparse: no disk) is refused by its size."""
    model = copy_tree(templates[1], tmp_path / "model")
    with open(model / "tokenizer.model", "r+b") as f:
        f.truncate(MAX_TOKENIZER_BYTES + 1)
    refused(
        capsys,
        glm4_cli.main,
        ["generate", "--model", str(model), "--prompt", "hi"],
        tmp_path,
        str(model / "tokenizer.model"),
        f"bytes, more than the {MAX_TOKENIZER_BYTES} this file may have",
    )


def test_a_bomb_in_a_destinations_manifest_means_not_ours(capsys, tmp_path, templates):
    """--overwrite replaces only a directory whose manifest proves it ours: a bomb there proves nothing."""
    src = copy_tree(templates[0], tmp_path / "src")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "conversion_manifest.json").write_text(BOMB)
    refused(
        capsys,
        torch_to_paddle.main,
        ["--src", str(src), "--dst", str(dst), "--overwrite"],
        tmp_path,
        "does not look like",
        "conversion_manifest.json",
    )


def test_a_bomb_in_a_partial_directorys_owner_file_leaves_it_alone(capsys, tmp_path, templates):
    src = copy_tree(templates[0], tmp_path / "src")
    partial = tmp_path / ".dst.x1y2.partial"
    partial.mkdir()
    (partial / OWNER_FILE).write_text(BOMB)
    assert torch_to_paddle.main(["--src", str(src), "--dst", str(tmp_path / "dst")]) == 0
    assert f"has no readable {OWNER_FILE}" in capsys.readouterr().err
    assert (partial / OWNER_FILE).read_text() == BOMB


def test_a_nesting_bomb_in_finetuning_data_is_an_error_naming_the_line(tmp_path):
    tokenizer = GLM4Tokenizer.from_pretrained(write_small_vocabulary(tmp_path / "vocab"))
    data = tmp_path / "data.jsonl"
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    data.write_text(json.dumps({"messages": turns}) + '\n{"messages": ' + BOMB + "}\n")
    with pytest.raises(DataError, match=r"data\.jsonl:2: not valid JSON for this project \(nested more than 32"):
        read_conversations(str(data), tokenizer, max_length=64)
