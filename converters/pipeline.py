"""The engine both conversion directions share: stream a planned checkpoint to disk, verify it, and put it
in place atomically.

A direction (`torch_to_paddle`, `paddle_to_torch`) describes its output as `OutputFile`s of `OutputTensor`s:
each output tensor is made from one or more source tensors by a `forth` transform (from `mapping`) that
computes any block of its rows. The engine owns the rest:
- memory: a source tensor is memory-mapped, and its output is computed, written and verified a block
  of rows at a time, in a few buffers used in turn. Peak: about one tensor (the page cache's, mapped)
  plus the buffers.
- speed: computing, writing, hashing (sha256, for the manifest), verifying and flushing to disk overlap.
- verification: every block of every tensor is re-read from the written file and compared bit for bit
  with the source, transformed (and cast to the output dtype); then each file's header and size, the
  index and config.json are read back and checked. That the transforms themselves are right is what
  the tests check, against transformers' model.
- safety: everything is built in a temporary directory beside the destination, verified, flushed to
  disk, and only then renamed into place (`paddle_glm4.output_dir`, which also decides what may be
  replaced); on any error or interrupt the temporary directory is removed, so the destination is either
  untouched or complete. Sources are only ever opened for reading, and only inside their directory
  (`paddle_glm4.source_files`).

Every output directory gets `conversion_manifest.json`: what the direction records ("tool", "source",
"output", and for a published source "published_layout", see torch_to_paddle), "verified", and "sha256":
{file name: sha256} of every other file in the directory.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterable
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from paddle_glm4 import output_dir
from paddle_glm4.checkpoint import INDEX_FILE, CheckpointError, weight_map
from paddle_glm4.config import CONFIG_NAME, GLM4Config
from paddle_glm4.output_dir import OutputKind
from paddle_glm4.safetensors_file import SafetensorsReader, SafetensorsWriter, cast, numpy_dtype
from paddle_glm4.source_files import copy_source, permission_bits, plain_name, source_path

MANIFEST = "conversion_manifest.json"
# Copied unchanged when the source has them.
SIDE_FILES = ("tokenizer.model", "tokenizer_config.json", "generation_config.json")
BLOCK_BYTES = 32 << 20  # rows are computed, written and verified in blocks of about this size
# Ask the disk to start writing after this many bytes, rather than when the kernel's dirty-page limit is
# hit: the writing then overlaps the computing, and the final fsync has little left to wait for.
SYNC_BYTES = 256 << 20
IN_FLIGHT = 3  # blocks between being computed and being written, hashed and verified


class ConversionError(ValueError):
    """A source that cannot be converted, or an output that does not verify; the message names the file."""


@dataclass(frozen=True)
class SourceTensor:
    """One tensor to convert from: where it is (for messages), and how to get it."""

    where: str  # its file, or "memory"
    name: str
    dtype: str
    shape: tuple[int, ...]
    load: Callable[[], np.ndarray]  # the whole tensor, memory-mapped when it is in a file

    @classmethod
    def in_file(cls, reader: SafetensorsReader, name: str) -> SourceTensor:
        return cls(reader.path, name, reader.dtype(name), reader.shape(name), lambda: reader.view(name))

    @classmethod
    def in_memory(cls, name: str, array: np.ndarray, dtype: str) -> SourceTensor:
        return cls("memory", name, dtype, tuple(array.shape), lambda: array)

    @property
    def label(self) -> str:
        return f"{self.where}: tensor {self.name!r}"


@dataclass(frozen=True)
class OutputTensor:
    """One tensor to write, made from `parts` (which share a dtype) by `forth`."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    parts: tuple[SourceTensor, ...]
    # (whole parts, start, stop, out): writes rows start:stop into `out` ([stop - start, *shape[1:]], in
    # `block_dtype`), which is then cast to `dtype`
    forth: Callable[[list[np.ndarray], int, int, np.ndarray], object]
    block_dtype: str | None = None  # default: the parts' dtype (a transform that only moves values)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * numpy_dtype(self.dtype).itemsize

    @property
    def computed_dtype(self) -> str:
        return self.block_dtype or self.parts[0].dtype


@dataclass
class OutputFile:
    name: str
    tensors: list[OutputTensor]
    metadata: dict | None = None
    header: bytes | None = None  # reproduce this exact header (it must describe `tensors`, in order)


@dataclass
class Plan:
    """Everything a conversion writes into the destination directory."""

    files: list[OutputFile]
    config: GLM4Config  # what config.json must read back as
    texts: dict[str, str]  # config.json, the index, ...: file name -> content
    copies: dict[str, str]  # file name -> path of a source file copied unchanged
    manifest: dict  # what the direction records about the conversion


@dataclass
class Summary:
    """What a conversion did; `report()` is the end-of-run screen."""

    direction: str
    src: str
    dst: str
    layout: str  # the source layout detected
    source_dtype: str
    dtype: str
    tensors: int
    bytes: int
    seconds: float
    files: list[str]
    verified: bool
    notes: list[str] = field(default_factory=list)

    def report(self) -> str:
        weights = sum(name.endswith(".safetensors") for name in self.files)
        rate = self.bytes / self.seconds / 1e6 if self.seconds else 0.0
        check = "every tensor re-read and compared with its source" if self.verified else "no (--no-verify)"
        lines = [
            f"{self.direction}: done in {self.seconds:.1f} s",
            f"  source       {self.src} ({self.layout} layout, {self.source_dtype})",
            f"  destination  {self.dst}",
            f"  written      {self.tensors} tensors in {self.dtype}: {_size(self.bytes)} in {weights} weight "
            f"file{'s' * (weights != 1)} ({rate:.0f} MB/s), and {len(self.files) - weights} other files",
            f"  verified     {check}",
            f"  manifest     {os.path.join(self.dst, MANIFEST)} (sha256 of every file)",
        ]
        return "\n".join(lines + [f"  note         {note}" for note in self.notes])


def _size(nbytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


def row_blocks(shape: tuple[int, ...], itemsize: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of rows of about BLOCK_BYTES each; a multiple of 8 rows, which keeps the
    transposes on their fast path."""
    rows = shape[0] if shape else 1
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * itemsize
    step = max(8, BLOCK_BYTES // max(row_bytes, 1) // 8 * 8)
    return [(start, min(start + step, rows)) for start in range(0, rows, step)] or [(0, 0)]


# ---- where the output goes --------------------------------------------------------------------------------
def _listed_files(manifest) -> list[str] | None:
    """The files a conversion manifest says its directory holds (None: not a manifest of ours)."""
    if (
        isinstance(manifest, dict)
        and str(manifest.get("tool", "")).startswith("paddle_glm4 ")
        and isinstance(manifest.get("sha256"), dict)
    ):
        return list(manifest["sha256"])
    return None


CHECKPOINT = OutputKind("a checkpoint", MANIFEST, _listed_files)


def check_destination(dst: str, overwrite: bool, src: str | None = None) -> None:
    """Refuse destinations that would lose data; run before anything is read or written. An existing `dst` is
    replaced only with `overwrite`, and only if it is empty or a conversion's output (see output_dir)."""
    if src is not None:
        src_real, dst_real = os.path.realpath(src), os.path.realpath(dst)
        if dst_real == src_real or dst_real.startswith(src_real + os.sep):
            raise ConversionError(
                f"--dst {dst} is inside --src {src}; the source is never written to, choose a directory outside it"
            )
        if src_real.startswith(dst_real + os.sep):
            raise ConversionError(f"--src {src} is inside --dst {dst}; choose a destination outside the source")
    output_dir.check_destination(dst, overwrite, CHECKPOINT)


def build(dst: str, plan: Plan, overwrite: bool, verify: bool, progress: bool) -> list[str]:
    """Write `plan` into a temporary directory beside `dst`, verify it, then move it into place.

    Returns the names of the files written. Nothing is left behind on failure or interrupt. The output gets no
    permission bit that its weight files' sources lack (and a copy none that its own source lacks).
    """
    names = _check_names(plan)
    sources = {
        part.where for file in plan.files for tensor in file.tensors for part in tensor.parts if part.where != "memory"
    }
    with output_dir.staged(dst, overwrite, CHECKPOINT, mode_limit=permission_bits(sources)) as staging:
        digests, heads = {}, {}
        total = sum(t.nbytes for f in plan.files for t in f.tensors)
        with (
            tqdm(total=total, unit="B", unit_scale=True, desc="converting", disable=not progress or None) as bar,
            contextlib.ExitStack() as threads,
        ):
            # one thread per stage, so that each stage handles the blocks in order
            stages = {
                name: threads.enter_context(ThreadPoolExecutor(1, thread_name_prefix=name))
                for name in ("write", "hash", "check", "sync")
            }
            buffers = _Buffers(plan.files)
            for file in plan.files:
                digests[file.name], heads[file.name] = _write_file(staging, dst, file, verify, stages, buffers, bar)
        for name, text in plan.texts.items():
            with open(os.path.join(staging, name), "w", encoding="utf-8") as f:
                f.write(text)
        for name, path in plan.copies.items():
            copy_source(path, os.path.join(staging, name))
        if verify:
            _verify_files(staging, dst, plan, heads)
        for name in [*plan.texts, *plan.copies]:
            digests[name] = _sha256(os.path.join(staging, name))
        manifest = {**plan.manifest, "verified": verify, "sha256": dict(sorted(digests.items()))}
        with open(os.path.join(staging, MANIFEST), "w", encoding="utf-8") as f:
            f.write(json.dumps(manifest, indent=2) + "\n")
    return names


def _check_names(plan: Plan) -> list[str]:
    """Every file the plan writes, each a plain name, once: names can come from a manifest (paddle_to_torch)."""
    names = [file.name for file in plan.files] + list(plan.texts) + list(plan.copies) + [MANIFEST]
    for name in names:
        plain_name(name, "the files to write")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConversionError(f"the files to write name {repeated[0]!r} twice")
    return sorted(names)


def _write_file(
    directory: str,
    dst: str,
    file: OutputFile,
    verify: bool,
    stages: dict[str, ThreadPoolExecutor],
    buffers: _Buffers,
    bar: tqdm,
) -> tuple[str, bytes]:
    """Stream one weight file; returns its sha256 and the header written.

    This thread computes the blocks; each block then goes through the stages, each a thread of its own:
    write it, hash it, and verify it (re-read it from the file once written). Now and then the "sync"
    stage has the disk write out what is written so far. Up to IN_FLIGHT blocks are in the stages at once,
    so that they all keep busy, on as many cores as there are.
    """
    path, shown = os.path.join(directory, file.name), os.path.join(dst, file.name)
    digest = hashlib.sha256()
    in_flight: collections.deque[list[futures.Future]] = collections.deque()  # for each block handed on: its jobs
    syncing, unsynced = None, 0
    with SafetensorsWriter(
        path, [(t.name, t.dtype, t.shape) for t in file.tensors], file.metadata, file.header, sync=False
    ) as writer:
        try:
            digest.update(writer.head)
            offset = len(writer.head)
            for tensor, start, block in _blocks(file, buffers):
                writing = stages["write"].submit(_write_block, writer, tensor.name, block)
                jobs = [writing, stages["hash"].submit(digest.update, block)]
                if verify:
                    jobs.append(
                        stages["check"].submit(_check_block, writing, path, shown, offset, block, tensor.name, start)
                    )
                in_flight.append(jobs)
                offset += block.nbytes
                bar.update(block.nbytes)
                unsynced += block.nbytes
                if unsynced >= SYNC_BYTES and (syncing is None or syncing.done()):
                    syncing, unsynced = stages["sync"].submit(os.fdatasync, writer.fileno()), 0
                while len(in_flight) > IN_FLIGHT:
                    _wait(*in_flight.popleft())
            while in_flight:
                _wait(*in_flight.popleft())
            _wait(syncing)
        finally:  # on errors too: drop the jobs not started, and let no stage use the file once it is closed
            pending = [job for jobs in in_flight for job in jobs] + ([syncing] if syncing else [])
            for job in pending:
                job.cancel()
            futures.wait(pending)
    return digest.hexdigest(), writer.head


def _blocks(file: OutputFile, buffers: _Buffers):
    """(tensor, first row, block of rows) for every tensor of `file`, computed as they are asked for.
    A tensor's sources are mapped while its blocks are computed, and unmapped after."""
    for tensor in file.tensors:
        parts = [part.load() for part in tensor.parts]
        for start, stop in row_blocks(tensor.shape, numpy_dtype(tensor.dtype).itemsize):
            rows = buffers.next((stop - start, *tensor.shape[1:]), tensor.computed_dtype)
            tensor.forth(parts, start, stop, rows)
            yield tensor, start, cast(rows, tensor.computed_dtype, tensor.dtype)


class _Buffers:
    """IN_FLIGHT + 1 buffers that the blocks are computed into, in turn: when a buffer comes round again,
    the stages are done with the block it held (`_write_file` waits for that). Reusing them matters:
    fresh memory costs the kernel more to fault in (~1.6 s per GB measured here) than computing the block."""

    def __init__(self, files: list[OutputFile]):
        nbytes = max((_block_bytes(tensor) for file in files for tensor in file.tensors), default=0)
        self._arrays = [np.empty(nbytes, np.uint8) for _ in range(IN_FLIGHT + 1)]
        self._turn = 0

    def next(self, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        array = self._arrays[self._turn % len(self._arrays)]
        self._turn += 1
        as_numpy = numpy_dtype(dtype)
        return array[: int(np.prod(shape, dtype=np.int64)) * as_numpy.itemsize].view(as_numpy).reshape(shape)


def _block_bytes(tensor: OutputTensor) -> int:
    """The size of the biggest block of `tensor`, in the dtype it is computed in."""
    rows = max(stop - start for start, stop in row_blocks(tensor.shape, numpy_dtype(tensor.dtype).itemsize))
    return rows * int(np.prod(tensor.shape[1:], dtype=np.int64)) * numpy_dtype(tensor.computed_dtype).itemsize


def _write_block(writer: SafetensorsWriter, name: str, block: np.ndarray):
    writer.write(name, block)
    writer.flush()  # hand it to the OS, so that it can be read back from the file


def _wait(*pending):
    for future in pending:
        if future is not None:
            future.result()  # raises what the helper raised


# ---- verification -----------------------------------------------------------------------------------------
def _check_block(writing: futures.Future, path: str, shown: str, offset: int, block: np.ndarray, name: str, start: int):
    """Once it is written, re-read a block from the file and compare its bytes with the block computed from
    the source."""
    writing.result()
    on_disk = np.memmap(path, np.uint8, mode="r", offset=offset, shape=(block.nbytes,))
    if not _same_bytes(on_disk, block.reshape(-1).view(np.uint8)):
        raise ConversionError(
            f"{shown}: tensor {name!r} reads back different from its source (the block of rows from {start})"
        )


def _same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    """a == b for byte arrays of the same size, compared 8 bytes at a time (8 times faster than by byte)."""
    whole = a.size // 8 * 8
    return np.array_equal(a[:whole].view(np.uint64), b[:whole].view(np.uint64)) and np.array_equal(a[whole:], b[whole:])


def _verify_files(directory: str, dst: str, plan: Plan, heads: dict[str, bytes]):
    """What the per-tensor checks do not cover: each file's header and size as read back, the index
    and config.json. Messages name the files as they would have been called in `dst`."""
    where = {}
    for file in plan.files:
        path, shown = os.path.join(directory, file.name), os.path.join(dst, file.name)
        with SafetensorsReader(path) as reader:
            header = reader.header_text.encode("utf-8")
        if header != heads[file.name][8:] or os.path.getsize(path) != len(heads[file.name]) + sum(
            t.nbytes for t in file.tensors
        ):
            raise ConversionError(f"{shown}: the header or size read back is not what was written")
        where.update({t.name: path for t in file.tensors})
    try:
        index = weight_map(directory)
    except CheckpointError as err:
        raise ConversionError(f"the written index does not load: {err}") from None
    if index != where:
        raise ConversionError(f"{os.path.join(dst, INDEX_FILE)}: does not map the tensors to the files that hold them")
    written = GLM4Config.from_file(os.path.join(directory, CONFIG_NAME))
    if written != plan.config:
        raise ConversionError(f"{os.path.join(dst, CONFIG_NAME)}: reads back as {written}, expected {plan.config}")


# ---- finishing ----------------------------------------------------------------------------------------------
def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# ---- shared by the directions --------------------------------------------------------------------------------
def source_dtype(dtypes: Iterable[str]) -> str:
    """The dtype a checkpoint is "in": the widest of its tensors' dtypes, so that a default conversion
    never rounds anything."""
    dtypes = set(dtypes)
    if len(dtypes) == 1:
        return dtypes.pop()
    return "float32"


def copies_from(src: str) -> dict[str, str]:
    """The side files (tokenizer, generation config) present in `src`; refuses links out of it and files that
    are not regular."""
    return {name: source_path(src, name) for name in SIDE_FILES if os.path.lexists(os.path.join(src, name))}
