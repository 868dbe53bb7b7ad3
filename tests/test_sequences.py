"""Sequences, the one place that decides slots and positions, and the model's one forward driven by them."""

import os

import numpy as np
import paddle

from conftest import left_padded, paddle_model, small_config
from paddle_glm4.demo import random_weights
from paddle_glm4.sequences import GROWTH_STEP, Sequences

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_claim_gives_slots_in_order_and_positions_over_real_tokens_only():
    sequences = Sequences(2, 8)
    step = sequences.claim(4, paddle.to_tensor([[0, 0, 1, 1], [1, 1, 1, 1]]))
    assert step.start == 0 and sequences.length == 4 and sequences.has_padding
    assert step.positions.numpy().tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]  # padding takes the next real position
    assert step.key_valid.numpy().tolist() == [[False, False, True, True], [True] * 4]
    step = sequences.claim(2)
    assert step.start == 4 and step.positions.numpy().tolist() == [[2, 3], [4, 5]]
    assert step.key_valid.shape == [2, 6] and step.key_valid.numpy()[:, 4:].all()


def test_key_valid_is_none_until_padding_appears():
    sequences = Sequences(1, 4)
    assert sequences.claim(3).key_valid is None
    assert sequences.claim(1, paddle.to_tensor([[1]])).key_valid is None
    assert sequences.seen.numpy().tolist() == [4]


def test_growing_keeps_what_was_written():
    config = small_config()
    model = paddle_model(config, dict(random_weights(config, seed=1)))
    sequences = Sequences(1, 2, model.model.new_cache(1, 2))
    sequences.claim(2, paddle.to_tensor([[0, 1]]))
    sequences.cache.keys[0][:, :2] = 7.0
    sequences.claim(1)
    assert sequences.capacity == GROWTH_STEP == sequences.cache.capacity
    assert float(sequences.cache.keys[0][:, :2].min()) == 7.0 and sequences.valid.numpy()[0, :3].tolist() == [
        False,
        True,
        True,
    ]


def test_a_prompt_prefilled_in_chunks_equals_one_forward():
    # several new tokens at a start > 0: what a long prompt's chunked prefill does, through the one forward
    config = small_config(rope_ratio=500.0)
    model = paddle_model(config, dict(random_weights(config, seed=2)))
    prompts = [np.random.RandomState(n).randint(3, config.vocab_size, n).astype("int64") for n in (9, 14)]
    ids, mask = left_padded(prompts, config.pad_token_id)
    full = model(paddle.to_tensor(ids), attention_mask=paddle.to_tensor(mask)).logits.numpy()
    sequences = Sequences(2, ids.shape[1], model.model.new_cache(2, ids.shape[1]))
    chunks = []
    for lo, hi in ((0, 5), (5, 6), (6, 14)):
        step = sequences.claim(hi - lo, paddle.to_tensor(mask[:, lo:hi]))
        chunks.append(
            model.logits(
                paddle.to_tensor(ids[:, lo:hi]), step.positions, step.start, step.key_valid, sequences.cache
            ).numpy()
        )
    chunked = np.concatenate(chunks, axis=1)
    real = mask.astype(bool)
    assert np.abs(chunked[real] - full[real]).max() <= 1e-4


def test_the_layer_loop_is_written_once():
    # one forward for the dynamic model and the exported program (issue 13): nothing else runs the blocks
    loops = []
    for directory, _, files in os.walk(os.path.join(ROOT, "paddle_glm4")):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(directory, name), encoding="utf-8") as f:
                    loops += [
                        (name, line.strip()) for line in f if line.strip().startswith("for ") and ".layers" in line
                    ]
    assert loops == [("model.py", "for i, layer in enumerate(self.layers):")]
