"""The model with bf16 / int8 / int4 Linear weights: loading (quantized at load, or a quantized checkpoint),
exactness against the float32 model of the same (dequantized) weights, saving, and the memory refusal."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import paddle
import pytest

from conftest import hf_state, paddle_model, paddle_state, quantize_table, reference_model, small_config
from paddle_glm4 import GLM4ForCausalLM, memory
from paddle_glm4.config import ConfigError, GLM4Config, Quantization
from paddle_glm4.linear import Linear
from paddle_glm4.quantization import Dense, Packed, Rows, convert

FORMATS = [("bfloat16", None), ("int8", None), ("int4", 32), ("int4", 64)]


def ids_for(config, shape=(2, 11), seed=0):
    return paddle.to_tensor(np.random.RandomState(seed).randint(0, config.vocab_size, shape).astype("int64"))


def load(directory, kind, group_size=None, **kwargs):
    if kind == "bfloat16":
        return GLM4ForCausalLM.from_pretrained(str(directory), dtype="bfloat16", **kwargs)
    return GLM4ForCausalLM.from_pretrained(str(directory), quantization=kind, group_size=group_size, **kwargs)


def dequantized_float_model(model: GLM4ForCausalLM) -> GLM4ForCausalLM:
    """The float32 model whose weights are exactly the values `model` computes with."""
    state = {}
    for prefix, layer in model.named_sublayers():
        if isinstance(layer, Linear):
            held = {slot.name: _numpy(getattr(layer, slot.name)) for slot in layer.slots}
            state[f"{prefix}.weight"] = convert(
                layer.format, held, Dense("float32"), layer.in_features, layer.out_features
            )["weight"]
    table = model.model.embed_tokens
    if isinstance(table.format, Packed):  # int8 / int4: the table is quantized too
        held = {slot.name: _numpy(getattr(table, slot.name)) for slot in table.slots}
        state["model.embed_tokens.weight"] = convert(
            table.format, held, Rows("float32"), table.hidden_size, table.vocab_size
        )["weight"]
    for name, tensor in model.state_dict().items():
        if not name.endswith(("qweight", "scales")) and name not in state:
            state[name] = (
                _numpy(tensor).astype(np.float32)
                if tensor.dtype != paddle.bfloat16
                else (_numpy(tensor).astype(np.uint32) << 16).view(np.float32)
            )
    return paddle_model(model.config, state)


def _numpy(tensor):
    if tensor.dtype == paddle.bfloat16:
        return tensor.view(paddle.int16).numpy().view(np.uint16)
    return tensor.numpy()


@pytest.mark.parametrize("kind, group_size", FORMATS)
def test_exact_activations_give_the_float_model_of_the_dequantized_weights(float_checkpoint, kind, group_size):
    base, directory = float_checkpoint
    model = load(directory, kind, group_size, activation_dtype="float32")
    layer = model.model.layers[0].mlp.down_proj  # K = 96, N = 64
    held = {
        slot.name: (tuple(getattr(layer, slot.name).shape), str(getattr(layer, slot.name).dtype))
        for slot in layer.slots
    }
    expected = {
        "bfloat16": {"weight": ((64, 96), "paddle.bfloat16")},
        "int8": {"qweight": ((64, 96), "paddle.int8"), "scales": ((64,), "paddle.float32")},
        "int4": {
            "qweight": ((64, 48), "paddle.uint8"),
            "scales": ((64, -(-96 // (group_size or 1))), "paddle.float32"),
        },
    }[kind]
    assert held == expected
    assert isinstance(model.lm_head.format, Packed) and model.lm_head.format.kind == kind  # the head too
    table = model.model.embed_tokens  # [512, 64]: a dense checkpoint's table stays as stored, mapped (float32
    # here); bf16 Linears hold it in bf16
    held = {
        slot.name: (tuple(getattr(table, slot.name).shape), str(getattr(table, slot.name).dtype))
        for slot in table.slots
    }
    assert held == {"weight": ((512, 64), "paddle.bfloat16" if kind == "bfloat16" else "paddle.float32")}
    assert model.model.norm.weight.dtype == paddle.float32
    ids = ids_for(model.config)
    ours = model(ids).logits.numpy()
    reference = dequantized_float_model(model)(ids).logits.numpy()
    assert np.abs(reference).max() > 1.0
    assert np.abs(ours - reference).max() <= 1e-4
    # and the quantization did change the model (the comparison is not float32 against itself)
    assert np.abs(base(ids).logits.numpy() - reference).max() > 1e-3


@pytest.mark.parametrize("activation_dtype", ["bfloat16", "int8", "auto"])
def test_rounded_activations_stay_close(float_checkpoint, activation_dtype):
    """Rounding the activations (for the faster instructions) moves the logits by about the rounding's
    relative size: bf16 2^-9, int8 per-row 1/254; reported, and bounded well below the logits' scale. The
    default, auto, rounds as the kernels choose on this CPU (float32 where nothing faster exists)."""
    _, directory = float_checkpoint
    exact = load(directory, "int8", activation_dtype="float32")
    rounded = load(directory, "int8", activation_dtype=activation_dtype)
    ids = ids_for(exact.config)
    a, b = exact(ids).logits.numpy(), rounded(ids).logits.numpy()
    difference = np.abs(a - b).max() / np.abs(a).max()
    print(f"activation_dtype={activation_dtype}: max |logit difference| = {difference:.2e} of the largest logit")
    assert (difference >= 0 if activation_dtype == "auto" else difference > 0) and difference < 0.05


def test_quantized_checkpoint_saves_and_loads_as_it_is(float_checkpoint, tmp_path):
    _, directory = float_checkpoint
    model = load(directory, "int4", 32, activation_dtype="float32")
    model.save_pretrained(str(tmp_path / "dense_table"))  # the table as loaded: dense
    config = json.loads((tmp_path / "dense_table" / "config.json").read_text())
    assert config["quantization"] == {"scheme": "int4", "group_size": 32, "embedding": False}
    reloaded = GLM4ForCausalLM.from_pretrained(str(tmp_path / "dense_table"), activation_dtype="float32")
    assert reloaded.model.embed_tokens.weight.dtype == paddle.float32
    for name, tensor in model.state_dict().items():
        assert np.array_equal(_numpy(reloaded.state_dict()[name]), _numpy(tensor)), name

    quantize_table(model)  # as glm4-convert --quantize stores it
    model.save_pretrained(str(tmp_path / "q"))
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization"] == {"scheme": "int4", "group_size": 32, "embedding": True}
    from safetensors.numpy import load_file

    tensors = load_file(str(tmp_path / "q" / "model.safetensors"))
    assert tensors["model.layers.1.mlp.gate_up_proj.qweight"].dtype == np.uint8
    assert tensors["lm_head.scales"].shape == (512, 2)
    assert tensors["model.embed_tokens.qweight"].shape == (512, 32) and "model.embed_tokens.weight" not in tensors
    assert "model.layers.1.mlp.gate_up_proj.weight" not in tensors
    reloaded = GLM4ForCausalLM.from_pretrained(str(tmp_path / "q"), activation_dtype="float32")
    assert isinstance(reloaded.lm_head.format, Packed) and reloaded.lm_head.format.group_size == 32
    for name, tensor in model.state_dict().items():
        assert np.array_equal(_numpy(reloaded.state_dict()[name]), _numpy(tensor)), name
    ids = ids_for(model.config)
    assert np.array_equal(reloaded(ids).logits.numpy(), model(ids).logits.numpy())
    # float32 asked of a quantized checkpoint: its dequantized values
    widened = GLM4ForCausalLM.from_pretrained(str(tmp_path / "q"), dtype="float32")
    assert isinstance(widened.lm_head.format, Dense)
    assert np.abs(widened(ids).logits.numpy() - model(ids).logits.numpy()).max() <= 1e-4
    with pytest.raises(ConfigError, match=r"quantized as int4 .group size 32.; re-quantizing"):
        GLM4ForCausalLM.from_pretrained(str(tmp_path / "q"), quantization="int8")


def test_bf16_checkpoint_stays_bf16_by_default(float_checkpoint, tmp_path):
    base, _ = float_checkpoint
    base.save_pretrained(str(tmp_path / "bf16"), dtype="bfloat16")
    model = GLM4ForCausalLM.from_pretrained(str(tmp_path / "bf16"), activation_dtype="float32")
    assert isinstance(model.lm_head.format, Packed) and model.lm_head.format.kind == "bfloat16"
    assert model.model.embed_tokens.weight.dtype == paddle.bfloat16  # looked up, then widened
    widened = GLM4ForCausalLM.from_pretrained(str(tmp_path / "bf16"), dtype="float32")
    assert isinstance(widened.lm_head.format, Dense) and widened.dtype == "float32"
    ids = ids_for(model.config)
    assert np.abs(model(ids).logits.numpy() - widened(ids).logits.numpy()).max() <= 1e-4
    # saved back as a bf16 checkpoint in Paddle's [in, out] layout, bit for bit
    model.save_pretrained(str(tmp_path / "again"))
    from safetensors import safe_open

    for name in ("lm_head.weight", "model.layers.0.self_attn.qkv_proj.weight"):
        with (
            safe_open(str(tmp_path / "bf16" / "model.safetensors"), "np") as a,
            safe_open(str(tmp_path / "again" / "model.safetensors"), "np") as b,
        ):
            assert a.get_slice(name).get_shape() == b.get_slice(name).get_shape()
    assert (tmp_path / "bf16" / "model.safetensors").read_bytes() == (
        tmp_path / "again" / "model.safetensors"
    ).read_bytes()


# ---- memory ---------------------------------------------------------------------------------------------
def test_glm4_9b_memory_figures():
    config = GLM4Config()  # the real geometry; nothing is allocated
    gb = {
        kind: memory.weight_bytes(config, fmt) / 1e9
        for kind, fmt in [
            ("float32", Dense("float32")),
            ("bfloat16", Packed("bfloat16")),
            ("int8", Packed("int8")),
            ("int4", Packed("int4", 128)),
        ]
    }
    assert 37.5 < gb["float32"] < 37.7 and 18.7 < gb["bfloat16"] < 18.9  # 9.4B parameters
    # quantized at load, the bf16 checkpoint's table stays bf16 (1.24 GB, mapped); a checkpoint quantized by
    # glm4-convert stores it quantized with them: 0.62 GB int8 (+ scales), 0.35 GB int4
    assert 10.0 < gb["int8"] < 10.1 and 5.8 < gb["int4"] < 6.0
    stored = {
        kind: memory.weight_bytes(
            dataclasses.replace(config, quantization=Quantization(fmt.kind, fmt.group_size, embedding=True)), fmt
        )
        / 1e9
        for kind, fmt in [("int8", Packed("int8")), ("int4", Packed("int4", 128))]
    }
    assert 9.3 < stored["int8"] < 9.5 and 4.9 < stored["int4"] < 5.1
    with pytest.raises(memory.InsufficientMemoryError) as err:
        memory.check_fits(config, Dense("float32"), 8192, "GLM-4-9B", available=int(21.8e9))
    message = str(err.value)
    assert message.startswith("GLM-4-9B needs 38.3 GB in float32 (weights 37.6 GB, KV cache for 8192 tokens 0.7 GB)")
    assert "21.8 GB is available: bfloat16 needs 19.5 GB, int8 needs" in message and "int4 needs" in message


def test_a_model_that_cannot_fit_is_refused_before_loading(float_checkpoint, monkeypatch):
    _, directory = float_checkpoint
    config = GLM4Config.from_pretrained(str(directory))
    int4 = memory.required_bytes(config, Packed("int4", 128), 256)
    assert (
        int4 < memory.required_bytes(config, Packed("int8"), 256) < memory.required_bytes(config, Dense("float32"), 256)
    )
    monkeypatch.setattr(memory, "available_bytes", lambda: int4)  # room for int4 only
    read = []
    monkeypatch.setattr("paddle_glm4.checkpoint.read_tensors", lambda *a, **k: read.append(1) or iter(()))
    with pytest.raises(
        memory.InsufficientMemoryError,
        match=r" needs \d+\.\d GB in float32 \(weights .*\), "
        r"\d+\.\d GB is available: int4 needs \d+\.\d GB \(",
    ):
        GLM4ForCausalLM.from_pretrained(str(directory), max_seq_len=256)
    assert not read  # refused before a byte of weights was read
    monkeypatch.undo()
    monkeypatch.setattr(memory, "available_bytes", lambda: int4)
    assert (
        GLM4ForCausalLM.from_pretrained(str(directory), quantization="int4", max_seq_len=256).lm_head.format.kind
        == "int4"
    )
    assert GLM4ForCausalLM.from_pretrained(str(directory), check_memory=False).dtype == "float32"


def test_bad_quantization_arguments(float_checkpoint, tmp_path):
    _, directory = float_checkpoint
    with pytest.raises(ConfigError, match="group_size applies to int4 only"):
        GLM4ForCausalLM.from_pretrained(str(directory), quantization="int8", group_size=64)
    with pytest.raises(ConfigError, match="even group_size"):
        GLM4ForCausalLM.from_pretrained(str(directory), quantization="int4", group_size=33)
    with pytest.raises(ConfigError, match="scheme must be one of"):
        GLM4ForCausalLM.from_pretrained(str(directory), quantization="int3")
    with pytest.raises(ValueError, match="activation_dtype must be one of"):
        GLM4ForCausalLM.from_pretrained(str(directory), quantization="int8", activation_dtype="fp8")
    data = json.loads((directory / "config.json").read_text())
    for bad in ({"scheme": "int4"}, {"scheme": "int8", "group_size": 64}, ["int8"], {"scheme": "int8", "x": 1}):
        with pytest.raises(ConfigError, match="quantization"):
            GLM4Config.from_dict({**data, "quantization": bad})
    assert GLM4Config.from_dict({**data, "quantization": {"scheme": "int8"}}).quantization == Quantization("int8")


def test_quantizing_at_load_streams_a_block_at_a_time(tmp_path, monkeypatch):
    """Peak memory while quantizing at load: the quantized model plus one block of float32 rows, never a
    whole float32 copy of a weight (numpy's allocations, which hold every array the loader makes)."""
    import tracemalloc

    from paddle_glm4 import quantization

    config = small_config(vocab_size=4096, hidden_size=128, intermediate_size=256, num_attention_heads=4, head_dim=32)
    paddle_model(config, paddle_state(config, hf_state(reference_model(config)))).save_pretrained(str(tmp_path))
    block = 16 << 10
    monkeypatch.setattr(quantization, "CONVERT_BLOCK_BYTES", block)
    tracemalloc.start()
    try:
        model = GLM4ForCausalLM.from_pretrained(str(tmp_path), quantization="int4", group_size=32)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    held = memory.weight_bytes(config, model.lm_head.format)
    largest = 4096 * 128 * 4  # the lm_head in float32: 2 MB
    assert peak <= held + 8 * block + (256 << 10), (peak, held)  # blocks, and small bookkeeping
    assert peak < held + largest / 2


@pytest.fixture(scope="module")
def full_width_bf16(tmp_path_factory):
    """A bf16 checkpoint of one GLM-4-9B layer at full width (K = 4096 and 13696 = 107 x 128), small vocab."""
    from conftest import full_width_config
    from paddle_glm4.demo import random_weights

    config = full_width_config(layers=1, vocab_size=8192, pad_token_id=0, eos_token_id=[1])
    directory = tmp_path_factory.mktemp("full_width")
    model = paddle_model(
        config,
        {name: array * np.float32(0.4) if array.ndim == 2 else array for name, array in random_weights(config, seed=2)},
    )
    model.save_pretrained(str(directory), dtype="bfloat16")
    return directory


@pytest.mark.slow
@pytest.mark.parametrize("kind, group_size", [("bfloat16", None), ("int8", None), ("int4", 128)])
def test_full_glm4_width_layer_equals_its_dequantized_float_model(full_width_bf16, kind, group_size):
    model = load(full_width_bf16, kind, group_size, activation_dtype="float32")
    ids = ids_for(model.config, (1, 7))
    ours = model(ids).logits.numpy()
    reference = dequantized_float_model(model)(ids).logits.numpy()
    assert np.abs(reference).max() > 1.0
    assert np.abs(ours - reference).max() <= 1e-5 * np.abs(reference).max() + 1e-4


def test_the_format_each_request_gets():
    """choose_format: the one decision of how Linear weights are held (the GPU branch runs here as logic only;
    its computation is unverified without a GPU)."""
    from paddle_glm4.quantization import WeightOnlyGPU, choose_format

    int4 = Quantization("int4", 128)
    cpu = {  # (stored dtype, stored quantization, dtype, quantization, group size) -> format
        ("bfloat16", None, None, None, None): Packed("bfloat16"),
        ("float32", None, None, None, None): Dense("float32"),
        ("bfloat16", None, "float32", None, None): Dense("float32"),
        ("float32", None, "bfloat16", None, None): Packed("bfloat16"),
        ("bfloat16", None, None, "int4", None): Packed("int4", 128),
        ("bfloat16", None, None, "int4", 64): Packed("int4", 64),
        ("bfloat16", int4, None, None, None): Packed("int4", 128),
        ("bfloat16", int4, "float32", None, None): Dense("float32"),
        ("bfloat16", int4, None, "int4", None): Packed("int4", 128),
    }
    for (stored, stored_q, dtype, scheme, group), expected in cpu.items():
        assert choose_format(stored, stored_q, dtype, scheme, group, "auto", False, False) == expected
    assert choose_format("bfloat16", None, None, "int8", None, "auto", True, True) == WeightOnlyGPU("int8", None)
    assert choose_format("bfloat16", int4, None, None, None, "auto", True, True) == WeightOnlyGPU("int4", 128)
    assert choose_format("bfloat16", None, None, None, None, "auto", True, True) == Dense("bfloat16", fused=True)
    with pytest.raises(ValueError, match=r"float16.*cannot compute on CPU"):
        choose_format("float16", None, "float16", None, None, "auto", False, False)
    with pytest.raises(ValueError, match="int8 or int4 weights"):
        choose_format("bfloat16", None, None, None, None, "int8", False, False)
