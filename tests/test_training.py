"""Training: the loss and every parameter's gradient against the reference (transformers' GlmForCausalLM)."""

import numpy as np
import paddle
import pytest

from conftest import hf_state, left_padded, paddle_model, paddle_state, reference_model, small_config
from converters import mapping
from paddle_glm4.model import IGNORE_INDEX


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
    out = ref(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), position_ids=torch.from_numpy(positions),
              labels=torch.from_numpy(labels))
    out.loss.backward()
    return out.loss.item(), {name: p.grad.float().numpy() for name, p in ref.named_parameters()}


@pytest.mark.parametrize("recompute", [False, True])
def test_loss_and_every_gradient_match_reference_with_padding_and_ignored_labels(recompute):
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
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    target = labels[:, 1:]
    counted = target != IGNORE_INDEX
    picked = np.take_along_axis(log_probs[:, :-1], np.where(counted, target, 0)[..., None], -1)[..., 0]
    assert abs(out.loss.item() - (-picked[counted].mean())) <= 1e-5
    none = model(paddle.to_tensor(ids), labels=paddle.full(ids.shape, IGNORE_INDEX, dtype="int64")).loss
    assert none.item() == 0.0
