"""`glm4 finetune --trainer paddlenlp|paddleformers`: the training loop of PaddleNLP's or PaddleFormers' `Trainer`
instead of finetune.train's, on the same model (LoRA already added), data and settings.

PaddleFormers carried PaddleNLP's Trainer forward with the same public API, so one function drives either:
`TrainingArguments` (a constant learning rate, AdamW, gradient clipping, the seed, a loss logged every step),
`Trainer(criterion=...)`, the documented hook for a model whose output is not a tuple or dict: the Trainer takes
the labels out of the batch and hands them with the model's output to the criterion, which is this project's
causal_lm_loss (the loss `model(..., labels=...)` computes). A TrainerCallback records each logged loss. The
Trainer's own output directory is a temporary one: checkpoints are not saved mid-run (save_strategy "no"); the
merged model is written by `glm4 finetune` as with the built-in loop.
"""

from __future__ import annotations

import importlib
import tempfile
from typing import TYPE_CHECKING, Any

import paddle

from ..cli_errors import UsageError
from ..model import causal_lm_loss

if TYPE_CHECKING:
    from ..finetune import Example, TrainSettings
    from ..model import GLM4ForCausalLM

# --trainer choice -> (the package to install, the module with Trainer, TrainingArguments and TrainerCallback,
# the adapter module whose model class the Trainer gets: PaddleFormers' asks the model things PaddleNLP's does not)
TRAINERS = {
    "paddlenlp": ("paddlenlp", "paddlenlp.trainer", "paddle_glm4.integrations.paddlenlp", "PaddleNLPGLM4ForCausalLM"),
    "paddleformers": (
        "paddleformers",
        "paddleformers.trainer",
        "paddle_glm4.integrations.paddleformers",
        "PaddleFormersGLM4ForCausalLM",
    ),
}


def trainer_module(library: str) -> Any:
    """The library's trainer module, or a UsageError saying how to install it (checked before any loading)."""
    package, module, _, _ = TRAINERS[library]
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise UsageError(
            f"--trainer {library}: {package} cannot be imported here ({err}); install it with "
            f"pip install 'paddle-glm4[{package}]' in an environment of its own, or use --trainer builtin"
        ) from None


def model_class(library: str) -> type[GLM4ForCausalLM]:
    """The GLM4ForCausalLM subclass that `library`'s Trainer trains (its Auto classes return the same)."""
    _, _, adapter, name = TRAINERS[library]
    return getattr(importlib.import_module(adapter), name)


def train_with_trainer(
    library: str, model: GLM4ForCausalLM, examples: list[Example], settings: TrainSettings, progress: bool = True
) -> list[float]:
    """Train the parameters of `model` that are not frozen with `library`'s Trainer; returns every step's loss."""
    from ..finetune import pad_batch

    trainer = trainer_module(library)
    pad_id = model.config.pad_token_id
    losses: list[float] = []

    callback: Any = trainer.TrainerCallback  # the library's, imported by name

    class RecordLosses(callback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    def collate(chosen: list[Example]) -> dict[str, paddle.Tensor]:
        ids, mask, labels = pad_batch(chosen, pad_id)
        return {
            "input_ids": paddle.to_tensor(ids),
            "attention_mask": paddle.to_tensor(mask),
            "labels": paddle.to_tensor(labels),
        }

    def criterion(outputs, labels: paddle.Tensor) -> paddle.Tensor:
        return causal_lm_loss(outputs.logits, labels)

    with tempfile.TemporaryDirectory(prefix="glm4-finetune-") as scratch:
        arguments = trainer.TrainingArguments(
            output_dir=scratch,
            max_steps=settings.total_steps(len(examples)),
            per_device_train_batch_size=settings.batch_size,
            learning_rate=settings.lr,
            lr_scheduler_type="constant",
            weight_decay=0.01,  # paddle.optimizer.AdamW's default, as the built-in loop uses it
            max_grad_norm=settings.max_grad_norm,
            seed=settings.seed,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            disable_tqdm=not progress,
            remove_unused_columns=False,  # the examples are not a datasets.Dataset: the collator builds the batch
            dataloader_num_workers=0,
            amp_master_grad=False,  # float32 training (PaddleFormers' default, True, is for its fp16/bf16 AMP)
        )
        trainer.Trainer(
            model=model,
            args=arguments,
            train_dataset=examples,
            data_collator=collate,
            criterion=criterion,
            callbacks=[RecordLosses()],
        ).train()
    model.eval()
    return losses
