"""Exports of bf16 / int8 / int4 models: the program calls paddle_glm4.kernels' operators, the predictor loads
them before it is created, and gives the dynamic quantized model's logits; and the CLI flags that ask for it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import paddle_model, small_config
from paddle_glm4 import GLM4ForCausalLM, kernels, memory
from paddle_glm4.demo import random_weights
from paddle_glm4.generation import ModelSession
from paddle_glm4.inference import Predictor, export_model
from paddle_glm4.small_vocab import write_small_vocabulary
from paddle_glm4.tokenizer import GLM4Tokenizer
from test_inference import run_python, session_logits

MAX_SEQ_LEN = 64
CASES = {
    "int8": {"quantization": "int8"},
    "int4": {"quantization": "int4", "group_size": 32},
    "bfloat16": {"dtype": "bfloat16"},
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("quantized_export") / "checkpoint")
    tokenizer = GLM4Tokenizer.from_pretrained(write_small_vocabulary(directory))
    config = small_config(
        vocab_size=tokenizer.vocab_size,
        rope_ratio=500.0,
        seq_length=128,
        eos_token_id=tokenizer.stop_token_ids,
        pad_token_id=tokenizer.pad_token_id,
    )
    paddle_model(config, dict(random_weights(config, seed=5))).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("case", list(CASES))
def test_predictor_on_a_quantized_export_equals_the_dynamic_quantized_model(checkpoint, tmp_path, case):
    args = CASES[case]
    out = str(tmp_path / case)
    manifest = export_model(
        checkpoint, out, max_seq_len=MAX_SEQ_LEN, progress=False, activation_dtype="float32", **args
    )
    assert manifest.kernels == kernels.available()
    dynamic = GLM4ForCausalLM.from_pretrained(checkpoint, activation_dtype="float32", **args)
    assert manifest.config.quantization == dynamic.quantization
    if case != "bfloat16":  # quantized at load, the dense checkpoint's table is kept as stored, here as there
        assert not manifest.config.quantization.embedding
    program = Path(out, "glm4.json").read_text(encoding="utf-8")
    operator = {"int8": "glm4_linear_int8", "int4": "glm4_linear_int4", "bfloat16": "glm4_linear_bf16"}[case]
    assert (operator in program) == manifest.kernels
    # the weights are stored as the dynamic model holds them (bf16, or int8 / int4 and their scales)
    held = memory.weight_bytes(dynamic.config, dynamic.model.kernels.weights)
    assert abs(os.path.getsize(os.path.join(out, "glm4.pdiparams")) - held) < 0.02 * held

    predictor = Predictor(out)
    rng = np.random.RandomState(1)
    for length in (1, 9):
        ids = rng.randint(3, 256, (1, length)).astype("int64")
        ours = session_logits(predictor.session(), ids, None, 5)
        reference = session_logits(ModelSession(dynamic), ids, None, 5)
        assert np.abs(reference).max() > 0.1
        np.testing.assert_allclose(ours, reference, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_cli_quantized_generate_and_export_in_fresh_processes(checkpoint, tmp_path):
    """`--quantize` and `--activation-dtype` in generate and export; a fresh process running the export must
    load the kernels itself before creating its predictor."""
    prompt = ("--prompt", "The weather today", "--max-new-tokens", "10", "--greedy")
    dynamic = run_python(
        "-m",
        "paddle_glm4",
        "generate",
        "--model",
        checkpoint,
        "--quantize",
        "int4",
        "--group-size",
        "32",
        "--activation-dtype",
        "float32",
        *prompt,
    )
    assert dynamic.returncode == 0, dynamic.stderr
    out = str(tmp_path / "export")
    export = run_python(
        "-m",
        "paddle_glm4.inference",
        "export",
        "--model",
        checkpoint,
        "--out",
        out,
        "--quantize",
        "int4",
        "--group-size",
        "32",
        "--activation-dtype",
        "float32",
        "--max-seq-len",
        "64",
    )
    assert export.returncode == 0, export.stderr
    assert "weights int4 (group size 32)" in export.stderr
    assert json.loads(Path(out, "export.json").read_text())["config"]["quantization"] == {
        "scheme": "int4",
        "group_size": 32,
        "embedding": False,
    }  # the table as stored, as the dynamic model's
    served = run_python("-m", "paddle_glm4", "generate", "--model", out, "--engine", "inference", *prompt)
    assert served.returncode == 0, served.stderr
    assert served.stdout == dynamic.stdout and dynamic.stdout.strip()

    wrong = run_python(
        "-m", "paddle_glm4", "generate", "--model", out, "--engine", "inference", "--quantize", "int8", *prompt
    )
    assert wrong.returncode == 2 and wrong.stderr.startswith("error: --quantize, --group-size and --activation-dtype")
    bad = run_python(
        "-m", "paddle_glm4", "generate", "--model", checkpoint, "--quantize", "int4", "--group-size", "7", *prompt
    )
    assert bad.returncode == 2 and "even group_size" in bad.stderr and bad.stderr.count("\n") == 1


@pytest.mark.slow
def test_cli_help_describes_the_new_flags():
    for args in (
        ("-m", "paddle_glm4", "generate", "--help"),
        ("-m", "paddle_glm4", "chat", "--help"),
        ("-m", "paddle_glm4", "serve", "--help"),
        ("-m", "paddle_glm4.inference", "export", "--help"),
        ("-m", "converters.torch_to_paddle", "--help"),
    ):
        done = run_python(*args)
        assert done.returncode == 0 and "--quantize" in done.stdout and "--group-size" in done.stdout, args
        if "converters.torch_to_paddle" not in args:
            assert "--activation-dtype" in done.stdout, args
