"""One .safetensors file, read and written a tensor at a time, as numpy arrays.

Our own reader and writer of the format (8-byte little-endian header length, a JSON header, then the raw
bytes) rather than `safetensors.safe_open`, because (1) numpy has no bfloat16, and here bf16 is simply
carried as its raw uint16 bits, so conversions are bit-exact; (2) a writer that knows the header up
front streams tensors to disk one by one (or block of rows by block of rows), so memory stays at one
tensor whatever the file size; and (3) every malformed input gets an error naming the file and the
tensor. Nothing here unpickles.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import weakref
from typing import Any

import numpy as np

from .source_files import open_regular
from .validation import Int, List, Map, Object, Optional, SchemaError, Str, parse_json, validate

# safetensors dtype code -> (our dtype name, numpy dtype that holds its bits)
DTYPES: dict[str, tuple[str, np.dtype]] = {
    "F32": ("float32", np.dtype("<f4")),
    "F16": ("float16", np.dtype("<f2")),
    "BF16": ("bfloat16", np.dtype("<u2")),
    "F64": ("float64", np.dtype("<f8")),
    "I64": ("int64", np.dtype("<i8")),
    "I32": ("int32", np.dtype("<i4")),
    "I8": ("int8", np.dtype("i1")),
    "U8": ("uint8", np.dtype("u1")),
    "BOOL": ("bool", np.dtype("?")),
}
CODE_OF = {name: code for code, (name, _) in DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's limit


class SafetensorsError(SchemaError):
    """A .safetensors file that is missing, truncated or malformed."""


def numpy_dtype(dtype: str) -> np.dtype:
    return DTYPES[CODE_OF[dtype]][1]


HEADER_SCHEMA = Map(
    Object(
        {"dtype": Str(), "shape": List(Int(0)), "data_offsets": List(Int(0), 2, 2)},
        required=("dtype", "shape", "data_offsets"),
    )
)  # other fields: ignored, as the library does
METADATA_SCHEMA = Optional(Map(Str()))  # the format's metadata: text keys to text values


def parse_header(raw: bytes, data_len: int, source: str) -> tuple[dict[str, str], dict[str, tuple]]:
    """Check a safetensors header (the JSON after the 8-byte length) by the format's rules, as the
    `safetensors` library checks it, for a file with `data_len` bytes after the header:
    a JSON object of tensors {dtype, shape, data_offsets} (and text `__metadata__`), no name twice, a known
    dtype, offsets that tile the data exactly (the first from 0, each from where the previous ended, the
    last at the end of the file: no gap, no overlap, nothing after) and span shape x dtype size bytes.
    Returns (metadata, {name: (dtype code, shape, begin, end)}), or raises SafetensorsError naming `source`."""
    header = parse_json(raw, f"{source}: header", error=SafetensorsError)
    if not isinstance(header, dict):
        raise SafetensorsError(f"{source}: corrupted header, not a JSON object")
    metadata = (
        validate(header.pop("__metadata__", None), METADATA_SCHEMA, f"{source}: header __metadata__", SafetensorsError)
        or {}
    )
    validate(header, HEADER_SCHEMA, f"{source}: header", SafetensorsError)
    entries = {}
    for name, entry in header.items():
        code, (begin, end) = entry["dtype"], entry["data_offsets"]
        shape = tuple(entry["shape"])
        if code not in DTYPES:
            raise SafetensorsError(
                f"{source}: tensor {name!r}: unsupported dtype {code!r} (supported: {', '.join(DTYPES)})"
            )
        expected = math.prod(shape) * DTYPES[code][1].itemsize  # exact: no int64 wrap-around on huge shapes
        if not begin <= end or end - begin != expected:
            raise SafetensorsError(
                f"{source}: tensor {name!r}: header offsets {begin}..{end} do not fit shape "
                f"{list(shape)} {code} ({expected} bytes)"
            )
        entries[name] = (code, shape, begin, end)
    position = 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda item: item[1][2:]):
        if begin != position:
            problem = "overlaps the tensor before it" if begin < position else "leaves a gap before it"
            raise SafetensorsError(
                f"{source}: tensor {name!r}: data offsets {begin}..{end} {problem} (the "
                f"previous tensor ends at {position}); tensors must be stored back to back"
            )
        position = end
    if position != data_len:
        if position > data_len:
            raise SafetensorsError(
                f"{source}: truncated: the tensors end at byte {position} of the data, but "
                f"the file holds only {data_len} data bytes"
            )
        raise SafetensorsError(
            f"{source}: {data_len - position} bytes after the last tensor's data; the "
            "header does not describe the whole file"
        )
    return metadata, entries


class SafetensorsReader:
    """Reads the header at once and each tensor on demand. Use as a context manager."""

    def __init__(self, path: str):
        self.path = path
        try:
            self._file = open_regular(path)
        except FileNotFoundError:
            raise SafetensorsError(f"{path}: file not found") from None
        except OSError as err:
            raise SafetensorsError(f"{path}: cannot open ({err.strerror})") from None
        try:
            self._parse_header()
        except BaseException:
            self._file.close()
            raise

    def _fail(self, message: str):
        raise SafetensorsError(f"{self.path}: {message}")

    def _parse_header(self):
        size = os.fstat(self._file.fileno()).st_size
        prefix = self._file.read(8)
        if len(prefix) < 8:
            self._fail(f"not a safetensors file (only {size} bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            self._fail(f"corrupted or truncated header (declares {header_len} header bytes, file has {size})")
        raw = self._file.read(header_len)
        self.metadata, self._entries = parse_header(raw, size - 8 - header_len, self.path)
        self.header_text = raw.decode("utf-8")  # exactly as stored, padding included
        self._data_start = 8 + header_len

    # ---- queries --------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def dtype(self, name: str) -> str:
        return DTYPES[self._entry(name)[0]][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[1]

    def nbytes(self, name: str) -> int:
        _, _, begin, end = self._entry(name)
        return end - begin

    def _entry(self, name: str):
        try:
            return self._entries[name]
        except KeyError:
            self._fail(f"has no tensor {name!r}")

    def read(self, name: str) -> np.ndarray:
        """The tensor as a new numpy array (bf16 as uint16 bits)."""
        code, shape, begin, end = self._entry(name)
        array = np.empty(shape, dtype=DTYPES[code][1])
        self._file.seek(self._data_start + begin)
        got = self._file.readinto(array.reshape(-1).data.cast("B")) if end > begin else 0
        if got != end - begin:
            self._fail(f"truncated: tensor {name!r} has {got} of its {end - begin} bytes")
        return array

    def view(self, name: str, private: bool = False) -> np.ndarray:
        """The tensor memory-mapped instead of copied: read-only, or with `private` writable copy-on-write
        (writes stay in this process, never reach the file; what a zero-copy hand-over to Paddle needs).

        The pages are the page cache's own, faulted in as they are touched, and unmapped when the array
        (and every view of it) is dropped; so mapping one tensor at a time bounds memory to one tensor.
        The header was checked against the file's size, but the file must not shrink while mapped.
        """
        code, shape, begin, end = self._entry(name)
        dtype = DTYPES[code][1]
        if end == begin:
            return np.empty(shape, dtype)
        first = self._data_start + begin
        skip = first % mmap.ALLOCATIONGRANULARITY  # mappings start at a page boundary
        access = mmap.ACCESS_COPY if private else mmap.ACCESS_READ
        mapped = mmap.mmap(self._file.fileno(), skip + end - begin, offset=first - skip, access=access)
        return np.frombuffer(mapped, dtype, count=(end - begin) // dtype.itemsize, offset=skip).reshape(shape)

    def unread(self, name: str) -> StoredTensor:
        """The tensor left in the file, to be read a block at a time (StoredTensor); it stays readable
        after this reader is closed."""
        code, shape, begin, _ = self._entry(name)
        return StoredTensor(self.path, self._file.fileno(), self._data_start + begin, shape, DTYPES[code][1])

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class StoredTensor:
    """A tensor not read yet: `tensor[rows, cols]` (plain slices) reads that block from the file with pread
    into a new array, so converting a weight a block at a time holds one block, not the tensor. (Mapped,
    a column block of a [K, N] weight touches every row, and the page cache's large folios are mapped whole
    around each fault: the first block made GLM-4-9B's whole 1.24 GB lm_head resident.)

    `offset`, `shape` and `dtype` come from a header that SafetensorsReader checked against the file's size;
    a file that shrinks meanwhile gives a short read, which is an error."""

    def __init__(self, path: str, fd: int, offset: int, shape: tuple[int, ...], dtype: np.dtype):
        self.path, self.shape, self.dtype, self.ndim = path, tuple(shape), np.dtype(dtype), len(shape)
        self._offset, self._fd = offset, os.dup(fd)  # its own descriptor: the reader may close first
        weakref.finalize(self, os.close, self._fd)

    def __getitem__(self, key) -> np.ndarray:
        rows, cols = key if isinstance(key, tuple) else (key, slice(None))
        if self.ndim != 2 or not all(isinstance(k, slice) and k.step in (None, 1) for k in (rows, cols)):
            raise TypeError(f"{self.path}: a stored tensor reads 2-D blocks of plain slices, got {key!r}")
        (r0, r1, _), (c0, c1, _) = rows.indices(self.shape[0]), cols.indices(self.shape[1])
        block = np.empty((max(0, r1 - r0), max(0, c1 - c0)), self.dtype)
        width = self.shape[1]
        if block.shape[1] == width:  # whole rows: one run of the file
            self._read_into(block, r0 * width)
        else:  # a run per row
            for i, row in enumerate(range(r0, r1)):
                self._read_into(block[i], row * width + c0)
        return block

    def _read_into(self, buffer: np.ndarray, element: int) -> None:
        """Fill the contiguous `buffer` from the tensor's element number `element` on."""
        data = buffer.reshape(-1).data.cast("B")
        done = 0
        while done < len(data):  # a single read returns at most ~2 GB
            got = os.preadv(self._fd, [data[done:]], self._offset + element * self.dtype.itemsize + done)
            if got <= 0:
                raise SafetensorsError(f"{self.path}: truncated while reading (the file shrank after it was opened)")
            done += got


def encode_header(entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict | None = None) -> bytes:
    """The header `SafetensorsWriter` writes: tensors laid out back to back in the order given, in the
    compact JSON and 8-byte padding of the `safetensors` library (so given that library's tensor order,
    the bytes are the same)."""
    header: dict[str, Any] = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}} if metadata else {}
    offset = 0
    for name, dtype, shape in entries:
        nbytes = int(np.prod(shape, dtype=np.int64)) * numpy_dtype(dtype).itemsize
        header[name] = {"dtype": CODE_OF[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return encoded + b" " * (-len(encoded) % 8)  # the format aligns the data start to 8 bytes


class SafetensorsWriter:
    """Writes a .safetensors file whose tensors (name, dtype, shape) are declared up front.

    The header goes out first (`head` holds those bytes: length prefix and JSON header); then `write`
    streams each tensor's bytes in the declared order, whole or in successive blocks of rows. `close`
    checks that every declared tensor was written and flushes the file to disk (unless `sync=False`:
    then the caller syncs later). `header` reproduces an existing file's header byte for byte; it must
    describe exactly `entries`. Used as a context manager, an exception abandons the file (closed,
    unchecked) and `close` otherwise.
    """

    def __init__(
        self,
        path: str,
        entries: list[tuple[str, str, tuple[int, ...]]],
        metadata: dict | None = None,
        header: bytes | None = None,
        sync: bool = True,
    ):
        self.path, self._sync = path, sync
        self._order = [(name, dtype, tuple(shape)) for name, dtype, shape in entries]
        if header is None:
            header = encode_header(self._order, metadata)
        elif _tensor_entries(header) != _tensor_entries(encode_header(self._order)):
            raise ValueError(f"{path}: the given header does not describe the declared tensors")
        self.head = struct.pack("<Q", len(header)) + header
        self._file = open(path, "wb")  # noqa: SIM115 - held until close(): tensors are written one at a time
        self._next, self._rows = 0, 0
        try:
            self._put(self.head)
        except BaseException:
            self._file.close()
            raise

    def _put(self, data):
        try:
            self._file.write(data)
        except OSError as err:  # e.g. a full disk: say which file
            raise OSError(err.errno, err.strerror, self.path) from None

    def fileno(self) -> int:
        return self._file.fileno()

    def flush(self) -> None:
        """Hand everything written so far to the OS, so that it can be read back from the file."""
        try:
            self._file.flush()
        except OSError as err:
            raise OSError(err.errno, err.strerror, self.path) from None

    def write(self, name: str, array: np.ndarray) -> None:
        """Write tensor `name` (the next declared one): the whole tensor, or its next block of rows."""
        if self._next == len(self._order):
            raise ValueError(f"{self.path}: all declared tensors are written, got {name!r}")
        expected_name, dtype, shape = self._order[self._next]
        if name != expected_name:
            raise ValueError(f"{self.path}: expected tensor {expected_name!r} next, got {name!r}")
        total = shape[0] if shape else 1
        rows = array.shape[0] if shape and array.ndim else 1
        if (
            array.dtype != numpy_dtype(dtype)
            or tuple(array.shape[1:]) != shape[1:]
            or array.ndim != len(shape)
            or self._rows + rows > total
        ):
            raise ValueError(
                f"{self.path}: tensor {name!r} declared {dtype} {list(shape)}, got numpy "
                f"{array.dtype} {list(array.shape)} after {self._rows} of its rows"
            )
        self._put(np.ascontiguousarray(array).reshape(-1).data.cast("B"))
        self._rows += rows
        if self._rows == total:
            self._next, self._rows = self._next + 1, 0

    def close(self) -> None:
        try:
            if self._next != len(self._order):
                missing = [name for name, _, _ in self._order[self._next :]]
                raise ValueError(f"{self.path}: closed before writing {len(missing)} tensors (first: {missing[0]!r})")
            self.flush()
            if self._sync:
                try:
                    os.fsync(self._file.fileno())
                except OSError as err:
                    raise OSError(err.errno, err.strerror, self.path) from None
        finally:
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:
            self._file.close()


def _tensor_entries(header: bytes) -> dict:
    entries = parse_json(header, "header", error=SafetensorsError)
    if isinstance(entries, dict):
        entries.pop("__metadata__", None)
    return entries


# ---- dtype casts on raw arrays ------------------------------------------------------------------------
def to_float32(array: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        bits = np.asarray(array).astype(np.uint32)
        bits <<= np.uint32(16)  # in place and uint32: numpy 1.x widens a 0-d array's `<< 16` to int64
        return bits.view(np.float32)
    return array.astype(np.float32)


def cast(array: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Cast between float32/bfloat16/float16 arrays; bf16 rounds to nearest even, as Paddle and torch do."""
    if src == dst:
        return array
    if dst == "bfloat16":
        bits = to_float32(array, src).view(np.uint32)
        nan = np.isnan(bits.view(np.float32))
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        return np.where(nan, np.uint16(0x7FC0), rounded)
    return to_float32(array, src).astype(numpy_dtype(dst))
