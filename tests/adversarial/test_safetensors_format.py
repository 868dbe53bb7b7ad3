"""Safetensors format: a .safetensors file is held to the format's own rules, as the `safetensors` library holds
it, wherever the project reads one (converter, loader, back-converter).

The rules: an 8-byte length, then a UTF-8 JSON object of at most 100 MB within the file; each tensor a known
dtype, a shape of integers and two offsets; the offsets tile the data exactly (from 0, each tensor where the one
before it ended: no gap, no overlap, nothing after the last) and span shape x dtype size bytes; no name twice.
- a corpus of corrupted checkpoints, built here from a real converted one: each corruption is refused by every
  command with one line naming the file and the tensor, the source stays byte-identical and nothing is written;
  and the `safetensors` library refuses the same bytes (the rule is the format's, not ours);
- property tests (hypothesis): any bytes at all, and headers built to be almost right, give a clean
  SafetensorsError or a parse; and what we accept, the library accepts too, with the same tensors and bytes.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import pytest
import safetensors
from corpus import build_templates, copy_tree
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sandbox import refused

from converters import paddle_to_torch, torch_to_paddle
from paddle_glm4 import __main__ as glm4_cli
from paddle_glm4.safetensors_file import DTYPES, MAX_HEADER_BYTES, SafetensorsError, SafetensorsReader

pytestmark = pytest.mark.torch_free
PROPERTY = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    return build_templates(tmp_path_factory)


# ---- reading and writing the raw format ---------------------------------------------------------------------------
def split(data: bytes) -> tuple[dict, bytes]:
    """(header as a dict, data bytes) of a well-formed file."""
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def join(header: dict | bytes, body: bytes, length: int | None = None) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + body


def library_refuses(data: bytes) -> bool:
    try:
        safetensors.deserialize(data)
    except Exception:  # noqa: BLE001 - the library raises SafetensorError, or a panic exception
        return True
    return False


def by_offset(header: dict) -> list[str]:
    return sorted((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"][0])


# Each corruption: (what it breaks, bytes -> bytes, words the message must hold, whether the library refuses it).
def overlap(data):
    header, body = split(data)
    first, second = by_offset(header)[:2]
    size = header[first]["data_offsets"][1] - header[first]["data_offsets"][0]
    header[second]["data_offsets"] = [o - size // 2 for o in header[second]["data_offsets"]]
    return join(header, body)


def gap(data):
    header, body = split(data)
    for name in by_offset(header)[1:]:
        header[name]["data_offsets"] = [o + 8 for o in header[name]["data_offsets"]]
    return join(header, body + bytes(8))


def not_from_zero(data):
    header, body = split(data)
    for name in by_offset(header):
        header[name]["data_offsets"] = [o + 8 for o in header[name]["data_offsets"]]
    return join(header, bytes(8) + body)


def shape_grows(data):
    header, body = split(data)
    name = by_offset(header)[0]
    header[name]["shape"][0] += 1
    return join(header, body)


def shape_wraps(data):
    """A shape whose element count wraps to 0 in int64 (2^80): the offsets of an empty tensor 'fit' it."""
    header, body = split(data)
    name = by_offset(header)[-1]
    header[name]["shape"] = [2**40, 2**40]
    header[name]["data_offsets"] = [header[name]["data_offsets"][0]] * 2
    return join(header, body[: header[name]["data_offsets"][0]])


def float_shape(data):
    header, body = split(data)
    header[by_offset(header)[0]]["shape"][0] += 0.5
    return join(header, body)


def twice(data):
    header, body = split(data)
    name = by_offset(header)[0]
    text = json.dumps(header)
    entry = json.dumps({name: header[name]})[1:-1]
    return join(text.replace(entry, entry + ", " + entry, 1).encode(), body)


def unknown_dtype(data):
    header, body = split(data)
    entry = header[by_offset(header)[0]]
    entry["dtype"] = {2: "U16", 4: "U32"}[DTYPES[entry["dtype"]][1].itemsize]  # the format's, as wide as before
    return join(header, body)


def length_past_the_end(data):
    header, body = split(data)
    whole = join(header, body)
    return struct.pack("<Q", len(whole)) + whole[8:]


def bomb(data):
    header, body = split(data)
    header["__metadata__"] = {"format": "[" * 10000}
    return join(json.dumps(header).replace('"' + "[" * 10000 + '"', "[" * 10000 + "]" * 10000).encode(), body)


def metadata_not_text(data):
    header, body = split(data)
    header["__metadata__"] = {"format": 1}
    return join(header, body)


def latin1(data):
    header, body = split(data)
    text = json.dumps(header).encode()
    return join(text.replace(b'"format"', b'"f\xe9rmat"', 1) if b'"format"' in text else b"\xe9" + text, body)


CORRUPTIONS = [
    ("overlap", overlap, ["overlaps the tensor before it"], True),
    ("gap", gap, ["leaves a gap before it"], True),
    ("not from 0", not_from_zero, ["leaves a gap before it"], True),
    ("trailing bytes", lambda d: d + bytes(8), ["8 bytes after the last tensor's data"], True),
    ("truncated", lambda d: d[:-8], ["truncated"], True),
    ("shape x dtype", shape_grows, ["do not fit shape"], True),
    ("int64 wrap", shape_wraps, ["do not fit shape [1099511627776, 1099511627776]"], True),
    ("float dim", float_shape, [".shape[0]: must be an integer >= 0"], True),
    ("length past the end", length_past_the_end, ["corrupted or truncated header"], True),
    ("length 2^64-1", lambda d: join(*split(d), length=2**64 - 1), ["corrupted or truncated header"], True),
    ("name twice", twice, ["appears twice"], False),  # the library keeps the last; we refuse the ambiguity
    ("unknown dtype", unknown_dtype, ["unsupported dtype 'U"], False),  # valid, but not a weight dtype
    ("nesting bomb", bomb, ["nested more than"], True),
    ("metadata not text", metadata_not_text, ["__metadata__: format: must be a string"], True),
    ("not UTF-8", latin1, ["not UTF-8 text"], True),
]


def shard_of(directory: Path) -> Path:
    """A weight file of the checkpoint holding at least two tensors."""
    for path in sorted(directory.glob("*.safetensors")):
        header, _ = split(path.read_bytes())
        if len(by_offset(header)) >= 2:
            return path
    raise AssertionError(f"no file of {directory} holds two tensors")


@pytest.mark.parametrize("what, corrupt, messages, library", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
@pytest.mark.parametrize("command", ["convert", "to-torch", "generate"])
def test_corrupted_weight_files_are_refused_everywhere(
    capsys, tmp_path, templates, command, what, corrupt, messages, library
):
    source = copy_tree(templates[0 if command == "convert" else 1], tmp_path / "src")
    shard = shard_of(source)
    corrupted = corrupt(shard.read_bytes())
    shard.write_bytes(corrupted)
    main, argv = {
        "convert": (torch_to_paddle.main, ["--src", str(source), "--dst", str(tmp_path / "dst")]),
        "to-torch": (paddle_to_torch.main, ["--src", str(source), "--dst", str(tmp_path / "dst")]),
        "generate": (glm4_cli.main, ["generate", "--model", str(source), "--prompt", "hi", "--max-new-tokens", "1"]),
    }[command]
    refused(capsys, main, argv, tmp_path, str(shard), *messages)
    assert library_refuses(corrupted) == library


def test_the_uncorrupted_shard_is_accepted_by_both(templates):
    data = shard_of(templates[1]).read_bytes()
    assert not library_refuses(data)
    with tempfile.TemporaryDirectory() as directory:
        check_against_library(data, Path(directory))


# ---- properties ---------------------------------------------------------------------------------------------------
def check_against_library(data: bytes, directory: Path):
    """Parse `data` as a file: a SafetensorsError naming the file, or a parse that the library agrees with."""
    path = directory / "x.safetensors"
    path.write_bytes(data)
    try:
        reader = SafetensorsReader(str(path))
    except SafetensorsError as err:
        assert str(err).startswith(str(path)), err
        return
    with reader:
        expected = dict(safetensors.deserialize(data))
        assert sorted(reader.names()) == sorted(expected)
        for name in reader.names():
            code = {v[0]: k for k, v in DTYPES.items()}[reader.dtype(name)]
            assert (code, list(reader.shape(name))) == (expected[name]["dtype"], expected[name]["shape"])
            assert reader.read(name).tobytes() == bytes(expected[name]["data"])


@PROPERTY
@given(st.binary(max_size=300))
def test_any_bytes_parse_or_are_refused_cleanly(data):
    with tempfile.TemporaryDirectory() as directory:
        check_against_library(data, Path(directory))


@PROPERTY
@given(st.binary(max_size=200))
def test_any_header_bytes_parse_or_are_refused_cleanly(header):
    with tempfile.TemporaryDirectory() as directory:
        check_against_library(join(header, bytes(16)), Path(directory))


DIMENSIONS = st.one_of(
    st.integers(0, 4),
    st.integers(-2, 2**65),
    st.floats(allow_nan=False, width=32),
    st.booleans(),
    st.text(max_size=2),
    st.none(),
)
ENTRIES = st.fixed_dictionaries(
    {
        "dtype": st.one_of(st.sampled_from([*DTYPES, "F8_E4M3", "U16", ""]), st.integers()),
        "shape": st.one_of(st.lists(DIMENSIONS, max_size=3), st.lists(st.integers(0, 4), max_size=3)),
        "data_offsets": st.one_of(
            st.lists(st.integers(0, 64), min_size=2, max_size=2),
            st.lists(st.one_of(st.integers(-1, 2**64), st.floats()), max_size=3),
        ),
    },
    optional={"extra": st.integers()},
)


@st.composite
def almost_right_files(draw):
    """Headers that are often valid or one rule away from it: tensors laid back to back, then perhaps bent."""
    header, offset = {}, 0
    for name in draw(st.lists(st.text(min_size=1, max_size=4), max_size=4, unique=True)):
        code = draw(st.sampled_from(list(DTYPES)))
        shape = draw(st.lists(st.integers(0, 3), max_size=2))
        size = DTYPES[code][1].itemsize
        for dim in shape:
            size *= dim
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if header and draw(st.booleans()):
        name = draw(st.sampled_from(sorted(header)))
        header[name] = draw(ENTRIES)
    if draw(st.booleans()):
        values = st.one_of(st.text(max_size=3), st.integers())
        header["__metadata__"] = draw(
            st.dictionaries(st.text(max_size=3), values, max_size=2) | st.sampled_from([None, 0, "", [], False])
        )
    body = bytes(range(256)) * (offset // 256 + 1)
    return join(header, body[: offset + draw(st.integers(-2, 2))] if offset else b"")


@PROPERTY
@given(almost_right_files())
def test_almost_right_files_agree_with_the_library(data):
    with tempfile.TemporaryDirectory() as directory:
        check_against_library(data, Path(directory))


def test_header_size_is_bounded_as_the_library_bounds_it():
    assert MAX_HEADER_BYTES == 100_000_000
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "big.safetensors")
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", MAX_HEADER_BYTES + 1))
            f.truncate(MAX_HEADER_BYTES + 100)  # sparse: the file is long enough, the header is not read
        with pytest.raises(SafetensorsError, match=r"corrupted or truncated header \(declares 100000001 header bytes"):
            SafetensorsReader(path)
