"""Schema: every JSON file the project reads is checked before use, and a bad one is one `error:` line naming
the file and the field, exit code 2 (the server: 400), whatever is wrong with it.

The files: a checkpoint's config.json (the Paddle and the published spelling), generation_config.json,
tokenizer_config.json, model.safetensors.index.json, a conversion's conversion_manifest.json and an export's
export.json. What is wrong: the wrong type where a number belongs (a string, a list, a bool, 256.5), a value
out of range, NaN/Infinity/1e999, a repeated key, a nesting bomb, text that is not UTF-8, a file far too big.
Each attack runs the real command that reads the file and checks the exit code, the message, and that nothing
in the sandbox changed (the source byte-identical, no output).
"""

from __future__ import annotations

import ast
import asyncio
import json
from pathlib import Path

import httpx
import pytest
from corpus import build_templates, copy_tree
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sandbox import refused

from conftest import small_config
from converters import paddle_to_torch, torch_to_paddle
from paddle_glm4 import GLM4ForCausalLM
from paddle_glm4 import __main__ as glm4_cli
from paddle_glm4.config import ConfigError, GLM4Config
from paddle_glm4.generation import GENERATION_SCHEMA, GenerationConfig
from paddle_glm4.inference import __main__ as inference_cli
from paddle_glm4.sampling import SamplingParams
from paddle_glm4.server.app import create_app
from paddle_glm4.small_vocab import write_small_vocabulary
from paddle_glm4.tokenizer import GLM4Tokenizer, TokenizerError, read_tokenizer_model
from paddle_glm4.validation import MAX_DEPTH, MAX_JSON_BYTES, SEED_LIMIT, SchemaError, check_seed, parse_json
from scripted_server import ScriptedModel

pytestmark = pytest.mark.torch_free

BOMB = "[" * 100_000 + "]" * 100_000  # json.loads raised RecursionError on this


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    published, paddle = build_templates(tmp_path_factory)
    export = paddle.parent / "export"
    inference_cli.main(["export", "--model", str(paddle), "--out", str(export)])
    return published, paddle, export


def edit(path: Path, field: str, raw: str):
    """Set `field` (a path, e.g. "published_layout/files/0/size") of the JSON file to the raw JSON text `raw`,
    which may be what json.dumps never writes (NaN, 1e999, a repeated key, a bomb)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    *parents, last = field.split("/")
    node = data
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[int(last) if isinstance(node, list) else last] = "@@VALUE@@"
    path.write_text(json.dumps(data, indent=1).replace('"@@VALUE@@"', raw), encoding="utf-8")


def generate(model: Path, *extra: str) -> list[str]:
    return ["generate", "--model", str(model), "--prompt", "hi", "--max-new-tokens", "2", *extra]


# (file, field, raw JSON value, what the message must say besides the file's path); read by `glm4 generate`
PADDLE_CASES = [
    ("config.json", "hidden_size", "256.5", "hidden_size: must be an integer"),
    ("config.json", "hidden_size", "64.0", "hidden_size: must be an integer"),
    ("config.json", "num_hidden_layers", '"2"', "num_hidden_layers: must be an integer"),
    ("config.json", "num_hidden_layers", "true", "num_hidden_layers: must be an integer"),
    ("config.json", "num_hidden_layers", "[2]", "num_hidden_layers: must be an integer"),
    ("config.json", "num_hidden_layers", "1000000000", "num_hidden_layers: must be an integer in [1, 1024]"),
    ("config.json", "num_hidden_layers", "1" + "0" * 40, "num_hidden_layers: must be an integer"),
    ("config.json", "num_hidden_layers", "1" * 5000, "not valid JSON"),  # more digits than Python converts
    ("config.json", "num_attention_heads", "0", "num_attention_heads: must be an integer"),
    ("config.json", "num_key_value_heads", "0", "num_key_value_heads: must be an integer"),
    ("config.json", "rms_norm_eps", "Infinity", "Infinity is not JSON"),
    ("config.json", "rms_norm_eps", "NaN", "NaN is not JSON"),
    ("config.json", "rms_norm_eps", "1e999", "1e999 is out of range"),
    ("config.json", "rms_norm_eps", "-1e-5", "rms_norm_eps: must be a finite number > 0"),
    ("config.json", "rope_ratio", "0", "rope_ratio: must be a finite number > 0"),
    ("config.json", "partial_rotary_factor", "2", "partial_rotary_factor: must be a finite number"),
    ("config.json", "eos_token_id", '["1"]', "eos_token_id"),
    ("config.json", "dtype", '"int4"', 'dtype: must be one of "float32", "bfloat16", "float16"'),
    ("config.json", "attention_bias", '"no"', "attention_bias: must be true or false"),
    ("config.json", "quantization", '{"scheme": "int3"}', 'quantization.scheme: must be one of "int8", "int4"'),
    ("config.json", "quantization", '{"scheme": "int4", "group_size": 0}', "quantization.group_size"),
    ("config.json", "extra", BOMB, f"nested more than {MAX_DEPTH} levels"),
    ("config.json", "hidden_size", '64, "hidden_size": 128', "key 'hidden_size' appears twice"),
    ("generation_config.json", "do_sample", '"no"', 'do_sample: must be null or true or false, got "no"'),
    ("generation_config.json", "top_k", "2.5", "top_k: must be null or an integer >= 0, got 2.5"),
    ("generation_config.json", "temperature", "NaN", "NaN is not JSON"),
    ("generation_config.json", "top_p", "1.5", "top_p: must be null or a finite number > 0 and <= 1, got 1.5"),
    ("generation_config.json", "eos_token_id", '[1, "2"]', "eos_token_id"),
    ("generation_config.json", "extra", BOMB, "nested more than"),
    ("tokenizer_config.json", "eos_token", "5", "eos_token"),
    ("tokenizer_config.json", "truncation_side", '"middle"', 'truncation_side: must be one of "left", "right"'),
    (
        "tokenizer_config.json",
        "added_tokens_decoder/abc",
        '{"content": "x"}',
        "added_tokens_decoder.abc: is not a valid key",
    ),
    ("tokenizer_config.json", "chat_template", "42", "chat_template: must be null or a string"),
    ("tokenizer_config.json", "extra", BOMB, "nested more than"),
    ("model.safetensors.index.json", "weight_map", "5", "weight_map: must be an object"),
    ("model.safetensors.index.json", "metadata/total_size", "-1", "metadata.total_size"),
    ("model.safetensors.index.json", "weight_map/model.norm.weight", "[1]", "weight_map['model.norm.weight']"),
    ("model.safetensors.index.json", "extra", BOMB, "nested more than"),
]


# (field, raw, message) of a published config.json, read by glm4-convert
PUBLISHED_CASES = [
    ("num_layers", "256.5", "num_layers: must be an integer"),
    ("padded_vocab_size", '"512"', "padded_vocab_size: must be an integer"),
    ("seq_length", "0", "seq_length: must be an integer in [1, "),
    ("multi_query_group_num", "0", "multi_query_group_num: must be an integer"),
    ("num_attention_heads", "0", "num_attention_heads: must be an integer"),  # was ZeroDivisionError
    ("kv_channels", "null", "kv_channels: must be an integer"),
    ("layernorm_epsilon", "Infinity", "Infinity is not JSON"),
    ("rope_ratio", "-500", "rope_ratio: must be a finite number > 0"),
    ("add_qkv_bias", "1", "add_qkv_bias: must be true or false"),
    ("torch_dtype", '"int4"', "torch_dtype: must be one of"),
    ("auto_map", BOMB, "nested more than"),
]


# ... of a conversion_manifest.json, read by paddle_to_torch
MANIFEST_CASES = [
    ("published_layout/files/0/size", '"big"', "published_layout.files[0].size: must be an integer"),
    ("published_layout/files/0/header", "7", "published_layout.files[0].header: must be a string"),
    ("published_layout/inv_freq", '"zz"', 'published_layout.inv_freq: must be null or bytes in hexadecimal, got "zz"'),
    ("published_layout/files", "[]", "published_layout.files: must be a list of 1 to 65536 items"),
    ("published_layout", BOMB, "nested more than"),
]


def test_a_recorded_header_that_is_a_bomb_is_not_reproduced(capsys, tmp_path, templates):
    """A recorded header is JSON inside a string: parsed with the same limits, it does not fit, and the
    canonical layout is written instead (with a note saying why)."""
    paddle = copy_tree(templates[1], tmp_path / "paddle")
    edit(paddle / "conversion_manifest.json", "published_layout/files/0/header", json.dumps(BOMB))
    assert paddle_to_torch.main(["--src", str(paddle), "--dst", str(tmp_path / "torch")]) == 0
    assert "nested more than" in capsys.readouterr().out


# ... of an export.json, read by the inference engine
EXPORT_CASES = [
    ("dtype", '"int4"', 'dtype: must be one of "float32", "bfloat16", "float16"'),
    ("compute_dtype", '"int8"', "compute_dtype: must be one of"),
    ("max_seq_len", "256.5", "max_seq_len: must be an integer"),
    ("max_seq_len", "100000", "max_seq_len 100000 exceeds the model's context"),
    ("device", '"tpu"', 'device: must be one of "cpu", "gpu"'),
    ("inputs", '"input_ids"', "inputs: must be a list"),
    ("config/hidden_size", '"64"', "config: hidden_size: must be an integer"),
    ("config/num_hidden_layers", "1000000000", "config: num_hidden_layers: must be an integer in [1, 1024]"),
    ("paddle_version", BOMB, "nested more than"),
]


# The command that reads each kind of file: (which template, argv for the copy `source` and the sandbox `root`).
COMMANDS = {
    "generate": (1, lambda source, root: (glm4_cli.main, generate(source))),
    "convert": (0, lambda source, root: (torch_to_paddle.main, ["--src", str(source), "--dst", str(root / "dst")])),
    "to-torch": (1, lambda source, root: (paddle_to_torch.main, ["--src", str(source), "--dst", str(root / "dst")])),
    "generate --engine inference": (2, lambda source, root: (glm4_cli.main, generate(source, "--engine", "inference"))),
}
CASES = (
    [("generate", *case) for case in PADDLE_CASES]
    + [("convert", "config.json", *case) for case in PUBLISHED_CASES]
    + [("to-torch", "conversion_manifest.json", *case) for case in MANIFEST_CASES]
    + [("generate --engine inference", "export.json", *case) for case in EXPORT_CASES]
)


@pytest.mark.parametrize("command, name, field, raw, message", CASES, ids=lambda v: str(v)[:40])
def test_a_bad_field_is_one_line_naming_file_and_field(capsys, tmp_path, templates, command, name, field, raw, message):
    template, argv = COMMANDS[command]
    source = copy_tree(templates[template], tmp_path / "source")
    edit(source / name, field, raw)
    refused(capsys, *argv(source, tmp_path), tmp_path, str(source / name), message)


# ---- whole files ----------------------------------------------------------------------------------------------
FILES = ["config.json", "generation_config.json", "tokenizer_config.json", "model.safetensors.index.json"]


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize(
    "content, message",
    [
        (b"\xff\xfe{}", "not valid JSON (not UTF-8 text"),
        (b"[1, 2]", "object"),
        (b'{"a": 1', "not valid JSON"),
        (b"", "not valid JSON"),
    ],
    ids=["latin-1", "a list", "cut short", "empty"],
)
def test_files_that_are_not_json_objects(capsys, tmp_path, templates, name, content, message):
    model = copy_tree(templates[1], tmp_path / "model")
    (model / name).write_bytes(content)
    refused(capsys, glm4_cli.main, generate(model), tmp_path, str(model / name), message)


@pytest.mark.parametrize("name", FILES)
def test_a_file_far_too_big_is_refused_unread(capsys, tmp_path, templates, name):
    """A file one byte over the limit (sparse: it costs no disk) is refused by its size, before a byte of it is
    read."""
    model = copy_tree(templates[1], tmp_path / "model")
    with open(model / name, "r+b") as f:
        f.truncate(MAX_JSON_BYTES + 1)
    refused(
        capsys,
        glm4_cli.main,
        generate(model),
        tmp_path,
        str(model / name),
        f"bytes, more than the {MAX_JSON_BYTES} this file may have",
    )


# ---- arguments --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", ["-1", str(SEED_LIMIT), str(2**64), "1" + "0" * 30])
def test_seeds_outside_the_range_are_one_line(capsys, tmp_path, templates, seed):
    model = copy_tree(templates[1], tmp_path / "model")
    refused(
        capsys,
        glm4_cli.main,
        generate(model, "--seed", seed, "--temperature", "0.7"),
        tmp_path,
        "--seed: must be an integer in [0, 9223372036854775807]",
    )


def test_seed_checks_are_one_rule():
    assert check_seed(None) is None and check_seed(0) == 0 and check_seed(SEED_LIMIT - 1) == SEED_LIMIT - 1
    for seed in (-1, SEED_LIMIT, True, 1.0, "1"):
        with pytest.raises(SchemaError, match="seed: must be an integer in"):
            check_seed(seed)


@pytest.mark.parametrize("value", ["0", "-5"])
def test_export_max_seq_len_must_be_positive(capsys, tmp_path, templates, value):
    """0 used to mean "the config's seq_length" (and silently exported that many positions)."""
    refused(
        capsys,
        inference_cli.main,
        ["export", "--model", str(templates[1]), "--out", str(tmp_path / "out"), "--max-seq-len", value],
        tmp_path,
        f"max_seq_len must be a positive integer, got {value}",
    )


def test_parse_json_never_raises_anything_else():
    for text in [BOMB, "{" * 50_000, '{"a":' * 50_000, "[" * 33 + "]" * 33, "\ud800", '"\\ud800"', "-", "1e-999999"]:
        try:
            parse_json(text, "x.json")
        except SchemaError as err:
            assert str(err).startswith("x.json: ")


# ---- the server ---------------------------------------------------------------------------------------------------
def post(app, path: str, body: dict) -> httpx.Response:
    async def send():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            return await client.post(path, json=body)

    return asyncio.run(send())


@pytest.fixture(scope="module")
def vocabulary(tmp_path_factory) -> Path:
    return write_small_vocabulary(tmp_path_factory.mktemp("vocab"))


@pytest.fixture(scope="module")
def tokenizer(vocabulary):
    return GLM4Tokenizer.from_pretrained(vocabulary)


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/completions", {"prompt": "hi"}),
    ],
)
@pytest.mark.parametrize("seed", [-1, SEED_LIMIT, 2**64, 10**30, 1.5, True])
def test_the_server_answers_400_to_seeds_outside_the_range(tokenizer, path, body, seed):
    response = post(create_app(ScriptedModel(tokenizer), tokenizer), path, {**body, "seed": seed, "temperature": 0.7})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "seed"


def test_the_server_answers_400_to_what_the_projects_checks_refuse(tokenizer, monkeypatch):
    """A SchemaError raised while a request is handled (here by the tokenizer) is the request's fault: 400."""

    def refuse(*args, **kwargs):
        raise TokenizerError("tokenizer_config.json: eos_token: must be a string, got 5")

    monkeypatch.setattr(tokenizer, "apply_chat_template", refuse)
    response = post(
        create_app(ScriptedModel(tokenizer), tokenizer),
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}]},
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"] == "tokenizer_config.json: eos_token: must be a string, got 5"


@pytest.mark.parametrize("seed", [-1, SEED_LIMIT, True])
def test_generate_checks_the_seed_itself(seed):
    """The Python API (and PaddleNLP's adapter, and the predictor, which call it) get the CLI's rule."""
    model = GLM4ForCausalLM(small_config(num_hidden_layers=1))
    with pytest.raises(SchemaError, match=r"^seed: must be an integer in \[0, 9223372036854775807\]"):
        model.generate([[1, 2]], max_new_tokens=1, do_sample=True, seed=seed)


# ---- properties: any JSON in any field -------------------------------------------------------------------------------
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
PROPERTY = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
SMALL = small_config(num_hidden_layers=1)
SPELLINGS = {
    "glm4": SMALL.to_dict(),
    "chatglm": SMALL.to_published_dict(),
    "glm": {"model_type": "glm", **SMALL.to_hf_glm_dict()},
}


def replaced(data: dict, key: str, value) -> dict:
    return {**data, key: value}


@PROPERTY
@given(spelling=st.sampled_from(sorted(SPELLINGS)), data=st.data(), value=JSON)
def test_any_value_in_any_config_field_is_a_config_or_a_config_error(spelling, data, value):
    """Whatever a field holds, reading the config gives a GLM4Config or a ConfigError naming the field, never
    TypeError, OverflowError, ZeroDivisionError or RecursionError."""
    config = SPELLINGS[spelling]
    key = data.draw(st.sampled_from(sorted(config)))
    try:
        GLM4Config.from_dict(replaced(config, key, value), source="config.json")
    except ConfigError as err:
        assert str(err).startswith("config.json: "), err


@PROPERTY
@given(key=st.sampled_from(sorted(GENERATION_SCHEMA.fields)), value=JSON)
def test_any_value_in_generation_config_is_defaults_or_a_schema_error(tmp_path, key, value):
    path = tmp_path / "generation_config.json"
    path.write_text(json.dumps({"do_sample": True, key: value}))
    try:
        defaults = GenerationConfig.from_model(SMALL, str(tmp_path))
    except SchemaError as err:
        assert str(err).startswith(str(path)), err
        return
    SamplingParams(
        defaults.do_sample, defaults.temperature or 1.0, defaults.top_k, defaults.top_p, defaults.repetition_penalty
    )  # what generate() makes of them: valid


@PROPERTY
@given(
    key=st.sampled_from(["added_tokens_decoder", "eos_token", "pad_token", "chat_template", "truncation_side"]),
    value=JSON,
)
def test_any_value_in_tokenizer_config_is_a_tokenizer_or_a_tokenizer_error(vocabulary, tokenizer, key, value):
    ranks = read_tokenizer_model(vocabulary / "tokenizer.model")
    try:
        GLM4Tokenizer(ranks, replaced(tokenizer.config, key, value), source="tokenizer_config.json")
    except TokenizerError as err:
        assert str(err).startswith("tokenizer_config.json: "), err


def test_every_json_the_package_reads_goes_through_validation():
    """The rule as code: outside validation.py, nothing in the package or the converters calls json.load(s),
    so no file or request reaches a parser without the limits (benchmarks read only their own output)."""
    root = Path(__file__).resolve().parents[2]
    calls = []
    for path in [*(root / "paddle_glm4").rglob("*.py"), *(root / "converters").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Attribute)
                and node.attr in ("load", "loads")
                and isinstance(node.value, ast.Name)
                and node.value.id == "json"
            ):
                calls.append(f"{path.relative_to(root)}:{node.lineno}")
    assert [call for call in calls if not call.startswith("paddle_glm4/validation.py:")] == []
    assert calls, "validation.py itself parses with json.loads"
