"""The OpenAI-compatible server, end to end: real server processes on loopback ports, driven by the official
`openai` client (and by httpx where a test needs the raw HTTP status, headers or connection).

Two servers per module run:
- `python -m paddle_glm4.server` over a small converted checkpoint with random weights: its greedy answers must
  equal `generate` run here on the same checkpoint;
- tests/scripted_server.py: the same app over a scripted model with one slot, for tool calls (known answers),
  admission and disconnects (a slow answer) and failures.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import paddle
import pytest

from conftest import small_config
from paddle_glm4 import GLM4ForCausalLM, GLM4Tokenizer
from paddle_glm4.demo import random_weights
from paddle_glm4.engine import load_engine
from paddle_glm4.small_vocab import write_small_vocabulary

pytestmark = pytest.mark.slow  # server processes

REPO = Path(__file__).resolve().parents[1]
KEY = "test-key-123"
CONTEXT = 256
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "Hi, how can I help?"},
    {"role": "user", "content": "What is the weather today?"},
]


# ---- servers --------------------------------------------------------------------------------------------
def start_server(command: list[str], log: Path, ready_headers: dict | None = None):
    """Start a server process on a free loopback port; return (process, base URL) once it answers."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, *command, "--port", "0"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        found = re.search(r"serving \S+ at (http://\S+/v1)", log.read_text())
        if found:
            try:
                httpx.get(f"{found.group(1)}/models", headers=ready_headers, timeout=5).raise_for_status()
                return process, found.group(1)
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"the server did not start in time:\n{log.read_text()[-3000:]}")


def stop_server(process) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A converted checkpoint: a small GLM-4 with random weights and the small GLM-4-style vocabulary."""
    directory = tmp_path_factory.mktemp("checkpoint")
    tokenizer = GLM4Tokenizer.from_pretrained(write_small_vocabulary(directory))
    config = small_config(
        vocab_size=tokenizer.vocab_size,
        seq_length=CONTEXT,
        eos_token_id=tokenizer.stop_token_ids,
        pad_token_id=tokenizer.pad_token_id,
    )
    with paddle.LazyGuard():
        model = GLM4ForCausalLM(config)
    params = model.state_dict()
    for name, array in random_weights(config, seed=0):
        params[name].set_value(array)
    model.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def engine(checkpoint):
    return load_engine(str(checkpoint))


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "server.log"
    process, url = start_server(
        [
            "-m",
            "paddle_glm4.server",
            "--model",
            str(checkpoint),
            "--api-key",
            KEY,
            "--max-concurrency",
            "8",
            "--served-model-name",
            "glm4-test",
        ],
        log,
        {"Authorization": f"Bearer {KEY}"},
    )
    yield url
    stop_server(process)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server, api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def scripted(checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "scripted.log"
    process, url = start_server([str(REPO / "tests" / "scripted_server.py"), "--tokenizer", str(checkpoint)], log)
    yield url
    stop_server(process)


@pytest.fixture(scope="module")
def scripted_client(scripted):
    return openai.OpenAI(base_url=scripted, api_key="unused", max_retries=0, timeout=60)


# ---- what generate() says -------------------------------------------------------------------------------
def greedy(engine, prompt: list[int], max_tokens: int, eos: list[int], repetition_penalty: float = 1.0):
    """(new ids, text) of greedy generate; one row, so no padding: every id was generated."""
    model, tokenizer = engine
    out, _ = model.generate(
        [prompt], max_new_tokens=max_tokens, do_sample=False, eos_token_id=eos, repetition_penalty=repetition_penalty
    )
    ids = out.numpy()[0].tolist()
    return ids, tokenizer.decode(ids, skip_special_tokens=True)


def expected_chat(engine, messages, max_tokens):
    """(prompt length, new ids, answer text, finish reason); GLM-4's answers start with a newline, which the
    server drops, so leading whitespace is dropped here too."""
    tokenizer = engine[1]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids, text = greedy(engine, prompt, max_tokens, tokenizer.stop_token_ids)
    return len(prompt), ids, text.lstrip(), "stop" if ids[-1] in tokenizer.stop_token_ids else "length"


def stream_text(stream) -> tuple[str, list]:
    chunks = list(stream)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


# ---- the model server -----------------------------------------------------------------------------------
def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["glm4-test"] and models[0].object == "model"


def test_chat_completion_equals_generate(client, engine):
    prompt_len, ids, text, finish = expected_chat(engine, CONVERSATION, 24)
    assert text  # a test of equality between empty strings would prove little
    answer = client.chat.completions.create(model="glm4-test", messages=CONVERSATION, max_tokens=24, temperature=0)
    choice = answer.choices[0]
    assert choice.message.content == text and choice.message.role == "assistant"
    assert choice.finish_reason == finish and not choice.message.tool_calls
    assert answer.model == "glm4-test" and answer.id.startswith("chatcmpl-")
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.usage.total_tokens) == (
        prompt_len,
        len(ids),
        prompt_len + len(ids),
    )


def test_streamed_chat_equals_generate(client, engine):
    prompt_len, ids, text, finish = expected_chat(engine, CONVERSATION, 24)
    streamed, chunks = stream_text(
        client.chat.completions.create(
            model="glm4-test",
            messages=CONVERSATION,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert streamed == text
    assert chunks[0].choices[0].delta.role == "assistant" and len(chunks) > 4  # it came in pieces
    assert chunks[-2].choices[0].finish_reason == finish
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == prompt_len  # OpenAI's usage chunk
    assert chunks[-1].usage.completion_tokens == len(ids)
    # without stream_options, usage comes with the finishing chunk
    _, chunks = stream_text(
        client.chat.completions.create(
            model="glm4-test", messages=CONVERSATION, max_tokens=24, temperature=0, stream=True
        )
    )
    assert chunks[-1].choices[0].finish_reason == finish and chunks[-1].usage.total_tokens == prompt_len + len(ids)


def test_stop_strings_cut_the_answer_and_stop_the_generation(client, engine):
    _, ids, text, _ = expected_chat(engine, CONVERSATION, 24)
    stop = next(text[i : i + 2] for i in range(3, len(text) - 2) if not text[i : i + 2].isspace())
    kept = text[: text.index(stop)]
    answer = client.chat.completions.create(
        model="m", messages=CONVERSATION, max_tokens=24, temperature=0, stop=[stop, "never seen"]
    )
    assert answer.choices[0].message.content == kept and answer.choices[0].finish_reason == "stop"
    assert answer.usage.completion_tokens < len(ids)
    streamed, chunks = stream_text(
        client.chat.completions.create(
            model="m", messages=CONVERSATION, max_tokens=24, temperature=0, stop=stop, stream=True
        )
    )
    assert streamed == kept and chunks[-1].choices[0].finish_reason == "stop"


def test_completions_for_the_base_model_equal_generate(client, engine):
    tokenizer = engine[1]
    prompt = tokenizer.encode("The weather today")
    ids, text = greedy(engine, prompt, 16, engine[0].generation_config.eos_token_id)
    answer = client.completions.create(model="m", prompt="The weather today", max_tokens=16, temperature=0)
    assert answer.choices[0].text == text and answer.object == "text_completion"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(prompt), len(ids))
    chunks = list(
        client.completions.create(model="m", prompt="The weather today", max_tokens=16, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == text and chunks[-1].usage.completion_tokens == len(ids)


def test_sampling_with_a_seed_is_reproducible(client):
    def ask():
        return (
            client.chat.completions.create(
                model="m", messages=CONVERSATION, max_tokens=16, temperature=0.9, top_p=0.9, seed=7
            )
            .choices[0]
            .message.content
        )

    assert ask() == ask()


def test_top_k_and_repetition_penalty_can_be_asked_per_request(client, engine):
    tokenizer = engine[1]
    prompt = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True)
    plain = greedy(engine, prompt, 24, tokenizer.stop_token_ids)[1].lstrip()
    penalized = greedy(engine, prompt, 24, tokenizer.stop_token_ids, repetition_penalty=3.0)[1].lstrip()
    assert penalized != plain  # else the test could not tell whether the penalty reached generate

    def ask(**extra):
        return (
            client.chat.completions.create(model="m", messages=CONVERSATION, max_tokens=24, extra_body=extra)
            .choices[0]
            .message.content
        )

    assert ask(temperature=0, repetition_penalty=3.0) == penalized
    assert ask(temperature=1.0, top_k=1, seed=3) == plain  # top-k 1 samples the greedy token


def test_eight_concurrent_streams_are_all_served_correctly(client, engine):
    conversations = [[{"role": "user", "content": f"Question number {i}: what is {i} + {i}?"}] for i in range(8)]

    def ask(messages):
        return stream_text(
            client.chat.completions.create(model="m", messages=messages, max_tokens=16, temperature=0, stream=True)
        )[0]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, conversations))
    assert answers == [expected_chat(engine, messages, 16)[2] for messages in conversations]


def raw_post(url: str, body, key: str | None = KEY, path: str = "/chat/completions") -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, str):
        return httpx.post(url + path, content=body, headers={**headers, "Content-Type": "application/json"})
    return httpx.post(url + path, json=body, headers=headers, timeout=30)


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
    assert {"param", "code"} <= set(error)
    if code:
        assert error["code"] == code
    return error


USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    "body, param, code",
    [
        ({"model": "m", "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role", None),
        ({"model": "m", "messages": USER, "max_tokens": 0}, "max_tokens", None),
        ({"model": "m", "messages": USER, "max_tokens": -5}, "max_tokens", None),
        ({"model": "m", "messages": USER, "temperature": 3}, "temperature", None),
        ({"model": "m", "messages": USER, "top_k": -1}, "top_k", None),
        ({"model": "m", "messages": USER, "repetition_penalty": 0}, "repetition_penalty", None),
        ({"model": "m", "messages": []}, "messages", None),
        (
            {"model": "m", "messages": [{"role": "user", "content": "hello " * CONTEXT}]},
            "messages",
            "context_length_exceeded",
        ),
        ({"model": "m", "messages": USER, "max_tokens": CONTEXT}, "messages", "context_length_exceeded"),
        (
            {
                "model": "m",
                "messages": USER,
                "tools": [WEATHER_TOOL],
                "tool_choice": {"type": "function", "function": {"name": "nope"}},
            },
            "tool_choice",
            None,
        ),
    ],
    ids=[
        "unknown-role",
        "zero-max-tokens",
        "negative-max-tokens",
        "temperature",
        "top-k",
        "repetition-penalty",
        "no-messages",
        "prompt-too-long",
        "no-room-to-answer",
        "unknown-tool-choice",
    ],
)
def test_invalid_requests_get_400_with_an_openai_error(server, body, param, code):
    error = assert_openai_error(raw_post(server, body), 400, code)
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_invalid_json_and_unknown_paths(server):
    assert_openai_error(raw_post(server, "{not json"), 400)
    assert_openai_error(httpx.get(server + "/nowhere", headers={"Authorization": f"Bearer {KEY}"}), 404)


def test_the_openai_client_sees_bad_requests_as_such(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hello " * CONTEXT}])
    assert caught.value.status_code == 400 and caught.value.code == "context_length_exceeded"


def test_a_missing_or_wrong_api_key_gets_401(server):
    for key in (None, "wrong-key"):
        assert_openai_error(raw_post(server, {"model": "m", "messages": USER}, key=key), 401, "invalid_api_key")
    assert_openai_error(httpx.get(server + "/models"), 401)
    assert_openai_error(raw_post(server, "{not json", key=None), 401)  # the key is checked before anything else
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server, api_key="wrong-key", max_retries=0).models.list()


def test_the_server_still_serves_after_bad_requests(client):
    answer = client.chat.completions.create(model="m", messages=USER, max_tokens=4, temperature=0)
    assert answer.usage.completion_tokens >= 1


# ---- the scripted server: tool calls --------------------------------------------------------------------
def test_tool_call_round_trip(scripted_client):
    question = [{"role": "user", "content": "What is the weather in Beijing?"}]
    answer = scripted_client.chat.completions.create(model="m", messages=question, tools=[WEATHER_TOOL])
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Beijing"}
    # the call and its result go back; the model sees them as GLM-4's assistant and observation turns
    history = [
        *question,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 20}'},
    ]
    answer = scripted_client.chat.completions.create(model="m", messages=history, tools=[WEATHER_TOOL])
    assert answer.choices[0].message.content == 'get_weather said: {"temperature": 20}'
    assert answer.choices[0].finish_reason == "stop" and not answer.choices[0].message.tool_calls


def test_streamed_tool_call(scripted_client):
    chunks = list(
        scripted_client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "weather in Beijing?"}],
            tools=[WEATHER_TOOL],
            tool_choice="auto",
            stream=True,
        )
    )
    calls = [call for c in chunks if c.choices for call in c.choices[0].delta.tool_calls or []]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].id.startswith("call_")
    assert calls[0].function.name == "get_weather" and json.loads(calls[0].function.arguments) == {"city": "Beijing"}
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_malformed_tool_call_comes_back_as_content(scripted_client):
    answer = scripted_client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "malformed please"}], tools=[WEATHER_TOOL]
    )
    choice = answer.choices[0]
    assert choice.message.content == "get_weather\nthis is not JSON" and not choice.message.tool_calls
    assert choice.finish_reason == "stop"


@pytest.mark.parametrize(
    "tool_choice, expected",
    [
        ("none", "I have no tools."),
        ({"type": "function", "function": {"name": "get_weather"}}, None),
    ],
)
def test_tool_choice(scripted_client, tool_choice, expected):
    answer = scripted_client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "weather?"}], tools=[WEATHER_TOOL], tool_choice=tool_choice
    )
    message = answer.choices[0].message
    if expected:
        assert message.content == expected and not message.tool_calls
    else:
        assert message.tool_calls[0].function.name == "get_weather"


# ---- the scripted server: admission, disconnects, failures ----------------------------------------------
SLOW = {"model": "m", "messages": [{"role": "user", "content": "slow"}], "max_tokens": 1000}  # 20 s if not stopped


def served_within(url: str, seconds: float) -> float:
    """How long until a quick request is served (retrying while the server says 429); fails after `seconds`."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        response = raw_post(url, {"model": "m", "messages": USER}, key=None)
        if response.status_code == 200:
            assert response.json()["choices"][0]["message"]["content"] == "Hello there."
            return time.monotonic() - started
        assert_openai_error(response, 429)
        time.sleep(0.05)
    raise AssertionError(f"no request was served within {seconds} s")


def test_beyond_max_concurrency_requests_get_429(scripted):
    with httpx.stream("POST", scripted + "/chat/completions", json={**SLOW, "stream": True}, timeout=30) as slow:
        lines = slow.iter_lines()
        assert next(lines).startswith("data: ")  # the slow answer holds the only slot
        response = raw_post(scripted, {"model": "m", "messages": USER}, key=None)
        assert_openai_error(response, 429, "server_busy")
        assert response.headers["retry-after"]
        with pytest.raises(openai.RateLimitError):
            openai.OpenAI(base_url=scripted, api_key="unused", max_retries=0).chat.completions.create(
                model="m", messages=USER
            )
    served_within(scripted, 5)


def test_a_client_that_leaves_mid_stream_frees_its_slot(scripted):
    with httpx.stream("POST", scripted + "/chat/completions", json={**SLOW, "stream": True}, timeout=30) as slow:
        assert any('"content":"t' in line for line in slow.iter_lines())  # "tick" is under way
    # the client hung up 1000 tokens (20 s) before the end; the next request gets the slot at once
    assert served_within(scripted, 5) < 5


def test_a_client_that_leaves_a_whole_answer_frees_its_slot(scripted):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(scripted + "/chat/completions", json=SLOW, timeout=0.5)
    assert served_within(scripted, 5) < 5


def test_a_failing_generation_fails_that_request_only(scripted_client):
    boom = [{"role": "user", "content": "explode"}]
    with pytest.raises(openai.InternalServerError):
        scripted_client.chat.completions.create(model="m", messages=boom)
    with pytest.raises(openai.APIError, match="server had an error") as caught:  # the details stay in the log
        list(scripted_client.chat.completions.create(model="m", messages=boom, stream=True))
    assert "fails on purpose" not in str(caught.value)
    answer = scripted_client.chat.completions.create(model="m", messages=USER)
    assert answer.choices[0].message.content == "Hello there."


# ---- the command line -----------------------------------------------------------------------------------
def test_a_busy_port_fails_in_one_line_before_the_model_loads(checkpoint):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        busy = subprocess.run(
            [
                sys.executable,
                "-m",
                "paddle_glm4.server",
                "--model",
                str(checkpoint),
                "--port",
                str(taken.getsockname()[1]),
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
    last = busy.stderr.strip().splitlines()[-1]  # (Paddle may warn before it, on import)
    assert busy.returncode == 2 and last.startswith("error: ") and "in use" in last
    assert "loading" not in busy.stderr


# ---- the Paddle Inference engine ------------------------------------------------------------------------
def test_the_inference_engine_serves_the_same_greedy_answer(checkpoint, engine, tmp_path):
    inference = pytest.importorskip("paddle_glm4.inference")
    export = tmp_path / "export"
    inference.export_model(str(checkpoint), str(export), progress=False)
    process, url = start_server(
        ["-m", "paddle_glm4.server", "--engine", "inference", "--model", str(export), "--tokenizer", str(checkpoint)],
        tmp_path / "inference.log",
    )
    try:
        answer = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60).chat.completions.create(
            model="m", messages=CONVERSATION, max_tokens=24, temperature=0
        )
    finally:
        stop_server(process)
    prompt_len, ids, text, finish = expected_chat(engine, CONVERSATION, 24)
    assert answer.choices[0].message.content == text and answer.choices[0].finish_reason == finish
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (prompt_len, len(ids))
