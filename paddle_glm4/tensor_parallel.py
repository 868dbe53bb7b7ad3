"""Tensor parallelism: one GLM-4 split across processes (Megatron-style), over paddle.distributed's collectives.

Each of `degree` ranks holds a slice of every layer and the ranks exchange activations at four points:

    embedding      rows of the vocabulary      masked lookup, then all_reduce (the owner's row, zeros elsewhere)
    qkv_proj       columns: its query heads and key/value groups (bias with its columns)
    o_proj         rows (its heads' outputs)   then all_reduce
    gate_up_proj   columns: its slice of gate AND its slice of up ([gate | up] are fused)
    down_proj      rows (its slice of the FFN) then all_reduce
    lm_head        columns (vocabulary)        logits all_gathered, so every rank has the same [b, s, vocab]

Attention splits by heads: with `degree` <= the key/value groups, a rank holds groups/degree of them and the
query heads that read them; above, each group is replicated on degree/groups ranks. The norms are replicated.
The model's own classes and its one forward (GLM4ForCausalLM.logits) run on every rank: `shard` only swaps
each layer for one of the rank's width and adds the collectives. No bias after a row split exists in GLM-4.

Loading: `from_pretrained(..., tensor_parallel_degree=N)` reads from the ordinary converted checkpoint only the
rows and columns the rank owns (`Shard.take`, on the memory-mapped tensors), then converts or quantizes that
slice, so a rank holds about 1/N of the weights plus the replicated norms. A checkpoint quantized as int4 splits
only where its groups of input rows do (checked before loading); quantizing at load works at any degree.

Running: in a program that every rank executes alike (the PaddleNLP way), call the model on every rank with the
same inputs (and the same seed when sampling). The command line instead lets rank 0 drive (`lead`): it owns the
tokenizer, the output and the server, runs generation, and sends every forward to the other ranks, which
`follow` it; they never sample, so all ranks use rank 0's tokens.

Failures: a rank that dies closes its connections, and the others' next collective fails at once (gloo: "Connection
reset by peer", or a TIMEOUT of the pair with the dead rank); `paddle.distributed.launch` then ends the pod with an
error. A rank that hangs is detected by gloo's collective timeout, fixed at 30 s in Paddle 3.3.1 (no setting
reaches it): a collective that waits longer raises. That is why rank 0 sends a heartbeat to the idle followers (a
chat waiting for its user), and why the ranks meet after loading through the TCP store, which waits patiently.
VERIFIED on CPU (gloo); the same code runs over NCCL on GPUs, UNVERIFIED (no GPU here).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import paddle

from .config import GLM4Config
from .linear import Linear
from .model import MLP, Attention, Embedding
from .quantization import Dense, Packed, WeightFormat, embedding_format

if TYPE_CHECKING:
    from .generation import ModelSession
    from .model import GLM4ForCausalLM

HEARTBEAT_SECONDS = 10.0  # well inside gloo's 30 s collective timeout
LOAD_TIMEOUT_SECONDS = 3600.0  # how long a rank waits for the others to finish loading
_LOADED_KEY = "paddle_glm4/tensor_parallel/loaded"


class TensorParallelError(ValueError):
    """A degree the model or the launch cannot take."""


class RankLost(ConnectionError):
    """Another rank died or stopped answering: a collective failed, or waited past gloo's timeout."""


@contextlib.contextmanager
def _peers() -> Iterator[None]:
    """Collectives with the other ranks: their failure (a RuntimeError from gloo) as a RankLost, one line."""
    try:
        yield
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RankLost(f"tensor parallel: another rank died or stopped answering ({first})") from err


# ---- which part a rank holds ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """The slices of a model of `config` that rank `rank` of `degree` holds, as index ranges."""

    config: GLM4Config
    degree: int
    rank: int

    def __post_init__(self):
        check_degree(self.config, self.degree)
        if not 0 <= self.rank < self.degree:
            raise TensorParallelError(f"rank {self.rank} is outside 0..{self.degree - 1}")

    def _part(self, total: int) -> range:
        size = total // self.degree
        return range(self.rank * size, (self.rank + 1) * size)

    @property
    def heads(self) -> range:
        return self._part(self.config.num_attention_heads)

    @property
    def groups(self) -> range:
        groups = self.config.num_key_value_heads
        if self.degree <= groups:
            return self._part(groups)
        first = self.rank * groups // self.degree  # replicated: the group this rank's query heads read
        return range(first, first + 1)

    @property
    def ffn(self) -> range:
        return self._part(self.config.intermediate_size)

    @property
    def vocab(self) -> range:
        return self._part(self.config.vocab_size)

    def qkv_columns(self) -> list[range]:
        """The fused projection's columns [h*d queries | g*d keys | g*d values] this rank keeps."""
        d, h, g = self.config.head_dim, self.config.num_attention_heads, self.config.num_key_value_heads
        heads, groups = self.heads, self.groups
        return [
            range(heads.start * d, heads.stop * d),
            range((h + groups.start) * d, (h + groups.stop) * d),
            range((h + g + groups.start) * d, (h + g + groups.stop) * d),
        ]

    def gate_up_columns(self) -> list[range]:
        width = self.config.intermediate_size
        return [self.ffn, range(width + self.ffn.start, width + self.ffn.stop)]

    def attention_rows(self) -> range:
        d = self.config.head_dim
        return range(self.heads.start * d, self.heads.stop * d)


def check_degree(config: GLM4Config, degree: object) -> None:
    """Refuse, before anything is loaded, a degree that does not split this model evenly."""
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
        raise TensorParallelError(f"tensor_parallel_degree must be a positive integer, got {degree!r}")
    heads, groups = config.num_attention_heads, config.num_key_value_heads
    sizes = {
        "num_attention_heads": heads,
        "intermediate_size (the FFN width)": config.intermediate_size,
        "vocab_size (the padded vocabulary)": config.vocab_size,
    }
    for name, size in sizes.items():
        if size % degree:
            raise TensorParallelError(f"tensor_parallel_degree {degree} does not divide the model's {name}, {size}")
    if groups % degree and degree % groups:
        raise TensorParallelError(
            f"tensor_parallel_degree {degree} must divide the model's {groups} key/value groups (num_key_value_heads) "
            f"or be a multiple of them (each group then replicated)"
        )


def check_groups(config: GLM4Config, degree: int, group: int, what: str) -> None:
    """int4 holds one scale per `group` input rows: a row split must fall on those groups (so that each rank
    holds whole groups, the very ones of one process)."""
    for name, rows in (
        ("o_proj", config.num_attention_heads * config.head_dim),
        ("down_proj", config.intermediate_size),
    ):
        if (rows // degree) % group:
            raise TensorParallelError(
                f"{what} int4 with groups of {group} input rows, and tensor_parallel_degree {degree} splits "
                f"{name}'s {rows} input rows into {rows // degree} per rank, not a multiple of {group}; use a "
                "degree or a group size (--group-size) that divides it"
            )


def prepare(config: GLM4Config, fmt: WeightFormat, degree: int, storage_only: bool) -> Layout:
    """Everything checked before a split model is loaded (the degree against the model, its weight format,
    the launch); then this rank's Layout. `fmt`: the Linear weights' format once loaded."""
    check_degree(config, degree)
    if storage_only:
        raise TensorParallelError("tensor parallelism is dynamic-graph only for now: a split model cannot be exported")
    if config.quantization is not None and config.quantization.group_size is not None:
        check_groups(config, degree, config.quantization.group_size, "this checkpoint is quantized as")
    if isinstance(fmt, Packed) and fmt.kind == "int4":  # quantized after splitting: each rank's groups
        check_groups(config, degree, fmt.group, "the weights are to be quantized as")
    return Layout(config, degree, init(degree))


# ---- the rank's slice of a checkpoint tensor ---------------------------------------------------------------
@dataclass(frozen=True)
class _Split:
    columns: tuple[range, ...] = ()  # output columns kept (concatenated in order)
    rows: range | None = None  # input rows kept
    vocab_rows: range | None = None  # the embedding's rows


class Shard:
    """Which slice of each checkpoint tensor this rank takes (`take`), by tensor name."""

    def __init__(self, layout: Layout):
        self.layout = layout
        c = layout.config
        self.splits: dict[str, _Split] = {"model.embed_tokens": _Split(vocab_rows=layout.vocab)}
        if not c.tie_word_embeddings:
            self.splits["lm_head"] = _Split(columns=(layout.vocab,))
        for i in range(c.num_hidden_layers):
            prefix = f"model.layers.{i}"
            self.splits[f"{prefix}.self_attn.qkv_proj"] = _Split(columns=tuple(layout.qkv_columns()))
            self.splits[f"{prefix}.self_attn.o_proj"] = _Split(rows=layout.attention_rows())
            self.splits[f"{prefix}.mlp.gate_up_proj"] = _Split(columns=tuple(layout.gate_up_columns()))
            self.splits[f"{prefix}.mlp.down_proj"] = _Split(rows=layout.ffn)

    def splits_tensor(self, name: str) -> bool:
        return name.rsplit(".", 1)[0] in self.splits

    def take(self, name: str, array: np.ndarray, stored: WeightFormat) -> np.ndarray:
        """This rank's part of checkpoint tensor `name` (a Linear's tensors stored in `stored`'s layout), as
        its own contiguous array: the memory-mapped rest is never copied."""
        prefix, slot = name.rsplit(".", 1)
        split = self.splits.get(prefix)
        if split is None:
            return array  # replicated
        if split.vocab_rows is not None:
            return np.ascontiguousarray(array[split.vocab_rows.start : split.vocab_rows.stop])
        out_axis, in_axis, in_unit = _axes(slot, stored)
        if split.columns:
            return np.concatenate([_slice(array, out_axis, part) for part in split.columns], axis=out_axis)
        assert split.rows is not None
        if in_axis is None:  # int8's per-output-channel scales: untouched by a split of the inputs
            return array
        first, stop = split.rows.start, split.rows.stop
        if first % in_unit or stop % in_unit:  # check_degree refused these for int4; a safety net
            raise TensorParallelError(f"{name}: rows {first}..{stop} do not fall on its packing of {in_unit}")
        return np.ascontiguousarray(_slice(array, in_axis, range(first // in_unit, stop // in_unit)))


def _axes(slot: str, stored: WeightFormat) -> tuple[int, int | None, int]:
    """(output axis, input axis or None, input rows per element along it) of a Linear's checkpoint tensor."""
    if slot == "bias":
        return 0, None, 1
    if isinstance(stored, Dense):  # weight [K, N]
        return 1, 0, 1
    assert isinstance(stored, Packed)  # output-major: qweight / weight [N, ...], scales [N] or [N, K / G]
    if slot == "scales":
        return (0, None, 1) if stored.kind == "int8" else (0, 1, stored.group)
    return 0, 1, 2 if stored.kind == "int4" else 1


def _slice(array: np.ndarray, axis: int, part: range) -> np.ndarray:
    index = [slice(None)] * array.ndim
    index[axis] = slice(part.start, part.stop)
    return array[tuple(index)]


# ---- the process group -----------------------------------------------------------------------------------
def init(degree: int) -> int:
    """Join (or find) the process group of `degree` ranks started by paddle.distributed.launch; this rank."""
    import paddle.distributed as dist

    world = int(os.environ.get("PADDLE_TRAINERS_NUM", "1"))
    if world != degree:
        launch = f"python -m paddle.distributed.launch --nproc_per_node {degree} ..."
        raise TensorParallelError(
            f"tensor_parallel_degree {degree} needs {degree} processes, one per rank; this launch has {world} "
            f"(start it with `{launch}`, and pass the same degree as the number of processes)"
        )
    if not dist.is_initialized():
        dist.init_parallel_env()
    return dist.get_rank()


def cores_per_rank() -> int:
    """The CPU threads a rank computes on: the ranks the launch started on this machine share its cores
    (more threads than cores would have them fight over each core)."""
    local = int(os.environ.get("PADDLE_LOCAL_SIZE", "1"))
    return max(1, len(os.sched_getaffinity(0)) // max(1, local))


def wait_for_all(degree: int, timeout: float = LOAD_TIMEOUT_SECONDS) -> None:
    """Meet the other ranks through the launch's TCP store, which waits without gloo's 30 s timeout (one
    rank may load for minutes longer than another)."""
    from paddle.base import core

    store = core.create_or_get_global_tcp_store()  # the one init_parallel_env made
    store.add(_LOADED_KEY, 1)
    deadline = time.monotonic() + timeout
    while store.add(_LOADED_KEY, 0) < degree:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the other tensor-parallel ranks did not finish loading within {timeout:.0f} s")
        time.sleep(0.2)


# ---- the layers of a rank -----------------------------------------------------------------------------
def _all_reduce(x: paddle.Tensor) -> paddle.Tensor:
    import paddle.distributed as dist

    dist.all_reduce(x)
    return x


class RowParallelLinear(Linear):
    """A Linear over this rank's input rows: partial sums, added up across the ranks."""

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return _all_reduce(super().forward(x))


class VocabParallelEmbedding(Embedding):
    """This rank's rows of the table: an id it does not hold looks up zeros, and the sum over the ranks is
    every id's row."""

    def __init__(self, rows: range, hidden_size: int, fmt: WeightFormat, dtype: str, compute_dtype: str):
        super().__init__(len(rows), hidden_size, fmt, dtype, compute_dtype)
        self.first = rows.start

    def forward(self, ids: paddle.Tensor) -> paddle.Tensor:
        local = ids - self.first
        held = (local >= 0) & (local < self.vocab_size)
        x = super().forward(paddle.where(held, local, paddle.zeros_like(local)))  # [b, s, H]
        return _all_reduce(x * held.unsqueeze(-1).astype(x.dtype))


def shard(model: GLM4ForCausalLM, layout: Layout) -> None:
    """Swap `model`'s (a GLM4ForCausalLM built under paddle.LazyGuard, nothing allocated yet) layers for this
    rank's slices of them, with the collectives; the parameters keep their names."""
    config, inner = model.config, model.model
    kernels = inner.kernels
    d, hidden = config.head_dim, config.hidden_size
    heads, groups, ffn = len(layout.heads), len(layout.groups), len(layout.ffn)
    for attention in [layer for layer in inner.sublayers() if isinstance(layer, Attention)]:
        attention.heads, attention.groups = heads, groups
        attention.qkv_proj = Linear(hidden, (heads + 2 * groups) * d, kernels, bias=config.attention_bias)
        attention.o_proj = RowParallelLinear(heads * d, hidden, kernels)
    for mlp in [layer for layer in inner.sublayers() if isinstance(layer, MLP)]:
        mlp.gate_up_proj = Linear(hidden, 2 * ffn, kernels)
        mlp.down_proj = RowParallelLinear(ffn, hidden, kernels)
    weights = kernels.weights
    inner.embed_tokens = VocabParallelEmbedding(
        layout.vocab,
        hidden,
        embedding_format(weights, config.dtype, config.tie_word_embeddings, config.quantization),  # as one process
        weights.embedding_dtype(config.dtype),
        weights.compute_dtype,
    )
    if not config.tie_word_embeddings:
        model.lm_head = Linear(hidden, len(layout.vocab), kernels)
    inner.kv_groups = groups
    model.tensor_parallel = TensorParallel(layout)


class TensorParallel:
    """A sharded model's view of its ranks: gathers the vocabulary-split logits, and makes rank 0 lead."""

    def __init__(self, layout: Layout):
        self.layout = layout
        self.leader: Leader | None = None

    @property
    def degree(self) -> int:
        return self.layout.degree

    @property
    def rank(self) -> int:
        return self.layout.rank

    def gather_vocab(self, logits: paddle.Tensor) -> paddle.Tensor:
        """[b, s, vocab / degree] on each rank -> the whole [b, s, vocab], the same on every rank."""
        import paddle.distributed as dist

        parts: list[paddle.Tensor] = []
        dist.all_gather(parts, logits)
        return paddle.concat(parts, axis=-1)

    def session(self, session: ModelSession) -> ModelSession | LeaderSession:
        """The generation session `model.generate` uses: rank 0's, when it leads, sends its forwards."""
        return session if self.leader is None else LeaderSession(session, self.leader)


# ---- rank 0 leads, the others follow ---------------------------------------------------------------------
# Every command is an int64 header [op, ...] broadcast from rank 0, then its tensors. No pickling.
_STOP, _PREFILL, _STEP, _HEARTBEAT = 0, 1, 2, 3
_HEADER = 8
_CACHE_DTYPES = (None, "float32", "bfloat16")


def _broadcast(tensor: paddle.Tensor) -> paddle.Tensor:
    import paddle.distributed as dist

    dist.broadcast(tensor, src=0)
    return tensor


def _send_header(*values: int) -> None:
    header = np.zeros(_HEADER, dtype=np.int64)
    header[: len(values)] = values
    _broadcast(paddle.to_tensor(header))


class Leader:
    """Rank 0's side: each forward of a generation is sent to the followers and run under `lock`; while none
    runs, a heartbeat every HEARTBEAT_SECONDS keeps the followers' wait inside gloo's timeout; `close` tells
    them to stop."""

    def __init__(self):
        self.lock = threading.Lock()  # one sender at a time: a forward (its command and collectives) or a beat
        self.last_sent = time.monotonic()
        self.closed = threading.Event()
        self.heartbeat = threading.Thread(target=self._beat, name="tensor-parallel heartbeat", daemon=True)
        self.heartbeat.start()

    def _beat(self) -> None:
        while not self.closed.wait(HEARTBEAT_SECONDS / 4):
            with self.lock:
                if not self.closed.is_set() and time.monotonic() - self.last_sent > HEARTBEAT_SECONDS:
                    try:
                        self.send(_HEARTBEAT)
                    except RuntimeError:  # a follower is gone: the next forward reports it (RankLost)
                        return

    def send(self, *header: int, tensors: tuple[paddle.Tensor, ...] = ()) -> None:
        """Broadcast a command (hold `lock`)."""
        _send_header(*header)
        for tensor in tensors:
            _broadcast(tensor)
        self.last_sent = time.monotonic()

    def close(self) -> None:
        with self.lock:
            if not self.closed.is_set():
                self.closed.set()
                with contextlib.suppress(RuntimeError):  # followers already gone have nothing to stop
                    self.send(_STOP)


class LeaderSession:
    """A generation Session on rank 0 that has the followers run the same forwards (generation.ModelSession's
    prefill and step, with the same arguments) on their slices."""

    def __init__(self, session: ModelSession, leader: Leader):
        self.session, self.leader = session, leader

    def prefill(
        self,
        input_ids: paddle.Tensor,
        attention_mask: paddle.Tensor | None,
        position_ids: paddle.Tensor | None,
        capacity: int,
        progress: Callable[[int, int], None] | None = None,
    ) -> paddle.Tensor:
        b, n = input_ids.shape
        extras = [t.astype("int64") for t in (attention_mask, position_ids) if t is not None]
        header = (_PREFILL, b, n, capacity, attention_mask is not None, position_ids is not None)
        cache_dtype = _CACHE_DTYPES.index(self.session.kv_cache_dtype)
        with self.leader.lock, _peers():
            self.leader.send(
                *header, self.session.prefill_chunk, cache_dtype, tensors=(input_ids.astype("int64"), *extras)
            )
            return self.session.prefill(input_ids, attention_mask, position_ids, capacity, progress)

    def step(self, tokens: paddle.Tensor) -> paddle.Tensor:
        with self.leader.lock, _peers():
            self.leader.send(_STEP, tokens.shape[0], tensors=(tokens.astype("int64"),))
            return self.session.step(tokens)


def lead(model: GLM4ForCausalLM) -> Leader:
    """Make rank 0's `model.generate` drive the followers; returns the Leader (close it when done)."""
    assert model.tensor_parallel is not None and model.tensor_parallel.rank == 0
    leader = Leader()
    model.tensor_parallel.leader = leader
    return leader


@paddle.no_grad()
def follow(model: GLM4ForCausalLM) -> None:
    """A follower's loop: run the forwards rank 0 sends, on this rank's slices, until it says stop."""
    with _peers():
        _follow(model)


def _follow(model: GLM4ForCausalLM) -> None:
    from .generation import ModelSession

    session: ModelSession | None = None
    while True:
        header = _broadcast(paddle.zeros([_HEADER], dtype="int64")).numpy().tolist()
        op = header[0]
        if op == _STOP:
            return
        if op == _PREFILL:
            b, n, capacity, has_mask, has_positions, chunk, dtype = header[1:8]
            ids = _broadcast(paddle.zeros([b, n], dtype="int64"))
            mask = _broadcast(paddle.zeros([b, n], dtype="int64")) if has_mask else None
            positions = _broadcast(paddle.zeros([b, n], dtype="int64")) if has_positions else None
            session = ModelSession(model, chunk, _CACHE_DTYPES[dtype])
            session.prefill(ids, mask, positions, capacity)
        elif op == _STEP:
            tokens = _broadcast(paddle.zeros([header[1]], dtype="int64"))
            assert session is not None, "a step comes after its prefill"
            session.step(tokens)
