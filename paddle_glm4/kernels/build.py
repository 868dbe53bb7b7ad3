"""Compile the C++ kernels on first use into a per-user cache, and load them once per process.

The cache is ~/.cache/paddle_glm4/kernels/<key> (XDG_CACHE_HOME honoured), the key a hash of the sources,
the Paddle version and the compiler flags: one build serves every CPU (each SIMD path is compiled for its
own instruction set and chosen at run time), and a changed source or Paddle gets a fresh build. A file lock
keeps two processes from building the same key at once; a build counts only once its marker is written.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import shutil
import sys
import warnings
from pathlib import Path
from types import ModuleType

NAME = "glm4_kernels"
SOURCES = (
    "ops.cc",
    "common.cc",
    "linear_bf16.cc",
    "linear_int8.cc",
    "linear_int4.cc",
    "attention.cc",
    "elementwise.cc",
    "block.cc",
)
HEADERS = ("common.h", "attention.h", "elementwise.h", "block.h")
# -O3 without -ffast-math: the kernels round exactly as documented; -march stays generic (see above)
CXX_FLAGS = ["-O3", "-std=c++17", "-pthread"]
HERE = Path(__file__).resolve().parent
_DONE = "built.ok"

_module = None
_failed: str | None = None


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "paddle_glm4" / "kernels"


def cache_key() -> str:
    import paddle

    digest = hashlib.sha256()
    for name in SOURCES + HEADERS:
        digest.update(name.encode() + b"\0" + (HERE / name).read_bytes() + b"\0")
    digest.update(paddle.__version__.encode() + b"\0" + " ".join(CXX_FLAGS).encode())
    return digest.hexdigest()[:16]


def load() -> ModuleType | None:
    """The compiled operators' module (building it if needed), or None with one warning if it cannot be built."""
    global _module, _failed
    if _module is not None or _failed is not None:
        return _module
    try:
        _module = _build_or_import()
    except Exception as error:  # noqa: BLE001 - any build failure means: use the portable path
        compiler = os.environ.get("CXX") or "g++"
        if shutil.which(compiler) is None:
            _failed = f"no C++ compiler ({compiler} not found): install g++"
        else:
            _failed = f"the build failed ({type(error).__name__}; {compiler}'s errors are printed above)"
        warnings.warn(
            f"paddle_glm4 kernels unavailable, linear layers use the slow portable path: {_failed}",
            RuntimeWarning,
            stacklevel=3,
        )
    return _module


def failure() -> str | None:
    return _failed


def _build_or_import():
    with warnings.catch_warnings():  # Paddle's builder warns at import that ccache is absent: no matter here
        warnings.simplefilter("ignore")
        from paddle.utils.cpp_extension import load as cpp_load
        from paddle.utils.cpp_extension.extension_utils import _import_module_from_library

    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    key = cache_key()
    directory = root / key
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if (directory / _DONE).exists():
            return _import_module_from_library(NAME, str(directory / NAME))
        print(f"paddle_glm4: building the C++ kernels into {directory} (first use, about a minute)", file=sys.stderr)
        directory.mkdir(exist_ok=True)
        # Paddle's builder prints its progress on stdout; a failure is raised and reported by load()
        with contextlib.redirect_stdout(io.StringIO()):
            module = cpp_load(
                NAME,
                [str(HERE / s) for s in SOURCES],
                extra_cxx_cflags=list(CXX_FLAGS),
                extra_include_paths=[str(HERE)],
                build_directory=str(directory),
            )
        (directory / _DONE).write_text(key + "\n")
        return module
