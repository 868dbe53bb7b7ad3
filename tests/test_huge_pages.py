"""Loaded weights in 2 MB pages (paddle_glm4/huge_pages.py): a buffer in small pages is collapsed into huge
ones, the page cache of the checkpoint is dropped only when memory is too fragmented for that (and the files
themselves are untouched), and from_pretrained leaves the weights it copied in huge pages. Whether that makes
decoding faster is a benchmark's question (benchmarks/NOTES.md), not a test's."""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import sys

import numpy as np
import pytest

import paddle_glm4
from conftest import run_python_json
from paddle_glm4 import huge_pages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(paddle_glm4.__file__)))
HUGE = huge_pages.HUGE_PAGE


def _kernel_collapses() -> str | None:
    """Why this system cannot collapse memory into huge pages, or None when it can."""
    if not sys.platform.startswith("linux"):
        return "huge pages are Linux's"
    major, minor = (int(part) for part in platform.release().split(".")[:2])
    if (major, minor) < (6, 1):
        return f"MADV_COLLAPSE needs Linux 6.1, this is {platform.release()}"
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            if "[never]" in f.read():
                return "transparent huge pages are disabled on this system"
    except OSError:
        return "this kernel has no transparent huge pages"
    if not os.path.exists("/proc/self/smaps"):
        return "no /proc/self/smaps to read the pages from"
    return None


needs_collapse = pytest.mark.skipif(_kernel_collapses() is not None, reason=str(_kernel_collapses()))


def _address(region: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(region))


def _madvise(address: int, length: int, advice: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    assert libc.madvise(address, length, advice) == 0, os.strerror(ctypes.get_errno())


@needs_collapse
def test_collapse_moves_a_buffer_in_small_pages_into_huge_pages():
    size = 16 * HUGE
    region = mmap.mmap(-1, size + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    address = _address(region)
    _madvise(address, size + HUGE, mmap.MADV_NOHUGEPAGE)  # written in small pages, whatever the system's default
    start = -address % HUGE + 4096  # not at a 2 MB boundary: the buffer's edges are not whole huge pages
    data = np.frombuffer(region, np.uint8)[start : start + size - 8192]
    data[:] = np.arange(data.size, dtype=np.uint64).astype(np.uint8)
    assert huge_pages.resident_huge_bytes(data.ctypes.data) == 0
    _madvise(address, size + HUGE, mmap.MADV_HUGEPAGE)  # what numpy advises for its large arrays

    assert huge_pages.collapse([(data.ctypes.data, data.nbytes)]) == []

    inside = (data.ctypes.data + data.nbytes) // HUGE * HUGE - -(-data.ctypes.data // HUGE) * HUGE
    assert inside == 14 * HUGE  # the two partly covered pages at the edges are left
    assert huge_pages.resident_huge_bytes(data.ctypes.data) >= inside
    assert np.array_equal(data, np.arange(data.size, dtype=np.uint64).astype(np.uint8))  # the copy kept the data
    del data
    region.close()


def test_settle_drops_the_sources_cache_only_for_what_did_not_collapse(monkeypatch):
    calls = []

    def collapse(buffers):
        buffers = list(buffers)
        calls.append(("collapse", buffers))
        return [b for b in buffers if b[0] == 1] if len(calls) == 1 else []

    monkeypatch.setattr(huge_pages, "collapse", collapse)
    monkeypatch.setattr(huge_pages, "drop_cache", lambda paths: calls.append(("drop", sorted(paths))))

    assert huge_pages.settle([(1, HUGE), (2, HUGE)], {"b", "a"}) == []
    assert calls == [("collapse", [(1, HUGE), (2, HUGE)]), ("drop", ["a", "b"]), ("collapse", [(1, HUGE)])]

    calls.clear()
    assert huge_pages.settle([(2, HUGE)], {"a"}) == []
    assert calls == [("collapse", [(2, HUGE)])]  # everything collapsed: the cache is left alone


def _resident_pages(path: str) -> int:
    """How many of the file's pages are in the page cache (mincore over a mapping of it)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as mapped:
        pages = -(-size // mmap.PAGESIZE)
        vector = (ctypes.c_ubyte * pages)()
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        view = np.frombuffer(mapped, np.uint8)
        assert libc.mincore(view.ctypes.data, size, vector) == 0, os.strerror(ctypes.get_errno())
        del view
    return sum(v & 1 for v in vector)


def _filesystem(path: str) -> str:
    """The type of the filesystem holding `path` (the longest mount point that contains it)."""
    best, kind = "", ""
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            _, point, fstype, *_ = line.split()
            if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
                best, kind = point, fstype
    return kind


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page-cache advice and mincore are Linux's")
def test_drop_cache_empties_the_page_cache_and_leaves_the_file(tmp_path):
    if _filesystem(str(tmp_path)) in ("tmpfs", "ramfs"):
        pytest.skip(f"{tmp_path} is in memory (tmpfs): its pages are the file, they cannot be dropped")
    path = tmp_path / "weights.bin"
    content = np.random.default_rng(0).integers(0, 256, 8 << 20, dtype=np.uint8).tobytes()
    path.write_bytes(content)
    os.sync()  # dirty pages are not dropped; written back, they are
    assert path.read_bytes() == content  # read: cached
    pages = len(content) // mmap.PAGESIZE
    assert _resident_pages(str(path)) > pages // 2

    huge_pages.drop_cache([str(path), str(tmp_path / "gone.bin")])  # a missing file is passed over

    assert _resident_pages(str(path)) < pages // 10
    assert path.read_bytes() == content


LOAD = """
import json, sys
import numpy as np
try:
    from numpy._core.multiarray import _set_madvise_hugepage
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _set_madvise_hugepage
_set_madvise_hugepage(False)  # numpy's own advice would give most arrays huge pages: only settle's count here
from paddle_glm4 import GLM4ForCausalLM, huge_pages
model = GLM4ForCausalLM.from_pretrained(sys.argv[1], quantization=sys.argv[2] if sys.argv[2] != "none" else None)
HUGE = huge_pages.HUGE_PAGE
out = {}
for name, t in model.state_dict().items():
    nbytes = int(np.prod(t.shape)) * t.element_size()
    inside = (t.data_ptr() + nbytes) // HUGE * HUGE - -(-t.data_ptr() // HUGE) * HUGE
    if inside > 0:
        out[name] = [inside, huge_pages.resident_huge_bytes(t.data_ptr())]
print(json.dumps(out))
"""


@needs_collapse
@pytest.mark.parametrize("quantization", ["none", "int4"])
def test_from_pretrained_leaves_the_weights_it_copied_in_huge_pages(tmp_path, quantization):
    sys.path.insert(0, ROOT)
    from benchmarks.full_depth import write_random_checkpoint
    from paddle_glm4.config import GLM4Config

    config = GLM4Config(
        num_hidden_layers=1,
        hidden_size=1024,
        intermediate_size=4096,
        vocab_size=8192,
        dtype="bfloat16",
        pad_token_id=0,
        eos_token_id=[1, 2],
    )
    write_random_checkpoint(str(tmp_path), config)
    weights = run_python_json(["-c", LOAD, str(tmp_path), quantization], timeout=600)
    copied = {name for name in weights if name != "model.embed_tokens.weight"}  # the table stays mapped
    # bf16: gate_up (1024 x 8192) and lm_head (1024 x 8192) hold whole 2 MB pages, int4 the same two at a
    # quarter of the bytes
    assert {"model.layers.0.mlp.gate_up_proj.weight", "lm_head.weight"} <= copied or quantization != "none"
    assert {"model.layers.0.mlp.gate_up_proj.qweight", "lm_head.qweight"} <= copied or quantization == "none"
    for name in copied:
        inside, huge = weights[name]
        assert huge >= inside, f"{name}: {huge} of its {inside} bytes in whole 2 MB pages are in huge pages"
