"""Generation with Paddle Inference: `Predictor` runs an export directory's program in the shared decode loop.

The predictor is a `generation.Session`: the loop, sampling, stopping and streaming are those of the dynamic
model (`generation.generate`), so both give the same results for the same arguments.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Callable
from typing import Any

import paddle
import paddle.inference as paddle_infer

from .. import generation, memory
from ..device import reuse_freed_memory, use_all_cores
from ..generation import GenerationConfig
from ..kv_cache import KVCache
from ..sequences import Sequences
from .manifest import PROGRAM, ExportError, Manifest

DEVICES = ("cpu", "gpu")
PRECISIONS = ("float32", "bfloat16", "float16")
# Paddle Inference grows its GPU memory pool on demand; this is only the first chunk.
GPU_POOL_MB = 1024


class Predictor:
    """A Paddle Inference predictor over an export directory, with GLM4ForCausalLM's `generate`.

    device: "cpu" or "gpu". threads: CPU threads (default: all cores). precision, on GPU: what Paddle
    Inference computes in (float32, bfloat16, float16). On CPU, "float32" or "bfloat16": an export that
    stores its weights in bf16 (`export --dtype bfloat16`) keeps them so and widens each to float32 where
    it is used, on any CPU, whichever of the two is asked for; a float32 export runs in oneDNN's bf16 mode
    with "bfloat16", which Paddle offers only on CPUs with AVX-512.
    """

    def __init__(self, export_dir: str, device: str = "cpu", precision: str = "float32", threads: int | None = None):
        if device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.manifest = Manifest.read(export_dir)
        self.config = self.manifest.config
        self.generation_config = GenerationConfig.from_model(self.config, export_dir)
        self.device, self.precision = device, precision
        self.prefill_chunk = generation.DEFAULT_PREFILL_CHUNK  # generate's default (GLM4ForCausalLM's too)
        config = paddle_infer.Config(*(os.path.join(export_dir, f"{PROGRAM}.{ext}") for ext in ("json", "pdiparams")))
        if device == "gpu":
            self._use_gpu(config)
        else:
            self._use_cpu(config, threads)
        config.disable_glog_info()
        if self.manifest.kernels:
            _load_kernels(export_dir)
        with _stdout_to_stderr():
            self._predictor = paddle_infer.create_predictor(config)
            if self._predictor.get_input_names() != self.manifest.inputs:
                raise ExportError(f"{export_dir}: the program's inputs are not those its manifest lists")
            if config.mkldnn_enabled():  # oneDNN prints at a program's first run: make it happen here
                self.session().prefill(paddle.zeros([1, 1], dtype="int64"), None, None, 1)
        if device == "cpu":  # its weights loaded, as from_pretrained does
            reuse_freed_memory()

    def _use_cpu(self, config, threads: int | None):
        # Paddle's own CPU kernels (MKL's GEMM) unless oneDNN's bf16 mode is asked for: on this project's CPUs
        # they are faster than oneDNN's (see the README), and oneDNN's cast kernel, which widens narrow
        # weights, returns stale data when a program runs twice with the same shapes (Paddle 3.3).
        if self.precision == "float16":
            raise ValueError("precision='float16' needs a GPU; on CPU use float32 or bfloat16")
        config.disable_gpu()
        config.set_cpu_math_library_num_threads(use_all_cores(threads))
        narrow = self.manifest.dtype != self.manifest.compute_dtype or self.config.quantization is not None
        if self.precision == "bfloat16" and not narrow:
            if not paddle.base.core.supports_bfloat16():
                raise ValueError(
                    "precision='bfloat16' on this CPU: Paddle's oneDNN bf16 mode needs AVX-512, which this CPU "
                    "lacks. Export with --dtype bfloat16 (weights stored in bf16, computed in float32), or use "
                    "precision='float32'."
                )
            config.enable_mkldnn()
            config.enable_mkldnn_bfloat16()
        else:
            config.disable_mkldnn()
        if narrow:
            # the pass would fold each weight's widening cast (or dequantization) into a float32 copy of it
            config.delete_pass("constant_folding_pass")

    def _use_gpu(self, config):
        # Unverified: this project's machines have no GPU (see the README).
        if not paddle.is_compiled_with_cuda():
            raise ValueError(f"device='gpu' needs a CUDA build of Paddle; this one ({paddle.__version__}) is CPU-only")
        precision = {
            "float32": paddle_infer.PrecisionType.Float32,
            "bfloat16": paddle_infer.PrecisionType.Bfloat16,
            "float16": paddle_infer.PrecisionType.Half,
        }[self.precision]
        config.enable_use_gpu(GPU_POOL_MB, 0, precision)

    @property
    def context_length(self) -> int:
        """The most tokens (prompt + new) one generation takes: the export's max_seq_len."""
        return self.manifest.max_seq_len

    def session(self, prefill_chunk: int | None = None) -> PredictorSession:
        return PredictorSession(self, self.prefill_chunk if prefill_chunk is None else prefill_chunk)

    def cache_dtype(self, capacity: int) -> str:
        """The KV cache's dtype: the program's cache inputs are in the export's kv_cache_dtype (chosen when it was
        exported), whatever the context."""
        return self.manifest.kv_cache_dtype

    def new_cache(self, batch_size: int, capacity: int, dtype: str | None = None) -> KVCache:
        """A KV cache the program takes (`dtype`: None or the export's kv_cache_dtype, the only one it takes)."""
        if dtype not in (None, self.manifest.kv_cache_dtype):
            raise ValueError(f"this export's cache is in {self.manifest.kv_cache_dtype}, not {dtype}")
        return KVCache(self.config, batch_size, capacity, dtype=self.manifest.kv_cache_dtype)

    def logits(
        self,
        input_ids: paddle.Tensor,
        positions: paddle.Tensor,
        start: int,
        key_valid: paddle.Tensor | None,
        cache: KVCache,
        logits_to_keep: int = 1,
    ) -> paddle.Tensor:
        """GLM4ForCausalLM.logits through the program that traces it: the same arguments (key_valid [b, start + s],
        None: all real), the last token's logits [b, 1, vocab]. The program reads every slot of the cache (those
        past the new tokens masked) and writes the new keys and values into the cache's first b rows."""
        if logits_to_keep != 1:
            raise ValueError(f"an export returns the last token's logits only (logits_to_keep=1), not {logits_to_keep}")
        batch, end = input_ids.shape[0], start + input_ids.shape[1]
        valid = paddle.zeros([batch, cache.capacity], dtype="bool")
        valid[:, :end] = True if key_valid is None else key_valid
        # the first b rows of each buffer: a view, which the program writes through (a copy would lose the writes)
        keys, values = [k[:batch] for k in cache.keys], [v[:batch] for v in cache.values]
        return self.run(input_ids, positions, start, valid, keys, values).unsqueeze(1)

    def run(
        self,
        input_ids: paddle.Tensor,
        position_ids: paddle.Tensor,
        start: int,
        key_valid: paddle.Tensor,
        keys: list,
        values: list,
    ) -> paddle.Tensor:
        """One call of the exported program (see export.StepProgram); writes `keys`/`values` in place."""
        # the predictor reads a tensor's memory as if it were contiguous: a slice of a batch (a prefill chunk) is not
        input_ids, position_ids = input_ids.contiguous(), position_ids.contiguous()
        inputs = [input_ids, position_ids, paddle.to_tensor(start, dtype="int64"), key_valid, *keys, *values]
        return self._predictor.run(inputs)[0]

    def generate(
        self, input_ids: generation.Batch, prefill_chunk: int | None = None, **kwargs: Any
    ) -> tuple[paddle.Tensor, paddle.Tensor]:
        """Same arguments and results as GLM4ForCausalLM.generate; the context is the export's max_seq_len."""
        return generation.generate(
            self.session(prefill_chunk),
            input_ids,
            context_length=self.context_length,
            vocab_size=self.config.vocab_size,
            defaults=self.generation_config,
            **kwargs,
        )


class PredictorSession:
    """A generation.Session over the predictor, holding one generation's KV cache. Its Sequences (those of the
    dynamic model) decide slots and positions; the cache's buffers are what the program writes into."""

    def __init__(self, predictor: Predictor, prefill_chunk: int = generation.DEFAULT_PREFILL_CHUNK):
        self.predictor = predictor
        self.prefill_chunk = generation.check_prefill_chunk(prefill_chunk)
        self.cache: KVCache | None = None
        self.sequences: Sequences | None = None

    def prefill(
        self,
        input_ids: paddle.Tensor,
        attention_mask: paddle.Tensor | None,
        position_ids: paddle.Tensor | None,
        capacity: int,
        progress: Callable[[int, int], None] | None = None,
    ) -> paddle.Tensor:
        if capacity > self.predictor.context_length:
            raise ValueError(
                f"{capacity} tokens (prompt + new) exceed this export's max_seq_len "
                f"{self.predictor.context_length}; export again with a larger --max-seq-len"
            )
        batch = input_ids.shape[0]
        memory.check_cache_fits(self.predictor.config, batch, capacity, self.predictor.cache_dtype(capacity))
        self.cache = self.predictor.new_cache(batch, capacity)  # after the check: the cache is allocated here
        self.sequences = Sequences(batch, capacity, self.cache)
        return generation.prefill_in_chunks(
            self._run, input_ids, attention_mask, position_ids, self.prefill_chunk, progress
        )

    def step(self, tokens: paddle.Tensor) -> paddle.Tensor:
        assert self.sequences is not None, "prefill() comes first"
        return self._run(tokens.unsqueeze(-1), None, None)

    def _run(
        self, input_ids: paddle.Tensor, attention_mask: paddle.Tensor | None, position_ids: paddle.Tensor | None
    ) -> paddle.Tensor:
        sequences, cache = self.sequences, self.cache
        assert sequences is not None and cache is not None
        step = sequences.claim(input_ids.shape[1], attention_mask)
        positions = step.positions if position_ids is None else position_ids
        return self.predictor.logits(input_ids, positions, step.start, step.key_valid, cache)[:, -1]


def _load_kernels(export_dir: str):
    """The program calls paddle_glm4.kernels' operators: a predictor finds only operators already loaded."""
    from .. import kernels

    if kernels.load() is None:
        raise ExportError(
            f"{export_dir} computes with paddle_glm4's C++ kernels, which cannot be built on this "
            "machine (see the warning above); export it again here, where the kernels' portable "
            "path is traced instead"
        )


@contextlib.contextmanager
def _stdout_to_stderr():
    """Send what is written to file descriptor 1 to stderr meanwhile.

    Paddle's C++ side prints to stdout while it prepares a program, past Python's sys.stdout (oneDNN's
    kernel checks print 'ReduceMeanCheckIfOneDNNSupport' at the first run), and stdout must carry only the
    generated text. C's stdio buffer is flushed before fd 1 is restored, so nothing buffered leaks back.
    """
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        ctypes.CDLL(None).fflush(None)
        os.dup2(saved, 1)
        os.close(saved)
