"""Convert a Paddle checkpoint back into the published GLM-4 torch layout (what THUDM's code and
transformers with `trust_remote_code` load).

    python -m converters.paddle_to_torch --src glm-4-9b-chat-paddle --dst glm-4-9b-chat-torch

The output has the published names (`transformer.*`), torch [out, in] weights, `inv_freq` in the output
dtype, config.json with model_type "chatglm", and metadata {"format": "pt"}. Its file layout is either
- reproduced: when the Paddle checkpoint was made by `torch_to_paddle` from a published checkpoint, its
  manifest records that checkpoint's layout (each shard's exact header, the index, config.json and the
  inv_freq bytes). If it still fits (same tensors, shapes and dtype), it is written again as it was, so a
  torch -> Paddle -> torch round trip gives back every file byte for byte;
- or canonical: what `transformers`' save_pretrained writes, as for the published checkpoint: tensors in
  module order cut into shards of at most 2GB (`model-0000N-of-0000M.safetensors`), each file in the
  `safetensors` library's order, and the index formatted as transformers formats it.
`write_published_checkpoint` writes the canonical layout from numpy arrays, without torch.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from paddle_glm4 import __version__
from paddle_glm4.checkpoint import INDEX_FILE, index_json, inspect, parse_size, plan_shards
from paddle_glm4.config import CONFIG_NAME, STORAGE_DTYPES, GLM4Config, Quantization
from paddle_glm4.safetensors_file import CODE_OF, MAX_HEADER_BYTES, SafetensorsReader, numpy_dtype
from paddle_glm4.source_files import UnsafeFileError, plain_name
from paddle_glm4.validation import MAX_JSON_BYTES, Int, List, Object, Optional, Str, parse_json, read_json

from . import cli, mapping, quantized
from .pipeline import (
    MANIFEST,
    ConversionError,
    OutputFile,
    OutputTensor,
    Plan,
    SourceTensor,
    Summary,
    build,
    check_destination,
    copies_from,
    source_dtype,
)

PUBLISHED_SHARD_SIZE = "2GB"  # what the published GLM-4 checkpoint was cut with
# What torch_to_paddle records of a published source (TorchCheckpoint.layout_record), as read back here.
LAYOUT_RECORD = Object(
    {
        "config": Str(max_len=MAX_JSON_BYTES),
        "index": Optional(Str(max_len=MAX_JSON_BYTES)),
        "files": List(
            Object(
                {"name": Str(max_len=255), "size": Int(0), "header": Str(max_len=MAX_HEADER_BYTES)},
                required=("name", "size", "header"),
            ),
            1,
            1 << 16,
        ),
        "inv_freq": Optional(Str(pattern="(?:[0-9a-f]{2})*", max_len=1 << 16, what="bytes in hexadecimal")),
    },
    required=("config", "index", "files", "inv_freq"),
)
MANIFEST_SCHEMA = Object({"published_layout": Optional(LAYOUT_RECORD)})
NUMPY_DTYPES = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16", np.dtype(np.uint16): "bfloat16"}


def published_tensors(
    config: GLM4Config,
    sources: Mapping[str, SourceTensor],
    dtype: str,
    inv_freq: np.ndarray | None = None,
    quantization: Quantization | None = None,
) -> list[OutputTensor]:
    """The published checkpoint's tensors in module order, made from Paddle-layout `sources` (by Paddle
    name; with `quantization`, the Linear weights are dequantized from their quantized tensors). `inv_freq`
    (bits in `dtype`) defaults to THUDM's own computation."""
    if inv_freq is None:
        inv_freq = mapping.published_inv_freq(config, dtype)
    tensors = {
        spec.published: _published_tensor(spec, sources, dtype, quantization) for spec in mapping.tensor_specs(config)
    }
    tensors[mapping.PUBLISHED_INV_FREQ] = OutputTensor(
        mapping.PUBLISHED_INV_FREQ,
        dtype,
        inv_freq.shape,
        (SourceTensor.in_memory(mapping.PUBLISHED_INV_FREQ, inv_freq, dtype),),
        forth=lambda parts, start, stop, out: np.copyto(out, parts[0][start:stop]),
    )
    return [tensors[name] for name in mapping.published_order(config)]


def _published_tensor(
    spec: mapping.TensorSpec, sources: Mapping[str, SourceTensor], dtype: str, quantization: Quantization | None
) -> OutputTensor:
    if quantization is not None and mapping.quantized(spec, quantization):
        prefix = spec.paddle[: -len("weight")]
        return quantized.dequantized_tensor(
            spec.published, spec, sources[prefix + "qweight"], sources[prefix + "scales"], quantization, dtype
        )
    return OutputTensor(
        spec.published,
        dtype,
        spec.source_shapes("published")[0],
        (sources[spec.paddle],),
        forth=lambda parts, start, stop, out: mapping.torch_rows(spec, parts[0], "published", 0, start, stop, out),
    )


def canonical_plan(
    config: GLM4Config, tensors: list[OutputTensor], max_shard_size: int
) -> tuple[list[OutputFile], dict]:
    """Files and texts as transformers' save_pretrained writes them (see the module docstring)."""
    shards = plan_shards([(t.name, t.nbytes) for t in tensors], max_shard_size, transformers_rule=True)
    by_name = {t.name: t for t in tensors}
    files = []
    for filename, names in shards:
        # the safetensors library orders a file's tensors by dtype size (largest first), then by name
        ordered = sorted(names, key=lambda n: (-numpy_dtype(by_name[n].dtype).itemsize, n))
        files.append(OutputFile(filename, [by_name[n] for n in ordered], {"format": "pt"}))
    texts = {CONFIG_NAME: json.dumps(config.to_published_dict(), indent=2, sort_keys=True) + "\n"}
    if len(shards) > 1:
        texts[INDEX_FILE] = index_json(shards, sum(t.nbytes for t in tensors))
    return files, texts


def recorded_plan(
    record: dict, config: GLM4Config, tensors: list[OutputTensor], where: str = MANIFEST
) -> tuple[list[OutputFile], dict]:
    """Files and texts exactly as recorded, when the record fits `tensors`; raises ValueError otherwise, and
    UnsafeFileError for a file name that is not a plain name (`where` names the manifest)."""
    by_name = {t.name: t for t in tensors}
    if GLM4Config.from_dict(parse_json(record["config"], "the recorded config.json")) != config:
        raise ValueError("its config.json describes a different model or dtype")
    files, seen = [], set()
    for i, entry in enumerate(record["files"]):
        plain_name(entry["name"], f"{where}: published_layout.files[{i}].name")
        if not entry["name"].endswith(".safetensors"):
            raise UnsafeFileError(
                f"{where}: published_layout.files[{i}].name {entry['name']!r} is not a "
                ".safetensors file name; refusing it"
            )
        header = entry["header"].encode("utf-8")
        layout = {
            k: v
            for k, v in parse_json(header, f"the recorded header of {entry['name']}").items()
            if k != "__metadata__"
        }
        names = sorted(layout, key=lambda n: layout[n]["data_offsets"][0])
        offset = 0
        for name in names:
            tensor = by_name.get(name)
            if (
                tensor is None
                or name in seen
                or layout[name]
                != {
                    "dtype": CODE_OF[tensor.dtype],
                    "shape": list(tensor.shape),
                    "data_offsets": [offset, offset + tensor.nbytes],
                }
            ):
                raise ValueError(f"tensor {name!r} of {entry['name']} does not fit")
            seen.add(name)
            offset += tensor.nbytes
        if entry["size"] != 8 + len(header) + offset:
            raise ValueError(f"{entry['name']} had bytes beyond its tensors")
        files.append(OutputFile(entry["name"], [by_name[n] for n in names], header=header))
    if seen != set(by_name):
        raise ValueError("it does not hold every tensor")
    texts = {CONFIG_NAME: record["config"]}
    if record["index"] is not None:
        recorded = parse_json(record["index"], f"{where}: published_layout.index")["weight_map"]
        if recorded != {t.name: file.name for file in files for t in file.tensors}:
            raise UnsafeFileError(
                f"{where}: published_layout.index does not map the tensors to the recorded files; refusing it"
            )
        texts[INDEX_FILE] = record["index"]
    return files, texts


def _recorded_layout(src: str) -> tuple[dict | None, str, str]:
    """The published layout recorded in `src`'s manifest, if any (and why not, for the summary), and the
    manifest's path."""
    path = os.path.join(src, MANIFEST)
    try:
        record = read_json(path, MANIFEST_SCHEMA).get("published_layout")
    except FileNotFoundError:
        return None, f"no {MANIFEST} in the source", path
    except PermissionError as err:
        return None, f"{path} is unreadable ({err.strerror})", path
    return record, "" if record else f"{path} records no published layout", path


def _plan(
    config: GLM4Config,
    sources: Mapping[str, SourceTensor],
    dtype: str,
    shard_size: int | None,
    record: dict | None,
    why_not: str,
    where: str,
    quantization: Quantization | None,
) -> tuple[list[OutputTensor], list[OutputFile], dict, str]:
    """The recorded layout if asked for (no shard size) and it fits, else the canonical one; and a note
    saying which, for the summary."""
    if shard_size is None and record is not None:
        try:
            recorded = record["inv_freq"]
            inv_freq = None if recorded is None else np.frombuffer(bytes.fromhex(recorded), numpy_dtype(dtype))
            tensors = published_tensors(config, sources, dtype, inv_freq, quantization)
            plan = recorded_plan(record, config, tensors, where)
            return tensors, *plan, "reproduced the source's recorded file layout"
        except UnsafeFileError:
            raise  # a crafted manifest: refused, not worked around
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            why_not = f"the recorded layout does not fit: {err}"
    tensors = published_tensors(config, sources, dtype, quantization=quantization)
    reason = "--max-shard-size given" if shard_size else why_not
    size = shard_size or parse_size(PUBLISHED_SHARD_SIZE)
    return tensors, *canonical_plan(config, tensors, size), f"canonical transformers layout ({reason})"


def export(
    src: str,
    dst: str,
    dtype: str | None = None,
    max_shard_size: int | str | None = None,
    overwrite: bool = False,
    verify: bool = True,
    progress: bool = True,
) -> Summary:
    """Write the Paddle checkpoint in `src` as a published-layout torch checkpoint in the new directory `dst`.

    `dtype` None keeps the source's. `max_shard_size` None reproduces the recorded source layout when there
    is one (else 2GB shards); a size always writes the canonical layout. Errors as for `convert`.
    """
    started = time.perf_counter()
    if dtype is not None and dtype not in STORAGE_DTYPES:
        raise ConversionError(f"--dtype {dtype}: choose one of {', '.join(STORAGE_DTYPES)}")
    shard_size = None if max_shard_size is None else parse_size(max_shard_size)
    check_destination(dst, overwrite, src)
    if not os.path.isdir(src):
        raise ConversionError(f"--src {src}: {'not a directory' if os.path.exists(src) else 'no such directory'}")
    config = GLM4Config.from_file(os.path.join(src, CONFIG_NAME))
    expected = mapping.checkpoint_tensors(config)
    fixed = {name: dtype for name, (_, dtype) in expected.items() if dtype is not None}  # quantized tensors
    # names, shapes and dtypes, naming the file
    locations = inspect(src, {name: shape for name, (shape, _) in expected.items()}, fixed)
    quantization = config.quantization
    with contextlib.ExitStack() as stack:
        readers = {
            path: stack.enter_context(SafetensorsReader(path))
            for path in dict.fromkeys(loc.path for loc in locations.values())
        }
        sources = {name: SourceTensor.in_file(readers[loc.path], name) for name, loc in locations.items()}
        src_dtype = source_dtype(loc.dtype for name, loc in locations.items() if name not in fixed)
        dtype = dtype or src_dtype
        config = dataclasses.replace(config, dtype=dtype, quantization=None)  # torch gets the dequantized weights
        tensors, files, texts, layout_note = _plan(
            config, sources, dtype, shard_size, *_recorded_layout(src), quantization
        )
        manifest: dict[str, Any] = {
            "tool": f"paddle_glm4 {__version__} converters.paddle_to_torch",
            "source": {"layout": "paddle", "dtype": src_dtype, "tensors": len(sources)},
            "output": {
                "layout": "published",
                "dtype": dtype,
                "tensors": len(tensors),
                "bytes": sum(t.nbytes for t in tensors),
                "file_layout": layout_note,
            },
        }
        if progress:
            quantized_note = "" if quantization is None else f", Linear weights {quantization} (dequantized)"
            print(
                f"{src}: Paddle checkpoint, {len(sources)} tensors, {src_dtype}{quantized_note}; writing the "
                f"published layout in {dtype} to {dst} ({layout_note})",
                file=sys.stderr,
            )
        written = build(dst, Plan(files, config, texts, copies_from(src), manifest), overwrite, verify, progress)
    return Summary(
        "paddle -> torch",
        src,
        dst,
        "paddle",
        src_dtype,
        dtype,
        len(tensors),
        manifest["output"]["bytes"],
        time.perf_counter() - started,
        written,
        verify,
        [layout_note],
    )


def write_published_checkpoint(
    dst: str,
    config: GLM4Config,
    tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
    dtype: str | None = None,
    max_shard_size: int | str = PUBLISHED_SHARD_SIZE,
    overwrite: bool = False,
    extra_files: Mapping[str, str] | None = None,
    verify: bool = True,
    progress: bool = False,
) -> Summary:
    """Write a published-layout (torch) GLM-4 checkpoint from Paddle-layout numpy arrays, without torch.

    `tensors` gives every tensor of `mapping.tensor_specs(config)` (Paddle names and shapes), as a dict or
    as (name, array) pairs: float32, float16, or bf16 as uint16 bits. They are held in memory (this is for
    small models: demos, tests) and written in `dtype` (default: `config.dtype`), in the canonical layout,
    atomically like a conversion. `extra_files` ({name: path}) are copied in too, e.g. the tokenizer.
    """
    started = time.perf_counter()
    dtype = dtype or config.dtype
    config = dataclasses.replace(config, dtype=dtype)
    check_destination(dst, overwrite)
    tensors = dict(tensors)
    sources = {}
    for spec in mapping.tensor_specs(config):
        if spec.paddle not in tensors:
            raise ConversionError(f"no array given for tensor {spec.paddle!r}")
        array = np.asarray(tensors[spec.paddle])
        if array.dtype not in NUMPY_DTYPES or array.shape != spec.shape:
            raise ConversionError(
                f"tensor {spec.paddle!r}: expected shape {list(spec.shape)} in float32, float16 "
                f"or bf16 bits (uint16), got {array.dtype} {list(array.shape)}"
            )
        sources[spec.paddle] = SourceTensor.in_memory(spec.paddle, array, NUMPY_DTYPES[array.dtype])
    outputs = published_tensors(config, sources, dtype)
    files, texts = canonical_plan(config, outputs, parse_size(max_shard_size))
    total = sum(t.nbytes for t in outputs)
    manifest = {
        "tool": f"paddle_glm4 {__version__} converters.paddle_to_torch.write_published_checkpoint",
        "output": {"layout": "published", "dtype": dtype, "tensors": len(outputs), "bytes": total},
    }
    written = build(dst, Plan(files, config, texts, dict(extra_files or {}), manifest), overwrite, verify, progress)
    return Summary(
        "numpy -> torch",
        "memory",
        dst,
        "paddle",
        source_dtype(s.dtype for s in sources.values()),
        dtype,
        len(outputs),
        total,
        time.perf_counter() - started,
        written,
        verify,
    )


# ---- command line -------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli.add_source_and_destination(
        parser,
        source="the Paddle checkpoint directory (config.json and safetensors, as written by glm4-convert "
        "or save_pretrained)",
        destination="the torch checkpoint directory to create (outside SRC_DIR), in the published GLM-4 layout",
    )
    cli.add_output_options(
        parser,
        max_shard_size=None,
        shard_default=(
            "if SRC_DIR was converted from a published checkpoint, reproduce that checkpoint's files byte for byte; "
            "otherwise 2GB, as the published checkpoint. Giving a size always writes the canonical layout"
        ),
    )


def run(args: argparse.Namespace) -> int:
    summary = export(args.src, args.dst, args.dtype, args.max_shard_size, args.overwrite, args.verify)
    print(summary.report())
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.main(
        argv,
        "python -m converters.paddle_to_torch",
        "Convert a paddle_glm4 checkpoint back into the published GLM-4 torch layout (safetensors).",
        add_arguments,
        run,
    )


if __name__ == "__main__":
    sys.exit(main())
