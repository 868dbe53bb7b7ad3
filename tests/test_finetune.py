"""`glm4 finetune`: chat JSONL -> ids and assistant-only labels, bad lines named, a LoRA run that learns and writes
a merged model, its loss curve and its manifest."""

import json
import os

import numpy as np
import paddle
import pytest

from conftest import small_config
from paddle_glm4 import GLM4ForCausalLM, GLM4Tokenizer
from paddle_glm4.__main__ import build_parser, main
from paddle_glm4.cli_errors import UsageError
from paddle_glm4.config import IGNORE_INDEX
from paddle_glm4.finetune import LOSS_CURVE, MANIFEST, DataError, encode_conversation, read_conversations
from paddle_glm4.small_vocab import write_small_vocabulary

CONVERSATIONS = [
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the weather?"},
        {"role": "assistant", "content": "Mild, with a light wind."},
        {"role": "user", "content": "Thank you!"},
        {"role": "assistant", "content": "You are welcome."},
    ],
    [{"role": "user", "content": "def add(a, b):"}, {"role": "assistant", "content": "    return a + b"}],
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return GLM4Tokenizer.from_pretrained(write_small_vocabulary(tmp_path_factory.mktemp("vocab")))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    directory = tmp_path_factory.mktemp("base")
    config = small_config(vocab_size=512, eos_token_id=tokenizer.stop_token_ids, pad_token_id=tokenizer.pad_token_id)
    paddle.seed(0)
    GLM4ForCausalLM(config).save_pretrained(str(directory))
    tokenizer.save_pretrained(directory)
    return directory


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def labelled_text(tokenizer, example):
    """The text of the labelled tokens, each labelled run as one string."""
    runs, run = [], []
    for token, label in zip(example.ids, example.labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            run.append(token)
        elif run:
            runs.append(tokenizer.decode(run))
            run = []
    return runs + ([tokenizer.decode(run)] if run else [])


def test_only_the_assistant_turns_and_the_tokens_that_end_them_are_labelled(tokenizer):
    example = encode_conversation(tokenizer, CONVERSATIONS[0])
    assert example.ids[:-1] == tokenizer.apply_chat_template(CONVERSATIONS[0])
    assert example.ids[-1] == tokenizer.eos_token_id
    eos = tokenizer.decode([tokenizer.eos_token_id])
    assert labelled_text(tokenizer, example) == ["\nMild, with a light wind.<|user|>", f"\nYou are welcome.{eos}"]

    context_only = [dict(m, weight=0) if m["content"].startswith("Mild") else m for m in CONVERSATIONS[0]]
    assert labelled_text(tokenizer, encode_conversation(tokenizer, context_only)) == [f"\nYou are welcome.{eos}"]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"messages": [{"role": "user", "content": "hi"}', r"data.jsonl:2: not valid JSON"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), r"data.jsonl:2: no assistant turn"),
        (json.dumps({"prompt": "hi", "completion": "there"}), r"data.jsonl:2: expected an object with a \"messages\""),
        (json.dumps({"messages": [{"role": "robot", "content": "hi"}]}), r"data.jsonl:2: no assistant turn"),
        (json.dumps({"messages": [{"role": "assistant", "content": 3}]}), r"data.jsonl:2: .*content must be a string"),
    ],
)
def test_a_bad_line_is_an_error_naming_it(tmp_path, tokenizer, line, message):
    path = write_jsonl(tmp_path / "data.jsonl", [{"messages": CONVERSATIONS[1]}, line])
    with pytest.raises(DataError, match=message):
        read_conversations(path, tokenizer, max_length=512)


def test_missing_data_file_blank_lines_and_max_length(tmp_path, tokenizer):
    with pytest.raises(UsageError, match=r"--data .*nothing.jsonl: no such file"):
        read_conversations(str(tmp_path / "nothing.jsonl"), tokenizer, 512)
    path = write_jsonl(tmp_path / "data.jsonl", ["", {"messages": CONVERSATIONS[0]}, "   "])
    [example] = read_conversations(path, tokenizer, 512)
    assert example == encode_conversation(tokenizer, CONVERSATIONS[0])
    first_answer = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
    cut = read_conversations(path, tokenizer, first_answer + 1)[0]
    assert cut.ids == example.ids[: first_answer + 1] and cut.labels[-1] == example.labels[first_answer]
    with pytest.raises(DataError, match=f"data.jsonl:2: no assistant token within the first {first_answer} tokens"):
        read_conversations(path, tokenizer, first_answer)
    with pytest.raises(DataError, match="no conversation"):
        read_conversations(write_jsonl(tmp_path / "empty.jsonl", [""]), tokenizer, 512)


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["finetune", "--help"])
    text = capsys.readouterr().out
    for flag in (
        "--model",
        "--data",
        "--out",
        "--tokenizer",
        "--lora-rank",
        "--lora-alpha",
        "--lora-dropout",
        "--lora-targets",
        "--epochs",
        "--steps",
        "--lr",
        "--batch-size",
        "--max-length",
        "--max-grad-norm",
        "--recompute",
        "--seed",
        "--overwrite",
        "--trainer",
        "--no-progress",
        "--debug",
    ):
        assert flag in text
    finetune = build_parser()._subparsers._group_actions[0].choices["finetune"]
    assert all(action.help for action in finetune._actions)


def test_cli_errors_are_one_line_and_exit_2(tmp_path, checkpoint, capsys):
    out = str(tmp_path / "out")
    cases = [
        (["--data", str(tmp_path / "missing.jsonl")], "--data", "no such file"),
        (["--data", write_jsonl(tmp_path / "bad.jsonl", ["{oops"])], "bad.jsonl:1", "not valid JSON"),
        (
            ["--data", write_jsonl(tmp_path / "ok.jsonl", [{"messages": CONVERSATIONS[1]}]), "--lr", "0"],
            "--lr 0.0",
            "positive",
        ),
        (["--data", str(tmp_path / "ok.jsonl"), "--lora-targets", "q_proj"], "q_proj", "choose from"),
    ]
    for extra, *words in cases:
        assert main(["finetune", "--model", str(checkpoint), "--out", out, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: ") and all(w in err for w in words), err
    assert not os.path.exists(out)


def test_finetune_learns_the_answers_and_writes_a_merged_model(tmp_path, checkpoint, tokenizer, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", [{"messages": c} for c in CONVERSATIONS])
    out = tmp_path / "tuned"
    assert (
        main(
            [
                "finetune",
                "--model",
                str(checkpoint),
                "--data",
                data,
                "--out",
                str(out),
                "--lora-rank",
                "4",
                "--steps",
                "12",
                "--batch-size",
                "2",
                "--lr",
                "1e-2",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "merged model written" in capsys.readouterr().err
    manifest = json.loads((out / MANIFEST).read_text())
    losses = manifest["losses"]
    assert len(losses) == 12 and losses[-1] < 0.8 * losses[0], losses
    assert set(manifest["files"]) | {MANIFEST} == set(os.listdir(out))
    assert (out / LOSS_CURVE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread

    curve = imread(out / LOSS_CURVE)
    assert curve.shape[:2] == (400, 700) and curve.std() > 0.05  # the 7 x 4 inch figure at 100 dpi, not blank

    # the merged model is an ordinary checkpoint whose loss on the data is the lowered one
    examples = read_conversations(data, tokenizer, 2048)
    width = max(len(e.ids) for e in examples)
    ids = np.array([[tokenizer.pad_token_id] * (width - len(e.ids)) + e.ids for e in examples])
    mask = np.array([[0] * (width - len(e.ids)) + [1] * len(e.ids) for e in examples])
    labels = np.array([[IGNORE_INDEX] * (width - len(e.ids)) + e.labels for e in examples])

    def loss(directory):
        model = GLM4ForCausalLM.from_pretrained(str(directory))
        return model(
            paddle.to_tensor(ids), attention_mask=paddle.to_tensor(mask), labels=paddle.to_tensor(labels)
        ).loss.item()

    assert abs(loss(checkpoint) - losses[0]) <= 1e-4
    assert loss(out) < losses[-1]
    assert GLM4Tokenizer.from_pretrained(out).apply_chat_template(CONVERSATIONS[1]) == tokenizer.apply_chat_template(
        CONVERSATIONS[1]
    )

    # a second run refuses to replace it unless told, and replaces only what it wrote
    args = ["finetune", "--model", str(checkpoint), "--data", data, "--out", str(out), "--steps", "1", "--no-progress"]
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0 and len(json.loads((out / MANIFEST).read_text())["losses"]) == 1
    (out / "notes.txt").write_text("mine")
    assert main([*args, "--overwrite"]) == 2 and "notes.txt" in capsys.readouterr().err


# ---- through PaddleNLP's or PaddleFormers' Trainer ------------------------------------------------------------------
# `make test-paddlenlp` and `make test-paddleformers` run this module in their environments, where each library is
# installed; elsewhere the library's case is skipped and its absence is tested instead.
TRAINER_LIBRARIES = ["paddlenlp", "paddleformers"]


def installed(library):
    import importlib.util

    return importlib.util.find_spec(library) is not None


@pytest.mark.parametrize("library", TRAINER_LIBRARIES)
def test_finetune_through_the_librarys_trainer_equals_the_builtin_loop(library, tmp_path, checkpoint, capsys):
    if not installed(library):
        pytest.skip(f"{library} is not installed here; `make test-{library}` runs this in its environment")
    data = write_jsonl(tmp_path / "train.jsonl", [{"messages": c} for c in CONVERSATIONS])
    common = [
        "finetune",
        "--model",
        str(checkpoint),
        "--data",
        data,
        "--lora-rank",
        "4",
        "--steps",
        "8",
        "--batch-size",
        "2",
        "--lr",
        "1e-2",
        "--no-progress",
    ]
    assert main([*common, "--out", str(tmp_path / "builtin")]) == 0
    assert main([*common, "--out", str(tmp_path / library), "--trainer", library]) == 0
    assert "merged model written" in capsys.readouterr().err

    manifest = json.loads((tmp_path / library / MANIFEST).read_text())
    builtin = json.loads((tmp_path / "builtin" / MANIFEST).read_text())
    assert manifest["trainer"] == library and builtin["trainer"] == "builtin"
    # one batch holds both conversations: the same steps, whichever loop runs them
    losses = manifest["losses"]
    assert len(losses) == 8 and losses[-1] < 0.8 * losses[0], losses
    np.testing.assert_allclose(losses, builtin["losses"], rtol=1e-5)
    assert (tmp_path / library / LOSS_CURVE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ids = paddle.to_tensor(np.random.RandomState(0).randint(3, 500, (2, 12)).astype("int64"))
    tuned, reference = (
        GLM4ForCausalLM.from_pretrained(str(tmp_path / name))(ids).logits.numpy() for name in (library, "builtin")
    )
    np.testing.assert_allclose(tuned, reference, atol=1e-4, rtol=0)


def test_a_trainer_whose_library_is_missing_is_a_one_line_error(tmp_path, checkpoint, capsys):
    missing = [library for library in TRAINER_LIBRARIES if not installed(library)]
    if not missing:
        pytest.skip("both PaddleNLP and PaddleFormers are installed here")
    data = write_jsonl(tmp_path / "train.jsonl", [{"messages": CONVERSATIONS[1]}])
    for library in missing:
        out = tmp_path / library
        assert (
            main(["finetune", "--model", str(checkpoint), "--data", data, "--out", str(out), "--trainer", library]) == 2
        )
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"--trainer {library}" in err and "--trainer builtin" in err, err
        assert not out.exists()
