"""The llama.cpp peer of the low-bit benchmark: the GGUF files of our weights, and finding the cached build.

The GGUF checks read the file back with the `gguf` package (what llama.cpp's own tools use); the check that
llama.cpp itself loads and quantizes the file runs only where llama.cpp is built (CI does not build it: 11+
minutes), as the quick benchmark does.
"""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="the gguf package (requirements-test.txt) is not installed")

from benchmarks import gguf_peer, llamacpp  # noqa: E402
from benchmarks.full_depth import write_random_checkpoint  # noqa: E402
from benchmarks.model import benchmark_config  # noqa: E402
from conftest import REFERENCE_DIR  # noqa: E402
from converters import mapping  # noqa: E402
from paddle_glm4.checkpoint import inspect  # noqa: E402
from paddle_glm4.safetensors_file import SafetensorsReader, to_float32  # noqa: E402
from paddle_glm4.tokenizer import GLM4_SPECIAL_TOKENS  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random bf16 checkpoint of 2 layers and its GGUF file."""
    directory = tmp_path_factory.mktemp("tiny")
    config = dataclasses.replace(benchmark_config(quick=True), dtype="bfloat16")
    write_random_checkpoint(str(directory / "checkpoint"), config)
    vocab = gguf_peer.write_gguf(str(directory / "checkpoint"), str(directory / "model.gguf"), None, progress=False)
    return config, directory, vocab


def _field(reader, key):
    field = reader.fields[key]
    value = field.parts[field.data[0]]
    return bytes(value).decode() if field.types[0] == gguf.GGUFValueType.STRING else value[0]


def test_gguf_holds_the_checkpoints_weights_in_llamacpp_chatglm_layout(tiny):
    config, directory, _ = tiny
    reader = gguf.GGUFReader(directory / "model.gguf")
    assert _field(reader, "general.architecture") == "chatglm"
    for key, expected in (
        ("chatglm.block_count", 2),
        ("chatglm.embedding_length", config.hidden_size),
        ("chatglm.feed_forward_length", config.intermediate_size),
        ("chatglm.attention.head_count", config.num_attention_heads),
        ("chatglm.attention.head_count_kv", config.num_key_value_heads),
        ("chatglm.rope.dimension_count", config.rotary_dim),
    ):
        assert _field(reader, key) == expected, key
    assert _field(reader, "chatglm.rope.freq_base") == pytest.approx(config.rope_theta)
    assert _field(reader, "chatglm.attention.layer_norm_rms_epsilon") == pytest.approx(config.rms_norm_eps)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    assert set(tensors) == {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{part}"
        for i in range(2)
        for part in (
            "attn_norm.weight",
            "attn_qkv.weight",
            "attn_qkv.bias",
            "attn_output.weight",
            "ffn_norm.weight",
            "ffn_up.weight",
            "ffn_down.weight",
        )
    }
    checkpoint = str(directory / "checkpoint")
    specs = {spec.published: spec for spec in mapping.tensor_specs(config)}
    locations = inspect(checkpoint, mapping.paddle_shapes(config))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.CHATGLM, 2)
    for published, spec in specs.items():
        tensor = tensors[names.get_name(published.removeprefix("transformer."), try_suffixes=(".weight", ".bias"))]
        with SafetensorsReader(locations[spec.paddle].path) as safetensors:
            ours = safetensors.read(spec.paddle)
        torch_layout = ours.T if spec.linear else ours  # ggml's rows are the published [out, in] rows
        if ours.ndim == 2:
            assert tensor.tensor_type == gguf.GGMLQuantizationType.BF16, tensor.name
            np.testing.assert_array_equal(tensor.data.view(np.uint16).reshape(torch_layout.shape), torch_layout)
        else:
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F32, tensor.name
            np.testing.assert_array_equal(tensor.data, to_float32(torch_layout, "bfloat16"))


def test_gguf_vocabulary_has_every_id_the_specials_as_control_and_merges_of_its_tokens(tiny):
    config, directory, vocab = tiny
    assert "small built-in" in vocab.source
    reader = gguf.GGUFReader(directory / "model.gguf")
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == "chatglm-bpe"
    tokens = reader.fields["tokenizer.ggml.tokens"]
    assert len(tokens.data) == config.vocab_size == len(vocab.tokens)
    types = vocab.types
    for token, token_id in vocab.specials.items():
        assert vocab.tokens[token_id] == token and types[token_id] == gguf.TokenType.CONTROL
    assert _field(reader, "tokenizer.ggml.eos_token_id") == vocab.specials["<|endoftext|>"]
    first_pad = max(vocab.specials.values()) + 1
    assert all(t == gguf.TokenType.UNUSED for t in types[first_pad:]) and first_pad < config.vocab_size
    _check_merges(vocab)


def _check_merges(vocab):
    """Every merge joins two tokens into a third, each of the three ranked as BPE needs (the parts first)."""
    rank = {token: i for i, token in enumerate(vocab.tokens)}
    assert vocab.merges
    for merge in vocab.merges:
        left, right = merge.split(" ")
        assert rank[left] < rank[left + right] and rank[right] < rank[left + right], merge


@pytest.mark.skipif(
    not (REFERENCE_DIR / "glm-4-9b-chat" / "tokenizer.model").is_file(),
    reason="GLM-4's tokenizer.model is not in ../shared/glm4_reference",
)
def test_gguf_vocabulary_of_glm4s_real_tokenizer():
    vocab = gguf_peer.vocabulary(151552, str(REFERENCE_DIR / "glm-4-9b-chat"))
    assert "GLM-4's tokenizer" in vocab.source
    assert len(vocab.tokens) == 151552
    assert [vocab.tokens[151329 + i] for i in range(len(GLM4_SPECIAL_TOKENS))] == list(GLM4_SPECIAL_TOKENS)
    assert vocab.tokens[220] == "Ġ"  # a space, in GPT-2's byte-level spelling
    assert len(vocab.merges) > 149_000  # all but the ~1000 tokens BPE cannot build
    _check_merges(vocab)


def test_gguf_writer_refuses_a_vocabulary_without_room_for_the_bytes():
    with pytest.raises(ValueError, match="too small"):
        gguf_peer.vocabulary(200, None)


# ---- finding llama.cpp ----------------------------------------------------------------------------------
def test_find_says_how_to_build_when_llamacpp_is_not_built(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(llamacpp.PeerUnavailable, match=r"not built.*python -m benchmarks\.llamacpp build"):
        llamacpp.find()
    with pytest.raises(llamacpp.PeerUnavailable):
        llamacpp.find_or_build(build=False)  # never builds unless asked


def test_find_rejects_a_build_for_another_cpu_and_takes_one_for_this_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    directory = llamacpp.cache_dir()
    (directory / "build" / "bin").mkdir(parents=True)
    for name in llamacpp.TARGETS:
        (directory / "build" / "bin" / name).write_text("#!/bin/sh\n")
        os.chmod(directory / "build" / "bin" / name, 0o755)
    stamp = {"version": llamacpp.VERSION, "commit": llamacpp.COMMIT, "cpu_flags": ["no-such-flag"]}
    (directory / "built.json").write_text(json.dumps(stamp))
    with pytest.raises(llamacpp.PeerUnavailable, match="another CPU"):
        llamacpp.find()
    (directory / "built.json").write_text(json.dumps({**stamp, "cpu_flags": list(llamacpp.cpu_flags())}))
    found = llamacpp.find()
    assert found.bench == directory / "build" / "bin" / "llama-bench"
    os.unlink(found.quantize)
    with pytest.raises(llamacpp.PeerUnavailable, match="llama-quantize"):
        llamacpp.find()


@pytest.mark.slow
def test_llamacpp_status_cli_fails_with_one_line_and_code_2(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.llamacpp", "status"],
        capture_output=True,
        text=True,
        env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "not built" in done.stderr


@pytest.mark.slow
def test_llamacpp_loads_and_quantizes_our_gguf(tiny, tmp_path):
    try:
        peer = llamacpp.find()
    except llamacpp.PeerUnavailable as error:
        pytest.skip(str(error))
    _, directory, _ = tiny
    gguf_peer.quantize(str(peer.quantize), str(directory / "model.gguf"), str(tmp_path / "q4.gguf"), "Q4_0")
    types = {tensor.name: tensor.tensor_type for tensor in gguf.GGUFReader(tmp_path / "q4.gguf").tensors}
    assert types["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.Q4_0
    done = subprocess.run(
        [str(peer.bench), "-m", str(tmp_path / "q4.gguf"), "-t", "1", "-p", "8", "-n", "2", "-r", "1", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert {(test["n_prompt"], test["n_gen"]) for test in json.loads(done.stdout)} == {(8, 0), (0, 2)}
