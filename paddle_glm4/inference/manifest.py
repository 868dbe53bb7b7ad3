"""The export directory's contract: which files it holds, and `export.json`, the manifest that describes them.

`export` writes the manifest last, so a directory without one is an export that did not finish. `Predictor`
reads it before anything else and refuses what it cannot run, with a message that says why.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import paddle

from ..config import DTYPE, SEQ, STORAGE_DTYPES, GLM4Config
from ..output_dir import OutputKind
from ..source_files import check_source_file
from ..validation import Bool, Int, List, Object, SchemaError, Str, read_json, validate

FORMAT = "paddle_glm4.inference"
# Bump when the program's inputs, outputs or meaning change: a predictor only runs its own version.
# 2: programs may call paddle_glm4.kernels' operators ("kernels"); config.quantization. 3: CPU programs attend
# through the kernels' glm4_attention; the KV cache's dtype (kv_cache_dtype)
FORMAT_VERSION = 3
MANIFEST_NAME = "export.json"
# `paddle.jit.save` prefix: PROGRAM.json holds the PIR program, PROGRAM.pdiparams the weights.
PROGRAM = "glm4"
PROGRAM_FILES = (f"{PROGRAM}.json", f"{PROGRAM}.pdiparams")
# Copied from the checkpoint when present, so that an export directory is all that generation needs.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "generation_config.json")


class ExportError(SchemaError):
    """An export request, or an export directory, that cannot be used."""


MANIFEST_SCHEMA = Object(
    {
        "format": Str((FORMAT,)),
        "format_version": Int(),
        "dtype": DTYPE,
        "compute_dtype": Str(STORAGE_DTYPES),
        "device": Str(("cpu", "gpu")),
        "max_seq_len": SEQ,
        "paddle_version": Str(max_len=64),
        "inputs": List(Str(max_len=64), max_len=4 + 2 * 1024),
        "config": Object({}),
        "kernels": Bool(),
        "kv_cache_dtype": Str(STORAGE_DTYPES),
    },
    required=(
        "format",
        "format_version",
        "dtype",
        "compute_dtype",
        "device",
        "max_seq_len",
        "paddle_version",
        "inputs",
        "config",
        "kernels",
        "kv_cache_dtype",
    ),
)


def _export_files(manifest) -> tuple[str, ...] | None:
    """What an export directory holds, if `manifest` is an export's (see output_dir)."""
    if isinstance(manifest, dict) and manifest.get("format") == FORMAT:
        return (*PROGRAM_FILES, *TOKENIZER_FILES)
    return None


EXPORT = OutputKind("an export", MANIFEST_NAME, _export_files)


def input_names(num_layers: int) -> list[str]:
    """The program's inputs, in the order the predictor feeds them (see export.StepProgram)."""
    return (
        ["input_ids", "position_ids", "start", "key_valid"]
        + [f"key_{i}" for i in range(num_layers)]
        + [f"value_{i}" for i in range(num_layers)]
    )


@dataclass
class Manifest:
    config: GLM4Config
    dtype: str  # how the weights are stored in PROGRAM.pdiparams
    compute_dtype: str  # activations
    device: str  # where the program was traced: "gpu" programs hold the fused GPU kernels
    max_seq_len: int  # the longest prompt + generation the export accepts
    paddle_version: str = paddle.__version__
    format_version: int = FORMAT_VERSION
    inputs: list[str] = field(default_factory=list)
    kernels: bool = False  # the program calls paddle_glm4.kernels' operators: load them before the predictor
    kv_cache_dtype: str = "float32"  # the program's cache inputs (the compute dtype, or bfloat16 on CPU)

    def to_json(self) -> str:
        data = {"format": FORMAT, **asdict(self), "config": self.config.to_dict()}
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def read(cls, directory: str) -> Manifest:
        """The manifest of an export directory, after checking that the directory is complete and that this
        version of the project and of Paddle can run it."""
        if not os.path.isdir(directory):
            raise ExportError(f"{directory}: no such export directory")
        path = os.path.join(directory, MANIFEST_NAME)
        if not os.path.exists(path):
            hint = (
                "it holds a checkpoint; export it first with `python -m paddle_glm4.inference export`"
                if os.path.exists(os.path.join(directory, "config.json"))
                else "the export is incomplete (interrupted?) or this is not an export directory"
            )
            raise ExportError(f"{directory}: no {MANIFEST_NAME}; {hint}")
        data = read_json(path, error=ExportError)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ExportError(f"{path}: not a {FORMAT} manifest")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ExportError(
                f"{path}: export format version {version}, but this paddle_glm4 reads version "
                f"{FORMAT_VERSION}; export the checkpoint again with this version"
            )
        validate(data, MANIFEST_SCHEMA, path, ExportError)
        written_by = data["paddle_version"]
        if _major_minor(written_by) > _major_minor(paddle.__version__):
            raise ExportError(
                f"{path}: exported with Paddle {written_by}, newer than this Paddle "
                f"{paddle.__version__}, which may not know its operators; upgrade Paddle or "
                "export again with this one"
            )
        missing = [name for name in PROGRAM_FILES if not os.path.lexists(os.path.join(directory, name))]
        if missing:
            raise ExportError(f"{directory}: {missing[0]} is missing; the export is incomplete")
        for name in PROGRAM_FILES:  # Paddle Inference opens them itself: no link out, no FIFO, before it does
            check_source_file(os.path.join(directory, name), directory)
        config = GLM4Config.from_dict(data["config"], source=f"{path}: config")
        manifest = cls(
            config=config,
            **{
                k: data[k]
                for k in (
                    "dtype",
                    "compute_dtype",
                    "device",
                    "max_seq_len",
                    "paddle_version",
                    "inputs",
                    "kernels",
                    "kv_cache_dtype",
                )
            },
        )
        if manifest.max_seq_len > config.seq_length:
            raise ExportError(
                f"{path}: max_seq_len {manifest.max_seq_len} exceeds the model's context "
                f"(seq_length {config.seq_length})"
            )
        if manifest.inputs != input_names(config.num_hidden_layers):
            raise ExportError(f"{path}: the program's inputs are not the ones this version feeds")
        return manifest


def _major_minor(version: str) -> tuple[int, ...]:
    parts = version.split(".")[:2]
    return tuple(int(p) for p in parts if p.isdigit())
