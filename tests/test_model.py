"""The model against the reference (transformers' GlmForCausalLM), the KV cache, padding, checkpoints."""

import contextlib
import gc
import json
import os

import numpy as np
import paddle
import pytest

from conftest import (
    full_width_config,
    hf_state,
    left_padded,
    paddle_model,
    paddle_state,
    reference_logits,
    reference_model,
    small_config,
)
from converters import mapping
from paddle_glm4 import GLM4ForCausalLM, ops
from paddle_glm4.checkpoint import CheckpointError

CONFIGS = [
    # (config overrides, sequence length): heads / KV groups 1, 2, 4 / rope_ratio 1 and 500 / odd lengths
    ({"num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16, "rope_ratio": 1.0}, 7),
    ({"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "rope_ratio": 500.0}, 13),
    ({"num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 8, "hidden_size": 48, "rope_ratio": 500.0}, 31),
    (
        {
            "num_attention_heads": 6,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "num_hidden_layers": 3,
            "intermediate_size": 40,
        },
        65,
    ),
]


def build(config, seed=0):
    ref = reference_model(config, seed=seed)
    return ref, paddle_model(config, paddle_state(config, hf_state(ref)))


def random_ids(config, shape, seed=0):
    return np.random.RandomState(seed).randint(0, config.vocab_size, shape).astype("int64")


def logits(model, ids, **kwargs):
    return model(paddle.to_tensor(ids), **kwargs).logits.numpy()


def test_mapping_names_every_parameter_of_the_model():
    for config in (small_config(), small_config(attention_bias=False), small_config(tie_word_embeddings=True)):
        with paddle.LazyGuard():
            model = GLM4ForCausalLM(config)
        shapes = {name: tuple(p.shape) for name, p in model.state_dict().items()}
        assert shapes == mapping.paddle_shapes(config)


@pytest.mark.parametrize("overrides, seq_len", CONFIGS)
def test_logits_match_reference(overrides, seq_len):
    config = small_config(**overrides)
    ref, model = build(config)
    ids = random_ids(config, (2, seq_len))
    expected = reference_logits(ref, ids)
    ours = logits(model, ids)
    assert ours.dtype == np.float32 and ours.shape == (2, seq_len, config.vocab_size)
    assert np.abs(expected).max() > 1.0  # the weights are large enough for the comparison to mean something
    assert np.abs(ours - expected).max() <= 1e-4


@pytest.mark.slow
def test_one_layer_at_full_glm4_width():
    config = full_width_config(layers=1)
    ref = reference_model(config, std=0.02)
    state = paddle_state(config, hf_state(ref))
    ids = random_ids(config, (1, 9))
    expected = reference_logits(ref, ids)
    del ref
    gc.collect()
    model = paddle_model(config, state)
    del state
    gc.collect()
    ours = logits(model, ids)
    relative = np.abs(ours - expected).max() / np.abs(expected).max()
    assert relative <= 1e-5, relative


def test_decoding_with_the_cache_equals_the_full_forward():
    config = small_config(rope_ratio=500.0)
    ref, model = build(config)
    ids = random_ids(config, (2, 40))
    full = logits(model, ids)
    np.testing.assert_allclose(full, reference_logits(ref, ids), atol=1e-4, rtol=0)
    out = model(paddle.to_tensor(ids[:, :8]), use_cache=True)
    steps = [out.logits.numpy()]
    cache = out.past_key_values
    for t in range(8, 40):  # 32 tokens, one at a time
        out = model(paddle.to_tensor(ids[:, t : t + 1]), past_key_values=cache, use_cache=True)
        steps.append(out.logits.numpy())
    assert cache.length == 40
    assert np.abs(np.concatenate(steps, axis=1) - full).max() <= 1e-4


def test_cache_grows_when_a_plain_forward_runs_past_its_capacity():
    config = small_config()
    _, model = build(config)
    ids = random_ids(config, (1, 300))
    out = model(paddle.to_tensor(ids[:, :250]), use_cache=True)
    cache = out.past_key_values
    capacity = cache.capacity
    out = model(paddle.to_tensor(ids[:, 250:]), past_key_values=cache, use_cache=True)
    assert cache.capacity > capacity >= 250
    assert np.abs(out.logits.numpy() - logits(model, ids)[:, 250:]).max() <= 1e-4


def test_left_padded_batch_equals_each_prompt_alone():
    config = small_config(rope_ratio=500.0)
    ref, model = build(config)
    prompts = [random_ids(config, (n,), seed=n)[None][0] for n in (5, 12, 1, 9)]
    ids, mask = left_padded(prompts, config.pad_token_id)
    batch = logits(model, ids, attention_mask=paddle.to_tensor(mask))
    for row, prompt in enumerate(prompts):
        alone = logits(model, prompt[None])
        assert np.abs(batch[row, -1] - alone[0, -1]).max() <= 1e-4
        assert np.abs(alone - reference_logits(ref, prompt[None])).max() <= 1e-4
        assert np.isfinite(batch[row]).all()


def test_left_padded_batch_then_cache_equals_each_prompt_alone():
    config = small_config()
    _, model = build(config)
    prompts = [random_ids(config, (n,), seed=n) for n in (3, 10)]
    continuation = random_ids(config, (2, 6), seed=99)
    ids, mask = left_padded(prompts, config.pad_token_id)
    out = model(paddle.to_tensor(ids), attention_mask=paddle.to_tensor(mask), use_cache=True)
    cache, steps = out.past_key_values, []
    for t in range(continuation.shape[1]):
        out = model(paddle.to_tensor(continuation[:, t : t + 1]), past_key_values=cache, use_cache=True)
        steps.append(out.logits.numpy()[:, -1])
    for row, prompt in enumerate(prompts):
        alone = logits(model, np.concatenate([prompt, continuation[row]])[None])
        got = np.stack([s[row] for s in steps])
        assert np.abs(got - alone[0, len(prompt) :]).max() <= 1e-4


def test_logits_to_keep_returns_the_last_positions_only():
    config = small_config()
    _, model = build(config)
    ids = random_ids(config, (2, 11))
    last = logits(model, ids, logits_to_keep=1)
    assert last.shape == (2, 1, config.vocab_size)
    assert np.abs(last[:, 0] - logits(model, ids)[:, -1]).max() <= 1e-5


def test_last_layer_runs_on_the_kept_positions_after_its_keys_and_values():
    # the positions whose logits are dropped need no last-layer MLP (llama.cpp's graphs skip it too), nor
    # last-layer attention outputs (queries, output projection); every other layer, and the keys and values
    # the last one caches, still see all of them
    config = small_config()
    _, model = build(config)
    ids = random_ids(config, (2, 11))
    rows = {"qkv": [], "o": [], "mlp": []}
    hooks = [
        module.register_forward_pre_hook(lambda _, inputs, seen=seen: seen.append(inputs[0].shape[1]))
        for layer in model.model.layers
        for module, seen in (
            (layer.self_attn.qkv_proj, rows["qkv"]),
            (layer.self_attn.o_proj, rows["o"]),
            (layer.mlp, rows["mlp"]),
        )
    ]
    kept = logits(model, ids, logits_to_keep=3)
    for hook in hooks:
        hook.remove()
    layers = config.num_hidden_layers
    assert rows == {"qkv": [11] * layers, "o": [11] * (layers - 1) + [3], "mlp": [11] * (layers - 1) + [3]}
    assert np.abs(kept - logits(model, ids)[:, -3:]).max() <= 1e-5


@pytest.mark.parametrize("grad", [True, False], ids=["paddle-attention", "kernel-attention"])
def test_kept_positions_of_a_padded_batch_and_of_a_cached_continuation(grad):
    # the kept queries sit at later cache slots (start > 0) and read padded keys (key_valid): as the full forward,
    # through Paddle's attention (a gradient wanted) and the attention operator (none)
    config = small_config()
    _, model = build(config)
    prompts = [random_ids(config, (n,), seed=n) for n in (4, 9)]
    continuation = random_ids(config, (2, 5), seed=7)
    ids, mask = left_padded(prompts, config.pad_token_id)
    both = np.concatenate([mask, np.ones_like(continuation)], axis=1)
    with contextlib.nullcontext() if grad else paddle.no_grad():
        full = model(paddle.to_tensor(ids), attention_mask=paddle.to_tensor(mask), use_cache=True)
        kept = model(paddle.to_tensor(ids), attention_mask=paddle.to_tensor(mask), use_cache=True, logits_to_keep=2)
        later = [
            model(
                paddle.to_tensor(continuation),
                attention_mask=paddle.to_tensor(both),
                past_key_values=out.past_key_values,
                use_cache=True,
                **keep,
            ).logits.numpy()
            for out, keep in ((full, {}), (kept, {"logits_to_keep": 1}))
        ]
    assert np.abs(kept.logits.numpy() - full.logits.numpy()[:, -2:]).max() <= 1e-5
    assert later[1].shape[1] == 1
    assert np.abs(later[1] - later[0][:, -1:]).max() <= 1e-5


def test_linear_split_across_threads_equals_one_matmul():
    from paddle_glm4.device import cpu_threads

    assert cpu_threads() >= 2  # (conftest) so that the split path runs
    weight, bias = paddle.randn([96, 40]), paddle.randn([40])
    for shape in ([1, 1, 96], [2, 3, 96], [4, 4, 96], [1, 40, 96]):  # few rows (split) and many (one GEMM)
        x = paddle.randn(shape)
        expected = paddle.nn.functional.linear(x, weight, bias).numpy()
        np.testing.assert_allclose(ops.linear(x, weight, bias).numpy(), expected, rtol=1e-5, atol=1e-5)
    odd = paddle.randn([95, 40])  # K not divisible by the threads: one GEMM
    x = paddle.randn([1, 1, 95])
    np.testing.assert_allclose(ops.linear(x, odd, None).numpy(), (x @ odd).numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
def test_fused_gpu_kernels_agree_with_portable_ones():
    x = paddle.randn([2, 5, 64])
    w = paddle.rand([64]) + 0.5
    np.testing.assert_allclose(ops.fused_rms_norm(x, w, 1e-6).numpy(), ops.rms_norm(x, w, 1e-6).numpy(), atol=1e-5)
    config = small_config(rope_ratio=500.0)
    ref, portable = build(config)
    fused = paddle_model(config, paddle_state(config, hf_state(ref)), fused=True)
    ids, mask = left_padded([random_ids(config, (n,), seed=n) for n in (4, 9)], config.pad_token_id)
    a = logits(portable, ids, attention_mask=paddle.to_tensor(mask))
    b = logits(fused, ids, attention_mask=paddle.to_tensor(mask))
    assert np.abs(a[:, -1] - b[:, -1]).max() <= 1e-4


# ---- checkpoints ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    config = small_config()
    _, model = build(config)
    single = tmp_path_factory.mktemp("single")
    sharded = tmp_path_factory.mktemp("sharded")
    model.save_pretrained(str(single), overwrite=True)
    model.save_pretrained(str(sharded), max_shard_size="40KB", overwrite=True)
    return model, single, sharded


def test_save_then_load_is_bit_exact(saved):
    model, single, sharded = saved
    assert sorted(os.listdir(single)) == ["config.json", "generation_config.json", "model.safetensors"]
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    original = {k: v.numpy() for k, v in model.state_dict().items()}
    for directory in (single, sharded):
        loaded = GLM4ForCausalLM.from_pretrained(str(directory))
        state = loaded.state_dict()
        assert set(state) == set(original)
        for name, array in original.items():
            assert np.array_equal(state[name].numpy(), array), name


def test_save_refuses_to_overwrite_unless_asked(saved):
    model, single, _ = saved
    before = (single / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="already holds a checkpoint"):
        model.save_pretrained(str(single))
    assert (single / "model.safetensors").read_bytes() == before


def test_save_bf16_and_load_back_as_float32(tmp_path, saved):
    model, _, _ = saved
    model.save_pretrained(str(tmp_path), dtype="bfloat16")
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = GLM4ForCausalLM.from_pretrained(str(tmp_path), dtype="float32")
    original = model.state_dict()["model.layers.0.mlp.down_proj.weight"]
    expected = original.astype("bfloat16").astype("float32").numpy()
    assert np.array_equal(loaded.state_dict()["model.layers.0.mlp.down_proj.weight"].numpy(), expected)


def copy_checkpoint(src, dst):
    dst.mkdir()
    for name in os.listdir(src):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def rewrite_single(directory, change):
    """Rewrite model.safetensors of `directory` with `change(dict of arrays)` applied."""
    from safetensors.numpy import load_file, save_file

    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


def test_load_refuses_a_missing_tensor(tmp_path, saved):
    bad = copy_checkpoint(saved[1], tmp_path / "c")
    rewrite_single(bad, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model.layers.1.mlp.down_proj.weight'"):
        GLM4ForCausalLM.from_pretrained(str(bad))


def test_load_refuses_an_unexpected_tensor(tmp_path, saved):
    bad = copy_checkpoint(saved[1], tmp_path / "c")
    rewrite_single(bad, lambda t: t.update({"model.layers.7.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model.layers.7.extra.weight'"):
        GLM4ForCausalLM.from_pretrained(str(bad))


def test_load_refuses_a_shape_that_contradicts_the_config(tmp_path, saved):
    bad = copy_checkpoint(saved[1], tmp_path / "c")
    rewrite_single(bad, lambda t: t.update({"model.norm.weight": np.ones(65, np.float32)}))
    with pytest.raises(CheckpointError, match=r"'model.norm.weight' has shape \[65\], the config expects \[64\]"):
        GLM4ForCausalLM.from_pretrained(str(bad))


def test_load_refuses_a_truncated_shard(tmp_path, saved):
    bad = copy_checkpoint(saved[2], tmp_path / "c")
    shard = sorted(bad.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=f"{shard.name}: truncated"):
        GLM4ForCausalLM.from_pretrained(str(bad))


def test_load_refuses_a_missing_shard(tmp_path, saved):
    bad = copy_checkpoint(saved[2], tmp_path / "c")
    shard = sorted(bad.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shard {shard.name} .* is missing"):
        GLM4ForCausalLM.from_pretrained(str(bad))


def test_load_refuses_pickle_files(tmp_path, saved):
    bad = copy_checkpoint(saved[1], tmp_path / "c")
    (bad / "model.safetensors").unlink()
    (bad / "model_state.pdparams").write_bytes(b"\x80\x04K\x01.")  # a pickle; it must never be unpickled
    with pytest.raises(CheckpointError, match=r"model_state.pdparams is a pickle file"):
        GLM4ForCausalLM.from_pretrained(str(bad))
    index = {"weight_map": {"model.norm.weight": "pytorch_model.bin"}}
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"points to 'pytorch_model.bin'"):
        GLM4ForCausalLM.from_pretrained(str(bad))


def test_load_refuses_a_directory_without_config(tmp_path):
    with pytest.raises(CheckpointError, match=r"no config.json"):
        GLM4ForCausalLM.from_pretrained(str(tmp_path))
