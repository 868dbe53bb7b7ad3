"""generate() against transformers' greedy generation, the cache, stopping, sampling, the context guard."""

import numpy as np
import paddle
import pytest
import torch

from conftest import hf_state, left_padded, paddle_model, paddle_state, reference_model, small_config
from paddle_glm4.generation import GenerationConfig

NEW = 32


@pytest.fixture(scope="module")
def models():
    config = small_config(rope_ratio=500.0, seq_length=128)
    ref = reference_model(config, seed=1)
    return config, ref, paddle_model(config, paddle_state(config, hf_state(ref)))


def prompts(config, lengths=(5, 11, 2, 8)):
    # ids from 3 up, so that no prompt holds a stop id (1, 2) or the pad id (0)
    return [np.random.RandomState(n).randint(3, config.vocab_size, n).astype("int64") for n in lengths]


def reference_generate(ref, config, ids, mask=None, **kwargs):
    with torch.no_grad():
        out = ref.generate(
            torch.from_numpy(ids),
            attention_mask=None if mask is None else torch.from_numpy(mask),
            do_sample=False,
            eos_token_id=config.eos_token_id,
            pad_token_id=config.pad_token_id,
            **kwargs,
        )
    return out[:, ids.shape[1] :].numpy()


def test_greedy_equals_the_reference_alone_and_batched(models):
    config, ref, model = models
    ps = prompts(config)
    for p in ps:
        ids, scores = model.generate(p, max_new_tokens=NEW)
        assert ids.dtype == paddle.int64 and list(scores.shape) == [1, 1]
        assert ids.numpy().tolist() == reference_generate(ref, config, p[None], max_new_tokens=NEW).tolist()
    batch, mask = left_padded(ps, config.pad_token_id)
    ids, scores = model.generate(batch, attention_mask=mask, max_new_tokens=NEW)
    assert ids.numpy().tolist() == reference_generate(ref, config, batch, mask, max_new_tokens=NEW).tolist()
    for row, p in enumerate(ps):
        alone_ids, alone_scores = model.generate(p, max_new_tokens=NEW)
        assert ids.numpy()[row, : alone_ids.shape[1]].tolist() == alone_ids.numpy()[0].tolist()
        assert abs(float(scores[row, 0]) - float(alone_scores[0, 0])) < 1e-3


def test_greedy_with_the_cache_equals_step_by_step_full_forwards(models):
    config, _, model = models
    p = prompts(config, (6,))[0]
    ids, scores = model.generate(p, max_new_tokens=12, eos_token_id=[])
    sequence, total = list(p), 0.0
    for _ in range(12):
        logits = model(paddle.to_tensor([sequence])).logits.numpy()[0, -1]
        token = int(logits.argmax())
        total += float(logits[token] - np.log(np.exp(logits - logits.max()).sum()) - logits.max())
        sequence.append(token)
    assert ids.numpy()[0].tolist() == sequence[len(p) :]
    assert abs(float(scores[0, 0]) - total) < 1e-3  # the score is the sum of the chosen tokens' log-probs


def test_stops_at_any_of_several_eos_ids_and_pads_finished_rows(models):
    config, _, model = models
    ps = prompts(config)
    free, _ = model.generate(ps[0], max_new_tokens=NEW, eos_token_id=[])
    stop_a, stop_b = int(free[0, 3]), int(free[0, 6])
    ids, alone = model.generate(ps[0], max_new_tokens=NEW, eos_token_id=[stop_b, stop_a], pad_token_id=0)
    first = next(i for i, t in enumerate(free.numpy()[0]) if t in (stop_a, stop_b))
    assert ids.shape[1] == first + 1 and int(ids[0, -1]) in (stop_a, stop_b)
    # in a batch, a row that stops early is padded while the others go on
    batch, mask = left_padded([ps[0], ps[1]], config.pad_token_id)
    other, _ = model.generate(ps[1], max_new_tokens=NEW, eos_token_id=[stop_a, stop_b], pad_token_id=0)
    ids, scores = model.generate(
        batch, attention_mask=mask, max_new_tokens=NEW, eos_token_id=[stop_a, stop_b], pad_token_id=0
    )
    assert ids.shape[1] == max(first + 1, other.shape[1])
    assert ids.numpy()[0, first + 1 :].tolist() == [0] * (ids.shape[1] - first - 1)
    assert abs(float(scores[0, 0]) - float(alone[0, 0])) < 1e-3  # the padding after its eos added nothing


def test_sampling_is_reproducible_with_a_seed_and_varies_across_seeds(models):
    config, _, model = models
    p = prompts(config)[1]
    kwargs = {
        "max_new_tokens": 16,
        "do_sample": True,
        "temperature": 1.5,
        "top_p": 0.95,
        "top_k": 100,
        "eos_token_id": [],
    }
    first, _ = model.generate(p, seed=7, **kwargs)
    again, _ = model.generate(p, seed=7, **kwargs)
    others = [model.generate(p, seed=s, **kwargs)[0].numpy().tolist() for s in (8, 9, 10)]
    assert first.numpy().tolist() == again.numpy().tolist()
    assert any(o != first.numpy().tolist() for o in others)


def test_sampling_leaves_the_callers_random_stream_alone(models):
    config, _, model = models
    paddle.seed(123)
    expected = paddle.rand([3]).numpy()
    paddle.seed(123)
    model.generate(prompts(config)[0], max_new_tokens=4, do_sample=True, seed=5)
    assert np.array_equal(paddle.rand([3]).numpy(), expected)


def test_top_k_one_and_tiny_top_p_equal_greedy(models):
    config, _, model = models
    p = prompts(config)[2]
    greedy, _ = model.generate(p, max_new_tokens=NEW)
    top_k, _ = model.generate(p, max_new_tokens=NEW, do_sample=True, top_k=1, seed=1)
    top_p, _ = model.generate(p, max_new_tokens=NEW, do_sample=True, top_p=1e-6, seed=2)
    assert top_k.numpy().tolist() == greedy.numpy().tolist() == top_p.numpy().tolist()


def test_repetition_penalty_equals_the_reference(models):
    config, ref, model = models
    p = prompts(config)[3]
    ids, _ = model.generate(p, max_new_tokens=NEW, repetition_penalty=1.5)
    expected = reference_generate(ref, config, p[None], max_new_tokens=NEW, repetition_penalty=1.5)
    assert ids.numpy().tolist() == expected.tolist()
    assert ids.numpy().tolist() != model.generate(p, max_new_tokens=NEW)[0].numpy().tolist()


CHECKPOINT = GenerationConfig(
    eos_token_id=[1, 2], pad_token_id=0, do_sample=True, temperature=0.8, top_p=0.8, top_k=0, repetition_penalty=1.1
)  # as GLM-4-9B-chat's generation_config.json


@pytest.mark.parametrize(
    "given, expected",
    [
        ({}, {"do_sample": True, "temperature": 0.8, "top_p": 0.8, "repetition_penalty": 1.1}),  # the checkpoint's
        (
            {"temperature": 0.5, "eos_token_id": 7},
            {"do_sample": True, "temperature": 0.5, "top_p": 0.8, "eos_token_id": [7]},
        ),
        ({"do_sample": False}, {"do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 0}),  # greedy: neutral
        ({"temperature": 0}, {"do_sample": False, "temperature": 1.0, "top_p": 1.0}),  # 0 means greedy
        ({"do_sample": True, "temperature": 0}, {"do_sample": True, "temperature": 0}),  # generate refuses it
        ({"repetition_penalty": 1.0, "pad_token_id": 5}, {"repetition_penalty": 1.0, "pad_token_id": 5}),
    ],
)
def test_requested_settings_merge_over_the_checkpoints(given, expected):
    merged = CHECKPOINT.merged(**given)
    assert {name: getattr(merged, name) for name in expected} == expected


def test_a_sampling_parameter_asks_for_sampling_over_a_greedy_checkpoint():
    greedy = GenerationConfig(do_sample=False, temperature=0.6, top_k=40)
    assert not greedy.merged().do_sample and greedy.merged().top_k == 0
    for given in ({"temperature": 0.9}, {"top_p": 0.5}, {"top_k": 5}):
        merged = greedy.merged(**given)
        assert merged.do_sample and merged.temperature == given.get("temperature", 0.6)
        assert merged.top_k == given.get("top_k", 40) and merged.top_p == given.get("top_p", 1.0)
    assert not greedy.merged(do_sample=False, top_p=0.5).do_sample


def test_generate_takes_unset_settings_from_the_generation_config(models):
    config, _, model = models
    p = prompts(config)[1]
    explicit = {"do_sample": True, "temperature": 1.3, "top_k": 50, "repetition_penalty": 1.2}
    expected, _ = model.generate(p, max_new_tokens=12, seed=3, eos_token_id=[], **explicit)
    saved = model.generation_config
    try:
        model.generation_config = GenerationConfig(eos_token_id=[], pad_token_id=0, **explicit)
        assert model.generate(p, max_new_tokens=12, seed=3)[0].numpy().tolist() == expected.numpy().tolist()
        greedy, _ = model.generate(p, max_new_tokens=12, do_sample=False)
    finally:
        model.generation_config = saved
    assert (
        greedy.numpy().tolist()
        == model.generate(p, max_new_tokens=12, eos_token_id=[], repetition_penalty=1.2)[0].numpy().tolist()
    )


def test_context_guard_refuses_before_any_work_or_truncates_when_asked(models):
    config, _, model = models
    long_prompt = np.random.RandomState(0).randint(3, config.vocab_size, 120)
    with pytest.raises(
        ValueError,
        match=r"prompt \(120 tokens\) plus max_new_tokens \(16\) exceeds the model's "
        r"context of 128 tokens",
    ):
        model.generate(long_prompt, max_new_tokens=16)
    ids, _ = model.generate(long_prompt, max_new_tokens=16, truncate=True, eos_token_id=[])
    kept, _ = model.generate(long_prompt[-112:], max_new_tokens=16, eos_token_id=[])
    assert ids.numpy().tolist() == kept.numpy().tolist()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be a positive integer"),
        ({"do_sample": True, "temperature": 0.0}, "temperature must be > 0"),
        ({"do_sample": True, "top_p": 1.5}, "top_p must be in"),
        ({"input_ids": [[5, 999999]]}, "token id 999999 is outside the model's vocabulary"),
    ],
)
def test_bad_arguments_are_refused(models, kwargs, message):
    _, _, model = models
    kwargs = {"input_ids": [[5, 6, 7]], **kwargs}
    with pytest.raises(ValueError, match=message):
        model.generate(**kwargs)


def test_streamers_text_joined_equals_the_final_decode(models, tmp_path):
    import io
    import threading

    from paddle_glm4 import GLM4Tokenizer, TextIteratorStreamer, TextStreamer
    from paddle_glm4.small_vocab import write_small_vocabulary

    _config, _, model = models
    tokenizer = GLM4Tokenizer.from_pretrained(write_small_vocabulary(tmp_path))
    prompt = tokenizer.encode("你好 🙂 streaming")
    for seed in range(3):  # sampled, so that multi-byte characters split over tokens show up
        kwargs = {"max_new_tokens": 40, "do_sample": True, "temperature": 1.5, "seed": seed, "eos_token_id": []}
        out = io.StringIO()
        ids, _ = model.generate(prompt, streamer=TextStreamer(tokenizer, out), **kwargs)
        expected = tokenizer.decode(
            [t for t in ids.numpy()[0] if not tokenizer.is_padding_id(t)], skip_special_tokens=True
        )
        assert out.getvalue() == expected
        streamer = TextIteratorStreamer(tokenizer, timeout=60)
        thread = threading.Thread(target=model.generate, args=(prompt,), kwargs={"streamer": streamer, **kwargs})
        thread.start()
        pieces = list(streamer)
        thread.join()
        assert "".join(pieces) == expected and len(pieces) > 1
        assert all("\ufffd" not in piece or "\ufffd" in expected for piece in pieces)


def test_a_cancelled_streamer_stops_generation(models):
    from paddle_glm4.streamer import Streamer

    config, _, model = models

    class StopAfterThree(Streamer):
        def on_tokens(self, token_ids):
            if self.tokens == 3:
                self.cancel()

    ids, _ = model.generate(prompts(config)[0], max_new_tokens=NEW, eos_token_id=[], streamer=StopAfterThree())
    assert ids.shape[1] == 3


def test_vocab_limit_keeps_generation_inside_the_tokenizers_ids(models):
    """Ids from vocab_limit on (an embedding's padding rows) are never chosen, greedy or sampled; below it greedy
    picks what the full forward's logits say among the allowed ids."""
    config, _, model = models
    limit = 97  # well below the model's 512 rows, so that random weights often prefer a row past it
    p = prompts(config, (7,))[0]
    ids, _ = model.generate(p, max_new_tokens=16, eos_token_id=[], vocab_limit=limit)
    sequence = list(p)
    for _ in range(16):
        sequence.append(int(model(paddle.to_tensor([sequence])).logits.numpy()[0, -1, :limit].argmax()))
    assert ids.numpy()[0].tolist() == sequence[len(p) :]
    free, _ = model.generate(p, max_new_tokens=16, eos_token_id=[])
    assert max(free.numpy()[0]) >= limit  # the limit changed something
    for seed in range(3):
        sampled, _ = model.generate(
            p,
            max_new_tokens=24,
            eos_token_id=[],
            do_sample=True,
            temperature=2.0,
            seed=seed,
            repetition_penalty=1.3,
            vocab_limit=limit,
        )
        assert sampled.numpy().max() < limit
    assert model.generate(p, max_new_tokens=4, vocab_limit=config.vocab_size)[0].shape == [1, 4]  # no-op limit
    for bad in (0, config.vocab_size + 1, 2.5, True):
        with pytest.raises(ValueError, match="vocab_limit must be an int"):
            model.generate(p, max_new_tokens=4, vocab_limit=bad)
