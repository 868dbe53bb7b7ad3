"""PaddleNLP integration: its Auto classes load converted GLM-4 checkpoints as this project's classes.

PaddleNLP 2.8.1 imports only beside pinned packages (numpy<2, huggingface_hub<0.26, ...), so these tests run in
their own environment, `make test-paddlenlp` (.venv-paddlenlp); elsewhere the module is skipped. The checkpoint is
a tiny random model saved by this project, with the small tokenizer: no torch needed.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import paddle
import pytest

paddlenlp = pytest.importorskip(
    "paddlenlp", reason="PaddleNLP is not installed here; `make test-paddlenlp` runs these tests in .venv-paddlenlp"
)

import paddlenlp.utils.env  # noqa: E402, F811 (the module importorskip returned, with its env submodule)
from paddlenlp.generation import GenerationConfig as PaddleNLPGenerationConfig  # noqa: E402
from paddlenlp.transformers import (  # noqa: E402
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
)

from conftest import check_peft_lora, small_config  # noqa: E402
from no_network import REFUSE_NETWORK  # noqa: E402
from paddle_glm4 import GLM4Config, GLM4ForCausalLM, GLM4Tokenizer  # noqa: E402
from paddle_glm4.integrations.paddlenlp import (  # noqa: E402
    PUBLISHED_TOKENIZER_CLASS,
    CheckpointNotFoundError,
    merge_paddlenlp_lora,
    register_paddlenlp,
)
from paddle_glm4.integrations.paddlenlp_home import cache_dir  # noqa: E402
from paddle_glm4.small_vocab import write_small_vocabulary  # noqa: E402

NAME = "THUDM/glm-4-9b"
TEXTS = ["def add(a, b):\n    return a + b", "hello", "你好，世界 <|user|> [gMASK]"]


@pytest.fixture(scope="module", autouse=True)
def registered():
    register_paddlenlp()
    register_paddlenlp()  # a second call changes nothing


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A converted checkpoint directory: random tiny GLM-4 + small tokenizer, ids and stop tokens agreeing."""
    directory = tmp_path_factory.mktemp("glm4")
    write_small_vocabulary(directory)
    tokenizer = GLM4Tokenizer.from_pretrained(directory)
    paddle.seed(0)
    config = small_config(
        vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.stop_token_ids, pad_token_id=tokenizer.pad_token_id
    )
    GLM4ForCausalLM(config).eval().save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def home(tmp_path_factory, checkpoint):
    """A PaddleNLP home whose model cache holds the checkpoint under NAME."""
    home = tmp_path_factory.mktemp("paddlenlp-home")
    shutil.copytree(checkpoint, home / "models" / NAME)
    return home


@pytest.fixture
def model_home(monkeypatch, home):
    """PaddleNLP's model cache, pointed at `home` (PaddleNLP reads PPNLP_HOME once, at import)."""
    monkeypatch.setattr(paddlenlp.utils.env, "MODEL_HOME", str(home / "models"))
    return home / "models"


@pytest.fixture(scope="module")
def reference(checkpoint):
    return GLM4ForCausalLM.from_pretrained(str(checkpoint)), GLM4Tokenizer.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def auto(home):
    """The model and tokenizer as PaddleNLP users get them, by name."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(paddlenlp.utils.env, "MODEL_HOME", str(home / "models"))
        return AutoModelForCausalLM.from_pretrained(NAME), AutoTokenizer.from_pretrained(NAME)


def logits(model, ids):
    return model(paddle.to_tensor(ids)).logits.numpy()


# ---- loading ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("by", ["directory", "name"])
def test_auto_classes_return_this_projects_classes(by, checkpoint, model_home):
    source = str(checkpoint) if by == "directory" else NAME
    config = AutoConfig.from_pretrained(source)
    assert type(config) is GLM4Config and config == GLM4Config.from_pretrained(str(checkpoint))
    for auto_class in (AutoModelForCausalLM, AutoModel):  # AutoModel too, as THUDM's checkpoint maps it
        model = auto_class.from_pretrained(source)
        assert isinstance(model, GLM4ForCausalLM) and not model.training
        assert model.config == config
    assert isinstance(AutoTokenizer.from_pretrained(source), GLM4Tokenizer)


def test_same_logits_as_glm4_for_causal_lm(auto, reference):
    ids = np.random.RandomState(0).randint(0, reference[0].config.vocab_size, (2, 9)).astype("int64")
    np.testing.assert_array_equal(logits(auto[0], ids), logits(reference[0], ids))


def test_same_token_ids_as_glm4_tokenizer(auto, reference):
    tokenizer, expected = auto[1], reference[1]
    for text in TEXTS:
        assert tokenizer(text) == expected(text)
    for key, value in tokenizer(TEXTS, padding=True, return_tensors="pd").items():
        np.testing.assert_array_equal(value.numpy(), expected(TEXTS, padding=True, return_tensors="np")[key])
    ids = paddle.to_tensor([expected.encode(TEXTS[0])] * 2)
    assert tokenizer.batch_decode(ids, skip_special_tokens=True) == [TEXTS[0]] * 2


def test_other_models_are_left_to_paddlenlp(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 4,
                "vocab_size": 100,
            }
        )
    )
    assert type(AutoConfig.from_pretrained(str(tmp_path))) is LlamaConfig
    assert not getattr(AutoConfig.from_pretrained.__wrapped__, "answers_for_glm4", False)  # wrapped once only


@pytest.mark.parametrize("auto_class", [AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer])
def test_a_missing_checkpoint_says_how_to_convert_it(auto_class, model_home, tmp_path):
    name = "THUDM/glm-4-9b-chat"
    with pytest.raises(CheckpointNotFoundError) as err:
        auto_class.from_pretrained(name)
    assert f"glm4-convert --src <dir> --dst {cache_dir(name)}\n" in str(err.value)
    assert f"glm4-convert --src <dir> --paddlenlp-name {name}" in str(err.value)
    assert cache_dir(name) == str(model_home / name)
    with pytest.raises(CheckpointNotFoundError, match=re.escape(f"--dst {tmp_path / name}") + "$"):
        auto_class.from_pretrained(name, cache_dir=str(tmp_path))


def test_the_published_checkpoint_loads_its_tokenizer_and_config_and_asks_to_convert_the_weights(tmp_path):
    write_small_vocabulary(tmp_path)
    tokenizer_config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    tokenizer_config["tokenizer_class"] = PUBLISHED_TOKENIZER_CLASS  # as THUDM's file says
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    config = small_config(vocab_size=GLM4Tokenizer.from_pretrained(tmp_path).vocab_size)
    (tmp_path / "config.json").write_text(json.dumps(config.to_published_dict()))

    assert isinstance(AutoTokenizer.from_pretrained(str(tmp_path)), GLM4Tokenizer)
    assert AutoConfig.from_pretrained(str(tmp_path)) == config
    with pytest.raises(CheckpointNotFoundError, match=re.escape(f"glm4-convert --src {tmp_path} --dst")):
        AutoModelForCausalLM.from_pretrained(str(tmp_path))


def test_tensor_parallel_degree_2_splits_the_model_across_two_processes(checkpoint, tmp_path):
    """PaddleNLP's way: every rank loads with tensor_parallel_degree and its rank, and runs the same calls; the
    logits and greedy tokens are one process's."""
    from test_tensor_parallel import launch

    ids = np.array([[5, 9, 17, 3, 40, 2]], dtype="int64")
    np.savez(tmp_path / "inputs.npz", ids=ids, batch_ids=ids, batch_mask=np.ones_like(ids))
    (tmp_path / "out").mkdir()
    done = launch(
        2,
        tmp_path,
        "--paddlenlp",
        "--model",
        str(checkpoint),
        "--out",
        str(tmp_path / "out"),
        "--degree",
        "2",
        "--inputs",
        str(tmp_path / "inputs.npz"),
        timeout=180,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint))
    expected = logits(model, ids)
    alone, _ = model.generate(paddle.to_tensor(ids), max_new_tokens=8)
    for rank in range(2):
        result = np.load(tmp_path / "out" / f"rank{rank}.npz", allow_pickle=False)
        assert np.abs(result["logits"] - expected).max() <= 1e-4
        np.testing.assert_array_equal(result["alone"], alone.numpy())


def test_loading_arguments_glm4_cannot_honour_are_refused(checkpoint):
    # a split model needs its ranks: one process is not a launch of 2 (tests/test_tensor_parallel.py splits it)
    with pytest.raises(ValueError, match="tensor_parallel_degree 2 needs 2 processes"):
        AutoModelForCausalLM.from_pretrained(str(checkpoint), tensor_parallel_degree=2)
    with pytest.raises(ValueError, match="tensor_parallel_rank 1 is not this process's rank, 0"):
        AutoModelForCausalLM.from_pretrained(str(checkpoint), tensor_parallel_rank=1)
    with pytest.raises(TypeError, match="keyword arguments only"):
        AutoModel.from_pretrained(str(checkpoint), "ForCausalLM")
    with pytest.raises(TypeError, match="colour"):
        AutoConfig.from_pretrained(str(checkpoint), colour="blue")
    assert AutoConfig.from_pretrained(str(checkpoint), seq_length=64).seq_length == 64


# ---- the model where PaddleNLP users touch it ---------------------------------------------------------------------


def test_generate_as_paddlenlp_users_write_it_equals_greedy_generate(auto, reference):
    model, tokenizer = auto
    inputs = tokenizer(TEXTS, padding=True, return_tensors="pd")
    expected_ids, expected_scores = reference[0].generate(**inputs, max_new_tokens=8)
    for length in ({"max_new_tokens": 8}, {"max_length": 8}):  # max_length: PaddleNLP's older name
        ids, scores = model.generate(**inputs, decode_strategy="greedy_search", **length)
        np.testing.assert_array_equal(ids.numpy(), expected_ids.numpy())
        np.testing.assert_allclose(scores.numpy(), expected_scores.numpy(), rtol=1e-6)
    # as GenerationConfig.from_pretrained reads THUDM's generation_config.json, version stamp included
    config = PaddleNLPGenerationConfig(decode_strategy="greedy_search", max_new_tokens=8, transformers_version="4.40.2")
    np.testing.assert_array_equal(model.generate(**inputs, generation_config=config)[0].numpy(), expected_ids.numpy())
    # trunc_input=False: the prompt (padding included) before the new tokens, as PaddleNLP returns it
    prompt = inputs["input_ids"].numpy()
    for keep in ({"trunc_input": False}, {"generation_config": PaddleNLPGenerationConfig(trunc_input=False)}):
        whole = model.generate(**inputs, max_new_tokens=8, **keep)[0].numpy()
        np.testing.assert_array_equal(whole, np.concatenate([prompt, expected_ids.numpy()], axis=1))


def test_sampling_arguments_are_honoured(auto, reference):
    model, tokenizer = auto
    inputs = tokenizer(TEXTS, padding=True, return_tensors="pd")
    sampling = {"top_p": 0.9, "top_k": 20, "temperature": 0.7, "repetition_penalty": 1.2}
    expected = reference[0].generate(**inputs, do_sample=True, max_new_tokens=8, seed=5, **sampling)[0].numpy()
    ids = model.generate(**inputs, decode_strategy="sampling", max_new_tokens=8, seed=5, **sampling)[0].numpy()
    np.testing.assert_array_equal(ids, expected)
    config = PaddleNLPGenerationConfig(decode_strategy="sampling", max_new_tokens=8, **sampling)
    np.testing.assert_array_equal(model.generate(**inputs, generation_config=config, seed=5)[0].numpy(), expected)
    hotter = model.generate(
        **inputs, decode_strategy="sampling", max_new_tokens=8, seed=5, **{**sampling, "temperature": 5.0}
    )
    assert not np.array_equal(hotter[0].numpy(), expected)


def test_unset_options_come_from_the_checkpoints_generation_config(checkpoint, reference):
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint))
    model.generation_config.do_sample, model.generation_config.temperature = True, 0.5
    ids = reference[1]("hello", return_tensors="pd")["input_ids"]
    expected = reference[0].generate(ids, do_sample=True, temperature=0.5, max_new_tokens=6, seed=1)[0]
    np.testing.assert_array_equal(model.generate(ids, max_new_tokens=6, seed=1)[0].numpy(), expected.numpy())


def test_eos_token_id_list_stops_generation(auto):
    model, tokenizer = auto
    inputs = tokenizer("hello", return_tensors="pd")
    free = model.generate(**inputs, decode_strategy="greedy_search", max_new_tokens=8, eos_token_id=[])[0].numpy()[0]
    end = next(i for i in range(1, len(free)) if free[i] not in free[:i])  # a token that first appears there
    unused = next(t for t in range(tokenizer.vocab_size) if t not in free)
    ids = model.generate(
        **inputs, decode_strategy="greedy_search", max_new_tokens=8, eos_token_id=[unused, int(free[end])]
    )[0]
    assert ids.numpy().tolist() == [free[: end + 1].tolist()]


def test_num_return_sequences_samples_each_prompt_that_often(auto, reference):
    model, tokenizer = auto
    inputs = tokenizer(TEXTS[:2], padding=True, return_tensors="pd")
    ids, scores = model.generate(**inputs, decode_strategy="sampling", num_return_sequences=3, max_new_tokens=5, seed=2)
    assert list(ids.shape) == [6, 5] and list(scores.shape) == [6, 1]
    repeated = {key: paddle.repeat_interleave(value, 3, axis=0) for key, value in inputs.items()}
    expected = reference[0].generate(**repeated, do_sample=True, max_new_tokens=5, seed=2)[0]
    np.testing.assert_array_equal(ids.numpy(), expected.numpy())


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"decode_strategy": "beam_search", "num_beams": 4}, ValueError, "beam_search"),
        ({"num_beams": 4}, ValueError, "num_beams"),
        ({"min_new_tokens": 3}, ValueError, "min_new_tokens"),
        ({"decode_strategy": "greedy_search", "num_return_sequences": 2}, ValueError, "sampling"),
        ({"decode_strategy": "contrastive"}, ValueError, "decode_strategy"),
        ({"output_scores": True}, TypeError, "output_scores"),
    ],
)
def test_generate_options_glm4_cannot_honour_are_refused(auto, options, error, message):
    model, tokenizer = auto
    with pytest.raises(error, match=message):
        model.generate(**tokenizer("hello", return_tensors="pd"), **options)


def test_config_eval_and_save_pretrained_round_trip(auto, reference, tmp_path):
    model, tokenizer = auto
    assert model.config == reference[0].config and model.config.vocab_size == tokenizer.vocab_size
    assert model.eval() is model and not model.training
    model.save_pretrained(str(tmp_path))
    tokenizer.save_pretrained(tmp_path)
    ids = np.array([tokenizer.encode(TEXTS[0])])
    np.testing.assert_array_equal(logits(AutoModelForCausalLM.from_pretrained(str(tmp_path)), ids), logits(model, ids))
    assert AutoTokenizer.from_pretrained(str(tmp_path))(TEXTS) == tokenizer(TEXTS)


# ---- where checkpoints are, import order, no network ----------------------------------------------------------------


def test_cache_dir_follows_paddlenlp_rule(monkeypatch, tmp_path):
    assert cache_dir(NAME) == os.path.join(paddlenlp.utils.env.MODEL_HOME, NAME)
    # without PaddleNLP imported, the same rule from the environment
    monkeypatch.delitem(sys.modules, "paddlenlp.utils.env")
    monkeypatch.setenv("PPNLP_HOME", str(tmp_path))
    assert cache_dir(NAME) == str(tmp_path / "models" / NAME)
    monkeypatch.delenv("PPNLP_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir(NAME) == str(tmp_path / ".paddlenlp" / "models" / NAME)
    for bad in ("", "/abs/glm", "../glm", "THUDM//glm", None):
        with pytest.raises(ValueError):
            cache_dir(bad)


# Run in a fresh interpreter with every network connection refused (and recorded): imports in the given order,
# nothing registered by hand, then loads by name from the PaddleNLP home in PPNLP_HOME.
NO_NETWORK_SCRIPT = (
    REFUSE_NETWORK
    + r"""
import json, sys

report = {}
if sys.argv[1] == "paddle_glm4":
    import paddle_glm4
    report["paddlenlp imported by paddle_glm4"] = "paddlenlp" in sys.modules
    import paddlenlp.transformers as transformers
else:
    import paddlenlp.transformers as transformers
    import paddle_glm4
from paddlenlp.utils.download.bos_download import bos_try_to_load_from_cache
from paddle_glm4.integrations.paddlenlp import CheckpointNotFoundError
from paddle_glm4.integrations.paddlenlp_home import cache_dir

name = sys.argv[2]
report["paddlenlp looks at"] = bos_try_to_load_from_cache(name, "config.json")
report["cache_dir"] = cache_dir(name)
model = transformers.AutoModelForCausalLM.from_pretrained(name)
tokenizer = transformers.AutoTokenizer.from_pretrained(name)
report["classes"] = [type(transformers.AutoConfig.from_pretrained(name)).__name__,
                     isinstance(model, paddle_glm4.GLM4ForCausalLM),
                     isinstance(transformers.AutoModel.from_pretrained(name), paddle_glm4.GLM4ForCausalLM),
                     isinstance(tokenizer, paddle_glm4.GLM4Tokenizer)]
ids, scores = model.generate(**tokenizer("hello", return_tensors="pd"), decode_strategy="greedy_search",
                             max_new_tokens=3)
report["generated"] = list(ids.shape)
try:
    transformers.AutoModelForCausalLM.from_pretrained(name + "-chat")
except CheckpointNotFoundError as err:
    report["missing"] = str(err)
report["explicit registration"] = callable(paddle_glm4.register_paddlenlp)
report["network attempts"] = attempts
print(json.dumps(report))
"""
)


@pytest.mark.parametrize("first", ["paddle_glm4", "paddlenlp"])
def test_registration_in_either_import_order_without_network(first, home):
    env = {**os.environ, "PPNLP_HOME": str(home)}
    run = subprocess.run(
        [sys.executable, "-c", NO_NETWORK_SCRIPT, first, NAME], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["network attempts"] == []
    if first == "paddle_glm4":
        assert report["paddlenlp imported by paddle_glm4"] is False
    assert report["cache_dir"] == str(home / "models" / NAME)
    assert report["paddlenlp looks at"] == os.path.join(report["cache_dir"], "config.json")
    assert report["classes"] == ["GLM4Config", True, True, True]
    assert report["generated"] == [1, 3]
    assert f"--dst {home / 'models' / NAME}-chat" in report["missing"]
    assert report["explicit registration"] is True


# ---- fine-tuning with PaddleNLP's LoRA ---------------------------------------------------------------------------
def test_paddlenlp_lora_model_wraps_glm4_trains_and_merges_into_a_checkpoint(checkpoint, tmp_path):
    from paddlenlp.peft import LoRAConfig, LoRAModel

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype="float32")
    check_peft_lora(model, LoRAConfig, LoRAModel, merge_paddlenlp_lora, checkpoint, tmp_path / "merged")
