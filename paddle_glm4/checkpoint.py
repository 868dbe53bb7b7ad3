"""A checkpoint directory: safetensors weights (one file, or shards + `model.safetensors.index.json`).

Loading checks every header against what the model expects before it reads a byte of data, then reads
one tensor at a time straight into the model's parameters (peak memory: the model plus one tensor).
Saving streams tensor by tensor and replaces each file atomically. Pickle is never loaded.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from .safetensors_file import (
    SafetensorsError,
    SafetensorsReader,
    SafetensorsWriter,
    StoredTensor,
    cast,
    numpy_dtype,
)
from .source_files import check_source_file, plain_name
from .validation import Int, Map, Object, Optional, SchemaError, Str, read_json

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_PATTERN = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
# Files that hold pickled objects: loading them can execute code, so they are refused by name.
PICKLE_SUFFIXES = (".pdparams", ".pdopt", ".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class CheckpointError(SchemaError):
    """A checkpoint directory whose files do not hold the model they claim to."""


INDEX_SCHEMA = Object(
    {
        "metadata": Optional(Object({"total_size": Optional(Int(0))})),
        "weight_map": Map(Str(max_len=255), max_len=1 << 20),
    },
    required=("weight_map",),
)


# The config.json model types of GLM-4's torch checkpoints, which Paddle loads only once converted.
TORCH_LAYOUTS = {"chatglm": "the published torch layout (THUDM's)", "glm": "transformers' torch layout"}


def require_converted(directory: str, error: type[ValueError] = CheckpointError) -> None:
    """Raise `error` with the command that converts it when `directory` holds GLM-4 as a torch checkpoint
    (its config.json names a torch model type); do nothing otherwise."""
    try:
        config = read_json(os.path.join(directory, "config.json"))
    except (OSError, ValueError):  # no readable config: the caller's own checks say what is wrong
        return
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type in TORCH_LAYOUTS:
        raise error(
            f"{directory} holds GLM-4 in {TORCH_LAYOUTS[model_type]} (config.json model_type "
            f"{model_type!r}), not a Paddle checkpoint; convert it first: glm4-convert --src {directory} "
            f"--dst {os.path.normpath(directory)}-paddle"
        )


# ---- small file helpers ---------------------------------------------------------------------------------
def write_text_atomic(path: str, text: str) -> None:
    """Write a text file so that readers see either the old file or the whole new one."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would make a shared checkpoint unreadable to others
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def parse_size(size: int | str) -> int:
    """'5GB' -> 5_000_000_000, '2GiB' -> 2 * 2**30, 1000 -> 1000 (bytes)."""
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
        if not match:
            raise ValueError(f"cannot read size {size!r}; write it like 5GB, 500MB or 2GiB")
        unit = (match.group(2) or "B").upper()
        scale = 1 if unit == "B" else (1024 if "I" in unit else 1000) ** ("KMGT".index(unit[0]) + 1)
        value = int(float(match.group(1)) * scale)
    if value <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return value


# ---- reading ------------------------------------------------------------------------------------------
def weight_map(directory: str) -> dict[str, str]:
    """{tensor name: file path} for the checkpoint in `directory`, from its index or its single file."""
    index_path = os.path.join(directory, INDEX_FILE)
    single_path = os.path.join(directory, SINGLE_FILE)
    if os.path.lexists(index_path):
        mapping = read_json(index_path, INDEX_SCHEMA, CheckpointError)["weight_map"]
        result = {}
        for name, filename in mapping.items():
            plain_name(filename, f"{index_path}: weight_map[{name!r}]")
            if not filename.endswith(".safetensors"):
                raise CheckpointError(
                    f"{index_path}: tensor {name!r} points to {filename!r}, which is not a "
                    ".safetensors file (only safetensors are loaded)"
                )
            path = os.path.join(directory, filename)
            if not os.path.lexists(path):
                raise CheckpointError(f"{index_path}: shard {filename} (holding {name!r}) is missing")
            check_source_file(path, directory)
            result[name] = path
        return result
    if os.path.lexists(single_path):
        check_source_file(single_path, directory)
        with SafetensorsReader(single_path) as reader:
            return dict.fromkeys(reader.names(), single_path)
    listing = os.listdir(directory) if os.path.isdir(directory) else []
    pickles = sorted(f for f in listing if f.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise CheckpointError(
            f"{os.path.join(directory, pickles[0])} is a pickle file; paddle_glm4 loads only safetensors, because "
            "unpickling a downloaded file can run arbitrary code. Convert the checkpoint with glm4-convert."
        )
    raise CheckpointError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE} here")


@dataclass
class TensorLocation:
    path: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def inspect(
    directory: str, expected_shapes: dict[str, tuple[int, ...]], expected_dtypes: dict[str, str] | None = None
) -> dict[str, TensorLocation]:
    """Check every header of the checkpoint against the expected names and shapes; read no tensor data.
    A tensor named in `expected_dtypes` (a quantized weight) must have that dtype, any other a float one."""
    expected_dtypes = expected_dtypes or {}
    locations: dict[str, TensorLocation] = {}
    by_file: dict[str, list[str]] = {}
    for name, path in weight_map(directory).items():
        by_file.setdefault(path, []).append(name)
    for path, names in sorted(by_file.items()):
        try:
            reader = SafetensorsReader(path)
        except SafetensorsError as err:
            raise CheckpointError(str(err)) from None
        with reader:
            in_file = set(reader.names())
            for name in names:
                if name not in in_file:
                    raise CheckpointError(f"{INDEX_FILE} says tensor {name!r} is in {path}, which has no such tensor")
            for name in reader.names():
                if name not in expected_shapes:
                    raise CheckpointError(f"{path}: unexpected tensor {name!r} (not part of this model)")
                if reader.shape(name) != tuple(expected_shapes[name]):
                    raise CheckpointError(
                        f"{path}: tensor {name!r} has shape {list(reader.shape(name))}, "
                        f"the config expects {list(expected_shapes[name])}"
                    )
                if name in expected_dtypes and reader.dtype(name) != expected_dtypes[name]:
                    raise CheckpointError(
                        f"{path}: tensor {name!r} has dtype {reader.dtype(name)}, expected {expected_dtypes[name]}"
                    )
                if name not in expected_dtypes and reader.dtype(name) not in ("float32", "bfloat16", "float16"):
                    raise CheckpointError(
                        f"{path}: tensor {name!r} has dtype {reader.dtype(name)}, expected float32, bfloat16 or float16"
                    )
                locations[name] = TensorLocation(path, reader.dtype(name), reader.shape(name), reader.nbytes(name))
    missing = [name for name in expected_shapes if name not in locations]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"{directory}: missing tensor {missing[0]!r}{more}")
    return locations


def read_tensors(
    locations: dict[str, TensorLocation],
    dtype: str | dict[str, str | None],
    progress: str | None = None,
    unread: frozenset[str] = frozenset(),
) -> Iterator[tuple[str, np.ndarray | StoredTensor]]:
    """Yield (name, numpy array in `dtype`) one tensor at a time, file by file (bf16 as uint16 bits).
    `dtype` is one for all, or one per name (None: as stored).

    A tensor already stored in `dtype` comes memory-mapped (copy-on-write), not read: its pages are the
    page cache's, loaded when first touched (an embedding table's unused rows never are) and shared by
    every process that maps the file. A cast needs the data, so those tensors are read. The tensors named
    in `unread` (as stored) come as a StoredTensor, read by the caller a block at a time."""
    by_file: dict[str, list[str]] = {}
    for name, loc in locations.items():
        by_file.setdefault(loc.path, []).append(name)
    total = sum(loc.nbytes for loc in locations.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc=progress, disable=True if progress is None else None) as bar:
        for path, names in by_file.items():
            with SafetensorsReader(path) as reader:
                for name in names:
                    stored = locations[name].dtype
                    wanted = dtype.get(name) if isinstance(dtype, dict) else dtype
                    if name in unread:
                        yield name, reader.unread(name)
                    elif wanted is None or stored == wanted:
                        yield name, reader.view(name, private=True)
                    else:
                        yield name, cast(reader.read(name), stored, wanted)
                    bar.update(locations[name].nbytes)


# ---- writing ------------------------------------------------------------------------------------------
def plan_shards(
    sizes: list[tuple[str, int]], max_shard_size: int, transformers_rule: bool = False
) -> list[tuple[str, list[str]]]:
    """Group tensors, in order, into files of at most `max_shard_size` bytes (a bigger tensor gets its own).

    With `transformers_rule`, group exactly as huggingface_hub (and so transformers' save_pretrained) does:
    a tensor bigger than the limit gets its own file where it comes, but the group being filled goes on,
    so a file's tensors need not be contiguous in `sizes` order.
    """
    groups: list[list[str]] = []
    current: list[str] = []
    current_size = 0
    for name, nbytes in sizes:
        if transformers_rule and nbytes > max_shard_size:
            groups.append([name])
            continue
        if current and current_size + nbytes > max_shard_size:
            groups.append(current)
            current, current_size = [], 0
        current.append(name)
        current_size += nbytes
    if current or not groups:
        groups.append(current)
    if len(groups) == 1:
        return [(SINGLE_FILE, groups[0])]
    return [(f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors", g) for i, g in enumerate(groups)]


def index_json(shards: list[tuple[str, list[str]]], total_size: int) -> str:
    """`model.safetensors.index.json` for `shards` ([(filename, tensor names)]), formatted as transformers
    writes it (sorted keys, indent 2, final newline), which is how the published GLM-4 index looks."""
    index = {
        "metadata": {"total_size": total_size},
        "weight_map": {name: filename for filename, names in shards for name in names},
    }
    return json.dumps(index, indent=2, sort_keys=True) + "\n"


def existing_weight_files(directory: str) -> list[str]:
    if not os.path.isdir(directory):
        return []
    return sorted(f for f in os.listdir(directory) if f in (SINGLE_FILE, INDEX_FILE) or SHARD_PATTERN.match(f))


def write_checkpoint(
    directory: str,
    entries: list[tuple[str, str, tuple[int, ...]]],
    tensors: Iterator[tuple[str, np.ndarray]],
    max_shard_size: int | str = "5GB",
    metadata: dict | None = None,
    progress: str | None = None,
) -> list[str]:
    """Write safetensors weights into `directory`, streaming.

    `entries` declares (name, dtype, shape) in writing order; `tensors` yields (name, numpy array) in that
    order. Each file is written under a temporary name and renamed when complete; the index goes last,
    then weight files of an earlier checkpoint that the new one does not use are removed.
    Returns the names of the files written.
    """
    os.makedirs(directory, exist_ok=True)
    declared = {name: (dtype, tuple(shape)) for name, dtype, shape in entries}
    sizes = [
        (name, int(np.prod(shape, dtype=np.int64)) * numpy_dtype(dtype).itemsize) for name, dtype, shape in entries
    ]
    shards = plan_shards(sizes, parse_size(max_shard_size))
    tensors = iter(tensors)
    written = []
    with tqdm(
        total=sum(n for _, n in sizes),
        unit="B",
        unit_scale=True,
        desc=progress,
        disable=True if progress is None else None,
    ) as bar:
        for filename, names in shards:
            final = os.path.join(directory, filename)
            tmp = os.path.join(directory, f".{filename}.tmp")
            try:
                writer = SafetensorsWriter(tmp, [(n, *declared[n]) for n in names], metadata)
                for _ in names:
                    name, array = next(tensors)
                    writer.write(name, array)
                    bar.update(array.nbytes)
                writer.close()
                os.replace(tmp, final)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
            written.append(filename)
    if len(shards) > 1:
        write_text_atomic(os.path.join(directory, INDEX_FILE), index_json(shards, sum(n for _, n in sizes)))
        written.append(INDEX_FILE)
    for stale in set(existing_weight_files(directory)) - set(written):
        os.unlink(os.path.join(directory, stale))
    return written
