"""Checkpoints in and out of the network: `from_pretrained` and `save_pretrained` (GLM4ForCausalLM's methods
of those names call these). The files themselves, and their checks, are checkpoint.py's; which tensors a model
of a config has is the weight table's (converters/mapping.py), the same one the converter reads.
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

from . import checkpoint
from .config import CONFIG_NAME, GLM4Config
from .device import compute_dtype, on_gpu, use_all_cores
from .generation import GENERATION_CONFIG_NAME, GenerationConfig
from .safetensors_file import cast

if TYPE_CHECKING:
    from .model import GLM4ForCausalLM

Model = TypeVar("Model", bound="GLM4ForCausalLM")


def from_pretrained(cls: type[Model], path: str, dtype: str | None = None, fused: bool | None = None,
                    storage_only: bool = False) -> Model:
    """Load a converted checkpoint directory (safetensors only) as a `cls` (GLM4ForCausalLM or a subclass);
    see GLM4ForCausalLM.from_pretrained. Parameters are created empty and filled one tensor at a time."""
    if not os.path.isdir(path):
        raise checkpoint.CheckpointError(f"{path}: not a directory")
    if not os.path.exists(os.path.join(path, CONFIG_NAME)):
        raise checkpoint.CheckpointError(
            f"{path}: no {CONFIG_NAME}; is this a checkpoint converted with glm4-convert?")
    config = GLM4Config.from_pretrained(path)
    # the headers against the config before anything is built for it: a config whose sizes are not the
    # checkpoint's is refused here
    locations = checkpoint.inspect(path, mapping.paddle_shapes(config))
    dtype = (dtype or config.dtype) if storage_only else compute_dtype(dtype, config.dtype)
    use_all_cores()
    with paddle.LazyGuard(), _default_dtype(dtype):
        model = cls(config, fused)
    params = model.state_dict()
    for name, array in checkpoint.read_tensors(locations, dtype, progress=f"loading {os.path.basename(path)}"):
        _fill(params[name], array, dtype)
    model.generation_config = GenerationConfig.from_model(config, path)
    model.eval()
    return model


def save_pretrained(model: GLM4ForCausalLM, directory: str, max_shard_size: int | str = "5GB",
                    dtype: str | None = None, overwrite: bool = False) -> list[str]:
    """Write `model`'s config.json, generation_config.json and safetensors weights; see
    GLM4ForCausalLM.save_pretrained. Returns the names of the files written."""
    existing = checkpoint.existing_weight_files(directory)
    if os.path.exists(os.path.join(directory, CONFIG_NAME)):
        existing.append(CONFIG_NAME)
    if existing and not overwrite:
        raise FileExistsError(f"{directory} already holds a checkpoint ({existing[0]}); pass overwrite=True")
    current = model.dtype
    store = dtype or current
    state = model.state_dict()
    entries = [(name, store, tuple(t.shape)) for name, t in state.items()]
    tensors = ((name, cast(t.numpy(), current, store)) for name, t in state.items())
    files = checkpoint.write_checkpoint(directory, entries, tensors, max_shard_size, metadata={"format": "pd"})
    dataclasses.replace(model.config, dtype=store).save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
    return [*files, CONFIG_NAME, GENERATION_CONFIG_NAME]


@contextlib.contextmanager
def _default_dtype(dtype: str) -> Iterator[None]:
    previous = paddle.get_default_dtype()
    paddle.set_default_dtype(dtype)
    try:
        yield
    finally:
        paddle.set_default_dtype(previous)


def _fill(param: paddle.Tensor, array: np.ndarray, dtype: str) -> None:
    """Give the parameter the loaded array's data. On CPU the parameter takes over the array's memory
    (DLPack, then sharing the buffer): no copy, so loading peaks at the model plus one tensor and leaves
    nothing behind in Paddle's allocator (set_value's copy left ~2x the largest tensor cached there)."""
    if dtype == "bfloat16":  # bf16 travels as its raw bits, uint16; Paddle reinterprets int16, not uint16
        array = array.view(np.int16)
    tensor = paddle.utils.dlpack.from_dlpack(array)  # zero-copy; the DLPack capsule keeps `array` alive
    if dtype == "bfloat16":
        tensor = tensor.view(paddle.bfloat16)
    if on_gpu():
        param.set_value(tensor)  # host to device: a copy anyway
    else:  # (not param.place: asking a lazy parameter for it initializes it, random values and all)
        tensor._share_buffer_to(param)
