"""Training: the loss and every parameter's gradient against the reference (transformers' GlmForCausalLM)."""

import numpy as np
import paddle
import pytest

from conftest import (
    hf_state,
    left_padded,
    paddle_model,
    paddle_state,
    reference_logits,
    reference_model,
    small_config,
    train_steps,
)
from converters import mapping, paddle_to_torch
from paddle_glm4 import GLM4ForCausalLM, ops
from paddle_glm4.lora import LoRASettings, TrainingError, add_lora, merge_lora
from paddle_glm4.model import IGNORE_INDEX
from paddle_glm4.quantization import Packed
from paddle_glm4.safetensors_file import SafetensorsReader


def padded_batch(config):
    """A left-padded batch, labels -100 on the padding and on each row's first real tokens (a 'prompt').

    A row's first real token always has label -100: the logits that would predict it are at a padding slot,
    which attends to nothing real and differs between implementations (data sets never count it)."""
    rng = np.random.RandomState(3)
    prompts = [rng.randint(3, config.vocab_size, n).astype("int64") for n in (9, 14, 5)]
    ids, mask = left_padded(prompts, config.pad_token_id)
    labels = np.where(mask == 1, ids, IGNORE_INDEX)
    labels[0, -9:-6] = IGNORE_INDEX
    labels[1, -14:-4] = IGNORE_INDEX
    labels[2, -5] = IGNORE_INDEX
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype("int64")
    return ids, mask, labels, positions


def reference_loss_and_grads(ref, ids, mask, labels, positions):
    import torch

    ref.train()
    ref.zero_grad()
    out = ref(
        torch.from_numpy(ids),
        attention_mask=torch.from_numpy(mask),
        position_ids=torch.from_numpy(positions),
        labels=torch.from_numpy(labels),
    )
    out.loss.backward()
    return out.loss.item(), {name: p.grad.float().numpy() for name, p in ref.named_parameters()}


@pytest.mark.parametrize("recompute, attention_blocks", [(False, False), (True, False), (False, True)])
def test_loss_and_every_gradient_match_reference_with_padding_and_ignored_labels(
    recompute, attention_blocks, monkeypatch
):
    if attention_blocks:  # CPU attention in blocks of 4 queries (what long sequences get): gradients flow the same
        monkeypatch.setattr(ops, "SCORE_BUDGET", 3 * 4 * 14 * 4)
    config = small_config(rope_ratio=500.0)
    ref = reference_model(config, std=0.08)
    model = paddle_model(config, paddle_state(config, hf_state(ref))).train()
    model.model.recompute = recompute
    ids, mask, labels, positions = padded_batch(config)
    expected_loss, hf_grads = reference_loss_and_grads(ref, ids, mask, labels, positions)

    out = model(paddle.to_tensor(ids), attention_mask=paddle.to_tensor(mask), labels=paddle.to_tensor(labels))
    out.loss.backward()
    assert out.logits.shape == [3, 14, config.vocab_size]
    assert abs(out.loss.item() - expected_loss) <= 1e-4 * abs(expected_loss)

    expected = paddle_state(config, hf_grads)  # gradients map as their parameters do (transposes, concats)
    names = [spec.paddle for spec in mapping.tensor_specs(config)]
    params = dict(model.named_parameters())
    assert set(names) == set(params)
    for name in names:
        grad = params[name].grad
        assert grad is not None, f"no gradient reached {name}"
        want = expected[name]
        relative = np.abs(grad.numpy() - want).max() / np.abs(want).max()
        assert np.abs(want).max() > 0 and relative <= 1e-4, (name, relative)


def test_loss_ignores_every_label_marked_ignored():
    config = small_config()
    ref = reference_model(config)
    model = paddle_model(config, paddle_state(config, hf_state(ref)))
    ids, mask, labels, _ = padded_batch(config)
    out = model(paddle.to_tensor(ids), attention_mask=paddle.to_tensor(mask), labels=paddle.to_tensor(labels))
    # the same loss by hand, from the logits: the next token's negative log-likelihood where a label counts
    logits = out.logits.numpy().astype("float64")
    log_probs = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    target = labels[:, 1:]
    counted = target != IGNORE_INDEX
    picked = np.take_along_axis(log_probs[:, :-1], np.where(counted, target, 0)[..., None], -1)[..., 0]
    assert abs(out.loss.item() - (-picked[counted].mean())) <= 1e-5
    none = model(paddle.to_tensor(ids), labels=paddle.full(ids.shape, IGNORE_INDEX, dtype="int64")).loss
    assert none.item() == 0.0


# ---- LoRA -------------------------------------------------------------------------------------------------
def tiny_data_set(config, rows=4, length=12):
    """A fixed little data set the model can learn: each row counts upward from a random start."""
    starts = np.random.RandomState(7).randint(3, config.vocab_size - length, rows)
    ids = (starts[:, None] + np.arange(length)[None]).astype("int64")
    return paddle.to_tensor(ids), paddle.to_tensor(ids)


def lora_model(config, settings):
    ref = reference_model(config)
    model = paddle_model(config, paddle_state(config, hf_state(ref))).train()
    return model, add_lora(model, settings)


def test_lora_trains_only_its_matrices_lowers_the_loss_and_merges_into_the_same_logits(tmp_path):
    import torch
    from transformers import GlmConfig, GlmForCausalLM

    config = small_config()
    paddle.seed(0)
    model, trainable = lora_model(config, LoRASettings(rank=4, alpha=8))
    # 4 Linear targets per layer, A and B each
    assert len(trainable) == 4 * 2 * config.num_hidden_layers and all("lora_" in n for n in trainable)
    ids, labels = tiny_data_set(config)
    losses = train_steps(model, ids, labels, steps=8)
    assert losses[-1] < 0.8 * losses[0], losses

    model.eval()
    lora_logits = model(ids).logits.numpy()
    merge_lora(model)
    assert set(dict(model.named_parameters())) == {spec.paddle for spec in mapping.tensor_specs(config)}
    merged_logits = model(ids).logits.numpy()
    assert np.abs(merged_logits - lora_logits).max() <= 1e-4

    # the merged checkpoint, turned back into the published torch layout, gives transformers the same logits
    model.save_pretrained(str(tmp_path / "merged"))
    paddle_to_torch.export(str(tmp_path / "merged"), str(tmp_path / "torch"), progress=False)
    published = {}
    for path in (tmp_path / "torch").glob("*.safetensors"):
        with SafetensorsReader(str(path)) as reader:
            published.update({name: reader.read(name) for name in reader.names()})
    hf = {}
    for spec in mapping.tensor_specs(config):
        hf.update(
            zip(
                spec.hf,
                mapping.from_paddle(spec, mapping.to_paddle(spec, [published[spec.published]]), "hf"),
                strict=False,
            )
        )
    ref = GlmForCausalLM(GlmConfig(**config.to_hf_glm_dict())).eval()
    ref.load_state_dict({name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in hf.items()}, strict=False)
    assert np.abs(reference_logits(ref, ids.numpy()) - merged_logits).max() <= 1e-4


def test_lora_refuses_weights_that_cannot_train():
    config = small_config()
    model = GLM4ForCausalLM(config, weights=Packed("int8", group_size=None))
    with pytest.raises(TrainingError, match=r"float32 weights.*int8.*dtype='float32'"):
        add_lora(model, LoRASettings())
    with pytest.raises(TrainingError, match="rank 0"):
        LoRASettings(rank=0)
    with pytest.raises(TrainingError, match="q_proj"):
        LoRASettings(targets=("q_proj",))
