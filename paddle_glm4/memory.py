"""Will the model fit? The memory a model needs in a given weight format (weights + KV cache), what this
machine has available, and the refusal, before loading, of a model that cannot fit. (Python, Paddle and a
forward's activations come on top: a few hundred MB at GLM-4-9B's width.)

Filling memory is worse than refusing: Linux kills the process (or another one) when memory runs out, after
minutes of swapping. So from_pretrained compares first, and says which formats would fit.
"""

from __future__ import annotations

from .config import GLM4Config, Quantization
from .quantization import Dense, Packed, WeightFormat, embedding_format
from .safetensors_file import numpy_dtype

# The context a model is checked for when the caller names none: the base model's, capped for the 128K one,
# whose full-length cache few runs use (the cache grows as tokens come; see kv_cache.py).
DEFAULT_CONTEXT = 8192
GB = 1e9


class InsufficientMemoryError(MemoryError, ValueError):
    """The model, in the chosen format, needs more memory than this machine has available (a ValueError
    too: a request refused, which the CLIs report in one line)."""


def weight_bytes(config: GLM4Config, fmt: WeightFormat) -> int:
    """Bytes of every tensor of the model with its Linear weights in `fmt`."""
    from converters import mapping

    total = 0
    for spec in mapping.tensor_specs(config):
        if spec.linear:
            total += fmt.nbytes(*spec.shape)
        elif spec.paddle == "model.embed_tokens.weight":
            total += embedding_format(fmt, config.dtype, config.tie_word_embeddings, config.quantization).nbytes(
                *spec.weight_shape
            )
        else:  # norms and biases
            dtype = fmt.bias_dtype if spec.paddle.endswith(".bias") else fmt.compute_dtype
            total += spec.shape[0] * numpy_dtype(dtype).itemsize
    return total


def kv_bytes_per_token(config: GLM4Config, dtype: str) -> int:
    """The keys and values of one token, every layer's, in `dtype`."""
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * numpy_dtype(dtype).itemsize


def kv_cache_bytes(config: GLM4Config, fmt: WeightFormat, context: int) -> int:
    return kv_bytes_per_token(config, fmt.compute_dtype) * context


def required_bytes(config: GLM4Config, fmt: WeightFormat, context: int) -> int:
    return weight_bytes(config, fmt) + kv_cache_bytes(config, fmt, context)


def available_bytes() -> int | None:
    """Memory this process can still take: MemAvailable, or less under a cgroup limit (containers).
    None when neither can be read (not Linux)."""
    candidates = []
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    candidates.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    room = _cgroup_room()
    if room is not None:
        candidates.append(room)
    return min(candidates) if candidates else None


def _cgroup_room() -> int | None:
    """The cgroup's limit minus its usage (v2, else v1); None without a limit."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            with open(limit_file, encoding="ascii") as f:
                limit = f.read().strip()
            with open(usage_file, encoding="ascii") as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= 1 << 60:  # v1 says "no limit" with a huge number
            return None
        return max(int(limit) - usage, 0)
    return None


def cpu_formats(group_size: int | None = None) -> list[WeightFormat]:
    """The formats a CPU model can be loaded in, widest first (what a refusal suggests instead)."""
    return [
        Dense("float32"),
        Packed("bfloat16"),
        Packed("int8"),
        Packed("int4", Quantization.of("int4", group_size).group_size),
    ]


def describe(fmt: WeightFormat) -> str:
    if isinstance(fmt, Packed):
        return fmt.kind
    return getattr(fmt, "dtype", type(fmt).__name__)


def check_fits(
    config: GLM4Config, fmt: WeightFormat, context: int, name: str = "the model", available: int | None = None
) -> None:
    """Raise InsufficientMemoryError, naming the numbers and the formats that would fit, when `config` in
    `fmt` with a KV cache of `context` tokens needs more than is available (default: `available_bytes()`)."""
    available = available_bytes() if available is None else available
    if available is None:
        return
    needed = required_bytes(config, fmt, context)
    if needed <= available:
        return
    group = fmt.group_size if isinstance(fmt, Packed) and fmt.kind == "int4" else None
    others = [
        (describe(other), required_bytes(config, other, context))
        for other in cpu_formats(group)
        if describe(other) != describe(fmt)
    ]
    fitting = [f"{label} needs {size / GB:.1f} GB" for label, size in others if size <= available]
    advice = (
        ", ".join(fitting) + " (from_pretrained's dtype= / quantization=, the CLI's --dtype / --quantize)"
        if fitting
        else "no format fits; free memory or use a machine with more"
    )
    raise InsufficientMemoryError(
        f"{name} needs {needed / GB:.1f} GB in {describe(fmt)} (weights {weight_bytes(config, fmt) / GB:.1f} GB, "
        f"KV cache for {context} tokens {kv_cache_bytes(config, fmt, context) / GB:.1f} GB), "
        f"{available / GB:.1f} GB is available: {advice}"
    )


KV_CACHE_DTYPES = ("float32", "bfloat16")
# Past this many slots (prompt + new tokens) a CPU generation's cache defaults to bfloat16: the 128K model's
# long contexts, where the cache is gigabytes. Below, it stays in the compute dtype and exact.
LONG_CONTEXT = DEFAULT_CONTEXT


def cache_dtype(requested: str | None, capacity: int, compute_dtype: str, on_gpu: bool) -> str:
    """The KV cache's dtype for a generation of `capacity` slots: `requested`, else bfloat16 for a long
    context on CPU, else the compute dtype."""
    if requested is None:
        return "bfloat16" if capacity > LONG_CONTEXT and not on_gpu else compute_dtype
    if requested not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {requested!r}")
    return requested


def check_cache_fits(config: GLM4Config, batch: int, capacity: int, dtype: str, available: int | None = None) -> None:
    """Refuse, before any work, a generation whose KV cache (`batch` rows of `capacity` slots in `dtype`)
    needs more memory than is available (default: `available_bytes()`)."""
    available = available_bytes() if available is None else available
    needed = batch * capacity * kv_bytes_per_token(config, dtype)
    if available is None or needed <= available:
        return
    advice = "lower max_new_tokens, shorten the prompt or the batch"
    if dtype != "bfloat16":
        advice += ", or use kv_cache_dtype='bfloat16' (half the bytes)"
    raise InsufficientMemoryError(
        f"the KV cache for {batch} x {capacity} tokens (prompt + max_new_tokens) needs {needed / GB:.2f} GB in "
        f"{dtype}, {available / GB:.2f} GB is available: {advice}"
    )


def kv_pool_bytes(config: GLM4Config, dtype: str, sequences: int, context: int, available: int | None = None) -> int:
    """The KV cache memory a continuous-batching engine takes by default: `sequences` full contexts, at most half
    the memory available now (default: `available_bytes()`), the rest left for activations and the machine."""
    full = sequences * context * kv_bytes_per_token(config, dtype)
    available = available_bytes() if available is None else available
    return full if available is None else min(full, available // 2)


def context_for(config: GLM4Config, max_seq_len: int | None) -> int:
    """The context the memory check plans a KV cache for."""
    if max_seq_len is None:
        return min(config.seq_length, DEFAULT_CONTEXT)
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 1:
        raise ValueError(f"max_seq_len must be a positive integer, got {max_seq_len!r}")
    return min(max_seq_len, config.seq_length)
