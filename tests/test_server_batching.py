"""Continuous batching through a real server process and the official `openai` client: concurrent requests get
what they get alone; a client that leaves mid-stream leaves the batch and the others go on."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from test_server import KEY, checkpoint, engine, start_server, stop_server  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow  # a server process


@pytest.fixture(scope="module")
def batching_client(checkpoint, tmp_path_factory):  # noqa: F811
    log = tmp_path_factory.mktemp("logs") / "batching.log"
    process, url = start_server(
        [
            "-m",
            "paddle_glm4.server",
            "--model",
            str(checkpoint),
            "--api-key",
            KEY,
            "--max-concurrency",
            "16",
            "--max-num-seqs",
            "6",
            "--kv-cache-memory",
            "4MB",
        ],
        log,
        {"Authorization": f"Bearer {KEY}"},
    )
    yield url, openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=120), process.pid
    stop_server(process)


def requests():
    """16 requests: prompts of different lengths, max_tokens, stop strings, greedy and seeded sampling."""
    made = []
    for n in range(16):
        sampling = [
            {},
            {"temperature": 0.9, "seed": n},
            {"extra_body": {"top_k": 8}, "seed": 50 + n},
            {"extra_body": {"repetition_penalty": 1.4}},
        ]
        made.append(
            {
                "model": "m",
                "max_tokens": 4 + (3 * n) % 13,
                "messages": [{"role": "user", "content": "word " * (1 + (5 * n) % 40) + f"number {n}"}],
                "stop": ["q"] if n % 5 == 0 else None,
                **sampling[n % 4],
            }
        )
    return made


def answer(client, request):
    choice = client.chat.completions.create(**request).choices[0]
    return choice.message.content, choice.finish_reason


def test_sixteen_concurrent_requests_get_what_each_gets_alone(batching_client):
    _, client, _ = batching_client
    alone = [answer(client, request) for request in requests()]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda request: answer(client, request), requests()))
    assert together == alone
    assert len({text for text, _ in alone}) > 8  # the requests really differ


def test_a_client_that_leaves_mid_stream_leaves_the_batch(batching_client):
    url, client, _ = batching_client
    long = {"model": "m", "max_tokens": 200, "messages": [{"role": "user", "content": "go on"}]}
    expected = [answer(client, request) for request in requests()[:4]]
    with ThreadPoolExecutor(4) as pool:
        others = pool.map(lambda request: answer(client, request), requests()[:4])
        with httpx.stream(
            "POST",
            url + "/chat/completions",
            json={**long, "stream": True},
            timeout=60,
            headers={"Authorization": f"Bearer {KEY}"},
        ) as stream:
            assert next(stream.iter_lines()).startswith("data: ")
        assert list(others) == expected
    assert answer(client, requests()[0]) == expected[0]  # and the server answers normally afterwards


def test_a_client_that_leaves_a_whole_answer_leaves_the_batch(batching_client):
    """Not streamed: the server sees the connection close, the request leaves the batch after the current step
    (its tokens stop short of max_tokens) and its KV memory goes back."""
    url, client, _ = batching_client
    long = {"model": "m", "max_tokens": 200, "messages": [{"role": "user", "content": "go on"}]}
    started = time.perf_counter()
    assert answer(client, long)[1] == "length"  # alone, it runs all 200 tokens
    whole = time.perf_counter() - started
    before = metrics(url)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/chat/completions", json=long, timeout=whole / 4, headers={"Authorization": f"Bearer {KEY}"})
    after = wait_idle(url)
    assert after["glm4_generated_tokens_total"] - before["glm4_generated_tokens_total"] < 200
    assert after["glm4_kv_cache_bytes"] == 0


def metrics(url: str) -> dict[str, float]:
    response = httpx.get(url.removesuffix("/v1") + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    response.raise_for_status()
    assert response.headers["content-type"].startswith("text/plain")
    return {
        line.split()[0]: float(line.split()[1])
        for line in response.text.splitlines()
        if line and not line.startswith("#")
    }


def wait_idle(url: str) -> dict[str, float]:
    """The metrics once nothing runs and the cache is given back (the engine thread ends its step just after
    the last answer goes out), or after 5 s."""
    deadline, now = time.monotonic() + 5, metrics(url)
    while (now["glm4_requests_running"] or now["glm4_kv_cache_bytes"]) and time.monotonic() < deadline:
        time.sleep(0.05)
        now = metrics(url)
    return now


def test_metrics_count_the_requests_tokens_and_latencies(batching_client):
    url, client, _ = batching_client
    before = metrics(url)
    answer(client, {**requests()[3], "max_tokens": 6})
    after = metrics(url)
    generated = after["glm4_generated_tokens_total"] - before["glm4_generated_tokens_total"]
    assert 1 <= generated <= 6
    assert after["glm4_time_to_first_token_seconds_count"] == before["glm4_time_to_first_token_seconds_count"] + 1
    assert (
        after["glm4_inter_token_latency_seconds_count"] - before["glm4_inter_token_latency_seconds_count"]
        == generated - 1
    )
    after = wait_idle(url)
    assert after["glm4_requests_running"] == after["glm4_requests_waiting"] == 0  # all answered
    assert after["glm4_kv_cache_bytes"] == 0  # idle: memory given back
    assert httpx.get(url.removesuffix("/v1") + "/metrics").status_code == 401  # behind the key, like the rest


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) * 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the server's RSS from /proc (Linux)")
def test_load_64_requests_from_16_clients_all_answered_and_memory_returns(batching_client):
    _, client, pid = batching_client
    load = [requests()[n % 16] for n in range(64)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda request: answer(client, request), load[:16]))  # warm up: the allocator's pools
        before = rss(pid)
        answers = list(pool.map(lambda request: answer(client, request), load))
    assert answers == [answers[n % 16] for n in range(64)]  # every request answered, each as its twin
    assert all(finish in ("stop", "length") for _, finish in answers)
    assert rss(pid) <= before * 1.05
    assert answer(client, requests()[0]) == answers[0]


def test_a_generation_that_raises_mid_batch_fails_that_request_only(engine, monkeypatch):  # noqa: F811
    """In the batching engine (in process, so that one request can be made to fail): a request whose sampling
    raises at its third token, while others run beside it, gets 500 with OpenAI's error shape (streamed: an error
    event), the log keeps the cause; the others get their alone answers and the server serves afterwards."""
    from fastapi.testclient import TestClient

    from paddle_glm4 import scheduler
    from paddle_glm4.server.app import create_app

    model, tokenizer = engine
    bad = tokenizer.encode("explode now")
    real_choose, real_decode, rows = scheduler.choose_token, scheduler.Scheduler._decode, []

    def choose(logits, params, context, rng):
        if context[: len(bad)] == bad and len(context) >= len(bad) + 2:
            raise RuntimeError("fails on purpose")
        return real_choose(logits, params, context, rng)

    def decode(self):
        rows.append(len(self.running))
        real_decode(self)

    monkeypatch.setattr(scheduler, "choose_token", choose)
    monkeypatch.setattr(scheduler.Scheduler, "_decode", decode)
    good = [
        {"model": "m", "prompt": "word " * (1 + 3 * n) + str(n), "max_tokens": 12, "temperature": 0} for n in range(4)
    ]
    with TestClient(create_app(model, tokenizer, max_num_seqs=6)) as client:

        def complete(body):
            return client.post("/v1/completions", json=body)

        alone = [complete(body).json()["choices"][0]["text"] for body in good]
        failing = {"model": "m", "prompt": "explode now", "max_tokens": 12}
        with ThreadPoolExecutor(6) as pool:
            together = pool.map(complete, good)
            failed = pool.submit(complete, failing)
            streamed = pool.submit(complete, {**failing, "stream": True})
            assert [answer.json()["choices"][0]["text"] for answer in together] == alone
            assert failed.result().status_code == 500
            assert failed.result().json()["error"]["code"] == "generation_failed"
            assert "fails on purpose" not in failed.result().text  # the cause goes to the log only
            assert '"code":"generation_failed"' in streamed.result().text.replace(" ", "")
        assert max(rows) >= 3  # the failures happened in a batch, beside other requests
        assert complete(good[0]).json()["choices"][0]["text"] == alone[0]
