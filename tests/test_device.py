"""The process settings device.py makes for CPU inference: large freed blocks kept for reuse once a model or a
predictor is loaded (so each layer's activations are not faulted in and zeroed again), and a malloc setting of the
user's kept."""

from __future__ import annotations

import ctypes

import pytest

from conftest import run_python_json
from paddle_glm4.device import reuse_freed_memory
from paddle_glm4.inference import export_model

GLIBC = hasattr(ctypes.CDLL(None), "gnu_get_libc_version")

FAULTS = """
import json, resource, sys
import paddle
from paddle_glm4 import GLM4ForCausalLM
from paddle_glm4.inference import Predictor

def faults_making_it_again():
    # a 64 MB activation (a 512-token gate_up output is 56 MB), freed and made again: the second one faults its
    # pages in anew only if its block went back to the kernel
    x = paddle.ones([16 << 20])
    del x
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = paddle.ones([16 << 20])
    del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

out = {"before": faults_making_it_again()}
GLM4ForCausalLM.from_pretrained(sys.argv[1]) if sys.argv[2] == "model" else Predictor(sys.argv[1])
out["after"] = faults_making_it_again()
print(json.dumps(out))
"""


@pytest.mark.skipif(not GLIBC, reason="the thresholds are glibc's malloc's (mallopt)")
@pytest.mark.parametrize("loaded", ["model", "predictor"])
def test_large_freed_blocks_are_kept_for_reuse_once_loaded(float_checkpoint, tmp_path, loaded):
    _, directory = float_checkpoint
    if loaded == "predictor":
        export_model(str(directory), str(tmp_path / "export"), max_seq_len=32, progress=False)
        directory = tmp_path / "export"
    faults = run_python_json(["-c", FAULTS, str(directory), loaded], timeout=300)
    # before: glibc unmaps a 64 MB block on free (4 KB pages: 16k faults to make it again; 2 MB ones: 32)
    assert faults["before"] >= 32, faults
    assert faults["after"] * 10 < faults["before"], faults


@pytest.mark.parametrize("variable", ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"])
def test_a_malloc_threshold_the_user_set_is_kept(monkeypatch, variable):
    monkeypatch.setenv(variable, str(1 << 20))
    assert reuse_freed_memory() is False
