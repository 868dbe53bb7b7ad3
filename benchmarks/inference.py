"""The Paddle Inference predictor against our dynamic-graph model, on the same weights.

The engines, weights and measurements are those of benchmarks.model (GLM-4-9B's width with 2 layers, or a
tiny model in quick mode; each engine in its own process): the dynamic graph in fp32, the predictor on an
export with float32 weights, and on an export with bf16 weights (which a CPU without AVX-512 widens to
float32 where each is used). Figures: prefill tokens/s of a 512-token prompt, decode tokens/s at batch 1
and 8, peak RSS; the peer is always the dynamic graph.

    python -c "from benchmarks import inference; print(inference.run())"
"""

from __future__ import annotations

import multiprocessing
import tempfile
from concurrent.futures import ProcessPoolExecutor

from benchmarks import model as engines

PREDICTORS = {"inference-fp32": "predictor, float32 weights",
              "inference-bf16": "predictor, bf16 weights"}
PEER = "dynamic graph fp32"


def run(quick: bool = False) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="glm4-bench-inference-") as workdir:
        # made in a process of its own, which frees the models it loaded before the engines run (at full
        # width they would hold ~10 GB of this process next to each engine's own)
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            dirs = pool.submit(engines._make_weights, workdir, quick).result()
        results = {name: engines._run_worker(name, dirs[name], quick) for name in ("paddle", *PREDICTORS)}
    dynamic = results["paddle"]
    figures = (("prefill", f"prefill tokens/s, {engines.settings(quick)['prefill']}-token prompt", "tokens/s", 1),
               ("decode_b1", "decode tokens/s, batch 1", "tokens/s", 1),
               ("decode_b8", "decode tokens/s, batch 8", "tokens/s", 1),
               ("peak_rss", "peak RSS, lower is better", "GB", 1e-9))
    return [engines._row(f"{figure} ({label})", results[name][key] * scale, dynamic[key] * scale, PEER, unit)
            for name, label in PREDICTORS.items() for key, figure, unit, scale in figures]
