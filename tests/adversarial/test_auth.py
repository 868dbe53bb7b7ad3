"""Adversarial: who may use the server, and what a failure tells a client.

- An empty API key (an unset shell variable in `--api-key "$KEY"`) is an error, never "no authentication".
- Without a key, a non-loopback address gets a loud warning; loopback stays quiet.
- Every request without the exact key is refused (401) before anything else looks at it, whatever the path,
  method or body; arbitrary Authorization headers never get in.
- A failure inside the server (500) tells the client a generic message; the exception's text stays in the log.

The app runs in this process over the scripted model (tests/scripted_server.py), through httpx's ASGI transport:
no server process, no socket.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from paddle_glm4.server import __main__ as server_main
from paddle_glm4.server.app import create_app
from paddle_glm4.server.errors import INTERNAL_ERROR
from paddle_glm4.small_vocab import write_small_vocabulary
from paddle_glm4.tokenizer import GLM4Tokenizer
from scripted_server import ScriptedModel

KEY = "s3cret-key"
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return GLM4Tokenizer.from_pretrained(write_small_vocabulary(tmp_path_factory.mktemp("vocab")))


def request(app, method: str, path: str, **kwargs) -> httpx.Response:
    async def send():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(send())


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


# ---- the key itself ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["", " ", "\t\n"])
def test_create_app_refuses_an_empty_key(tokenizer, key):
    with pytest.raises(ValueError, match="non-empty"):
        create_app(ScriptedModel(tokenizer), tokenizer, api_key=key)


def run_server_cli(argv, capsys) -> tuple[int, str]:
    code = server_main.main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("key", ["", "   ", " padded ", "tab\tinside", "ключ"])
def test_serve_refuses_an_unusable_api_key_in_one_line(tmp_path, capsys, key):
    code, err = run_server_cli(["--model", str(tmp_path / "nowhere"), "--api-key", key, "--port", "0"], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: --api-key")
    assert "nowhere" not in err  # refused before anything else is looked at


def test_an_empty_key_from_the_environment_is_an_error_too(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GLM4_API_KEY", "")
    code, err = run_server_cli(["--model", str(tmp_path / "nowhere"), "--port", "0"], capsys)
    assert code == 2 and "is empty" in err


@pytest.mark.parametrize(
    "host, key, warned",
    [("0.0.0.0", None, True), ("127.0.0.1", None, False), ("localhost", None, False), ("0.0.0.0", KEY, False)],
)
def test_no_key_on_a_network_address_is_a_loud_warning(tmp_path, capsys, monkeypatch, host, key, warned):
    monkeypatch.delenv("GLM4_API_KEY", raising=False)
    argv = ["--model", str(tmp_path / "nowhere"), "--host", host, "--port", "0"] + (["--api-key", key] if key else [])
    code, err = run_server_cli(argv, capsys)
    assert code == 2 and "no such model directory" in err  # it got as far as loading, after the warning
    assert ("WARNING" in err and "without --api-key" in err) == warned


# ---- requests without the key -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def app(tokenizer):
    return create_app(ScriptedModel(tokenizer), tokenizer, "scripted", api_key=KEY)


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("GET", "/v1/models", None),
        ("POST", "/v1/chat/completions", {"model": "m", "messages": USER}),
        ("POST", "/v1/completions", {"model": "m", "prompt": "hi"}),
        ("POST", "/v1/chat/completions", "{not json"),
        ("GET", "/nowhere", None),
        ("DELETE", "/v1/models", None),
        ("GET", "/openapi.json", None),
        ("GET", "/docs", None),
    ],
)
@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Bearer wrong",
        f"Basic {KEY}",
        f"Bearer {KEY}x",
        f"Bearer {KEY[:-1]}",
        f"Token {KEY}",
        f"Bearer {KEY.upper()}",
    ],
)
def test_anything_without_the_exact_key_gets_401_first(app, method, path, body, header):
    headers = {} if header is None else {"Authorization": header}
    kwargs = {"content": body} if isinstance(body, str) else {"json": body} if body else {}
    error = error_of(request(app, method, path, headers=headers, **kwargs), 401)
    assert error["code"] == "invalid_api_key" and error["type"] == "authentication_error"


def test_the_exact_key_gets_in(app):
    response = request(app, "GET", "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200 and response.json()["data"][0]["id"] == "scripted"
    response = request(app, "GET", "/v1/models", headers={"Authorization": f"bearer   {KEY}  "})
    assert response.status_code == 200  # the scheme is case-insensitive and spaces around the key are HTTP's


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=40))
def test_no_arbitrary_authorization_header_gets_in(app, header):
    if header.strip().lower().startswith("bearer") and header.strip()[6:].strip() == KEY:
        return  # the one header that is allowed in
    response = request(app, "GET", "/v1/models", headers={"Authorization": header.encode("latin-1")})
    assert response.status_code == 401


# ---- what a failure tells the client ----------------------------------------------------------------------
EXPLODE = {"model": "m", "messages": [{"role": "user", "content": "explode"}]}


def test_a_failing_generation_gets_a_generic_500(tokenizer, caplog):
    app = create_app(ScriptedModel(tokenizer), tokenizer, "scripted")
    with caplog.at_level("ERROR", logger="paddle_glm4.server"):
        error = error_of(request(app, "POST", "/v1/chat/completions", json=EXPLODE), 500)
    assert error["message"] == INTERNAL_ERROR and error["type"] == "server_error"
    assert "fails on purpose" not in str(error) and "RuntimeError" not in str(error)
    assert "fails on purpose" in caplog.text  # the operator still learns what happened


def test_a_failing_stream_gets_a_generic_error_event(tokenizer):
    app = create_app(ScriptedModel(tokenizer), tokenizer, "scripted")
    response = request(app, "POST", "/v1/chat/completions", json={**EXPLODE, "stream": True})
    assert response.status_code == 200
    assert INTERNAL_ERROR in response.text and "fails on purpose" not in response.text
    assert response.text.rstrip().endswith("data: [DONE]")


class BrokenTokenizer:
    """A tokenizer whose chat template raises something unexpected, with private details in the message."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def apply_chat_template(self, *args, **kwargs):
        raise KeyError("/home/operator/.secrets/token")


def test_an_unexpected_exception_in_a_handler_gets_a_generic_500(tokenizer):
    app = create_app(ScriptedModel(tokenizer), BrokenTokenizer(tokenizer), "scripted")
    error = error_of(request(app, "POST", "/v1/chat/completions", json={"model": "m", "messages": USER}), 500)
    assert error["message"] == INTERNAL_ERROR and "secrets" not in str(error) and "KeyError" not in str(error)


# ---- sizes ------------------------------------------------------------------------------------------------
def test_a_huge_body_is_refused_before_it_is_read(app, monkeypatch):
    from paddle_glm4.server import app as app_module

    key = {"Authorization": f"Bearer {KEY}"}
    big = (
        b'{"model": "m", "messages": [{"role": "user", "content": "' + b"x" * (app_module.MAX_BODY_BYTES + 1) + b'"}]}'
    )
    error = error_of(
        request(app, "POST", "/v1/chat/completions", content=big, headers={**key, "Content-Type": "application/json"}),
        413,
    )
    assert error["code"] == "request_too_large" and str(app_module.MAX_BODY_BYTES) in error["message"]

    async def chunks():  # no Content-Length: counted as it arrives
        for _ in range(app_module.MAX_BODY_BYTES // (1 << 20) + 2):
            yield b"x" * (1 << 20)

    error = error_of(
        request(app, "POST", "/v1/completions", content=chunks(), headers={**key, "Content-Type": "application/json"}),
        413,
    )
    assert error["code"] == "request_too_large"
    assert error_of(request(app, "POST", "/v1/completions", content=big), 401)  # the key still comes first


def test_stop_strings_are_bounded(app):
    key = {"Authorization": f"Bearer {KEY}"}
    for stop in (["x"] * 17, ["x" * 1001], "x" * 1001):
        body = {"model": "m", "prompt": "hi", "stop": stop}
        assert error_of(request(app, "POST", "/v1/completions", json=body, headers=key), 400)["param"] == "stop"
    body = {"model": "m", "messages": USER, "stop": ["x" * 1000] * 16, "max_tokens": 2}
    assert request(app, "POST", "/v1/chat/completions", json=body, headers=key).status_code == 200
