"""The README's Python example runs as written, against the demo's checkpoint (`glm4 demo --out DIR`), with
`DIR/paddle` in place of `glm-4-9b-chat-paddle`, as the README tells a newcomer to do."""

from __future__ import annotations

import re
from pathlib import Path

from paddle_glm4.__main__ import main

README = Path(__file__).resolve().parents[1] / "README.md"


def python_example(section: str) -> str:
    """The first ```python block after the heading `section`."""
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n## {section}\n")
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def test_the_python_example_runs_on_the_demos_checkpoint(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--max-new-tokens", "4"]) == 0
    kept = capsys.readouterr().out
    assert f"{tmp_path / 'paddle'} is a converted checkpoint" in kept  # the demo tells where it is
    example = python_example("Use it from Python")
    assert "glm-4-9b-chat-paddle" in example
    code = example.replace("glm-4-9b-chat-paddle", str(tmp_path / "paddle"))
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    printed = capsys.readouterr().out
    tokenizer, out = namespace["tokenizer"], namespace["out"]
    assert out.shape[0] == 2 and out.numpy().max() < len(tokenizer)  # only ids that have a token
    texts = tokenizer.batch_decode(out, skip_special_tokens=True)
    assert printed.endswith(f"{texts}\n")  # after the streamed answer, the batch's texts
