"""The `glm4` command line in this process (no subprocess): --version, the to-torch and export subcommands,
--truncate, and the one-line errors of a newcomer's first steps."""

from __future__ import annotations

import json

import paddle
import pytest

from conftest import small_config
from paddle_glm4 import GLM4ForCausalLM, GLM4Tokenizer, __version__
from paddle_glm4.__main__ import main
from paddle_glm4.small_vocab import write_small_vocabulary

CONTEXT = 48


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small converted checkpoint with a short context, and the small vocabulary (432 ids for 448 rows)."""
    directory = tmp_path_factory.mktemp("cli_commands") / "model"
    tokenizer = GLM4Tokenizer.from_pretrained(write_small_vocabulary(directory))
    config = small_config(
        vocab_size=448, seq_length=CONTEXT, eos_token_id=tokenizer.stop_token_ids, pad_token_id=tokenizer.pad_token_id
    )
    paddle.seed(0)
    GLM4ForCausalLM(config).save_pretrained(str(directory))
    return directory


def run(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exit_:  # argparse: --help, --version, usage errors
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"paddle_glm4 {__version__}"


def test_help_lists_every_command(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for command in ("generate", "chat", "convert", "to-torch", "export", "demo", "serve"):
        assert command in out


def test_truncate_keeps_the_end_of_a_prompt_that_does_not_fit(checkpoint, capsys):
    long_prompt = "The weather today is mild, with a light wind from the west. " * 4
    tokenizer = GLM4Tokenizer.from_pretrained(checkpoint)
    assert len(tokenizer.encode(long_prompt)) + 8 > CONTEXT
    args = ("generate", "--model", str(checkpoint), "--prompt", long_prompt, "--max-new-tokens", "8")
    code, out, err = run(capsys, *args)
    assert code == 2 and out == "" and err.count("\n") == 1 and "--truncate" in err
    code, out, err = run(capsys, *args, "--truncate")
    assert code == 0, err
    model = GLM4ForCausalLM.from_pretrained(str(checkpoint))
    ids, _ = model.generate(
        [tokenizer.encode(long_prompt)], max_new_tokens=8, truncate=True, vocab_limit=len(tokenizer)
    )
    assert out == tokenizer.decode(ids.numpy()[0], skip_special_tokens=True) + "\n"


def test_to_torch_and_export_are_glm4_subcommands(checkpoint, tmp_path, capsys):
    code, _, err = run(capsys, "to-torch", "--src", str(checkpoint), "--dst", str(tmp_path / "torch"))
    assert code == 0, err
    assert json.loads((tmp_path / "torch" / "config.json").read_text())["model_type"] == "chatglm"
    code, _, err = run(capsys, "export", "--model", str(checkpoint), "--out", str(tmp_path / "export"))
    assert code == 0, err
    assert (tmp_path / "export" / "export.json").exists() and "exported to" in err


def test_a_torch_checkpoint_given_to_generate_names_the_convert_command(checkpoint, tmp_path, capsys):
    assert run(capsys, "to-torch", "--src", str(checkpoint), "--dst", str(tmp_path / "torch"))[0] == 0
    GLM4Tokenizer.from_pretrained(checkpoint).save_pretrained(tmp_path / "torch")
    code, out, err = run(capsys, "generate", "--model", str(tmp_path / "torch"), "--prompt", "hi")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "published torch layout" in err and f"glm4-convert --src {tmp_path / 'torch'}" in err


def test_serve_without_fastapi_points_to_the_serve_extra(monkeypatch, tmp_path, capsys):
    import builtins

    real_import = builtins.__import__

    def no_fastapi(name, *args, **kwargs):
        if name.split(".")[0] in ("fastapi", "uvicorn"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    import sys

    monkeypatch.setattr(builtins, "__import__", no_fastapi)
    for module in [m for m in sys.modules if m.startswith("paddle_glm4.server.")]:
        monkeypatch.delitem(sys.modules, module)
    code, _, err = run(capsys, "serve", "--model", str(tmp_path))
    assert code == 2 and "pip install -e '.[serve]'" in err


@pytest.mark.parametrize("seed", [0, 1])
def test_the_demo_says_when_it_stopped_at_an_end_of_sequence_id(capsys, seed):
    code, out, err = run(capsys, "demo", "--seed", str(seed), "--max-new-tokens", "16")
    assert code == 0, err
    new = json.loads(next(line for line in out.splitlines() if line.startswith("new ids")).split(":", 1)[1])
    stops = {425, 427, 418}  # the small vocabulary's <|user|>, <|observation|>, <|endoftext|>
    stopped = [line for line in out.splitlines() if line.startswith("stopped:")]
    if new[-1] in stops:
        assert len(stopped) == 1 and f"end-of-sequence id {new[-1]}" in stopped[0]
        assert f"after {len(new)} of at most 16" in stopped[0]
    else:
        assert not stopped and len(new) == 16
    assert max(new) < 432  # never an id past the tokenizer's


@pytest.mark.parametrize("command", ["generate", "chat", "serve"])
def test_every_engine_flag_reaches_load_engine(command, monkeypatch):
    """generate, chat and serve load through one mapping of the engine flags (engine.load_engine_from_args):
    each flag, given a value other than its default, arrives in load_engine's arguments."""
    import argparse
    import inspect

    from paddle_glm4 import engine

    flags = [
        "--model",
        "m",
        "--tokenizer",
        "t",
        "--engine",
        "inference",
        "--dtype",
        "bfloat16",
        "--prefill-chunk",
        "7",
        "--kv-cache-dtype",
        "bfloat16",
        "--quantize",
        "int4",
        "--group-size",
        "32",
        "--activation-dtype",
        "float32",
        "--tensor-parallel",
        "2",
    ]
    parser = argparse.ArgumentParser()
    engine.add_engine_arguments(parser)
    args = parser.parse_args(flags)
    defaults = vars(parser.parse_args(["--model", "m"]))
    assert all(value != defaults[name] for name, value in vars(args).items() if name != "model")  # all set

    seen, signature = {}, inspect.signature(engine.load_engine)

    def record(*positional, **keywords):
        seen.update(signature.bind(*positional, **keywords).arguments)
        raise SystemExit(0)

    monkeypatch.setattr(engine, "load_engine", record)
    extra = {"generate": ["--prompt", "hi"], "chat": [], "serve": ["--port", "0"]}[command]
    with pytest.raises(SystemExit):
        main([command, *flags, *extra])
    names = {"model_dir": "model", "tokenizer_dir": "tokenizer", "quantization": "quantize"}
    assert {names.get(key, key): value for key, value in seen.items()} == vars(args)
