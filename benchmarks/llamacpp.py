"""llama.cpp, the CPU peer of the low-bit benchmark: found in a per-user cache, or built into it.

It is built from the `llama-cpp-python` source package on PyPI (the only registry these machines reach), whose
`vendor/llama.cpp` is ggml-org's llama.cpp at commit COMMIT. Two things to know (see
/work/shared/llamacpp-peer.md): the package's `vendor/llama.cpp/.git` is a submodule link to a directory it does
not ship, which makes cmake's build-info step loop forever, so it is removed after unpacking; and GGML_NATIVE
compiles for the CPU at hand (AVX-512 BF16/VNNI on some of these machines, AVX2 on others), so a build is kept
only for the CPU flags it was made for and rebuilt on another CPU.

Cache: $XDG_CACHE_HOME/paddle_glm4/llamacpp/<VERSION>/ (default ~/.cache/...), outside the project's git:
download/ (the source package), src/ (unpacked), build/ (cmake; binaries in build/bin), build.log, built.json
(what the build was made for). Nothing of llama.cpp is ever written into the project.

    python -m benchmarks.llamacpp build     (~11 minutes on 2 cores, at the lowest CPU priority)
    python -m benchmarks.llamacpp status    (where the binaries are, or why there are none)
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

VERSION = "0.3.36"  # llama-cpp-python
COMMIT = "0c1e57098"  # its vendored llama.cpp (per the package's CHANGELOG)
TARGETS = ("llama-bench", "llama-quantize")
# the CPU flags ggml's native build compiles for: a build is reused only on a CPU with the same ones
SIMD_FLAGS = (
    "sse4_2",
    "avx",
    "f16c",
    "fma",
    "avx2",
    "avx_vnni",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512dq",
    "avx512cd",
    "avx512_vnni",
    "avx512_bf16",
    "avx512vbmi",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
    "asimd",
    "sve",
)
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_CURL=OFF",
    f"-DLLAMA_BUILD_COMMIT={COMMIT}",
)


class PeerUnavailable(RuntimeError):
    """Why llama.cpp cannot be used here, in one line."""


@dataclass(frozen=True)
class LlamaCpp:
    bench: Path  # llama-bench
    quantize: Path  # llama-quantize
    cpu_flags: tuple[str, ...]


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "paddle_glm4" / "llamacpp" / VERSION


def cpu_flags() -> tuple[str, ...]:
    """This CPU's SIMD flags (of SIMD_FLAGS), as /proc/cpuinfo spells them."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next(
                (set(line.split(":", 1)[1].split()) for line in f if line.startswith(("flags", "Features"))), set()
            )
    except OSError:
        flags = set()
    return tuple(flag for flag in SIMD_FLAGS if flag in flags)


def find() -> LlamaCpp:
    """The cached build for this CPU; PeerUnavailable saying why there is none."""
    directory = cache_dir()
    try:
        built = json.loads((directory / "built.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise PeerUnavailable(
            f"llama.cpp {COMMIT} is not built in {directory} "
            "(build it with: python -m benchmarks.llamacpp build, ~11 min)"
        ) from None
    if not isinstance(built, dict) or built.get("commit") != COMMIT or built.get("cpu_flags") != list(cpu_flags()):
        raise PeerUnavailable(
            f"the llama.cpp build in {directory} was made for another CPU or version "
            "(rebuild it with: python -m benchmarks.llamacpp build, ~11 min)"
        )
    binaries = [directory / "build" / "bin" / name for name in TARGETS]
    missing = [str(path) for path in binaries if not os.access(path, os.X_OK)]
    if missing:
        raise PeerUnavailable(
            f"llama.cpp binaries missing: {', '.join(missing)} (rebuild with: python -m benchmarks.llamacpp build)"
        )
    return LlamaCpp(*binaries, cpu_flags=cpu_flags())


def find_or_build(build: bool) -> LlamaCpp:
    """The cached build, else (when `build`) a new one; PeerUnavailable with a one-line reason otherwise."""
    try:
        return find()
    except PeerUnavailable:
        if not build:
            raise
    with _locked(cache_dir()):  # one build at a time; a second caller waits, then finds the first one's
        try:
            return find()
        except PeerUnavailable:
            _build(cache_dir())
    return find()


class _locked:
    def __init__(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / ".lock"

    def __enter__(self):
        self.file = open(self.path, "a")
        fcntl.flock(self.file, fcntl.LOCK_EX)

    def __exit__(self, *_):
        self.file.close()


def _build(directory: Path):
    compiler = next((shutil.which(name) for name in ("c++", "g++", "clang++") if shutil.which(name)), None)
    if compiler is None or shutil.which("cmake") is None:
        raise PeerUnavailable("llama.cpp needs cmake and a C++ compiler to build (e.g. apt-get install cmake g++)")
    source = _unpacked_source(directory)
    generator = _generator()
    log_path = directory / "build.log"
    nice = ["nice", "-n", "19"] if shutil.which("nice") else []  # other work on the machine keeps its cores
    steps = [
        [*nice, "cmake", "-S", str(source), "-B", str(directory / "build"), "-G", generator, *CMAKE_OPTIONS],
        [
            *nice,
            "cmake",
            "--build",
            str(directory / "build"),
            "-j",
            str(len(os.sched_getaffinity(0))),
            "--target",
            *TARGETS,
        ],
    ]
    print(
        f"building llama.cpp {COMMIT} into {directory} (~11 minutes on 2 cores; log: {log_path})",
        file=sys.stderr,
        flush=True,
    )
    with open(log_path, "w", encoding="utf-8") as log:
        for command in steps:
            log.write("$ " + " ".join(command) + "\n")
            log.flush()
            if _run_with_progress(command, log):
                raise PeerUnavailable(
                    f"llama.cpp build step failed: {' '.join(command[len(nice) :][:3])} ... (see {log_path})"
                )
    _write_atomic(
        directory / "built.json",
        json.dumps({"version": VERSION, "commit": COMMIT, "cpu_flags": list(cpu_flags()), "generator": generator})
        + "\n",
    )


def _unpacked_source(directory: Path) -> Path:
    """src/vendor/llama.cpp, downloading and unpacking the source package the first time."""
    source = directory / "src" / "vendor" / "llama.cpp"
    if source.is_dir():
        return source
    download = directory / "download"
    archives = sorted(download.glob(f"llama_cpp_python-{VERSION}.tar.gz"))
    if not archives:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"llama-cpp-python=={VERSION}",
                "-d",
                str(download),
            ],
            capture_output=True,
            text=True,
        )
        archives = sorted(download.glob(f"llama_cpp_python-{VERSION}.tar.gz"))
        if done.returncode or not archives:
            last = (done.stderr.strip().splitlines() or ["no archive"])[-1]
            raise PeerUnavailable(f"cannot download llama-cpp-python=={VERSION}'s source from PyPI: {last}")
    # unpacked beside, then renamed: a src/ that exists is complete
    with tempfile.TemporaryDirectory(dir=directory, prefix="src-") as scratch:
        with tarfile.open(archives[0]) as archive:
            archive.extractall(scratch, filter="data")  # no links or paths out of the directory
        top = [entry for entry in Path(scratch).iterdir() if entry.is_dir()]
        if len(top) != 1 or not (top[0] / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
            raise PeerUnavailable(f"{archives[0]} does not hold vendor/llama.cpp/CMakeLists.txt")
        link = top[0] / "vendor" / "llama.cpp" / ".git"
        if link.is_file():  # the dangling submodule link (see the module docstring)
            link.unlink()
        top[0].rename(directory / "src")
    return source


def _generator() -> str:
    if shutil.which("ninja"):
        return "Ninja"
    if shutil.which("make"):
        return "Unix Makefiles"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "ninja"], check=False)
    scripts = Path(sys.executable).parent  # where pip put the ninja command
    if (scripts / "ninja").exists():
        os.environ["PATH"] = f"{scripts}{os.pathsep}{os.environ.get('PATH', '')}"
        return "Ninja"
    raise PeerUnavailable("llama.cpp needs ninja or make to build, and `pip install ninja` did not provide one")


_PROGRESS = re.compile(r"^\[\s*(\d+)(?:/(\d+)|%)\]")  # ninja: "[12/143] ...", make: "[ 45%] ..."


def _run_with_progress(command: list[str], log) -> int:
    """Run `command`, its output into `log`, with a progress bar from ninja's or make's step counter."""
    from tqdm import tqdm

    with (
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process,
        tqdm(total=100, desc="llama.cpp build", unit="%", file=sys.stderr, leave=False) as bar,
    ):
        assert process.stdout is not None
        for line in process.stdout:
            log.write(line)
            step = _PROGRESS.match(line)
            if step:
                done, total = int(step.group(1)), int(step.group(2) or 100)
                bar.update(int(100 * done / total) - bar.n)
        return process.wait()


def _write_atomic(path: Path, text: str):
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.llamacpp", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "command",
        choices=["build", "status"],
        help="build: find or build llama-bench and llama-quantize; status: report only",
    )
    args = parser.parse_args(argv)
    try:
        peer = find_or_build(build=args.command == "build")
    except PeerUnavailable as error:
        print(f"llama.cpp: {error}", file=sys.stderr)
        return 2
    print(f"llama-bench: {peer.bench}\nllama-quantize: {peer.quantize}\nbuilt for: {' '.join(peer.cpu_flags)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
