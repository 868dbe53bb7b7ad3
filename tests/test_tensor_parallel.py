"""Tensor parallelism (paddle_glm4/tensor_parallel.py): a model split across 2 (and 4) processes on CPU, over
gloo, launched for real by `python -m paddle.distributed.launch`, against the same model in one process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import paddle
import pytest

from conftest import hf_state, left_padded, paddle_model, paddle_state, reference_model, small_config
from paddle_glm4 import GLM4ForCausalLM
from paddle_glm4.config import Quantization
from paddle_glm4.quantization import Dense, Packed
from paddle_glm4.tensor_parallel import Layout, TensorParallelError, check_degree, prepare

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "tensor_parallel_worker.py"
NEW_TOKENS = 8


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PADDLE_", "FLAGS_selected"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["GLOG_minloglevel"] = "2"
    env["PYTHONFAULTHANDLER"] = "1"  # a rank killed by a signal (an abort in C++) prints where each thread was
    return env


def launch_command(degree: int, log_dir: Path, *program: str) -> list[str]:
    """`python -m paddle.distributed.launch` running `program` on `degree` ranks, their logs in log_dir."""
    launcher = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", str(degree)]
    return [*launcher, "--log_dir", str(log_dir), *program]


def launch(degree: int, tmp: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the worker on `degree` ranks through paddle.distributed.launch; its rank logs in tmp/log."""
    command = launch_command(degree, tmp / "log", str(WORKER), *args)
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=ROOT)


def rank_logs(tmp: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted((tmp / "log").glob("workerlog.*")))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small random GLM-4 checkpoint, prompts (one alone, a left-padded batch) and what one process makes of
    them: logits of the prompt, greedy tokens alone and in the batch."""
    tmp = tmp_path_factory.mktemp("tp")
    config = small_config()
    model = paddle_model(config, paddle_state(config, hf_state(reference_model(config))))
    model.save_pretrained(str(tmp / "model"))
    rng = np.random.default_rng(0)
    ids = rng.integers(3, config.vocab_size, (1, 7))
    batch_ids, batch_mask = left_padded([list(rng.integers(3, config.vocab_size, 4)), list(ids[0])], 0)
    np.savez(tmp / "inputs.npz", ids=ids, batch_ids=batch_ids, batch_mask=batch_mask)
    return tmp, config, ids, batch_ids, batch_mask


def one_process(model: GLM4ForCausalLM, ids, batch_ids, batch_mask) -> dict[str, np.ndarray]:
    with paddle.no_grad():
        logits = model(paddle.to_tensor(ids)).logits.numpy()
    alone = model.generate(ids, max_new_tokens=NEW_TOKENS)[0].numpy()
    batch = model.generate(batch_ids, attention_mask=batch_mask, max_new_tokens=NEW_TOKENS)[0].numpy()
    return {"logits": logits, "alone": alone, "batch": batch}


def split_run(small, degree: int, tmp: Path, *args: str) -> list[dict[str, np.ndarray]]:
    model_dir = small[0] / "model"
    (tmp / "out").mkdir(parents=True, exist_ok=True)
    done = launch(
        degree,
        tmp,
        "--model",
        str(model_dir),
        "--out",
        str(tmp / "out"),
        "--degree",
        str(degree),
        "--inputs",
        str(small[0] / "inputs.npz"),
        "--max-new-tokens",
        str(NEW_TOKENS),
        *args,
    )
    assert done.returncode == 0, done.stderr[-2000:] + rank_logs(tmp)[-4000:]
    return [dict(np.load(tmp / "out" / f"rank{r}.npz", allow_pickle=False)) for r in range(degree)]


@pytest.mark.parametrize("degree, groups_per_rank", [(2, 1), (4, 1)])
def test_split_model_computes_what_one_process_does(small, tmp_path, degree, groups_per_rank):
    """Degree 2 gives each rank one of the 2 key/value groups; degree 4 replicates each group on 2 ranks."""
    tmp, config, ids, batch_ids, batch_mask = small
    expected = one_process(GLM4ForCausalLM.from_pretrained(str(tmp / "model")), ids, batch_ids, batch_mask)
    ranks = split_run(small, degree, tmp_path)
    for rank in ranks:
        assert rank["kv_groups"] == groups_per_rank  # each rank's cache holds its groups only
        assert np.abs(rank["logits"] - expected["logits"]).max() <= 1e-4
        assert rank["logits"].shape == (1, ids.shape[1], config.vocab_size)  # gathered: the whole vocabulary
        np.testing.assert_array_equal(rank["alone"], expected["alone"])
        np.testing.assert_array_equal(rank["batch"], expected["batch"])
    np.testing.assert_array_equal(expected["batch"][1], expected["alone"][0])  # the batch's padding is inert


@pytest.mark.parametrize(
    "load, flags",
    [
        ({"dtype": "bfloat16"}, ["--dtype", "bfloat16"]),  # the bf16 kernels
        # row splits of 32 and 48 rows fall on groups of 16; float32 activations, since int8 ones take their scale
        # over the rank's slice of a row (as rounded as one process's, not the same rounding)
        (
            {"quantization": "int4", "group_size": 16, "activation_dtype": "float32"},
            ["--quantize", "int4", "--group-size", "16", "--activation-dtype", "float32"],
        ),
    ],
)
def test_split_model_with_the_kernels_matches_one_process(small, tmp_path, load, flags):
    """bf16 and int4 (quantized after splitting, on the groups one process has) are the same weights split:
    only the order of the additions differs."""
    tmp, _config, ids, batch_ids, batch_mask = small
    expected = one_process(GLM4ForCausalLM.from_pretrained(str(tmp / "model"), **load), ids, batch_ids, batch_mask)
    for rank in split_run(small, 2, tmp_path, *flags):
        assert np.abs(rank["logits"] - expected["logits"]).max() <= 2e-3
        np.testing.assert_array_equal(rank["alone"], expected["alone"])
        np.testing.assert_array_equal(rank["batch"], expected["batch"])


@pytest.mark.slow
def test_each_rank_holds_half_the_weights(tmp_path):
    """A model whose weights (~630 MB in float32) dwarf the process's own memory: what loading and generating
    add to a rank's peak RSS is about half of the weights."""
    config = small_config(
        vocab_size=65536,
        hidden_size=1024,
        intermediate_size=4096,
        num_attention_heads=16,
        num_key_value_heads=2,
        head_dim=64,
    )
    paddle.seed(0)
    model = GLM4ForCausalLM(config)
    model.save_pretrained(str(tmp_path / "model"))
    weights = (tmp_path / "model" / "model.safetensors").stat().st_size
    del model
    ids = np.arange(3, 10)[None]
    np.savez(tmp_path / "inputs.npz", ids=ids, batch_ids=ids, batch_mask=np.ones_like(ids))
    args = ["--model", str(tmp_path / "model"), "--inputs", str(tmp_path / "inputs.npz"), "--max-new-tokens", "2"]
    (tmp_path / "one").mkdir()
    alone = subprocess.run(
        [sys.executable, str(WORKER), *args, "--out", str(tmp_path / "one"), "--degree", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
        cwd=ROOT,
    )
    assert alone.returncode == 0, alone.stderr[-2000:]
    (tmp_path / "two").mkdir()
    split = launch(2, tmp_path, *args, "--out", str(tmp_path / "two"), "--degree", "2", timeout=300)
    assert split.returncode == 0, rank_logs(tmp_path)[-3000:]

    def added(result) -> int:
        return int(result["loaded_rss"]) - int(result["before_rss"])

    one = added(np.load(tmp_path / "one" / "rank0.npz"))
    ranks = [added(np.load(tmp_path / "two" / f"rank{r}.npz")) for r in range(2)]
    print(
        f"weights {weights / 2**20:.0f} MiB; loading added {one / 2**20:.0f} MiB to one process, "
        f"{', '.join(f'{r / 2**20:.0f}' for r in ranks)} MiB to each of 2 ranks"
    )
    # one process maps its float32 checkpoint: what it never reads (the embedding rows not looked up) stays
    # on disk, so its growth is no yardstick; a rank copies its slices, so it holds its half of every weight,
    # plus the distributed runtime (gloo, the launch's environment: ~120 MiB here)
    assert one < 0.9 * weights
    assert all(0.45 * weights < rank < 0.5 * weights + 160 * 2**20 for rank in ranks)


# ---- refused before loading ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, degree, names",
    [
        ({}, 3, "num_attention_heads"),
        ({"num_attention_heads": 6, "num_key_value_heads": 3}, 2, "key/value groups"),
        ({"intermediate_size": 98}, 4, "intermediate_size"),
        ({"vocab_size": 510}, 4, "vocab_size"),
        ({}, 0, "positive integer"),
    ],
)
def test_a_degree_that_does_not_split_the_model_is_refused(overrides, degree, names):
    with pytest.raises(TensorParallelError, match=names):
        check_degree(small_config(**overrides), degree)


def test_int4_groups_must_fall_on_the_row_splits(tmp_path):
    config = small_config()  # o_proj: 64 input rows, down_proj: 96; split in 2: 32 and 48
    with pytest.raises(TensorParallelError, match=r"groups of 32 .* down_proj's 96 input rows into 48"):
        prepare(config, Packed("int4", 32), 2, storage_only=False)
    quantized = small_config(quantization=Quantization("int4", 32))
    with pytest.raises(TensorParallelError, match="checkpoint is quantized as int4 with groups of 32"):
        prepare(quantized, Dense("float32"), 2, storage_only=False)
    with pytest.raises(TensorParallelError, match="dynamic-graph only"):
        prepare(config, Dense("float32"), 2, storage_only=True)


def test_a_launch_of_another_size_is_refused(small, monkeypatch):
    monkeypatch.delenv("PADDLE_TRAINERS_NUM", raising=False)
    with pytest.raises(TensorParallelError, match=r"needs 2 processes.*has 1.*--nproc_per_node 2"):
        GLM4ForCausalLM.from_pretrained(str(small[0] / "model"), tensor_parallel_degree=2)


def test_layout_of_glm4_9b_with_two_and_four_ranks():
    config = small_config(
        vocab_size=151552,
        hidden_size=4096,
        intermediate_size=13696,
        num_attention_heads=32,
        num_key_value_heads=2,
        head_dim=128,
        pad_token_id=151329,
        eos_token_id=[151329],
    )
    two = Layout(config, 2, 1)
    assert (two.heads, two.groups, two.ffn, two.vocab) == (
        range(16, 32),
        range(1, 2),
        range(6848, 13696),
        range(75776, 151552),
    )
    assert two.qkv_columns() == [range(2048, 4096), range(4096 + 128, 4096 + 256), range(4352 + 128, 4352 + 256)]
    assert two.gate_up_columns() == [range(6848, 13696), range(13696 + 6848, 2 * 13696)]
    assert [Layout(config, 4, r).groups for r in range(4)] == [range(0, 1), range(0, 1), range(1, 2), range(1, 2)]
    assert [Layout(config, 4, r).heads for r in range(4)][2] == range(16, 24)  # group 1's heads are 16..31


# ---- a rank that dies or hangs ---------------------------------------------------------------------------
def _spawn_ranks(small, tmp: Path, *args: str) -> list[subprocess.Popen]:
    """The two ranks started by hand, as on two machines where no launcher watches the other: their own
    collectives must notice a dead peer."""
    procs = []
    port, *ends = _free_ports(3)
    endpoints = [f"127.0.0.1:{end}" for end in ends]
    (tmp / "out").mkdir(parents=True, exist_ok=True)
    for rank in range(2):
        env = _env() | {
            "PADDLE_TRAINER_ID": str(rank),
            "PADDLE_TRAINERS_NUM": "2",
            "PADDLE_DISTRI_BACKEND": "gloo",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "PADDLE_TRAINER_ENDPOINTS": ",".join(endpoints),
            "PADDLE_CURRENT_ENDPOINT": endpoints[rank],
        }
        command = [
            sys.executable,
            str(WORKER),
            "--model",
            str(small[0] / "model"),
            "--out",
            str(tmp / "out"),
            "--degree",
            "2",
            "--inputs",
            str(small[0] / "inputs.npz"),
            *args,
        ]
        procs.append(
            subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    return procs


def _free_ports(count: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:  # all open at once: distinct ports
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def test_a_rank_killed_mid_generation_ends_the_other_with_an_error(small, tmp_path):
    procs = _spawn_ranks(small, tmp_path, "--die-at-step", "3")
    started = time.monotonic()
    outputs = [p.communicate(timeout=90) for p in procs]
    assert procs[1].returncode == 9, outputs[1][1][-2000:]  # it died at step 3 as asked
    assert procs[0].returncode not in (0, None), outputs[0][1][-2000:]
    assert time.monotonic() - started < 60
    # gloo names the lost connection: reset or closed by the peer, or (1-2 runs in 10 here, by when the death lands
    # in rank 0's collective) its pair with rank 1 timed out at once
    lost = ("Connection reset by peer", "Connection closed by peer", "TIMEOUT self_rank = 0 pair_rank = 1")
    assert any(text in outputs[0][1] for text in lost), outputs[0][1][-2000:]


@pytest.mark.slow
def test_a_rank_that_hangs_ends_the_other_with_an_error_after_the_gloo_timeout(small, tmp_path):
    """A rank stopped (SIGSTOP: alive, its sockets open) mid-generation: the other's collective times out."""
    procs = _spawn_ranks(small, tmp_path, "--die-at-step", "3", "--hang")
    try:
        started = time.monotonic()
        _, err = procs[0].communicate(timeout=120)
        assert procs[0].returncode not in (0, None)
        assert 25 < time.monotonic() - started < 90
        assert "TIMEOUT" in err or "Timed out" in err, err[-2000:]
    finally:
        procs[1].send_signal(signal.SIGKILL)
        procs[1].communicate()


# ---- the command line: rank 0 leads, the other ranks follow ----------------------------------------------------
GLM4 = str(Path(sys.executable).parent / "glm4")


@pytest.fixture(scope="module")
def cli_checkpoint(tmp_path_factory):
    from test_cli import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("tp_cli"))


def launch_glm4(tmp: Path, *args: str, stdin: str | None = None, timeout: float = 180) -> tuple[int, str]:
    """`python -m paddle.distributed.launch --nproc_per_node 2 glm4 ARGS --tensor-parallel 2`; (exit code, what
    rank 0 printed). The launcher echoes rank 0's output among its own lines; the log file holds it alone."""
    command = launch_command(2, tmp / "log", GLM4, *args, "--tensor-parallel", "2")
    done = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=ROOT)
    return done.returncode, (tmp / "log" / "workerlog.0").read_text(errors="replace")


@pytest.mark.slow
def test_glm4_generate_split_in_two_prints_what_one_process_does(cli_checkpoint, tmp_path):
    from test_cli import expected_answer

    model_dir, model, tokenizer = cli_checkpoint
    code, out = launch_glm4(
        tmp_path, "generate", "--model", model_dir, "--prompt", "Hello, 你好", "--max-new-tokens", "12"
    )
    assert code == 0, out[-3000:]
    ids = expected_answer(model, tokenizer, tokenizer.encode("Hello, 你好"), 12)
    assert tokenizer.decode(ids, skip_special_tokens=True) + "\n" in out
    assert "decode:" in out  # rank 0 reports the speed
    assert "tokens/s" not in (tmp_path / "log" / "workerlog.1").read_text(errors="replace")  # rank 1 prints nothing


@pytest.mark.slow
def test_glm4_chat_split_in_two_survives_a_pause_longer_than_the_gloo_timeout(cli_checkpoint, tmp_path):
    """The follower waits for rank 0's next turn longer than gloo's 30 s collective timeout: the leader's
    heartbeat keeps it waiting. The answers are one process's."""
    model_dir, model, tokenizer = cli_checkpoint
    reader, writer = os.pipe()
    command = launch_command(
        2, tmp_path / "log", GLM4, "chat", "--model", model_dir, "--max-new-tokens", "6", "--tensor-parallel", "2"
    )
    process = subprocess.Popen(
        command, stdin=reader, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(), cwd=ROOT
    )
    os.close(reader)
    try:
        os.write(writer, b"Hello\n")
        time.sleep(40)
        os.write(writer, b"Again\n")
        os.close(writer)
        assert process.wait(timeout=120) == 0
    finally:
        if process.poll() is None:
            process.kill()
    out = (tmp_path / "log" / "workerlog.0").read_text(errors="replace")
    messages = []
    for turn in ("Hello", "Again"):
        messages.append({"role": "user", "content": turn})
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        answer, _ = model.generate(
            [ids], max_new_tokens=6, eos_token_id=tokenizer.stop_token_ids, vocab_limit=len(tokenizer)
        )
        new = [t for t in answer.numpy()[0].tolist() if t not in tokenizer.stop_token_ids]
        text = tokenizer.decode(new, skip_special_tokens=True).strip()
        messages.append({"role": "assistant", "content": text})
        assert text in out
    assert "error" not in out.lower()


@pytest.mark.slow
def test_glm4_serve_split_in_two_answers_as_one_process(cli_checkpoint, tmp_path):
    import re

    import httpx

    from test_cli import expected_answer

    model_dir, model, tokenizer = cli_checkpoint
    command = launch_command(
        2, tmp_path / "log", GLM4, "serve", "--model", model_dir, "--port", "0", "--tensor-parallel", "2"
    )
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(), cwd=ROOT
    )
    log = tmp_path / "log" / "workerlog.0"
    try:
        deadline, url = time.monotonic() + 120, None
        while url is None and time.monotonic() < deadline:
            assert process.poll() is None, log.read_text(errors="replace")[-3000:]
            found = (
                re.search(r"serving \S+ at (http://\S+/v1)", log.read_text(errors="replace")) if log.exists() else None
            )
            url = found.group(1) if found else None
            time.sleep(0.2)
        assert url is not None, "the server did not start"
        prompt = "The weather today"
        for _ in range(2):  # two requests, one after the other: the followers run both
            reply = httpx.post(
                f"{url}/completions",
                json={"model": "m", "prompt": prompt, "max_tokens": 10, "temperature": 0},
                timeout=60,
            )
            reply.raise_for_status()
            expected = expected_answer(model, tokenizer, tokenizer.encode(prompt), 10)
            assert reply.json()["choices"][0]["text"] == tokenizer.decode(expected, skip_special_tokens=True)
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.parametrize(
    "args, message",
    [
        (["export", "--out", "OUT", "--tensor-parallel", "2"], "dynamic-graph only for now"),
        (
            ["generate", "--prompt", "hi", "--tensor-parallel", "2"],
            "needs 2 processes, one per rank; this launch has 1",
        ),
        (["generate", "--prompt", "hi", "--tensor-parallel", "2", "--engine", "inference"], "dynamic engine only"),
        (["serve", "--port", "0", "--tensor-parallel", "3"], "3 does not divide the model's num_attention_heads, 4"),
    ],
)
def test_the_command_line_refuses_what_it_cannot_split_in_one_line(cli_checkpoint, monkeypatch, capsys, args, message):
    from paddle_glm4.__main__ import main

    monkeypatch.delenv("PADDLE_TRAINERS_NUM", raising=False)
    assert main([*args, "--model", cli_checkpoint[0]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
