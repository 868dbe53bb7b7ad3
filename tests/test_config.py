import json
from pathlib import Path

import pytest

from conftest import CHAT_REFERENCE, requires_reference
from paddle_glm4 import GLM4Config
from paddle_glm4.config import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@requires_reference("config.json")
def test_reads_the_published_chat_config():
    config = GLM4Config.from_file(str(CHAT_REFERENCE / "config.json"))
    assert (config.vocab_size, config.hidden_size, config.intermediate_size) == (151552, 4096, 13696)
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (40, 32, 2)
    assert (config.head_dim, config.rotary_dim, config.seq_length) == (128, 64, 131072)
    assert config.rope_theta == 10000 * 500
    assert config.rms_norm_eps == 1.5625e-07
    assert config.attention_bias and not config.tie_word_embeddings
    assert config.eos_token_id == [151329, 151336, 151338] and config.pad_token_id == 151329
    assert config.dtype == "bfloat16"


@requires_reference("config.json")
def test_shipped_configs_hold_the_real_geometry():
    published = GLM4Config.from_file(str(CHAT_REFERENCE / "config.json"))
    chat = GLM4Config.from_file(str(CONFIGS / "glm-4-9b-chat.json"))
    base = GLM4Config.from_file(str(CONFIGS / "glm-4-9b.json"))
    assert chat == published
    assert (base.seq_length, base.rope_ratio) == (8192, 1.0)
    assert {**base.__dict__, "seq_length": 0, "rope_ratio": 0} == {**chat.__dict__, "seq_length": 0, "rope_ratio": 0}


def test_hf_glm_format_maps_onto_the_same_fields():
    hf = {
        "model_type": "glm",
        "vocab_size": 151552,
        "hidden_size": 4096,
        "intermediate_size": 13696,
        "num_hidden_layers": 40,
        "num_attention_heads": 32,
        "num_key_value_heads": 2,
        "head_dim": 128,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1.5625e-07,
        "attention_bias": True,
        "partial_rotary_factor": 0.5,
        "rope_theta": 5000000.0,
        "eos_token_id": [151329, 151336, 151338],
        "pad_token_id": 151329,
        "torch_dtype": "bfloat16",
    }
    config = GLM4Config.from_dict(hf)
    assert config.rope_ratio == 500 and config.seq_length == 131072 and config.num_key_value_heads == 2
    # transformers 5 spells RoPE as a rope_parameters dict
    new_style = {**hf, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}}
    del new_style["rope_theta"]
    assert GLM4Config.from_dict(new_style).rope_ratio == 1.0


def test_canonical_round_trip(tmp_path):
    config = GLM4Config(num_hidden_layers=3, rope_ratio=500, seq_length=131072)
    config.save_pretrained(str(tmp_path))
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == "glm4"
    assert GLM4Config.from_pretrained(str(tmp_path)) == config
    # and the HF spelling we hand to transformers describes the same model
    assert GLM4Config.from_dict({"model_type": "glm", **config.to_hf_glm_dict()}) == config
    assert GLM4Config.from_dict(config.to_published_dict()) == config


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_attention_heads": 3}, "multiple of"),
        ({"hidden_size": 0}, "hidden_size: must be an integer in"),
        ({"rope_ratio": -1}, "rope_ratio"),
        ({"dtype": "int8"}, "dtype"),
        ({"pad_token_id": 10**9}, "outside the vocabulary"),
    ],
)
def test_bad_values_are_named(change, message):
    with pytest.raises(ConfigError, match=message):
        GLM4Config(**change)


def test_bad_files_are_named(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match=r"config.json: not valid JSON"):
        GLM4Config.from_file(str(path))
    path.write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="model_type 'llama' is not GLM-4"):
        GLM4Config.from_file(str(path))
    path.write_text(json.dumps({"model_type": "chatglm", "num_attention_heads": 32, "add_bias_linear": True}))
    with pytest.raises(ConfigError, match="add_bias_linear=True is not supported"):
        GLM4Config.from_file(str(path))
    path.write_text(json.dumps({"model_type": "chatglm", "num_attention_heads": 32, "hidden_size": 64}))
    with pytest.raises(ConfigError, match="missing field 'padded_vocab_size'"):
        GLM4Config.from_file(str(path))
    with pytest.raises(ConfigError, match="no such config file"):
        GLM4Config.from_file(str(tmp_path / "absent.json"))
