"""PaddleFormers integration: its Auto classes, through their public register API, load converted GLM-4 checkpoints
as this project's classes.

PaddleFormers 1.2.0 pins transformers<5.4 (the test environment has 5.24), so these tests run in their own
environment, `make test-paddleformers` (.venv-paddleformers); elsewhere the module is skipped. The checkpoint is a
tiny random model saved by this project, with the small tokenizer: no torch needed.
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

paddleformers = pytest.importorskip(
    "paddleformers",
    reason="PaddleFormers is not installed here; `make test-paddleformers` runs these tests in .venv-paddleformers",
)

from paddleformers.transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, Qwen2Config  # noqa: E402

from conftest import check_peft_lora, small_config  # noqa: E402
from hub_stand_in import hub_stand_in  # noqa: E402
from no_network import REFUSE_NETWORK  # noqa: E402
from paddle_glm4 import GLM4ForCausalLM, GLM4Tokenizer, register_paddleformers  # noqa: E402
from paddle_glm4.integrations.paddleformers import (  # noqa: E402
    ChatGLM4Tokenizer,
    PaddleFormersGLM4Config,
    PaddleFormersGLM4ForCausalLM,
    PaddleFormersPublishedGLM4Config,
    merge_paddleformers_lora,
)
from paddle_glm4.integrations.paddleformers_home import cache_dir  # noqa: E402
from paddle_glm4.integrations.paddlenlp import CheckpointNotFoundError  # noqa: E402
from paddle_glm4.small_vocab import write_small_vocabulary  # noqa: E402

NAME = "THUDM/glm-4-9b"
TEXTS = ["def add(a, b):\n    return a + b", "hello", "你好，世界 <|user|> [gMASK]"]
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "你好"},
    {"role": "assistant", "content": "Hi."},
    {"role": "user", "content": "2+2?"},
]


@pytest.fixture(scope="module", autouse=True)
def registered():
    register_paddleformers()
    register_paddleformers()  # a second call changes nothing


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A converted checkpoint directory: random tiny GLM-4 + small tokenizer, ids and stop tokens agreeing."""
    directory = tmp_path_factory.mktemp("ckpt")
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
    """A PaddleFormers home (PF_HOME) that holds the checkpoint under NAME."""
    home = tmp_path_factory.mktemp("pf-home")
    shutil.copytree(checkpoint, home / NAME)
    return home


@pytest.fixture
def pf_home(monkeypatch, home):
    # PaddleFormers reads PF_HOME at each lookup; its AutoTokenizer reads tokenizer_config.json through
    # transformers (which ignores PF_HOME) unless the download source is another than "huggingface"
    monkeypatch.setenv("PF_HOME", str(home))
    monkeypatch.setenv("DOWNLOAD_SOURCE", "aistudio")
    return home


@pytest.fixture(scope="module")
def reference(checkpoint):
    return GLM4ForCausalLM.from_pretrained(str(checkpoint)), GLM4Tokenizer.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def auto(checkpoint):
    return AutoModelForCausalLM.from_pretrained(str(checkpoint)), AutoTokenizer.from_pretrained(str(checkpoint))


def logits(model, ids):
    return model(paddle.to_tensor(ids)).logits.numpy()


# ---- loading ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("by", ["directory", "name"])
def test_auto_classes_return_this_projects_classes(by, checkpoint, pf_home, reference):
    source = str(checkpoint) if by == "directory" else NAME
    config = AutoConfig.from_pretrained(source)
    assert type(config) is PaddleFormersGLM4Config and config.to_glm4_config() == reference[0].config
    for auto_class in (AutoModelForCausalLM, AutoModel):  # AutoModel too, as THUDM's checkpoint maps it
        model = auto_class.from_pretrained(source)
        assert type(model) is PaddleFormersGLM4ForCausalLM and not model.training
        assert model.config == reference[0].config
    ids = np.random.RandomState(0).randint(0, reference[0].config.vocab_size, (2, 9)).astype("int64")
    np.testing.assert_array_equal(logits(model, ids), logits(reference[0], ids))
    assert type(AutoTokenizer.from_pretrained(source)) is ChatGLM4Tokenizer


def test_same_token_ids_and_chat_template_as_glm4_tokenizer(auto, reference):
    tokenizer, expected = auto[1], reference[1]
    assert isinstance(tokenizer, GLM4Tokenizer)
    for text in TEXTS:
        assert tokenizer(text) == expected(text)
    for key, value in tokenizer(TEXTS, padding=True, return_tensors="pd").items():
        np.testing.assert_array_equal(value.numpy(), expected(TEXTS, padding=True, return_tensors="np")[key])
    assert tokenizer.apply_chat_template(
        CHAT, tokenize=False, add_generation_prompt=True
    ) == expected.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert tokenizer.apply_chat_template(CHAT, add_generation_prompt=True) == expected.apply_chat_template(
        CHAT, add_generation_prompt=True
    )


def test_qwen2_is_left_to_paddleformers(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["Qwen2ForCausalLM"],
                "model_type": "qwen2",
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 1,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "vocab_size": 100,
            }
        )
    )
    assert type(AutoConfig.from_pretrained(str(tmp_path))) is Qwen2Config
    # (PaddleFormers' Qwen2 model needs paddlefleet, a GPU package, to import: its mappings are checked instead)
    from paddleformers.transformers.auto.configuration import CONFIG_MAPPING
    from paddleformers.transformers.auto.modeling import MODEL_MAPPING

    assert CONFIG_MAPPING["qwen2"] is Qwen2Config and CONFIG_MAPPING["glm4"] is PaddleFormersGLM4Config
    assert set(MODEL_MAPPING._extra_content) == {PaddleFormersGLM4Config, PaddleFormersPublishedGLM4Config}
    assert AutoModelForCausalLM._name_mapping["Qwen2Model_Import_Class"] == "Qwen2ForCausalLM"


def test_a_missing_checkpoint_says_how_to_convert_it(pf_home, tmp_path):
    name = "THUDM/glm-4-9b-chat"
    with pytest.raises(CheckpointNotFoundError) as err:
        PaddleFormersGLM4ForCausalLM.from_pretrained(name)
    assert f"glm4-convert --src <dir> --dst {cache_dir(name)}\n" in str(err.value)
    assert f"glm4-convert --src <dir> --paddleformers-name {name}" in str(err.value)
    assert "export PF_HOME" not in str(err.value)  # it is set: PaddleFormers reads names from it
    assert cache_dir(name) == str(pf_home / name)


def test_the_published_checkpoint_loads_its_tokenizer_and_config_and_asks_to_convert_the_weights(tmp_path):
    write_small_vocabulary(tmp_path)  # tokenizer_config.json names ChatGLM4Tokenizer, as THUDM's does
    config = small_config(vocab_size=GLM4Tokenizer.from_pretrained(tmp_path).vocab_size)
    (tmp_path / "config.json").write_text(json.dumps(config.to_published_dict()))  # model_type "chatglm"

    assert type(AutoTokenizer.from_pretrained(str(tmp_path))) is ChatGLM4Tokenizer
    published = AutoConfig.from_pretrained(str(tmp_path))
    assert type(published) is PaddleFormersPublishedGLM4Config and published.to_glm4_config() == config
    for auto_class in (AutoModelForCausalLM, AutoModel):
        with pytest.raises(CheckpointNotFoundError, match=re.escape(f"glm4-convert --src {tmp_path} --dst")):
            auto_class.from_pretrained(str(tmp_path))


# ---- the model where PaddleFormers users touch it ------------------------------------------------------------------


def test_generate_with_paddleformers_sampling_arguments_equals_ours(auto, reference):
    model, tokenizer = auto
    inputs = tokenizer(TEXTS, padding=True, return_tensors="pd")
    expected_ids, expected_scores = reference[0].generate(**inputs, max_new_tokens=8)
    ids, scores = model.generate(**inputs, decode_strategy="greedy_search", max_new_tokens=8)
    np.testing.assert_array_equal(ids.numpy(), expected_ids.numpy())
    np.testing.assert_allclose(scores.numpy(), expected_scores.numpy(), rtol=1e-6)
    whole = model.generate(**inputs, decode_strategy="greedy_search", max_new_tokens=8, trunc_input=False)[0]
    np.testing.assert_array_equal(whole.numpy(), np.concatenate([inputs["input_ids"].numpy(), expected_ids.numpy()], 1))

    sampling = {"top_p": 0.9, "top_k": 20, "temperature": 0.7, "repetition_penalty": 1.2}
    expected = reference[0].generate(**inputs, do_sample=True, max_new_tokens=8, seed=5, **sampling)[0].numpy()
    for strategy in ({"decode_strategy": "sampling"}, {"do_sample": True}):
        ids = model.generate(**inputs, max_new_tokens=8, seed=5, **strategy, **sampling)[0].numpy()
        np.testing.assert_array_equal(ids, expected)
    from paddleformers.generation import GenerationConfig

    config = GenerationConfig(do_sample=True, max_new_tokens=8, **sampling)
    np.testing.assert_array_equal(model.generate(**inputs, generation_config=config, seed=5)[0].numpy(), expected)
    hotter = model.generate(
        **inputs, decode_strategy="sampling", max_new_tokens=8, seed=5, **{**sampling, "temperature": 5.0}
    )
    assert not np.array_equal(hotter[0].numpy(), expected)


def test_save_pretrained_round_trip(auto, tmp_path):
    model, tokenizer = auto
    model.save_pretrained(str(tmp_path))
    tokenizer.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert type(again) is PaddleFormersGLM4ForCausalLM and again.config == model.config
    ids = np.array([tokenizer.encode(TEXTS[0])])
    np.testing.assert_array_equal(logits(again, ids), logits(model, ids))
    assert AutoTokenizer.from_pretrained(str(tmp_path))(TEXTS) == tokenizer(TEXTS)


def test_cache_dir_follows_paddleformers_rule(monkeypatch, tmp_path):
    monkeypatch.setenv("PF_HOME", str(tmp_path))
    assert cache_dir(NAME) == str(tmp_path / NAME)
    # what PaddleFormers' own lookup makes of the name while PF_HOME is set: that directory
    from paddleformers.utils.download.download import check_repo

    (tmp_path / NAME).mkdir(parents=True)
    assert check_repo(NAME, "huggingface") == cache_dir(NAME)
    monkeypatch.delenv("PF_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir(NAME) == str(tmp_path / ".paddleformers" / NAME)
    for bad in ("", "/abs/glm", "../glm", "THUDM//glm", None):
        with pytest.raises(ValueError):
            cache_dir(bad)


# ---- import order, by name, no network ----------------------------------------------------------------------------

# A fresh interpreter with every network connection refused (and recorded): imports in the given order, nothing
# registered by hand, then loads by name from the PaddleFormers home in PF_HOME.
NO_NETWORK_SCRIPT = (
    REFUSE_NETWORK
    + r"""
import json, sys

report = {}
if sys.argv[1] == "paddle_glm4":
    import paddle_glm4
    report["paddleformers imported by paddle_glm4"] = "paddleformers" in sys.modules
    import paddleformers.transformers as transformers
elif sys.argv[1] == "adapter":  # the adapter module imports PaddleFormers itself
    import paddle_glm4.integrations.paddleformers
    import paddleformers.transformers as transformers
else:
    import paddleformers.transformers as transformers
    import paddle_glm4

name = sys.argv[2]
model = transformers.AutoModelForCausalLM.from_pretrained(name)
tokenizer = transformers.AutoTokenizer.from_pretrained(name)
report["classes"] = [type(transformers.AutoConfig.from_pretrained(name)).__name__, type(model).__name__,
                     type(transformers.AutoModel.from_pretrained(name)).__name__, type(tokenizer).__name__]
inputs = tokenizer(["hello", "你好，世界"], padding=True, return_tensors="pd")
ids, scores = model.generate(**inputs, decode_strategy="greedy_search", max_new_tokens=3)
report["generated"] = list(ids.shape)

# the same as this project's own classes on the same files
from paddle_glm4 import GLM4ForCausalLM, GLM4Tokenizer
directory = sys.argv[3]
own_model, own_tokenizer = GLM4ForCausalLM.from_pretrained(directory), GLM4Tokenizer.from_pretrained(directory)
report["same ids"] = tokenizer(["hello", "你好，世界"]) == own_tokenizer(["hello", "你好，世界"])
chat = [{"role": "user", "content": "你好"}]
report["same chat template"] = (tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
                                == own_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
report["same logits"] = bool((model(inputs["input_ids"]).logits == own_model(inputs["input_ids"]).logits).all())
report["same greedy tokens"] = bool((ids == own_model.generate(**inputs, max_new_tokens=3)[0]).all())
report["network attempts"] = attempts
print(json.dumps(report))
"""
)


@pytest.mark.parametrize("first", ["paddle_glm4", "paddleformers", "adapter"])
def test_registration_in_either_import_order_without_network(first, home):
    env = {**os.environ, "PF_HOME": str(home), "DOWNLOAD_SOURCE": "aistudio"}
    run = subprocess.run(
        [sys.executable, "-c", NO_NETWORK_SCRIPT, first, NAME, str(home / NAME)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "could not register" not in run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["network attempts"] == []
    if first == "paddle_glm4":
        assert report["paddleformers imported by paddle_glm4"] is False
    assert report["classes"] == [
        "PaddleFormersGLM4Config",
        "PaddleFormersGLM4ForCausalLM",
        "PaddleFormersGLM4ForCausalLM",
        "ChatGLM4Tokenizer",
    ]
    assert report["generated"] == [2, 3]
    assert report["same ids"] and report["same chat template"]
    assert report["same logits"] and report["same greedy tokens"]


# ---- fine-tuning with PaddleFormers' LoRA --------------------------------------------------------------------------
def test_paddleformers_lora_model_wraps_glm4_trains_and_merges_into_a_checkpoint(checkpoint, tmp_path):
    from paddleformers.peft import LoRAConfig, LoRAModel

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype="float32")
    check_peft_lora(model, LoRAConfig, LoRAModel, merge_paddleformers_lora, checkpoint, tmp_path / "merged")


# ---- by name, where PaddleFormers may reach the hub ------------------------------------------------------------------

# PaddleFormers 1.2 resolves a name it does not find in $PF_HOME on a hub before it consults any registered class:
# offline, a GLM-4 name with nothing converted (or PF_HOME unset) ends in the hub client's connection error, which
# no public API lets this project replace. Online, the hub gives THUDM's small config.json and tokenizer_config.json,
# which pick this project's classes, and they read the name from PaddleFormers' home. A stand-in hub on 127.0.0.1
# plays THUDM's repositories here (every other connection refused); PF_HOME is unset, HOME a temporary directory.
HUB_SCRIPT = (
    REFUSE_NETWORK
    + r"""
import json, sys
allowed.add("127.0.0.1")

import paddle
import paddle_glm4
import paddleformers.transformers as transformers
from paddle_glm4.integrations.paddlenlp import CheckpointNotFoundError

report = {}
converted, missing = sys.argv[1:3]
try:
    transformers.AutoModelForCausalLM.from_pretrained(missing)
except CheckpointNotFoundError as err:
    report["missing"] = str(err)
model = transformers.AutoModelForCausalLM.from_pretrained(converted)
tokenizer = transformers.AutoTokenizer.from_pretrained(converted)
report["classes"] = [type(model).__name__, type(tokenizer).__name__]
report["ids"] = tokenizer("hello")["input_ids"]
report["logits"] = model(paddle.to_tensor([report["ids"]])).logits.numpy().tolist()
report["network attempts"] = attempts
print(json.dumps(report))
"""
)


def test_by_name_with_a_hub_the_cache_is_read_and_a_missing_checkpoint_says_how_to_convert(
    checkpoint, reference, tmp_path
):
    home = tmp_path / "user"
    shutil.copytree(checkpoint, home / ".paddleformers" / NAME)  # where glm4-convert --paddleformers-name writes
    published = {
        "config.json": json.dumps(reference[0].config.to_published_dict()).encode(),
        "tokenizer_config.json": (checkpoint / "tokenizer_config.json").read_bytes(),
    }
    missing = NAME + "-chat"
    with hub_stand_in({NAME: published, missing: published}) as (url, requests):
        # nothing of the caller's setup may send the client elsewhere: no offline switch, no proxy, no PF_HOME
        unset = ("PF_HOME", "DOWNLOAD_SOURCE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN")
        env = {key: value for key, value in os.environ.items() if key not in unset and "proxy" not in key.lower()}
        env.update(HOME=str(home), HF_ENDPOINT=url, HF_HUB_CACHE=str(tmp_path / "hf-cache"), NO_PROXY="127.0.0.1")
        run = subprocess.run(
            [sys.executable, "-c", HUB_SCRIPT, NAME, missing], env=env, capture_output=True, text=True, timeout=600
        )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["network attempts"] == []
    assert f"glm4-convert --src <dir> --paddleformers-name {missing}" in report["missing"]
    assert f"export PF_HOME={home / '.paddleformers'}" in report["missing"]
    assert report["classes"] == ["PaddleFormersGLM4ForCausalLM", "ChatGLM4Tokenizer"]
    assert report["ids"] == reference[1]("hello")["input_ids"]
    np.testing.assert_array_equal(
        np.array(report["logits"], dtype="float32"), logits(reference[0], np.array([report["ids"]]))
    )
    # the hub gave the two small files that pick the classes; no weights were asked of it
    resolved = {request.split("/resolve/main/")[-1] for request in requests if "/resolve/main/" in request}
    assert {"config.json", "tokenizer_config.json"} <= resolved
    assert not [name for name in resolved if name.endswith((".safetensors", ".bin", ".pdparams", ".model"))], resolved
