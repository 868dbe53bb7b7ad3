"""LoRA (low-rank adaptation): train a small update A @ B beside each chosen Linear, the model frozen.

    model = GLM4ForCausalLM.from_pretrained(directory, dtype="float32")
    add_lora(model, LoRASettings(rank=8, alpha=16))   # only the A, B matrices train now
    ...train...
    merge_lora(model)                                  # W += scale * A @ B; an ordinary GLM4ForCausalLM again
    model.save_pretrained(out)                         # converters.paddle_to_torch makes it a torch checkpoint

Each target Linear y = x @ W becomes y = x @ W + scale * dropout(x) @ A @ B, A [K, r], B [r, N],
scale = alpha / r. B starts at zero, so the wrapped model computes exactly what the base model does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import paddle
import paddle.nn.functional as F
from paddle import nn

from .config import TARGET_MODULES
from .linear import Linear
from .quantization import Dense

__all__ = ["TARGET_MODULES", "LoRALinear", "LoRASettings", "TrainingError", "add_lora", "merge_lora"]


class TrainingError(ValueError):
    """A model that cannot be trained as asked (its weights' format, the settings)."""


@dataclass(frozen=True)
class LoRASettings:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGET_MODULES

    def __post_init__(self):
        if self.rank < 1:
            raise TrainingError(f"LoRA rank {self.rank}: must be at least 1")
        if not 0.0 <= self.dropout < 1.0:
            raise TrainingError(f"LoRA dropout {self.dropout}: must be in [0, 1)")
        unknown = sorted(set(self.targets) - set(TARGET_MODULES))
        if unknown or not self.targets:
            raise TrainingError(
                f"LoRA targets {', '.join(unknown) or '(none)'}: choose from {', '.join(TARGET_MODULES)}"
            )


class LoRALinear(nn.Layer):
    """A frozen Linear plus its trainable low-rank update."""

    def __init__(self, base: Linear, settings: LoRASettings):
        super().__init__()
        self.base = base
        self.scale = settings.alpha / settings.rank
        self.dropout = settings.dropout
        # A as a Linear's default (Kaiming-uniform) init, B zero: training starts from the base model
        bound = 1.0 / math.sqrt(base.in_features)
        self.lora_A = self.create_parameter(
            [base.in_features, settings.rank],
            dtype="float32",
            default_initializer=nn.initializer.Uniform(-bound, bound),
        )
        self.lora_B = self.create_parameter(
            [settings.rank, base.out_features], dtype="float32", default_initializer=nn.initializer.Constant(0.0)
        )

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        update = F.dropout(x, self.dropout, training=self.training) if self.dropout else x
        return self.base(x) + paddle.matmul(paddle.matmul(update, self.lora_A), self.lora_B) * self.scale

    def merged(self) -> Linear:
        """The base Linear with the update added into its weight."""
        with paddle.no_grad():
            self.base.weight.set_value(self.base.weight + paddle.matmul(self.lora_A, self.lora_B) * self.scale)
        return self.base


def require_float32(model: nn.Layer) -> None:
    """Training computes gradients through the Linear weights' own math: only dense float32 weights have it."""
    weights = model.model.kernels.weights
    if not (isinstance(weights, Dense) and weights.dtype == "float32"):
        held = getattr(weights, "kind", None) or getattr(weights, "dtype", None) or type(weights).__name__
        raise TrainingError(
            f"training needs float32 weights, but this model holds its Linear weights as {held}; "
            f"load it with from_pretrained(..., dtype='float32') (GLM-4-9B: 37.6 GB)"
        )


def _targets(model: nn.Layer, cls: type, names: tuple[str, ...]):
    """(parent layer, attribute name) of every sublayer of type `cls` whose attribute name is in `names`."""
    for _, parent in model.named_sublayers(include_self=True):
        for name, child in parent.named_children():
            if name in names and isinstance(child, cls):
                yield parent, name


def add_lora(model: nn.Layer, settings: LoRASettings) -> list[str]:
    """Wrap the target Linear layers of `model` (a GLM4ForCausalLM) in LoRALinear and freeze every other
    parameter. Returns the names of the trainable parameters."""
    require_float32(model)
    for param in model.parameters():
        param.stop_gradient = True
    wrapped = list(_targets(model, Linear, settings.targets))
    for parent, name in wrapped:
        setattr(parent, name, LoRALinear(getattr(parent, name), settings))
    return [name for name, param in model.named_parameters() if not param.stop_gradient]


def merge_lora(model: nn.Layer) -> nn.Layer:
    """Add every LoRA update into its base weight and unwrap it: the model is an ordinary one again, with the
    state_dict names (and so the checkpoint) of the base model."""
    for parent, name in list(_targets(model, LoRALinear, TARGET_MODULES)):
        setattr(parent, name, getattr(parent, name).merged())
    for param in model.parameters():
        param.stop_gradient = False
    return model
