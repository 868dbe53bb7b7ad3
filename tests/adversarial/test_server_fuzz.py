"""Adversarial: the server fuzzed from its own OpenAPI description with schemathesis.

A real uvicorn server (in this process, on a free loopback port) over a small random-weight model; schemathesis
generates requests from the app's OpenAPI schema, valid ones and ones that break it, a bounded number per
operation. Every response must be no 5xx, a status the schema lists, the content type it lists, and a body that
conforms to its schema. The run stops by itself: bounded examples, and each request has a timeout.
"""

from __future__ import annotations

import threading
import time

import httpx
import paddle
import pytest

schemathesis = pytest.importorskip("schemathesis")
uvicorn = pytest.importorskip("uvicorn")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from conftest import small_config  # noqa: E402
from paddle_glm4 import GLM4ForCausalLM, GLM4Tokenizer  # noqa: E402
from paddle_glm4.server import bind  # noqa: E402
from paddle_glm4.server.app import create_app  # noqa: E402
from paddle_glm4.small_vocab import write_small_vocabulary  # noqa: E402

EXAMPLES = 60  # per generation mode; about a minute on two cores
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(app, base URL) of a server on 127.0.0.1 over a small model with a short context (answers stay short)."""
    tokenizer = GLM4Tokenizer.from_pretrained(write_small_vocabulary(tmp_path_factory.mktemp("vocab")))
    config = small_config(
        vocab_size=448, seq_length=96, eos_token_id=tokenizer.stop_token_ids, pad_token_id=tokenizer.pad_token_id
    )
    paddle.seed(0)
    model = GLM4ForCausalLM(config).eval()
    from paddle_glm4.generation import GenerationConfig

    model.generation_config = GenerationConfig.from_model(config)
    app = create_app(model, tokenizer, "fuzzed", max_concurrency=2, default_max_tokens=8)
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield app, url
    server.should_exit = True
    thread.join(timeout=30)
    sock.close()


@pytest.mark.slow
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_the_server_answers_every_generated_request_as_its_schema_says(served, mode):
    app, url = served
    schema = schemathesis.openapi.from_dict(app.openapi())
    assert sorted(schema) == ["/v1/chat/completions", "/v1/completions", "/v1/models"]
    seen: dict[int, int] = {}

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=schema.as_strategy(generation_mode=mode))
    def fuzz(case):
        if isinstance(case.body, dict) and isinstance(case.body.get("max_tokens"), int):
            case.body["max_tokens"] = min(case.body["max_tokens"], 16)  # bounded answers, still all code paths
        response = case.call(base_url=url, timeout=60)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        case.validate_response(response, checks=CHECKS)

    fuzz()
    assert seen and all(status < 500 for status in seen)
    if mode == GenerationMode.POSITIVE:
        assert 200 in seen  # the fuzzer did reach the model, not only the validation
    else:
        assert 400 in seen
    # and the server is still well
    assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 200
