"""Every command line fails the same way: one `error:` line and exit code 2; `--debug` (or GLM4_DEBUG=1) adds the
traceback that the line summarises, so that a bug report can carry it."""

from __future__ import annotations

import pytest

from converters import paddle_to_torch, torch_to_paddle
from paddle_glm4 import __main__ as glm4_cli
from paddle_glm4.inference import __main__ as inference_cli
from paddle_glm4.server import __main__ as server_cli


def commands(missing: str):
    """(entry point, argv) of every CLI, each given a model or source directory that does not exist."""
    return [
        (glm4_cli.main, ["generate", "--model", missing, "--prompt", "hi"]),
        (glm4_cli.main, ["convert", "--src", missing, "--dst", missing + "-out"]),
        (torch_to_paddle.main, ["--src", missing, "--dst", missing + "-out"]),
        (paddle_to_torch.main, ["--src", missing, "--dst", missing + "-out"]),
        (inference_cli.main, ["export", "--model", missing, "--out", missing + "-out"]),
        (server_cli.main, ["--model", missing]),
    ]


WAYS = ["plain", "flag", "flag before the command", "environment"]
CASES = [
    (index, how) for index in range(6) for how in WAYS if how != "flag before the command" or index in (0, 1, 4)
]  # the CLIs with subcommands


@pytest.mark.parametrize("index, how", CASES)
def test_debug_shows_the_traceback_behind_the_one_line_error(tmp_path, capsys, monkeypatch, index, how):
    main, argv = commands(str(tmp_path / "missing"))[index]
    monkeypatch.delenv("GLM4_DEBUG", raising=False)
    if how == "flag":
        argv = [*argv, "--debug"]
    elif how == "flag before the command":
        argv = ["--debug", *argv]
    elif how == "environment":
        monkeypatch.setenv("GLM4_DEBUG", "1")
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and str(tmp_path / "missing") in lines[-1], err
    assert ("Traceback (most recent call last)" in err) == (how != "plain"), err
    if how == "plain":
        assert len([line for line in lines if line.startswith("error:")]) == 1


def test_every_cli_documents_debug(capsys):
    for main, argv in [
        (glm4_cli.main, []),
        (glm4_cli.main, ["convert"]),
        (torch_to_paddle.main, []),
        (inference_cli.main, ["export"]),
        (server_cli.main, []),
    ]:
        with pytest.raises(SystemExit):
            main([*argv, "--help"])
        out = capsys.readouterr().out
        assert "--debug" in out and "GLM4_DEBUG=1" in out
