"""The `glm4` command line, run for real in subprocesses: generate, chat (piped and on a terminal), demo, errors."""

import os
import pty
import select
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import paddle
import pytest

from conftest import small_config
from paddle_glm4 import GLM4ForCausalLM, GLM4Tokenizer
from paddle_glm4.console import LineReader
from paddle_glm4.small_vocab import write_small_vocabulary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def glm4(*args, stdin=None, timeout=180):
    return subprocess.run(
        [sys.executable, "-m", "paddle_glm4", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def make_checkpoint(directory, silent_norm=False):
    """A small converted checkpoint with the project's small vocabulary; `silent_norm` zeroes the final norm,
    so every logit is 0 and greedy decoding repeats token 0 forever (never a stop token)."""
    tokenizer = GLM4Tokenizer.from_pretrained(write_small_vocabulary(directory / "vocab"))
    config = small_config(
        vocab_size=512, seq_length=4096, eos_token_id=tokenizer.stop_token_ids, pad_token_id=tokenizer.pad_token_id
    )
    paddle.seed(0)
    model = GLM4ForCausalLM(config)
    if silent_norm:
        model.model.norm.weight.set_value(np.zeros(config.hidden_size, np.float32))
    model.save_pretrained(str(directory / "model"))
    tokenizer.save_pretrained(directory / "model")
    return str(directory / "model"), model.eval(), tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("cli"))


def expected_answer(model, tokenizer, ids, new_tokens, **kwargs):
    """The new ids of greedy generation among the tokenizer's ids (the model's 512 rows outnumber the
    vocabulary's 432 tokens, as GLM-4's 151552 do its 151343: the CLI never picks those padding rows)."""
    out, _ = model.generate([ids], max_new_tokens=new_tokens, vocab_limit=len(tokenizer), **kwargs)
    ids = out.numpy()[0].tolist()
    assert not any(tokenizer.is_padding_id(t) for t in ids)
    return ids


@pytest.mark.slow
def test_help_explains_every_flag():
    done = glm4("generate", "--help")
    assert done.returncode == 0
    for flag in (
        "--model",
        "--prompt",
        "--max-new-tokens",
        "--temperature",
        "--top-p",
        "--top-k",
        "--seed",
        "--dtype",
        "--engine",
        "--tokenizer",
        "--greedy",
        "--repetition-penalty",
    ):
        assert flag in done.stdout
    assert all(sub in glm4("--help").stdout for sub in ("generate", "chat", "convert", "demo"))
    assert all(
        flag in glm4("convert", "--help").stdout
        for flag in ("--src", "--dst", "--paddlenlp-name", "--paddleformers-name")
    )


@pytest.mark.slow
def test_generate_streams_the_greedy_continuation_and_reports_speed(checkpoint):
    model_dir, model, tokenizer = checkpoint
    done = glm4("generate", "--model", model_dir, "--prompt", "Hello, 你好", "--max-new-tokens", "12")
    assert done.returncode == 0, done.stderr
    ids = expected_answer(model, tokenizer, tokenizer.encode("Hello, 你好"), 12)
    assert done.stdout == tokenizer.decode(ids, skip_special_tokens=True) + "\n"
    assert "prefill:" in done.stderr and "tokens/s" in done.stderr


@pytest.mark.slow
def test_generate_prefills_in_chunks_with_the_same_answer_and_reports_time_to_first_token(checkpoint):
    model_dir, model, tokenizer = checkpoint
    prompt = "Hello, 你好, a prompt of several chunks"
    done = glm4("generate", "--model", model_dir, "--prompt", prompt, "--max-new-tokens", "8", "--prefill-chunk", "3")
    assert done.returncode == 0, done.stderr
    ids = expected_answer(model, tokenizer, tokenizer.encode(prompt), 8)
    assert done.stdout == tokenizer.decode(ids, skip_special_tokens=True) + "\n"
    assert "time to first token:" in done.stderr


@pytest.mark.slow
def test_generate_sampling_flags_are_reproducible(checkpoint):
    model_dir, _, _ = checkpoint
    args = (
        "generate",
        "--model",
        model_dir,
        "--prompt",
        "abc",
        "--max-new-tokens",
        "10",
        "--temperature",
        "1.3",
        "--top-p",
        "0.9",
        "--seed",
        "3",
    )
    first, again = glm4(*args), glm4(*args)
    assert first.returncode == 0 and first.stdout == again.stdout


@pytest.mark.slow
def test_chat_with_piped_stdin_keeps_history_and_handles_reset_and_exit(checkpoint):
    model_dir, model, tokenizer = checkpoint
    done = glm4(
        "chat",
        "--model",
        model_dir,
        "--max-new-tokens",
        "6",
        "--system",
        "Be brief.",
        stdin="hi there\nand more\n/reset\nhello again\n/exit\nnever read\n",
    )
    assert done.returncode == 0, done.stderr
    system = [{"role": "system", "content": "Be brief."}]
    history, expected = list(system), []
    for text in ("hi there", "and more", None, "hello again"):
        if text is None:  # /reset
            history = list(system)
            continue
        history.append({"role": "user", "content": text})
        ids = expected_answer(
            model,
            tokenizer,
            tokenizer.apply_chat_template(history, add_generation_prompt=True),
            6,
            eos_token_id=tokenizer.stop_token_ids,
        )
        answer = tokenizer.decode([t for t in ids if t not in tokenizer.stop_token_ids], skip_special_tokens=True)
        history.append({"role": "assistant", "content": answer.strip()})
        expected.append(answer.lstrip())
    assert done.stdout == "".join(f"{a}\n" for a in expected)
    assert "(history cleared)" in done.stderr


@pytest.mark.slow
def test_chat_ends_cleanly_at_end_of_input(checkpoint):
    done = glm4("chat", "--model", checkpoint[0], "--max-new-tokens", "3", stdin="one turn\n")
    assert done.returncode == 0 and done.stdout.count("\n") == 1 and "Traceback" not in done.stderr


def read_until(fd, marker: bytes, timeout: float = 60) -> bytes:
    seen, deadline = b"", time.time() + timeout
    while marker not in seen:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.time()))
        if not ready:
            raise TimeoutError(f"no {marker!r} in {seen[-300:]!r}")
        seen += os.read(fd, 4096)
    return seen


def test_line_reader_splits_lines_across_reads_and_keeps_a_last_line_without_newline():
    read_end, write_end = os.pipe()
    os.write(write_end, b"one\r\ntw")
    with LineReader(read_end) as reader:
        assert reader.readline() == "one"
        os.write(write_end, "o 你好\nthree".encode())
        os.close(write_end)
        assert [reader.readline(), reader.readline(), reader.readline()] == ["two 你好", "three", None]
    os.close(read_end)


def test_line_reader_wakes_for_ctrl_c_delivered_to_another_thread():
    """With threads alive, the kernel may hand SIGINT to any of them; a plain blocking read on the main thread
    would then never see it (Ctrl-C at the chat prompt did nothing, now and then)."""
    read_end, write_end = os.pipe()
    to_another_thread = threading.Thread(
        target=lambda: (time.sleep(0.3), signal.pthread_kill(threading.get_ident(), signal.SIGINT))
    )
    unblock = threading.Timer(20, os.write, (write_end, b"timed out\n"))  # so a failure is not a hang
    unblock.start()
    started = time.monotonic()
    try:
        with LineReader(read_end) as reader, pytest.raises(KeyboardInterrupt):
            to_another_thread.start()
            reader.readline()
        assert time.monotonic() - started < 10  # woken by the signal, not by the unblocking write
    finally:
        unblock.cancel()
        to_another_thread.join()
        os.close(read_end)
        os.close(write_end)


@pytest.mark.slow
def test_chat_on_a_terminal_handles_ctrl_c_during_an_answer_and_at_the_prompt(tmp_path):
    model_dir, _, _ = make_checkpoint(tmp_path, silent_norm=True)  # answers never end by themselves
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "paddle_glm4", "chat", "--model", model_dir, "--max-new-tokens", "3000"],
        stdin=terminal,
        stdout=subprocess.PIPE,
        stderr=terminal,
        cwd=ROOT,
    )
    os.close(terminal)
    try:
        read_until(controller, b"you> ")
        os.write(controller, b"tell me a long story\n")
        os.read(process.stdout.fileno(), 1)  # the answer has started streaming
        process.send_signal(signal.SIGINT)
        read_until(controller, b"you> ")  # interrupted, back at the prompt
        process.send_signal(signal.SIGINT)  # Ctrl-C at the prompt leaves
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
        os.close(controller)


@pytest.mark.slow
def test_generate_ctrl_c_exits_with_one_line(tmp_path):
    model_dir, _, _ = make_checkpoint(tmp_path, silent_norm=True)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "paddle_glm4",
            "generate",
            "--model",
            model_dir,
            "--prompt",
            "x",
            "--max-new-tokens",
            "3000",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    os.read(process.stdout.fileno(), 1)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130 and stderr.decode().strip().splitlines()[-1] == "interrupted"
    assert b"Traceback" not in stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "setup, message",
    [
        ("missing", "no such model directory"),
        ("empty", "has no tokenizer.model"),
        ("published", "no config.json"),  # tokenizer present, but weights not converted: no Paddle config
    ],
)
def test_bad_model_directories_give_one_line_and_exit_2(tmp_path, setup, message):
    model_dir = tmp_path / "m"
    if setup != "missing":
        model_dir.mkdir()
    if setup == "published":
        write_small_vocabulary(model_dir)
        (model_dir / "pytorch_model.bin").write_bytes(b"not for unpickling")
    done = glm4("generate", "--model", str(model_dir), "--prompt", "hi")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ") and message in done.stderr
    assert done.stdout == ""


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline_from_nothing():
    started = time.time()
    done = glm4("demo", "--max-new-tokens", "8")
    assert done.returncode == 0, done.stderr
    assert time.time() - started < 60
    assert "weights are random" in done.stdout and "new ids (" in done.stdout and "tokens/s" in done.stdout
    for stage in ("[1/3]", "[2/3]", "[3/3]", "published", "verified"):
        assert stage in done.stderr
