"""The package's public API: `import paddle_glm4` is cheap (no Paddle) and each public name loads on first use."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_python(script: str) -> str:
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_importing_the_package_and_its_config_imports_no_paddle():
    out = run_python(
        "import sys, paddle_glm4\n"
        "config = paddle_glm4.GLM4Config()\n"
        "print('paddle' in sys.modules, config.num_hidden_layers)"
    )
    assert out == "False 40"


def test_public_names_load_on_first_use():
    out = run_python(
        "import sys, paddle_glm4\n"
        "model_class = paddle_glm4.GLM4ForCausalLM\n"
        "from paddle_glm4.model import GLM4ForCausalLM\n"
        "print('paddle' in sys.modules, model_class is GLM4ForCausalLM)"
    )
    assert out == "True True"


def test_every_public_name_resolves_and_unknown_names_fail():
    import paddle_glm4

    for name in paddle_glm4.__all__:
        assert getattr(paddle_glm4, name) is not None
        assert name in dir(paddle_glm4)
    with pytest.raises(AttributeError, match="no attribute 'GLM5'"):
        paddle_glm4.GLM5  # noqa: B018
