"""Shared test fixtures: small GLM-4 configs, the reference model, and its weights in each layout.

The reference is transformers' GlmForCausalLM (torch, CPU, fp32). Its random weights are mapped onto
our model through converters.mapping, the same table the converter uses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from converters import mapping
from paddle_glm4 import GLM4Config

REFERENCE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "glm4_reference"
CHAT_REFERENCE = REFERENCE_DIR / "glm-4-9b-chat"
PROJECT = str(Path(__file__).resolve().parents[1])  # the checkout under test


def run_python_json(args: list[str], timeout: float) -> dict:
    """`python ARGS` in a fresh process, in the project with its package importable; it must succeed, and its
    last line of output is returned, parsed as JSON."""
    done = subprocess.run(
        [sys.executable, *args],
        cwd=PROJECT,
        env={**os.environ, "PYTHONPATH": PROJECT},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def requires_reference(*files: str):
    """Skip (saying why) when the published GLM-4 data files in ../shared are not on this machine."""
    missing = [f for f in files if not (CHAT_REFERENCE / f).exists()]
    return pytest.mark.skipif(
        bool(missing),
        reason=f"published GLM-4 reference files not found: {', '.join(str(CHAT_REFERENCE / f) for f in missing)}",
    )


def small_config(**overrides) -> GLM4Config:
    """A tiny GLM-4 (2 layers, hidden 64) that keeps every structural feature of the real one."""
    fields = {
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rope_ratio": 1.0,
        "seq_length": 256,
        "pad_token_id": 0,
        "eos_token_id": [1, 2],
        "dtype": "float32",
    }
    fields.update(overrides)
    return GLM4Config(**fields)


def full_width_config(layers: int = 1, **overrides) -> GLM4Config:
    """GLM-4-9B geometry (hidden 4096, 32 heads, 2 KV groups, ffn 13696, vocab 151552) with few layers."""
    return GLM4Config(num_hidden_layers=layers, dtype="float32", **overrides)


def reference_model(config: GLM4Config, seed: int = 0, std: float = 0.08):
    """transformers' GlmForCausalLM with random weights, large enough that logits are far from zero."""
    import torch
    from transformers import GlmConfig, GlmForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():  # every weight is drawn below; transformers' own init would be wasted time
        model = GlmForCausalLM(GlmConfig(**config.to_hf_glm_dict())).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(1.0, 0.1, generator=generator)
            else:
                param.normal_(0.0, std, generator=generator)
    return model


def hf_state(model) -> dict[str, np.ndarray]:
    """The reference model's tensors, in transformers' `glm` layout, as fp32 numpy arrays."""
    return {name: t.detach().float().numpy() for name, t in model.state_dict().items()}


def paddle_state(config: GLM4Config, hf: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Map transformers-layout tensors to this project's Paddle layout."""
    return {
        spec.paddle: mapping.to_paddle(spec, [hf[name] for name in spec.hf]) for spec in mapping.tensor_specs(config)
    }


def quantize_table(model) -> None:
    """Quantize `model`'s dense embedding table in the scheme of its int8 / int4 Linear weights, as
    `glm4-convert --quantize` stores it (quantizing at load keeps a dense checkpoint's table as stored): the
    model that a quantized checkpoint of the same weights loads as."""
    import dataclasses

    import paddle

    from paddle_glm4.model import Embedding
    from paddle_glm4.quantization import convert, embedding_format

    weights, table = model.model.kernels.weights, model.model.embed_tokens
    target = embedding_format(
        weights,
        table.dtype,
        model.config.tie_word_embeddings,
        dataclasses.replace(weights.quantization, embedding=True),
    )
    dense = table.weight
    held = {
        "weight": dense.view(paddle.int16).numpy().view(np.uint16) if dense.dtype == paddle.bfloat16 else dense.numpy()
    }
    with paddle.LazyGuard():
        model.model.embed_tokens = Embedding(
            table.vocab_size, table.hidden_size, target, table.dtype, table.compute_dtype
        )
    for slot, value in convert(table.format, held, target, table.hidden_size, table.vocab_size).items():
        getattr(model.model.embed_tokens, slot).set_value(value)


def paddle_model(config: GLM4Config, state: dict[str, np.ndarray], fused: bool | None = None):
    """Our GLM4ForCausalLM holding exactly `state`."""
    import paddle

    from paddle_glm4 import GLM4ForCausalLM

    with paddle.LazyGuard():
        model = GLM4ForCausalLM(config, fused=fused)
    params = model.state_dict()
    assert set(params) == set(state), set(params) ^ set(state)
    for name, array in state.items():
        params[name].set_value(array)
    return model.eval()


def reference_logits(model, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    import torch

    with torch.no_grad():
        kwargs = {} if attention_mask is None else {"attention_mask": torch.from_numpy(attention_mask)}
        return model(torch.from_numpy(input_ids), **kwargs).logits.float().numpy()


def train_steps(model, ids, labels, steps: int, lr: float = 1e-2) -> list[float]:
    """`steps` AdamW steps of `model`'s trainable parameters on one batch; the loss before each step. Checks that
    the frozen parameters stay as they were."""
    import paddle

    frozen = {name: p.numpy().copy() for name, p in model.named_parameters() if p.stop_gradient}
    optimizer = paddle.optimizer.AdamW(lr, parameters=[p for p in model.parameters() if not p.stop_gradient])
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        losses.append(loss.item())
    assert all(np.array_equal(p.numpy(), frozen[name]) for name, p in model.named_parameters() if name in frozen)
    return losses


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """A batch of prompts of different lengths, padded on the left: (input_ids, attention_mask), int64."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype="int64")
    mask = np.zeros((len(prompts), width), dtype="int64")
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    return ids, mask


@pytest.fixture(scope="session", autouse=True)
def _like_production():
    """Every core, as from_pretrained sets it: the model's kernels split small matmuls across threads."""
    from paddle_glm4.device import use_all_cores

    os.environ.setdefault("GLOG_minloglevel", "2")
    use_all_cores(max(2, len(os.sched_getaffinity(0))))
    yield


def pytest_collection_modifyitems(config, items):
    import paddle

    if paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0:
        return
    skip = pytest.mark.skip(reason="needs a GPU and a CUDA build of Paddle; this machine has neither")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def check_peft_lora(model, lora_config_class, lora_model_class, merge, base_checkpoint, out) -> None:
    """A peft's LoRAModel (PaddleNLP's or PaddleFormers', the same API) on `model`, a float32 GLM4ForCausalLM loaded
    from `base_checkpoint`: it wraps the four Linear targets of every layer and only those train; a few steps lower
    the loss; `merge` (the adapter's merge_*_lora) gives a GLM4ForCausalLM with the base model's tensors, which saves
    to `out` as a checkpoint computing the adapted logits."""
    import paddle

    from paddle_glm4 import GLM4ForCausalLM
    from paddle_glm4.lora import TARGET_MODULES

    def logits(layer, ids):
        return layer(ids).logits.numpy()

    paddle.seed(0)
    lora = lora_model_class(
        model, lora_config_class(target_modules=[f".*{name}" for name in TARGET_MODULES], r=4, lora_alpha=8)
    )
    trainable = [name for name, p in lora.named_parameters() if not p.stop_gradient]
    layers = model.config.num_hidden_layers
    assert len(trainable) == 2 * len(TARGET_MODULES) * layers and all("lora_" in name for name in trainable)

    lora.train()
    ids = paddle.to_tensor(np.random.RandomState(1).randint(3, model.config.vocab_size, (2, 10)).astype("int64"))
    losses = train_steps(lora, ids, ids, steps=4)
    assert losses[-1] < losses[0], losses

    adapted = logits(lora, ids)
    lora.eval()  # PaddleNLP adds each update into its weight here
    np.testing.assert_allclose(logits(lora, ids), adapted, atol=1e-4, rtol=0)
    merged = merge(lora)
    assert set(dict(merged.named_parameters())) == set(dict(GLM4ForCausalLM(merged.config).named_parameters()))
    merged.save_pretrained(str(out))
    np.testing.assert_allclose(logits(GLM4ForCausalLM.from_pretrained(str(out)), ids), adapted, atol=1e-4, rtol=0)
    assert not np.allclose(logits(GLM4ForCausalLM.from_pretrained(str(base_checkpoint)), ids), adapted, atol=1e-3)

    # the converter turns it into the published torch layout and back, the adapted logits intact (torch-free)
    from converters import paddle_to_torch, torch_to_paddle

    paddle_to_torch.export(str(out), f"{out}-torch", progress=False)
    assert json.loads(Path(f"{out}-torch", "config.json").read_text())["model_type"] == "chatglm"
    torch_to_paddle.convert(f"{out}-torch", f"{out}-again", dtype="float32", progress=False)
    np.testing.assert_allclose(logits(GLM4ForCausalLM.from_pretrained(f"{out}-again"), ids), adapted, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def float_checkpoint(tmp_path_factory):
    """(the model, its directory): a float32 checkpoint of a small model with the reference's random weights,
    whose K (64, 96) is not always a multiple of an int4 group of 64."""
    config = small_config()
    model = paddle_model(config, paddle_state(config, hf_state(reference_model(config))))
    directory = tmp_path_factory.mktemp("float32")
    model.save_pretrained(str(directory), overwrite=True)
    return model, directory
