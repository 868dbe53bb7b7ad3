"""Memory while loading: a weight converted at load is read from its file a block at a time
(safetensors_file.StoredTensor), so the process's peak is the loaded model plus a block, not plus the source
tensor (which a memory mapping makes resident as a whole: GLM-4-9B's lm_head is 1.24 GB in bf16); and a dense
embedding table stays mapped when the Linear weights are quantized at load."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

import paddle_glm4
from conftest import run_python_json
from paddle_glm4.quantization import CONVERT_BLOCK_BYTES, Dense, Packed, Rows, convert
from paddle_glm4.safetensors_file import SafetensorsError, SafetensorsReader, SafetensorsWriter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(paddle_glm4.__file__)))  # the package under test


@pytest.fixture
def stored(tmp_path):
    """A file with a bf16 [37, 53] tensor between two others (so offsets are not 0), and its values."""
    rng = np.random.default_rng(0)
    tensors = {
        "a": rng.standard_normal(5).astype(np.float32),
        "w": rng.integers(0, 1 << 16, (37, 53), dtype=np.uint16) & 0xBFFF,  # finite bf16 bits
        "z": rng.standard_normal((3, 4)).astype(np.float32),
    }
    path = str(tmp_path / "m.safetensors")
    dtypes = {"a": "float32", "w": "bfloat16", "z": "float32"}
    with SafetensorsWriter(path, [(name, dtypes[name], t.shape) for name, t in tensors.items()]) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    return path, tensors


def test_a_stored_tensor_reads_the_blocks_it_is_asked_for(stored):
    path, tensors = stored
    with SafetensorsReader(path) as reader:
        weight = reader.unread("w")
    # the reader is closed: the stored tensor keeps its own descriptor
    assert weight.shape == (37, 53) and weight.dtype == np.uint16
    w = tensors["w"]
    for key in [
        np.s_[:, 10:20],
        np.s_[3:9],
        np.s_[:, :],
        np.s_[30:, 50:],
        np.s_[:, 52:60],
        np.s_[5:5, :],
        np.s_[-4:, -7:-2],
    ]:
        block = weight[key]
        assert block.flags.c_contiguous and np.array_equal(block, w[key]), key
    with pytest.raises(TypeError, match="plain slices"):
        weight[:, ::2]
    with pytest.raises(TypeError, match="plain slices"):
        weight[3]


def test_a_stored_tensor_whose_file_shrank_is_an_error(stored):
    path, _ = stored
    with SafetensorsReader(path) as reader:
        weight = reader.unread("w")
    os.truncate(path, os.path.getsize(path) - 100)  # cuts into "w"'s last rows ("z" is 48 bytes)
    assert weight[:2].shape == (2, 53)
    with pytest.raises(SafetensorsError, match=r"m\.safetensors: truncated while reading"):
        weight[30:]


@pytest.mark.parametrize("target", [Packed("int8"), Packed("int4", 16), Packed("bfloat16"), Dense("float32")])
def test_converting_from_the_file_gives_what_converting_the_array_gives(tmp_path, monkeypatch, target):
    """Every format converts the same from a stored tensor as from its array, over several blocks."""
    from paddle_glm4 import quantization

    monkeypatch.setattr(quantization, "CONVERT_BLOCK_BYTES", 4 * 53 * 6)  # 6 output rows a block; K = 53
    rng = np.random.default_rng(1)
    k, n = 53, 37
    weight = (rng.integers(0, 1 << 16, (k, n), dtype=np.uint16) & 0x807F) | 0x3C00
    path = str(tmp_path / "w.safetensors")
    with SafetensorsWriter(path, [("w", "bfloat16", (k, n))]) as writer:
        writer.write("w", weight)
    with SafetensorsReader(path) as reader:
        from_file = convert(Dense("bfloat16"), {"weight": reader.unread("w")}, target, k, n)
    from_array = convert(Dense("bfloat16"), {"weight": weight}, target, k, n)
    assert from_file.keys() == from_array.keys()
    for name in from_file:
        assert np.array_equal(from_file[name], from_array[name]), name
    # and a table stored row by row, quantized
    with SafetensorsReader(path) as reader:
        table = convert(Rows("bfloat16"), {"weight": reader.unread("w")}, Packed("int8"), n, k)["qweight"]
    assert np.array_equal(table, convert(Rows("bfloat16"), {"weight": weight}, Packed("int8"), n, k)["qweight"])


LOAD = """
import json, sys
import numpy as np
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
from paddle_glm4 import GLM4ForCausalLM
before = status("VmRSS")
model = GLM4ForCausalLM.from_pretrained(sys.argv[1], quantization=sys.argv[2])
sizes = {name: int(np.prod(t.shape)) * t.element_size() for name, t in model.state_dict().items()}
table = sizes.pop("model.embed_tokens.weight", None)  # dense: mapped, read only where looked up
print(json.dumps({"rise": status("VmHWM") - before, "weights": sum(sizes.values()), "mapped_table": table}))
"""
ALLOWANCE = 0.5e9  # a block being converted (CONVERT_BLOCK_BYTES of float32, its source and outputs), and
# what loading adds beside the weights (the kernels' library); the lm_head's bf16 source alone is 1.24 GB


@pytest.fixture(scope="module")
def glm4_width_checkpoint(tmp_path_factory):
    """One GLM-4-9B layer with its real vocabulary, bf16 (2.9 GB: the 1.24 GB embedding and lm_head)."""
    sys.path.insert(0, ROOT)
    from benchmarks.full_depth import write_random_checkpoint
    from paddle_glm4.config import GLM4Config

    directory = tmp_path_factory.mktemp("glm4_width")
    write_random_checkpoint(str(directory), GLM4Config(num_hidden_layers=1, dtype="bfloat16"))
    return directory


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantizing_glm4_at_load_peaks_at_the_weights_plus_a_block(glm4_width_checkpoint, quantization):
    """The process's peak resident memory (VmHWM: the kernel's count, page-cache pages mapped included) rises
    by the quantized weights plus ALLOWANCE while loading, not by the weights plus a mapped bf16 source; the
    bf16 table stays in the file, mapped (nothing looks it up here), not quantized into memory."""
    assert ALLOWANCE > 4 * CONVERT_BLOCK_BYTES
    figures = run_python_json(["-c", LOAD, str(glm4_width_checkpoint), quantization], timeout=600)
    print(
        f"{quantization}: loading raised the peak RSS by {figures['rise'] / 1e9:.2f} GB, "
        f"for {figures['weights'] / 1e9:.2f} GB of weights beside the mapped table"
    )
    assert figures["mapped_table"] == 151552 * 4096 * 2
    assert figures["weights"] > 0.4e9  # the real lm_head, quantized (int4: 0.35 GB), and the layer
    assert figures["rise"] <= figures["weights"] + ALLOWANCE
