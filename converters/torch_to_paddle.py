"""Convert a GLM-4 torch checkpoint (safetensors) into a Paddle checkpoint that `GLM4ForCausalLM.from_pretrained`
loads.

    glm4-convert --src glm-4-9b-chat --dst glm-4-9b-chat-paddle
    glm4-convert --src glm-4-9b-chat --paddlenlp-name THUDM/glm-4-9b-chat   # for PaddleNLP's from_pretrained
    glm4-convert --src glm-4-9b-chat --paddleformers-name THUDM/glm-4-9b-chat   # for PaddleFormers' (PF_HOME)
    python -m converters.torch_to_paddle --src SRC --dst DST [--dtype bfloat16] [--max-shard-size 5GB]

The source is the published THUDM layout or transformers' `glm` layout (told apart by the tensor names),
in one file or sharded with an index. Everything about it is checked before a byte is written: the
config, the index against the shards' headers, every name, shape (against config.json) and dtype, and
the derived `inv_freq` (checked, then dropped). `pipeline.build` then streams, verifies and publishes.

For a published source, the manifest also records the source's file layout (each shard's header, the
index, config.json and inv_freq, a few kB), which is what lets `paddle_to_torch` give the checkpoint back
byte for byte.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time

import numpy as np

from paddle_glm4 import __version__
from paddle_glm4.checkpoint import INDEX_FILE, SINGLE_FILE, index_json, parse_size, plan_shards, weight_map
from paddle_glm4.cli_errors import UsageError
from paddle_glm4.config import (
    CONFIG_NAME,
    STORAGE_DTYPES,
    ConfigError,
    GLM4Config,
    Quantization,
)
from paddle_glm4.integrations import paddleformers_home, paddlenlp_home
from paddle_glm4.quantization import add_arguments as add_quantization_arguments
from paddle_glm4.safetensors_file import SafetensorsReader, to_float32
from paddle_glm4.source_files import open_source

from . import cli, mapping, quantized
from .pipeline import (
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

LAYOUT_NAMES = {"published": "published (THUDM 'chatglm')", "hf": "transformers 'glm'"}


@dataclasses.dataclass
class TorchCheckpoint:
    """A validated torch checkpoint directory, its files open for reading."""

    directory: str
    config: GLM4Config
    layout: str
    tensors: dict[str, SourceTensor]  # every tensor but inv_freq, by name
    files: list[SafetensorsReader]
    inv_freq: SourceTensor | None  # published layout only
    index_text: str | None

    @property
    def dtype(self) -> str:
        return source_dtype(t.dtype for t in self.tensors.values())

    def layout_record(self) -> dict:
        """What `paddle_to_torch` needs to write these files again byte for byte."""
        with open_source(os.path.join(self.directory, CONFIG_NAME), mode="r", encoding="utf-8") as f:
            config_text = f.read()
        return {
            "config": config_text,
            "index": self.index_text,
            "files": [
                {"name": os.path.basename(r.path), "size": os.path.getsize(r.path), "header": r.header_text}
                for r in self.files
            ],
            "inv_freq": None if self.inv_freq is None else self.inv_freq.load().tobytes().hex(),
        }


def open_torch_checkpoint(src: str, stack: contextlib.ExitStack) -> TorchCheckpoint:
    """Open and check the checkpoint in `src`: every problem raises an error naming the file and tensor."""
    if not os.path.isdir(src):
        raise ConversionError(f"--src {src}: {'not a directory' if os.path.exists(src) else 'no such directory'}")
    config_path = os.path.join(src, CONFIG_NAME)
    if not os.path.lexists(config_path):
        raise ConversionError(
            f"{config_path}: missing; a checkpoint directory needs the config.json that came with the weights"
        )
    config = GLM4Config.from_file(config_path)
    located = weight_map(src)  # refuses pickle files, names missing shards
    readers = {path: stack.enter_context(SafetensorsReader(path)) for path in dict.fromkeys(located.values())}
    index_path = os.path.join(src, INDEX_FILE)
    sharded = os.path.lexists(index_path)
    for name, path in located.items():
        if name not in readers[path]:
            raise ConversionError(
                f"{index_path}: lists tensor {name!r} in {os.path.basename(path)}, which has no such tensor"
            )
    for path, reader in readers.items():
        for name in reader.names():
            if located.get(name) != path:
                raise ConversionError(f"{path}: tensor {name!r} is not listed for this file in {index_path}")

    try:
        layout = mapping.detect_layout(located)
    except ValueError as err:
        raise ConversionError(f"{src}: {err}") from None
    tensors = {name: SourceTensor.in_file(readers[path], name) for name, path in located.items()}
    inv_freq = tensors.pop(mapping.PUBLISHED_INV_FREQ, None) if layout == "published" else None
    _check_tensors(tensors, config, layout, config_path, index_path if sharded else os.path.join(src, SINGLE_FILE))
    if inv_freq is not None:
        _check_inv_freq(inv_freq, config, config_path)
    index_text = None
    if sharded:
        with open_source(index_path, mode="r", encoding="utf-8") as f:
            index_text = f.read()
    return TorchCheckpoint(src, config, layout, tensors, list(readers.values()), inv_freq, index_text)


def _check_tensors(tensors: dict[str, SourceTensor], config: GLM4Config, layout: str, config_path: str, where: str):
    expected: dict[str, tuple[int, ...]] = {}
    for spec in mapping.tensor_specs(config):
        expected.update(zip(spec.source_names(layout), spec.source_shapes(layout), strict=True))
    model = (
        f"GLM-4 in the {LAYOUT_NAMES[layout]} layout with the geometry of {config_path} "
        f"({config.num_hidden_layers} layers, hidden size {config.hidden_size})"
    )
    for name, tensor in tensors.items():
        path = tensor.where
        if name not in expected:
            raise ConversionError(f"{path}: unexpected tensor {name!r}: not part of {model}")
        if tensor.dtype not in STORAGE_DTYPES:
            raise ConversionError(
                f"{path}: tensor {name!r} has dtype {tensor.dtype}; only "
                f"{', '.join(STORAGE_DTYPES)} weights can be converted"
            )
        if tensor.shape != expected[name]:
            raise ConversionError(
                f"{path}: tensor {name!r} has shape {list(tensor.shape)}, but {config_path} "
                f"implies {list(expected[name])}"
            )
    missing = [name for name in expected if name not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConversionError(f"{where}: missing tensor {missing[0]!r}{more}, which {model} has")
    for spec in mapping.tensor_specs(config):
        parts = [tensors[name] for name in spec.source_names(layout)]
        if len({part.dtype for part in parts}) > 1:
            raise ConversionError(
                f"{parts[0].label}: is {parts[0].dtype} but the tensors it is concatenated "
                f"with are {', '.join(p.dtype for p in parts[1:])}; they must share a dtype"
            )


def _check_inv_freq(tensor: SourceTensor, config: GLM4Config, config_path: str):
    """inv_freq is derived from the config; a mismatch means the config is not this checkpoint's."""
    shape = (config.rotary_dim // 2,)
    if tensor.dtype not in STORAGE_DTYPES or tensor.shape != shape:
        raise ConversionError(
            f"{tensor.label}: is {tensor.dtype} {list(tensor.shape)}, but {config_path} implies "
            f"a float vector of shape {list(shape)}"
        )
    actual = to_float32(tensor.load(), tensor.dtype)
    expected = to_float32(mapping.published_inv_freq(config, tensor.dtype), tensor.dtype)
    if not np.allclose(actual, expected, rtol=2**-7, atol=0):
        raise ConversionError(
            f"{tensor.label}: does not match the rotary embedding of {config_path} "
            f"(got {actual[:3].tolist()}..., expected {expected[:3].tolist()}...)"
        )


def plan_paddle_checkpoint(
    source: TorchCheckpoint, dtype: str, max_shard_size: int, quantization: Quantization | None = None
) -> Plan:
    if quantization is not None:  # the embedding table in the same scheme, unless the lm_head shares it
        quantization = dataclasses.replace(quantization, embedding=not source.config.tie_word_embeddings)
    config = dataclasses.replace(source.config, dtype=dtype, quantization=quantization)
    tensors = [
        tensor
        for spec in mapping.module_order(mapping.tensor_specs(config))
        for tensor in _paddle_tensors(spec, source, dtype, quantization)
    ]
    shards = plan_shards([(t.name, t.nbytes) for t in tensors], max_shard_size)
    by_name = {t.name: t for t in tensors}
    files = [OutputFile(name, [by_name[n] for n in names], {"format": "pd"}) for name, names in shards]
    manifest = {
        "tool": f"paddle_glm4 {__version__} converters.torch_to_paddle",
        "source": {
            "layout": source.layout,
            "dtype": source.dtype,
            "tensors": len(source.tensors),
            "files": [os.path.basename(r.path) for r in source.files],
        },
        "output": {
            "layout": "paddle",
            "dtype": dtype,
            "tensors": len(tensors),
            "bytes": sum(t.nbytes for t in tensors),
            **({} if quantization is None else {"quantization": dataclasses.asdict(quantization)}),
        },
    }
    if source.layout == "published":
        manifest["published_layout"] = source.layout_record()
    texts = {
        CONFIG_NAME: config.to_json_string(),
        INDEX_FILE: index_json(shards, sum(t.nbytes for t in tensors)),
    }  # always indexed, even one file
    return Plan(files, config, texts, copies_from(source.directory), manifest)


def _paddle_tensors(
    spec: mapping.TensorSpec, source: TorchCheckpoint, dtype: str, quantization: Quantization | None
) -> list[OutputTensor]:
    """The Paddle tensor(s) of `spec`: one in `dtype`, or a Linear weight's quantized ones."""
    parts = tuple(source.tensors[name] for name in spec.source_names(source.layout))
    if quantization is not None and mapping.quantized(spec, quantization):
        return quantized.quantized_tensors(spec, parts, quantization)
    return [
        OutputTensor(
            spec.paddle,
            dtype,
            spec.shape,
            parts,
            forth=lambda parts, start, stop, out: mapping.paddle_rows(spec, parts, start, stop, out),
        )
    ]


def convert(
    src: str,
    dst: str,
    dtype: str | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    verify: bool = True,
    progress: bool = True,
    quantize: str | None = None,
    group_size: int | None = None,
) -> Summary:
    """Convert the torch checkpoint in `src` into a new Paddle checkpoint directory `dst`.

    `dtype` None keeps the source's. `quantize` "int8" | "int4" stores the Linear weights quantized (int4:
    one scale per `group_size` input rows, default 128; see paddle_glm4.quantization), and the embedding
    table in the same scheme (unless the lm_head shares it); norms and biases stay in `dtype`. Raises
    ValueError (ConversionError, ConfigError, ...) for bad input and OSError for I/O failures; either way
    `dst` is untouched (or, with `overwrite`, the old one kept).
    """
    started = time.perf_counter()
    if dtype is not None and dtype not in STORAGE_DTYPES:
        raise ConversionError(f"--dtype {dtype}: choose one of {', '.join(STORAGE_DTYPES)}")
    shard_bytes = parse_size(max_shard_size)
    quantization = _quantization(quantize, group_size)
    check_destination(dst, overwrite, src)
    with contextlib.ExitStack() as stack:
        source = open_torch_checkpoint(src, stack)
        dtype = dtype or source.dtype
        if progress:
            quantized = "" if quantization is None else f", Linear weights quantized to {quantization}"
            print(
                f"{src}: {LAYOUT_NAMES[source.layout]} layout, {len(source.tensors)} tensors in "
                f"{len(source.files)} files, {source.dtype}; writing {dtype}{quantized} to {dst}",
                file=sys.stderr,
            )
        plan = plan_paddle_checkpoint(source, dtype, shard_bytes, quantization)
        files = build(dst, plan, overwrite, verify, progress)
    return Summary(
        "torch -> paddle",
        src,
        dst,
        LAYOUT_NAMES[source.layout],
        source.dtype,
        dtype,
        tensors=plan.manifest["output"]["tensors"],
        bytes=plan.manifest["output"]["bytes"],
        seconds=time.perf_counter() - started,
        files=files,
        verified=verify,
        notes=[] if quantization is None else [f"Linear weights quantized: {quantization}"],
    )


def _quantization(scheme: str | None, group_size: int | None) -> Quantization | None:
    if scheme is None:
        if group_size is not None:
            raise ConversionError("--group-size applies to --quantize int4")
        return None
    try:
        return Quantization.of(scheme, group_size)
    except ConfigError as err:
        raise ConversionError(f"--quantize {scheme}: {err}") from None


# ---- command line -------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    # --dst, --paddlenlp-name or --paddleformers-name: destination() checks that exactly one is given, rather than
    # argparse, so that a mistake there is one `error:` line like any other bad input
    cli.add_source_and_destination(
        parser,
        source="the torch checkpoint directory: config.json plus model.safetensors, or shards with "
        "model.safetensors.index.json. The published THUDM layout and transformers' 'glm' layout "
        "are both detected automatically",
        destination="the Paddle checkpoint directory to create (outside SRC_DIR); give this, --paddlenlp-name or "
        "--paddleformers-name",
        dst_required=False,
    )
    parser.add_argument(
        "--paddlenlp-name",
        metavar="NAME",
        help="instead of --dst: write the checkpoint where PaddleNLP looks for the model NAME "
        "(e.g. THUDM/glm-4-9b-chat), $PPNLP_HOME/models/NAME (PPNLP_HOME defaults to "
        "~/.paddlenlp), so that after `import paddle_glm4` PaddleNLP's "
        "AutoModelForCausalLM.from_pretrained(NAME) and AutoTokenizer.from_pretrained(NAME) "
        "load it. PaddleNLP need not be installed to convert.",
    )
    parser.add_argument(
        "--paddleformers-name",
        metavar="NAME",
        help="instead of --dst: write the checkpoint where PaddleFormers looks for the model NAME, "
        "$PF_HOME/NAME (PF_HOME defaults to ~/.paddleformers; PaddleFormers 1.2 reads a name "
        "from there while the PF_HOME environment variable is set), so that after "
        "`import paddle_glm4` PaddleFormers' AutoModelForCausalLM.from_pretrained(NAME) loads "
        "it. PaddleFormers need not be installed to convert.",
    )
    cli.add_output_options(parser, max_shard_size="5GB")
    add_quantization_arguments(parser, "store", activations=False)


def destination(args: argparse.Namespace) -> str:
    """The directory to create: --dst, or where PaddleNLP looks for --paddlenlp-name, or PaddleFormers for
    --paddleformers-name."""
    given = [
        flag
        for flag, value in (
            ("--dst", args.dst),
            ("--paddlenlp-name", args.paddlenlp_name),
            ("--paddleformers-name", args.paddleformers_name),
        )
        if value is not None
    ]
    if not given:
        raise UsageError(
            "say where to write the checkpoint: --dst DST_DIR or --paddlenlp-name NAME or --paddleformers-name NAME"
        )
    if len(given) > 1:
        raise UsageError(f"{' and '.join(given)} all say where to write the checkpoint; give only one")
    if args.paddlenlp_name is not None:
        return paddlenlp_home.cache_dir(args.paddlenlp_name)
    if args.paddleformers_name is not None:
        return paddleformers_home.cache_dir(args.paddleformers_name)
    return args.dst


def run(args: argparse.Namespace) -> int:
    summary = convert(
        args.src,
        destination(args),
        args.dtype,
        args.max_shard_size,
        args.overwrite,
        args.verify,
        quantize=args.quantize,
        group_size=args.group_size,
    )
    if args.paddlenlp_name is not None:
        summary.notes.append(
            f"PaddleNLP: AutoModelForCausalLM.from_pretrained({args.paddlenlp_name!r}) loads it "
            "once paddle_glm4 is imported"
        )
    if args.paddleformers_name is not None:
        summary.notes.append(
            f"PaddleFormers: AutoModelForCausalLM.from_pretrained({args.paddleformers_name!r}) "
            f"loads it once paddle_glm4 is imported, with PF_HOME={paddleformers_home.model_home()}"
        )
    print(summary.report())
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.main(
        argv,
        "glm4-convert",
        "Convert a GLM-4 torch checkpoint (safetensors, published or transformers "
        "layout) into a Paddle checkpoint for paddle_glm4.",
        add_arguments,
        run,
    )


if __name__ == "__main__":
    sys.exit(main())
