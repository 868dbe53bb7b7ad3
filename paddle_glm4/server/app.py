"""The OpenAI-compatible HTTP API: GET /v1/models, POST /v1/chat/completions, POST /v1/completions.

Each generating request goes: check (schemas.py; context length; admission by the Worker, or 429) -> generate on
the worker thread -> tokens into a Reply (stop strings, tool calls) -> a JSON answer, or server-sent events in
OpenAI's chunk format ending with `data: [DONE]`. Everything that can be refused is refused before the first
byte of a stream, so that it gets a proper status code; a failure after that arrives as an error event.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, cast

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..chat_template import ChatTemplateError
from ..validation import SchemaError
from . import schemas as s
from .errors import ERROR_TYPES, INTERNAL_ERROR, APIError
from .metrics import Metrics
from .reply import Reply
from .tool_calls import active_tools, to_glm_messages
from .worker import Busy, Job, Worker

if TYPE_CHECKING:
    from ..engine import Engine
    from ..tokenizer import GLM4Tokenizer


def create_app(
    model: Engine,
    tokenizer: GLM4Tokenizer,
    model_name: str = "glm-4-9b-chat",
    api_key: str | None = None,
    max_concurrency: int = 8,
    default_max_tokens: int = 1024,
    max_num_seqs: int = 8,
    kv_cache_memory: int | None = None,
) -> FastAPI:
    """The API over `model` (anything with the engine interface: generate, config, generation_config,
    context_length) and its tokenizer. `api_key`: when not None, every request must send
    `Authorization: Bearer <api_key>` (an empty key is refused, so that an unset variable cannot turn
    authentication off).
    `max_concurrency`: requests admitted at once (generating or waiting), beyond which 429.
    `default_max_tokens`: the answer length for requests that give none (capped by the room left in the context).
    `max_num_seqs`: requests generated together in one batch; `kv_cache_memory`: bytes their KV cache may take
    (None: see scheduler.Scheduler). See worker.py.
    """
    if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
        raise ValueError("api_key must be a non-empty string, or None for no authentication")
    worker = Worker(model, max_concurrency, max_num_seqs, kv_cache_memory)
    metrics = Metrics(worker)
    worker.on_token = metrics.token
    context = model.context_length

    @asynccontextmanager
    async def lifespan(_app):
        yield
        worker.close()

    app = _API(title="paddle_glm4", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    _add_error_handlers(app)
    app.add_middleware(LimitBody, limit=MAX_BODY_BYTES)
    if api_key is not None:  # added last, so outermost: the key is checked before anything else
        app.add_middleware(RequireKey, key=api_key)

    def start(prompt: list[int], requested: int | None, body: s.SamplingRequest, eos: list[int]) -> Job:
        """Admit the generation of `prompt`, or refuse it (400 too long, 429 busy)."""
        room = context - len(prompt)
        max_tokens = requested or min(default_max_tokens, room)
        if max_tokens < 1 or max_tokens > room:
            raise APIError(
                400,
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{len(prompt) + max(max_tokens, 1)} tokens ({len(prompt)} in the prompt, "
                f"{max(max_tokens, 1)} for the answer). Shorten the prompt or lower max_tokens.",
                code="context_length_exceeded",
                param="messages",
            )
        try:
            return worker.submit(
                prompt, max_new_tokens=max_tokens, eos_token_id=eos, vocab_limit=len(tokenizer), **_sampling(body)
            )
        except Busy:
            raise APIError(
                429,
                f"The server is busy: {max_concurrency} requests are being served or are waiting. Retry shortly.",
                code="server_busy",
                headers={"Retry-After": "1"},
            ) from None
        except ValueError as err:  # more than the engine can ever hold (its KV memory)
            raise APIError(400, str(err), code="context_length_exceeded", param="max_tokens") from None

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        """Prometheus text format (see metrics.py)."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", responses=_errors(401))
    async def list_models() -> s.ModelList:
        return s.ModelList(data=[s.ModelCard(id=model_name)])

    @app.post("/v1/chat/completions", response_model=None, responses=_answers(s.ChatCompletion, s.ChatCompletionChunk))
    async def chat_completions(body: s.ChatCompletionRequest, request: Request):
        tools = active_tools(body.tools, body.tool_choice)
        try:
            prompt = cast(
                list[int],
                tokenizer.apply_chat_template(to_glm_messages(body.messages, tools), add_generation_prompt=True),
            )  # tokenized
        except ChatTemplateError as err:
            raise APIError(400, str(err), param="messages") from None
        eos = tokenizer.stop_token_ids
        reply = Reply(
            tokenizer, eos, stop=body.stop_strings(), tool_names=[t.function.name for t in tools], strip_leading=True
        )
        job = start(prompt, body.max_completion_tokens or body.max_tokens, body, eos)
        answer_id = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            events = _chat_events(answer_id, model_name, job, reply, len(prompt), body.include_usage())
            return StreamingResponse(events, media_type="text/event-stream")
        content = await _collect(job, reply, request)
        message = s.AssistantMessage(
            content=content or (None if reply.tool_calls else ""), tool_calls=reply.tool_calls or None
        )
        return s.ChatCompletion(
            id=answer_id,
            model=model_name,
            usage=_usage(len(prompt), reply),
            choices=[s.ChatChoice(message=message, finish_reason=cast(str, reply.finish_reason))],
        )

    @app.post("/v1/completions", response_model=None, responses=_answers(s.Completion, s.Completion))
    async def completions(body: s.CompletionRequest, request: Request):
        prompt = tokenizer.encode(body.prompt_text())
        eos = model.generation_config.eos_token_id or [tokenizer.eos_token_id]
        reply = Reply(tokenizer, eos, stop=body.stop_strings())
        job = start(prompt, body.max_tokens, body, eos)
        answer_id = f"cmpl-{uuid.uuid4().hex}"
        if body.stream:
            events = _completion_events(answer_id, model_name, job, reply, len(prompt), body.include_usage())
            return StreamingResponse(events, media_type="text/event-stream")
        text = await _collect(job, reply, request)
        return s.Completion(
            id=answer_id,
            model=model_name,
            usage=_usage(len(prompt), reply),
            choices=[s.CompletionChoice(text=text, finish_reason=reply.finish_reason)],
        )

    return app


def _sampling(body: s.SamplingRequest) -> dict:
    """generate()'s sampling arguments: those the request set; generate takes the others from the checkpoint's
    generation_config (GenerationConfig.merged: a temperature, top_p or top_k asks for sampling, 0 is greedy)."""
    return {name: getattr(body, name) for name in ("temperature", "top_p", "top_k", "repetition_penalty", "seed")}


def _usage(prompt_tokens: int, reply: Reply) -> s.Usage:
    return s.Usage(
        prompt_tokens=prompt_tokens, completion_tokens=reply.tokens, total_tokens=prompt_tokens + reply.tokens
    )


# ---- reading a generation -------------------------------------------------------------------------------
async def _contents(job: Job, reply: Reply) -> AsyncIterator[str]:
    """The answer's content as it becomes sendable; cancels the generation once a stop string is seen."""
    async for token in job.receive():
        text = reply.add(token)
        if reply.stopped:
            job.cancel()
        if text:
            yield text
    text = reply.finish()
    if text:
        yield text


async def _collect(job: Job, reply: Reply, request: Request) -> str:
    """The whole content, for an answer that is not streamed; stops the generation if the client goes away
    (a streamed answer needs no such watch: Starlette cancels its stream when the client disconnects)."""

    async def cancel_on_disconnect():
        while (await request.receive())["type"] != "http.disconnect":
            pass
        job.cancel()

    watch = asyncio.create_task(cancel_on_disconnect())
    try:
        return "".join([text async for text in _contents(job, reply)])
    finally:
        watch.cancel()


def _event(data: BaseModel | dict) -> str:
    text = data.model_dump_json(exclude_none=True) if isinstance(data, BaseModel) else json.dumps(data)
    return f"data: {text}\n\n"


async def _stream(job: Job, events: AsyncIterator[BaseModel]) -> AsyncIterator[str]:
    """Server-sent events of `events`, then [DONE]; a generation that fails mid-stream becomes an error event.
    Whatever ends the stream (the end, a failure, the client leaving) also ends the generation."""
    try:
        async for event in events:
            yield _event(event)
    except APIError as err:  # the status line is long gone: tell the client in the stream, as OpenAI does
        yield _event(err.body())
    finally:
        job.cancel()
    yield "data: [DONE]\n\n"


def _chat_events(
    answer_id: str, model_name: str, job: Job, reply: Reply, prompt_tokens: int, include_usage: bool
) -> AsyncIterator[str]:
    def chunk(delta: s.Delta, finish_reason: str | None = None, usage: s.Usage | None = None):
        return s.ChatCompletionChunk(
            id=answer_id,
            model=model_name,
            usage=usage,
            choices=[s.ChunkChoice(delta=delta, finish_reason=finish_reason)],
        )

    async def events():
        yield chunk(s.Delta(role="assistant", content=""))
        async for text in _contents(job, reply):
            yield chunk(s.Delta(content=text))
        if reply.tool_calls:
            calls = [s.DeltaToolCall(index=i, **call.model_dump()) for i, call in enumerate(reply.tool_calls)]
            yield chunk(s.Delta(tool_calls=calls))
        usage = _usage(prompt_tokens, reply)
        # Usage comes with the last chunk; asked for with stream_options.include_usage, in a chunk of its own
        # with no choices, as OpenAI sends it.
        yield chunk(s.Delta(), reply.finish_reason, None if include_usage else usage)
        if include_usage:
            yield s.ChatCompletionChunk(id=answer_id, model=model_name, choices=[], usage=usage)

    return _stream(job, events())


def _completion_events(
    answer_id: str, model_name: str, job: Job, reply: Reply, prompt_tokens: int, include_usage: bool
) -> AsyncIterator[str]:
    def chunk(text: str, finish_reason: str | None = None, usage: s.Usage | None = None):
        return s.Completion(
            id=answer_id,
            model=model_name,
            usage=usage,
            choices=[s.CompletionChoice(text=text, finish_reason=finish_reason)],
        )

    async def events():
        async for text in _contents(job, reply):
            yield chunk(text)
        usage = _usage(prompt_tokens, reply)
        yield chunk("", reply.finish_reason, None if include_usage else usage)
        if include_usage:
            yield s.Completion(id=answer_id, model=model_name, choices=[], usage=usage)

    return _stream(job, events())


# ---- the API's description (OpenAPI) --------------------------------------------------------------------
def _errors(*statuses: int) -> dict:
    return {status: {"model": s.ErrorResponse, "description": ERROR_TYPES[status]} for status in (*statuses, 500)}


def _answers(whole: type[BaseModel], chunk: type[BaseModel]) -> dict:
    """A generating endpoint's responses: the answer as JSON, or (stream: true) server-sent events of chunks."""
    events = {
        "schema": {
            "type": "object",
            "required": ["data"],
            "properties": {"data": {"type": "string"}},
            "description": f"each server-sent event: `data: <{chunk.__name__} as JSON>` (or an "
            "error), the last one `data: [DONE]`",
        }
    }
    return {200: {"model": whole, "content": {"text/event-stream": events}}, **_errors(400, 401, 413, 429)}


class _API(FastAPI):
    def openapi(self) -> dict:
        """The OpenAPI description of what the server really answers: FastAPI documents a 422 for every request
        body, but a request that fails validation gets 400 here, as from OpenAI (see _add_error_handlers). Not
        served over HTTP; the tests fuzz the server from it."""
        if self.openapi_schema is None:
            schema = get_openapi(title=self.title, version=self.version, routes=self.routes)
            for operations in schema["paths"].values():
                for operation in operations.values():
                    operation["responses"].pop("422", None)
            self.openapi_schema = schema
        return self.openapi_schema


# ---- access and errors ----------------------------------------------------------------------------------
# A request body's bytes at most: GLM-4's whole 128K-token context is under a megabyte of text, so this leaves
# room for tools and JSON escapes while a client cannot make the server hold gigabytes.
MAX_BODY_BYTES = 16 << 20


class LimitBody:
    """Refuses (413) a request body of more than `limit` bytes, by its Content-Length before reading anything,
    or (a chunked body) as soon as more has arrived; nothing parses a body past the limit."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = Headers(scope=scope).get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self._too_large().response()(scope, receive, send)
        received, refused = 0, False

        async def limited() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:  # answer now; the app then sees a client that left, and is not heard
                refused = True
                await self._too_large().response()(scope, receive, send)
                return {"type": "http.disconnect"}
            return message

        async def unless_refused(message: Message) -> None:
            if not refused:
                await send(message)

        await self.app(scope, limited, unless_refused)

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body is larger than {self.limit} bytes", code="request_too_large")


class RequireKey:
    """Refuses (401) every request without `Authorization: Bearer <key>`, before anything else looks at it."""

    def __init__(self, app: ASGIApp, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        problem = self._problem(Headers(scope=scope)) if scope["type"] == "http" else None
        if problem:
            return await APIError(401, problem, code="invalid_api_key").response()(scope, receive, send)
        await self.app(scope, receive, send)

    def _problem(self, headers: Headers) -> str | None:
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return "Missing API key: send it as 'Authorization: Bearer KEY'"
        if not hmac.compare_digest(given.strip().encode(), self.key):
            return "Incorrect API key provided"
        return None


def _add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape; pydantic's validation errors as 400, as OpenAI answers a bad request."""

    @app.exception_handler(APIError)
    async def api_error(_request, err: APIError):
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request, err: RequestValidationError):
        problems = err.errors()
        first: dict[str, Any] = problems[0] if problems else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            return APIError(
                400,
                f"the request body is not valid JSON ({first.get('ctx', {}).get('error', '')})",
                code="invalid_json",
            ).response()
        # the field's path; pydantic also names the member of a union that failed ("constrained-str"), not a field
        where = ".".join(
            str(part) for part in first["loc"] if part != "body" and (isinstance(part, int) or part.isidentifier())
        )
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        message = f"{where}: {first['msg']}{more}" if where else f"{first['msg']}{more}"
        return APIError(400, message, param=where or None, code="invalid_request").response()

    @app.exception_handler(SchemaError)
    async def invalid_value(_request, err: SchemaError):  # a value the project's own checks refused
        return APIError(400, str(err), code="invalid_request").response()

    @app.exception_handler(HTTPException)
    async def http_error(_request, err: HTTPException):
        return APIError(err.status_code, str(err.detail)).response()

    @app.exception_handler(Exception)
    async def server_error(_request, err: Exception):
        # A client learns nothing of the server's insides. The details are for the operator: Starlette raises
        # the exception again after this response, and uvicorn logs its traceback.
        return APIError(500, INTERNAL_ERROR, code="internal_error").response()
