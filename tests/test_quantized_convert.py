"""Quantized checkpoints through the converter: glm4-convert --quantize writes them (streamed, verified, numpy
only), from_pretrained loads them as they are, and paddle_to_torch writes their dequantized weights back in the
published layout, on which transformers' GlmForCausalLM gives the logits of our quantized model."""

from __future__ import annotations

import json

import numpy as np
import paddle
import pytest

from checkpoint_builders import write_published
from conftest import hf_state, paddle_state, quantize_table, reference_model, small_config
from converters import mapping, paddle_to_torch, torch_to_paddle
from paddle_glm4 import GLM4ForCausalLM
from paddle_glm4.safetensors_file import SafetensorsReader, to_float32

IDS = np.array([[1, 17, 42, 99, 256, 300, 511, 7]])


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A published-layout bf16 checkpoint (THUDM's names, torch [out, in]) of a small random GLM-4."""
    config = small_config()
    paddle = paddle_state(config, hf_state(reference_model(config)))
    return write_published(tmp_path_factory.mktemp("published") / "src", config, paddle, dtype="bfloat16")


def tensors_in(directory) -> dict[str, tuple[str, tuple]]:
    found = {}
    for path in sorted(directory.glob("*.safetensors")):
        with SafetensorsReader(str(path)) as reader:
            found.update({name: (reader.dtype(name), reader.shape(name)) for name in reader.names()})
    return found


@pytest.mark.parametrize("scheme, group_size", [("int8", None), ("int4", 32), ("int4", None)])
def test_quantized_conversion_loads_as_the_model_quantized_at_load(tmp_path, published, scheme, group_size):
    argv = ["--src", str(published), "--dst", str(tmp_path / "q"), "--quantize", scheme, "--max-shard-size", "60KB"]
    if group_size:
        argv += ["--group-size", str(group_size)]
    assert torch_to_paddle.main(argv) == 0
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    expected_group = None if scheme == "int8" else group_size or 128
    assert config["quantization"] == {"scheme": scheme, "group_size": expected_group, "embedding": True}
    assert config["dtype"] == "bfloat16"
    manifest = json.loads((tmp_path / "q" / "conversion_manifest.json").read_text())
    assert manifest["verified"] and manifest["output"]["quantization"]["scheme"] == scheme
    tensors = tensors_in(tmp_path / "q")
    qdtype = "int8" if scheme == "int8" else "uint8"
    assert tensors["model.layers.0.mlp.down_proj.qweight"] == (qdtype, (64, 96 if scheme == "int8" else 48))
    assert tensors["lm_head.scales"][0] == "float32"
    # the embedding table in the same scheme: 512 rows of 64
    assert tensors["model.embed_tokens.qweight"] == (qdtype, (512, 64 if scheme == "int8" else 32))
    assert tensors["model.embed_tokens.scales"] == (
        "float32",
        (512,) if scheme == "int8" else (512, -(-64 // expected_group)),
    )
    assert not any(
        name.endswith("proj.weight") or name in ("lm_head.weight", "model.embed_tokens.weight") for name in tensors
    )
    assert set(tensors) == set(
        mapping.checkpoint_tensors(
            small_config(
                dtype="bfloat16", quantization={"scheme": scheme, "group_size": expected_group, "embedding": True}
            )
        )
    )

    # the same bytes as quantizing at load from the unquantized conversion
    torch_to_paddle.convert(str(published), str(tmp_path / "bf16"), progress=False)
    at_load = GLM4ForCausalLM.from_pretrained(
        str(tmp_path / "bf16"), quantization=scheme, group_size=group_size, activation_dtype="float32"
    )
    assert at_load.model.embed_tokens.weight.dtype == paddle.bfloat16  # kept as stored, mapped
    quantize_table(at_load)  # then quantized as the conversion stores it
    loaded = GLM4ForCausalLM.from_pretrained(str(tmp_path / "q"), activation_dtype="float32")
    for name, tensor in at_load.state_dict().items():
        other = loaded.state_dict()[name]
        assert tensor.dtype == other.dtype and np.array_equal(_bits(tensor), _bits(other)), name
    ids = paddle.to_tensor(IDS)
    assert np.array_equal(loaded(ids).logits.numpy(), at_load(ids).logits.numpy())


def _bits(tensor):
    return tensor.view(paddle.int16).numpy() if tensor.dtype == paddle.bfloat16 else tensor.numpy()


@pytest.mark.parametrize("scheme, dtype", [("int8", "float32"), ("int4", "float32"), ("int4", "bfloat16")])
def test_dequantized_export_gives_transformers_the_same_logits(tmp_path, published, scheme, dtype):
    import torch
    from transformers import GlmConfig, GlmForCausalLM

    torch_to_paddle.convert(
        str(published),
        str(tmp_path / "q"),
        quantize=scheme,
        group_size=32 if scheme == "int4" else None,
        progress=False,
    )
    assert paddle_to_torch.main(["--src", str(tmp_path / "q"), "--dst", str(tmp_path / "torch"), "--dtype", dtype]) == 0
    published_config = json.loads((tmp_path / "torch" / "config.json").read_text())
    assert published_config["model_type"] == "chatglm" and "quantization" not in published_config
    assert published_config["torch_dtype"] == dtype
    config = small_config(dtype=dtype)
    # every tensor in the published layout: names, [out, in] shapes, dtype
    written = tensors_in(tmp_path / "torch")
    for spec in mapping.tensor_specs(config):
        assert written[spec.published] == (dtype, spec.source_shapes("published")[0]), spec.published

    # transformers' GlmForCausalLM on those weights (published names mapped to its own by the weight table)
    arrays = {}
    for path in (tmp_path / "torch").glob("*.safetensors"):
        with SafetensorsReader(str(path)) as reader:
            arrays.update({name: to_float32(reader.read(name), reader.dtype(name)) for name in reader.names()})
    state = {}
    for spec in mapping.tensor_specs(config):
        paddle_layout = mapping.to_paddle(spec, [arrays[spec.published]])
        state.update(zip(spec.hf, mapping.from_paddle(spec, paddle_layout, "hf"), strict=False))
    reference = GlmForCausalLM(GlmConfig(**config.to_hf_glm_dict())).eval()
    reference.load_state_dict({name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in state.items()})
    with torch.no_grad():
        expected = reference(torch.from_numpy(IDS)).logits.float().numpy()

    # our quantized model, computing exactly (float32 activations): its dequantized weights are those values,
    # rounded to `dtype` on the way out
    ours = GLM4ForCausalLM.from_pretrained(str(tmp_path / "q"), activation_dtype="float32")
    logits = ours(paddle.to_tensor(IDS)).logits.numpy()
    assert np.abs(expected).max() > 1.0
    tolerance = 1e-4 if dtype == "float32" else 0.05 * np.abs(expected).max()
    assert np.abs(logits - expected).max() <= tolerance


def test_transformers_layout_quantizes_its_concatenated_qkv(tmp_path):
    """transformers' layout splits qkv into q, k and v: their output rows are quantized as one weight."""
    from checkpoint_builders import write_hf

    config = small_config()
    source = write_hf(tmp_path / "hf", reference_model(config, seed=4))
    torch_to_paddle.convert(str(source), str(tmp_path / "q"), quantize="int4", group_size=32, progress=False)
    torch_to_paddle.convert(str(source), str(tmp_path / "f"), progress=False)
    converted = GLM4ForCausalLM.from_pretrained(str(tmp_path / "q"), activation_dtype="float32")
    at_load = GLM4ForCausalLM.from_pretrained(
        str(tmp_path / "f"), quantization="int4", group_size=32, activation_dtype="float32"
    )
    quantize_table(at_load)  # as the conversion stores the table
    for name, tensor in at_load.state_dict().items():
        assert np.array_equal(_bits(converted.state_dict()[name]), _bits(tensor)), name


def test_a_checkpoint_quantized_before_its_embedding_was_still_loads(tmp_path, published):
    """Checkpoints quantized before the embedding table was (a bf16 table; config.json's quantization without
    "embedding") load, the table kept as stored (mapped); quantized, it is the model a conversion gives today."""
    from paddle_glm4 import checkpoint

    torch_to_paddle.convert(str(published), str(tmp_path / "q"), quantize="int4", group_size=32, progress=False)
    torch_to_paddle.convert(str(published), str(tmp_path / "bf16"), progress=False)
    sources = {}
    for directory in ("q", "bf16"):
        for path in sorted((tmp_path / directory).glob("*.safetensors")):
            with SafetensorsReader(str(path)) as reader:
                sources.update(
                    {
                        name: (reader.dtype(name), reader.read(name))
                        for name in reader.names()
                        if directory == "q" or name == "model.embed_tokens.weight"
                    }
                )
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    del config["quantization"]["embedding"]
    old = small_config(dtype="bfloat16", quantization=config["quantization"])
    names = list(mapping.checkpoint_tensors(old))
    assert "model.embed_tokens.weight" in names and "model.embed_tokens.qweight" not in names
    entries = [(name, sources[name][0], sources[name][1].shape) for name in names]
    checkpoint.write_checkpoint(
        str(tmp_path / "old"), entries, ((name, sources[name][1]) for name in names), metadata={"format": "pd"}
    )
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))

    loaded = GLM4ForCausalLM.from_pretrained(str(tmp_path / "old"), activation_dtype="float32")
    today = GLM4ForCausalLM.from_pretrained(str(tmp_path / "q"), activation_dtype="float32")
    assert np.array_equal(
        _bits(loaded.model.embed_tokens.weight).view(np.uint16), sources["model.embed_tokens.weight"][1]
    )
    quantize_table(loaded)
    assert loaded.model.embed_tokens.qweight.dtype == paddle.uint8
    for name, tensor in today.state_dict().items():
        assert np.array_equal(_bits(loaded.state_dict()[name]), _bits(tensor)), name
    # and it converts back to torch as it did: its table as stored
    assert paddle_to_torch.main(["--src", str(tmp_path / "old"), "--dst", str(tmp_path / "torch")]) == 0
    written = tensors_in(tmp_path / "torch")
    assert written["transformer.embedding.word_embeddings.weight"] == ("bfloat16", (512, 64))
