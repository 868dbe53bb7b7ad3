"""Adversarial: files that do not belong together, or are not what the loader takes.

- A tokenizer whose special ids disagree with the model's stop ids is refused at load (generation would never
  stop, or stop at ordinary text), by the engine (CLI, server) and by the PaddleNLP adapter's model.
- A torch checkpoint (the published layout, or transformers') handed to from_pretrained, the CLI or export is
  named as such, with the glm4-convert command, instead of "unexpected tensor ...".
"""

from __future__ import annotations

import json

import paddle
import pytest

from conftest import small_config
from converters.paddle_to_torch import write_published_checkpoint
from paddle_glm4 import GLM4ForCausalLM, GLM4Tokenizer
from paddle_glm4.checkpoint import CheckpointError
from paddle_glm4.cli_errors import UsageError
from paddle_glm4.demo import random_weights
from paddle_glm4.engine import load_engine
from paddle_glm4.small_vocab import write_small_vocabulary


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    return write_small_vocabulary(tmp_path_factory.mktemp("vocab"))


def checkpoint(directory, vocab, **config_changes):
    """A small converted checkpoint with the small vocabulary's tokenizer, its config changed as asked."""
    tokenizer = GLM4Tokenizer.from_pretrained(vocab)
    fields = {"vocab_size": 448, "eos_token_id": tokenizer.stop_token_ids, "pad_token_id": tokenizer.pad_token_id}
    config = small_config(**{**fields, **config_changes})
    paddle.seed(0)
    model = GLM4ForCausalLM(config)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(directory)
    return str(directory), config


def test_a_matching_pair_loads(tmp_path, vocab):
    model_dir, _ = checkpoint(tmp_path / "ok", vocab)
    model, tokenizer = load_engine(model_dir)
    assert model.generation_config.eos_token_id == tokenizer.stop_token_ids


@pytest.mark.parametrize(
    "eos, words",
    [
        ([1, 2], "stops at id 1, which is not a special token"),
        ([445], "stops at id 445, which is not a special token"),  # a padding row: no token at all
        (["<|user|>"], "ends text with '<|endoftext|>'"),
    ],
)
def test_stop_ids_that_are_not_the_tokenizers_are_refused(tmp_path, vocab, eos, words):
    tokenizer = GLM4Tokenizer.from_pretrained(vocab)
    eos = [tokenizer.special_token_id(e) if isinstance(e, str) else e for e in eos]
    model_dir, _ = checkpoint(tmp_path / "model", vocab, eos_token_id=eos)
    with pytest.raises(UsageError, match=words) as caught:
        load_engine(model_dir)
    assert "do not belong together" in str(caught.value) and model_dir in str(caught.value)


def test_a_tokenizer_with_more_tokens_than_the_model_is_refused(tmp_path, vocab):
    model_dir, _ = checkpoint(tmp_path / "model", vocab, vocab_size=400, eos_token_id=[1], pad_token_id=0)
    with pytest.raises(UsageError, match=r"432 tokens but the model in .* only 400"):
        load_engine(model_dir)


def test_the_paddlenlp_adapter_refuses_the_pair_too_and_limits_generation(tmp_path, vocab):
    from paddle_glm4.integrations.paddlenlp import PaddleNLPGLM4ForCausalLM

    bad_dir, _ = checkpoint(tmp_path / "bad", vocab, eos_token_id=[1, 2])
    with pytest.raises(UsageError, match="stops at id 1"):
        PaddleNLPGLM4ForCausalLM.from_pretrained(bad_dir)
    good_dir, _ = checkpoint(tmp_path / "good", vocab)
    model = PaddleNLPGLM4ForCausalLM.from_pretrained(good_dir)
    assert model.vocab_limit == 432
    ids, _ = model.generate(
        paddle.to_tensor([[5, 6, 7]]),
        max_new_tokens=24,
        decode_strategy="sampling",
        temperature=3.0,
        seed=0,
        eos_token_id=[],
    )
    assert ids.numpy().max() < 432


# ---- torch checkpoints -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def published(tmp_path_factory, vocab):
    config = small_config(vocab_size=448, eos_token_id=GLM4Tokenizer.from_pretrained(vocab).stop_token_ids)
    directory = tmp_path_factory.mktemp("published") / "glm-4-9b-chat"
    write_published_checkpoint(str(directory), config, random_weights(config, 0), dtype="bfloat16")
    GLM4Tokenizer.from_pretrained(vocab).save_pretrained(directory)
    return str(directory)


def test_from_pretrained_on_a_published_checkpoint_says_convert_it(published):
    with pytest.raises(CheckpointError) as caught:
        GLM4ForCausalLM.from_pretrained(published)
    message = str(caught.value)
    assert "published torch layout" in message and "unexpected tensor" not in message
    assert f"glm4-convert --src {published} --dst {published}-paddle" in message.splitlines()[0]


def test_transformers_layout_is_named_too(tmp_path, published):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "glm", "vocab_size": 448}))
    with pytest.raises(CheckpointError, match=r"transformers' torch layout .* glm4-convert --src"):
        GLM4ForCausalLM.from_pretrained(str(tmp_path))


def test_load_engine_and_export_say_it_too(published, tmp_path):
    from paddle_glm4.inference import ExportError, export_model

    with pytest.raises(CheckpointError, match="published torch layout"):
        load_engine(published)
    with pytest.raises(ExportError, match=r"published torch layout.*glm4-convert --src"):
        export_model(published, str(tmp_path / "export"))
