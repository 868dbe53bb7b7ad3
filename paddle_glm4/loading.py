"""Checkpoints in and out of the network: `from_pretrained` and `save_pretrained` (GLM4ForCausalLM's methods
of those names call these). The files themselves, and their checks, are checkpoint.py's; which tensors a model
of a config has is the weight table's (converters/mapping.py); the Linear weight formats and the conversions
between them are quantization.py's.

Loading, in order: choose the Linear weight format (quantization.choose_format), refuse up front what cannot
fit in memory (memory.py), create the parameters empty, check every header, then fill the parameters a
tensor at a time. A Linear whose checkpoint tensors are already in the held format takes them without a copy
(memory-mapped); otherwise they are converted a block of rows at a time (bf16 transposed to the kernels'
layout, or quantized), so peak memory is the model plus one block. Last, the weights copied in are moved into
2 MB pages, which a decode step streams faster (huge_pages.py), and, on CPU, the C library is told to keep the
large blocks freed from then on for reuse (device.reuse_freed_memory).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import paddle

from converters import mapping

from . import checkpoint, huge_pages, memory
from .config import CONFIG_NAME, GLM4Config
from .device import on_gpu, reuse_freed_memory, use_all_cores
from .generation import GENERATION_CONFIG_NAME, GenerationConfig
from .linear import Linear, load_weight
from .quantization import (
    Dense,
    Packed,
    Rows,
    WeightFormat,
    WeightOnlyGPU,
    choose_format,
    convert,
    same_layout,
    stored_embedding_format,
    stored_format,
)
from .safetensors_file import StoredTensor

if TYPE_CHECKING:
    from . import tensor_parallel
    from .model import GLM4ForCausalLM

Model = TypeVar("Model", bound="GLM4ForCausalLM")
TABLE = "model.embed_tokens"  # the token embedding's parameters: TABLE.weight, or TABLE.qweight and TABLE.scales


def from_pretrained(
    cls: type[Model],
    path: str,
    dtype: str | None = None,
    fused: bool | None = None,
    storage_only: bool = False,
    quantization: str | None = None,
    group_size: int | None = None,
    activation_dtype: str = "auto",
    max_seq_len: int | None = None,
    check_memory: bool = True,
    tensor_parallel_degree: int = 1,
) -> Model:
    """Load a converted checkpoint directory (safetensors only) as a `cls` (GLM4ForCausalLM or a subclass);
    see GLM4ForCausalLM.from_pretrained. With `tensor_parallel_degree` > 1, this rank's slices only
    (tensor_parallel.py); the degree is checked against the model and the launch before anything is read."""
    if not os.path.isdir(path):
        raise checkpoint.CheckpointError(f"{path}: not a directory")
    if not os.path.exists(os.path.join(path, CONFIG_NAME)):
        raise checkpoint.CheckpointError(f"{path}: no {CONFIG_NAME}; is this a checkpoint converted with glm4-convert?")
    checkpoint.require_converted(path)
    config = GLM4Config.from_pretrained(path)
    # the headers against the config before anything is built for it: a config whose sizes are not the
    # checkpoint's is refused here
    expected = mapping.checkpoint_tensors(config)
    fixed = {name: dtype for name, (_, dtype) in expected.items() if dtype is not None}  # quantized tensors
    locations = checkpoint.inspect(path, {name: shape for name, (shape, _) in expected.items()}, fixed)
    gpu = on_gpu()
    fused = gpu if fused is None else fused
    if storage_only:  # for exporting: held as asked (or stored), whatever this device computes in
        fmt: WeightFormat = Dense(dtype or config.dtype, fused=fused)
    else:
        fmt = choose_format(
            config.dtype, config.quantization, dtype, quantization, group_size, activation_dtype, gpu, fused
        )
    layout = None
    if tensor_parallel_degree != 1:  # checked (and the process group joined) before anything is read
        from . import tensor_parallel

        layout = tensor_parallel.prepare(config, fmt, tensor_parallel_degree, storage_only)
    if check_memory and not gpu:
        memory.check_fits(config, fmt, memory.context_for(config, max_seq_len), name=os.path.basename(path))
    use_all_cores(None if layout is None else tensor_parallel.cores_per_rank())
    with paddle.LazyGuard(), _default_dtype(fmt.bias_dtype):  # norms and biases; Linear weights as `fmt` says
        model = cls(config, fused, fmt)
        if layout is not None:
            tensor_parallel.shard(model, layout)
    _load_state(model, path, config, locations, None if layout is None else tensor_parallel.Shard(layout))
    if layout is not None:
        tensor_parallel.wait_for_all(layout.degree)
    model.generation_config = GenerationConfig.from_model(config, path)
    model.eval()
    if not gpu:
        reuse_freed_memory()
    return model


def _load_state(
    model: GLM4ForCausalLM,
    path: str,
    config: GLM4Config,
    locations: dict[str, checkpoint.TensorLocation],
    shard: tensor_parallel.Shard | None = None,
):
    """Fill every parameter of `model` from the checkpoint's tensors (as the weight table names them),
    converting Linear weights to the model's format. With a tensor-parallel `shard`, each tensor's slice that
    this rank holds (read as stored, then converted: a slice, never the whole tensor)."""
    params = model.state_dict()
    stored = stored_format(config.dtype, config.quantization)
    # the weights converted on their way in (held format, K, N): every Linear, and the embedding table when
    # it is stored or held quantized (else it is a plain tensor, cast if need be)
    converted = {
        prefix: (layer.format, layer.in_features, layer.out_features) for prefix, layer in _linears(model).items()
    }
    table = model.model.embed_tokens
    dense_table = locations.get(f"{TABLE}.weight")
    stored_table = stored_embedding_format(dense_table.dtype if dense_table else config.dtype, config.quantization)
    if isinstance(stored_table, Packed) or isinstance(table.format, Packed):
        converted[TABLE] = (table.format, table.hidden_size, table.vocab_size)
    layer_of = {
        name: name.rsplit(".", 1)[0]
        for name in locations
        if name.rsplit(".", 1)[0] in converted and not name.endswith(".bias")
    }
    wanted = {name: None if name in layer_of else _dtype_name(params[name].dtype) for name in locations}
    if shard is not None:
        wanted = {name: None if shard.splits_tensor(name) else dtype for name, dtype in wanted.items()}

    def source_of(name: str) -> WeightFormat:
        if layer_of.get(name) == TABLE:
            return stored_table
        return stored if config.quantization is not None else Dense(locations[name].dtype)

    # a dense weight converted on its way in is read from the file a block at a time, not mapped: mapped, the
    # page cache would make the whole source resident beside its converted copy (see StoredTensor)
    unread = frozenset(
        name
        for name, prefix in layer_of.items()
        if isinstance(source_of(name), (Dense, Rows))
        and not same_layout(source_of(name), *converted[prefix])
        and not (shard is not None and shard.splits_tensor(name))
    )
    pending: dict[str, dict[str, np.ndarray | StoredTensor]] = {}
    copies: list[huge_pages.Buffer] = []  # the arrays made here that the parameters took over
    for name, array in checkpoint.read_tensors(
        locations, wanted, progress=f"loading {os.path.basename(path)}", unread=unread
    ):
        source = source_of(name)
        if shard is not None and shard.splits_tensor(name):
            assert isinstance(array, np.ndarray)  # mapped: a split tensor is not in `unread`
            array = shard.take(name, array, source)
            if name not in layer_of:  # read as stored: cast only the slice
                array = _cast(array, locations[name].dtype, _dtype_name(params[name].dtype))
        if name not in layer_of:
            copies += _fill(params[name], array)
            continue
        prefix = layer_of[name]
        target, k, n = converted[prefix]
        arrays = pending.setdefault(prefix, {})
        arrays[name.rsplit(".", 1)[1]] = array
        if len(arrays) == len(source.slots(k, n)):  # the weight's last tensor
            for slot, value in load_weight(source, pending.pop(prefix), target, k, n).items():
                copies += _fill(params[f"{prefix}.{slot}"], value)
    huge_pages.settle(copies, sources={location.path for location in locations.values()})


def save_pretrained(
    model: GLM4ForCausalLM,
    directory: str,
    max_shard_size: int | str = "5GB",
    dtype: str | None = None,
    overwrite: bool = False,
) -> list[str]:
    """Write `model`'s config.json, generation_config.json and safetensors weights; see
    GLM4ForCausalLM.save_pretrained. Returns the names of the files written. A quantized model writes a
    quantized checkpoint (its Linear weights and a quantized embedding table as they are, everything else
    in `dtype`)."""
    existing = checkpoint.existing_weight_files(directory)
    if os.path.exists(os.path.join(directory, CONFIG_NAME)):
        existing.append(CONFIG_NAME)
    if existing and not overwrite:
        raise FileExistsError(f"{directory} already holds a checkpoint ({existing[0]}); pass overwrite=True")
    held = model.model.kernels.weights
    if isinstance(held, WeightOnlyGPU):
        raise ValueError(
            "a model quantized on the GPU holds weight_quantize's device layout, which is not saved; "
            "quantize the checkpoint with glm4-convert --quantize instead"
        )
    quantization = model.quantization
    table = model.model.embed_tokens
    quantized_table = {f"{TABLE}.{slot.name}": slot for slot in table.slots} if isinstance(table.format, Packed) else {}
    store = dtype or model.dtype
    target = stored_format(store, quantization)
    state = model.state_dict()
    linears = _linears(model)
    layer_of = {f"{prefix}.{slot.name}": prefix for prefix, layer in linears.items() for slot in layer.slots}
    entries = []  # (name, dtype, shape) of every tensor written, in order; a Linear's where its first one was
    for name, tensor in state.items():
        prefix = layer_of.get(name)
        if name in quantized_table:
            entries.append((name, quantized_table[name].dtype, quantized_table[name].shape))
        elif prefix is None:
            entries.append((name, store, tuple(tensor.shape)))
        elif name == f"{prefix}.{linears[prefix].slots[0].name}":
            layer = linears[prefix]
            entries += [
                (f"{prefix}.{slot.name}", slot.dtype, slot.shape)
                for slot in target.slots(layer.in_features, layer.out_features)
            ]

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        for name, _, _ in entries:
            prefix, slot = name.rsplit(".", 1)
            if prefix in linears and slot != "bias":  # a Linear's weight, in the stored format
                yield name, _stored_arrays(linears[prefix], target)[slot]
            elif name in quantized_table:
                yield name, _numpy(state[name])
            else:
                yield name, _cast(_numpy(state[name]), _dtype_name(state[name].dtype), store)

    files = checkpoint.write_checkpoint(directory, entries, tensors(), max_shard_size, metadata={"format": "pd"})
    dataclasses.replace(model.config, dtype=store, quantization=quantization).save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
    return [*files, CONFIG_NAME, GENERATION_CONFIG_NAME]


def _stored_arrays(layer: Linear, target: WeightFormat) -> dict[str, np.ndarray]:
    held = {slot.name: _numpy(getattr(layer, slot.name)) for slot in layer.slots}
    return convert(layer.format, held, target, layer.in_features, layer.out_features)


def _linears(model) -> dict[str, Linear]:
    return {name: layer for name, layer in model.named_sublayers() if isinstance(layer, Linear)}


def _dtype_name(dtype) -> str:
    return str(dtype).replace("paddle.", "")


def _numpy(tensor: paddle.Tensor) -> np.ndarray:
    """A parameter's values as numpy (bf16 as its uint16 bits)."""
    if tensor.dtype == paddle.bfloat16:
        return tensor.view(paddle.int16).numpy().view(np.uint16)
    return tensor.numpy()


def _cast(array: np.ndarray, current: str, store: str) -> np.ndarray:
    from .safetensors_file import cast

    return cast(array, current, store)


@contextlib.contextmanager
def _default_dtype(dtype: str) -> Iterator[None]:
    previous = paddle.get_default_dtype()
    paddle.set_default_dtype(dtype)
    try:
        yield
    finally:
        paddle.set_default_dtype(previous)


def _fill(param: paddle.Tensor, value) -> list[huge_pages.Buffer]:
    """Give the parameter the loaded array's data. On CPU the parameter takes over the array's memory
    (DLPack, then sharing the buffer): no copy, so loading peaks at the model plus one tensor and leaves
    nothing behind in Paddle's allocator (set_value's copy left ~2x the largest tensor cached there).
    A Paddle tensor (made on the device, see linear.load_weight) is taken as it is.
    Returns the memory the parameter took over when it is an array made here (not mapped from a file)."""
    if isinstance(value, np.ndarray):
        bf16 = value.dtype == np.uint16  # bf16 travels as its raw bits; Paddle reinterprets int16, not uint16
        tensor = paddle.utils.dlpack.from_dlpack(value.view(np.int16) if bf16 else value)  # zero-copy
        if bf16:
            tensor = tensor.view(paddle.bfloat16)
        if on_gpu():
            param.set_value(tensor)  # host to device: a copy anyway
            return []
    else:
        tensor = value
    # (not param.place: asking a lazy parameter for it initializes it, random values and all)
    tensor._share_buffer_to(param)
    owned = isinstance(value, np.ndarray) and value.flags.owndata
    return [(value.ctypes.data, value.nbytes)] if owned else []
