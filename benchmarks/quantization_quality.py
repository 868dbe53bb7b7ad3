"""How much bf16 / int8 / int4 weights change GLM-4's outputs: logits error, KL divergence and top-1
agreement against the float32 model of the same weights.

    python -m benchmarks.quantization_quality [--quick]

The real GLM-4-9B weights cannot be downloaded here, so two kinds of random weights stand in for them, on a
GLM-4-shaped model (GQA with 2 KV groups, half-rotary RoPE, FFN ~3.3x hidden, biased QKV):
- "gaussian": every weight iid normal. Every row and group has the same spread: the easy case for
  per-channel / per-group scales.
- "outliers": what trained LLM weights look like where quantization hurts: heavy-tailed values (Student-t,
  4 degrees of freedom), 1% of the input channels of every matrix 4-12x larger than the rest (they set
  their row's int8 scale and their group's int4 scale, flattening everything else there to few levels),
  and norm weights with a few 5-15x channels (activation outliers, which matter to int8 activations).
Each model is saved as a float32 checkpoint and loaded back through from_pretrained, quantized at load: the
code path users run. The figures are over every position of a batch of random prompts. They say how the
formats compare and how the outlier structure hurts; they are not the real model's perplexity.
Writes benchmarks/quantization_quality.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "quantization_quality.json")
# (label, from_pretrained keywords)
FORMATS = [
    ("bf16", {"dtype": "bfloat16"}),
    ("int8", {"quantization": "int8"}),
    ("int4 g128", {"quantization": "int4", "group_size": 128}),
    ("int4 g64", {"quantization": "int4", "group_size": 64}),
]
ACTIVATIONS = ("float32", "bfloat16", "int8")


def model_config(quick: bool):
    from paddle_glm4 import GLM4Config

    if quick:
        return GLM4Config(
            vocab_size=2048,
            hidden_size=256,
            intermediate_size=856,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
            seq_length=512,
            pad_token_id=0,
            eos_token_id=[1],
            dtype="float32",
        )
    return GLM4Config(
        vocab_size=16384,
        hidden_size=1024,
        intermediate_size=3424,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=128,
        seq_length=1024,
        pad_token_id=0,
        eos_token_id=[1],
        dtype="float32",
    )


def random_state(config, kind: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Paddle-layout float32 weights of `kind` ("gaussian" or "outliers") for every tensor of `config`."""
    from converters import mapping

    rng = np.random.default_rng(seed)
    state = {}
    for spec in mapping.tensor_specs(config):
        shape = spec.shape
        if spec.paddle.endswith("norm.weight"):
            values = rng.normal(1.0, 0.1, shape)
            if kind == "outliers":  # a few hidden channels the norm amplifies: activation outliers
                channels = rng.choice(shape[0], max(1, shape[0] // 128), replace=False)
                values[channels] *= rng.uniform(5, 15, len(channels))
        elif spec.paddle.endswith(".bias"):
            values = rng.normal(0.0, 0.1, shape)
        else:
            fan_in = shape[0]  # Paddle layout [in, out]; the embedding [vocab, H] is looked up, not multiplied
            std = 1.0 / np.sqrt(fan_in) if spec.linear else 1.0
            if kind == "gaussian":
                values = rng.normal(0.0, std, shape)
            else:
                values = rng.standard_t(4, shape) * std / np.sqrt(2.0)  # t(4) has variance 2
                if spec.linear:  # a few input channels (rows of [in, out]) much larger than the rest
                    channels = rng.choice(shape[0], max(1, shape[0] // 100), replace=False)
                    values[channels] *= rng.uniform(4, 12, (len(channels), 1))
        state[spec.paddle] = values.astype(np.float32)
    return state


def compare(reference: np.ndarray, logits: np.ndarray) -> dict:
    """Figures of `logits` against `reference` (both [positions, vocab])."""

    def log_softmax(x):
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))

    p_log, q_log = log_softmax(reference.astype(np.float64)), log_softmax(logits.astype(np.float64))
    kl = float((np.exp(p_log) * (p_log - q_log)).sum(axis=-1).mean())
    scale = float(np.abs(reference).max())
    return {
        "max_abs_error_rel": float(np.abs(logits - reference).max()) / scale,
        "mean_abs_error_rel": float(np.abs(logits - reference).mean()) / scale,
        "kl_divergence": kl,
        "top1_agreement": float((logits.argmax(-1) == reference.argmax(-1)).mean()),
    }


def run(quick: bool = False) -> list[dict]:
    import paddle

    from paddle_glm4 import GLM4ForCausalLM, kernels
    from paddle_glm4.quantization import Dense

    config = model_config(quick)
    rng = np.random.default_rng(1)
    batch, length = (2, 32) if quick else (4, 128)
    ids = paddle.to_tensor(rng.integers(2, config.vocab_size, (batch, length)).astype("int64"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("gaussian", "outliers"):
            directory = os.path.join(tmp, kind)
            _save(config, random_state(config, kind), directory)
            reference = GLM4ForCausalLM.from_pretrained(directory, dtype="float32")
            assert isinstance(reference.lm_head.format, Dense)
            expected = reference(ids).logits.numpy().reshape(-1, config.vocab_size)
            del reference
            for label, kwargs in FORMATS:
                for activation in ACTIVATIONS:
                    if activation == "int8" and label == "bf16":
                        continue  # integer dot products need integer weights
                    model = GLM4ForCausalLM.from_pretrained(directory, activation_dtype=activation, **kwargs)
                    logits = model(ids).logits.numpy().reshape(-1, config.vocab_size)
                    rows.append(
                        {"weights": kind, "format": label, "activations": activation, **compare(expected, logits)}
                    )
                    print(_row(rows[-1]), file=sys.stderr, flush=True)
    return [
        {
            "config": {
                "hidden": config.hidden_size,
                "layers": config.num_hidden_layers,
                "vocab": config.vocab_size,
                "positions": batch * length,
            },
            "kernels": kernels.isa(),
            "rows": rows,
        }
    ]


def _save(config, state: dict[str, np.ndarray], directory: str):
    import paddle

    from paddle_glm4 import GLM4ForCausalLM

    with paddle.LazyGuard():
        model = GLM4ForCausalLM(config)
    params = model.state_dict()
    for name, array in state.items():
        params[name].set_value(array)
    model.save_pretrained(directory)


def _row(row: dict) -> str:
    return (
        f"| {row['weights']} | {row['format']} | {row['activations']} | {row['max_abs_error_rel']:.2e} | "
        f"{row['mean_abs_error_rel']:.2e} | {row['kl_divergence']:.2e} | {100 * row['top1_agreement']:.1f}% |"
    )


def markdown(result: dict) -> str:
    c = result["config"]
    lines = [
        f"GLM-4-shaped model, hidden {c['hidden']}, {c['layers']} layers, vocab {c['vocab']}, {c['positions']} "
        f"positions; kernels on `{result['kernels']}`. Errors relative to the largest float32 logit.",
        "",
        "| weights | format | activations | max abs error | mean abs error | KL(fp32 ‖ q) | top-1 agreement |",
        "|---|---|---|---|---|---|---|",
    ]
    return "\n".join(lines + [_row(row) for row in result["rows"]])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.quantization_quality", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="a tiny model (seconds), for a smoke run")
    args = parser.parse_args(argv)
    [result] = run(args.quick)
    if not args.quick:
        with open(RESULTS, "w", encoding="utf-8") as f:
            f.write(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
