"""Run by tests/test_tensor_parallel.py under `python -m paddle.distributed.launch --nproc_per_node N`: one rank of
a tensor-parallel model. Loads the checkpoint split N ways, computes what the test asks and writes it to
OUT/rank<r>.npz with its RSS before loading and its peak once loaded. With --degree 1 (no launch needed), the
model in one process, for comparison."""

from __future__ import annotations

import argparse
import os

import numpy as np
import paddle

from paddle_glm4 import GLM4ForCausalLM


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--degree", type=int, required=True)
    parser.add_argument("--inputs", required=True, help="an .npz of ids, batch_ids, batch_mask")
    parser.add_argument("--dtype")
    parser.add_argument("--quantize")
    parser.add_argument("--group-size", type=int)
    parser.add_argument("--activation-dtype", default="auto")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--die-at-step", type=int, help="rank 1 exits abruptly at this decode step")
    parser.add_argument("--hang", action="store_true", help="with --die-at-step: rank 1 stops (SIGSTOP) instead")
    parser.add_argument("--paddlenlp", action="store_true", help="load through PaddleNLP's AutoModelForCausalLM")
    args = parser.parse_args()
    before_rss = _rss_bytes()

    if args.paddlenlp:  # as a PaddleNLP user splits a model: the degree, and the launch's rank
        from paddlenlp.transformers import AutoModelForCausalLM

        from paddle_glm4.integrations.paddlenlp import register_paddlenlp

        register_paddlenlp()
        model = AutoModelForCausalLM.from_pretrained(
            args.model,
            dtype=args.dtype,
            tensor_parallel_degree=args.degree,
            tensor_parallel_rank=int(os.environ["PADDLE_TRAINER_ID"]),
        )
    else:
        model = GLM4ForCausalLM.from_pretrained(
            args.model,
            dtype=args.dtype,
            quantization=args.quantize,
            group_size=args.group_size,
            activation_dtype=args.activation_dtype,
            tensor_parallel_degree=args.degree,
        )
    rank = 0 if model.tensor_parallel is None else model.tensor_parallel.rank
    inputs = np.load(args.inputs, allow_pickle=False)
    if args.die_at_step is not None:
        _die_mid_generation(model, inputs["ids"], args.die_at_step, args.hang)
    with paddle.no_grad():
        logits = model(paddle.to_tensor(inputs["ids"])).logits.numpy()
    alone, _ = model.generate(inputs["ids"], max_new_tokens=args.max_new_tokens)
    batch, _ = model.generate(
        inputs["batch_ids"], attention_mask=inputs["batch_mask"], max_new_tokens=args.max_new_tokens
    )
    # this process's peak once every weight was used (a mapped checkpoint is resident only where read);
    # not ru_maxrss, which counts the memory of the parent this process was forked from
    loaded_rss = _rss_bytes("VmHWM:")
    np.savez(
        f"{args.out}/rank{rank}.npz",
        logits=logits,
        alone=alone.numpy(),
        batch=batch.numpy(),
        before_rss=before_rss,
        loaded_rss=loaded_rss,
        kv_groups=model.model.kv_groups,
    )


def _rss_bytes(field: str = "VmRSS:") -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field))


def _die_mid_generation(model, ids: np.ndarray, step: int, hang: bool) -> None:
    """Rank 1 exits (as if killed), or stops, at decode step `step`; the other ranks must fail, not wait forever."""
    import signal

    from paddle_glm4.streamer import Streamer

    class Killer(Streamer):
        def __init__(self):
            super().__init__()
            self.steps = 0

        def on_tokens(self, token_ids):
            self.steps += 1
            if self.steps == step and model.tensor_parallel.rank == 1:
                if hang:
                    os.kill(os.getpid(), signal.SIGSTOP)
                os._exit(9)

        def on_end(self):
            pass

    model.generate(ids, max_new_tokens=step + 20, streamer=Killer())
    raise SystemExit("the generation ended although a rank died")


if __name__ == "__main__":
    main()
