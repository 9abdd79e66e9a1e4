"""`weitiao serve`: an OpenAI-compatible HTTP API over the engine (FastAPI + uvicorn).

Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions (with tools: serve/tool_calls.py),
POST /v1/completions. Streaming uses
server-sent events in OpenAI's chunk format, ending with `data: [DONE]`. Errors use OpenAI's error body
({"error": {"message", "type", "param", "code"}}) so the official clients raise their usual exceptions.
Requests join the engine's running batch; a client that leaves mid-stream cancels its generation.

What keeps it up under load and abuse (`ServerLimits`): a cap on body size and on prompts per request, prompts
refused by length before they are tokenized, tokenizing off the event loop, strict request bodies, a Host-header
check against DNS rebinding, 500s without internal text, and a connection layer (`guarded_protocol`) that closes
connections which send no request in time and keeps the number of open sockets under the open-file limit.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import resource
import secrets
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from weitiao.errors import WeitiaoError
from weitiao.generation.engine import Engine
from weitiao.generation.requests import (MAX_SEED, ContextLengthError, EngineBusyError, Generation, SamplingParams,
                                         UnknownModelError)
from weitiao.data.tools import ToolFormat
from weitiao.serve.tool_calls import (CallStream, ToolPlan, ToolRequestError, engine_messages, plan_tools,
                                      reply_message)

log = logging.getLogger("weitiao.serve")


@dataclass
class ServerLimits:
    """What one client may ask of the server. allowed_hosts: the Host header values (names or addresses, any
    port) requests may carry; None accepts any (see `default_allowed_hosts`)."""
    max_body_bytes: int = 8 * 2**20
    max_prompts: int = 32  # replies one request may ask for: prompts of /v1/completions times n
    request_timeout: float = 20.0  # seconds a connection may take to send a request's headers (or sit idle before)
    allowed_hosts: list[str] | None = None


def default_allowed_hosts(host: str) -> list[str] | None:
    """A server on a loopback address answers only requests addressed to this machine by name or address, so a web
    page elsewhere cannot reach it through a DNS name that points at 127.0.0.1 (DNS rebinding). One on all
    interfaces has no single name to check: None (any), and it requires an API key instead (the CLI)."""
    if host in ("0.0.0.0", "::", ""):
        return None
    return sorted({"localhost", "127.0.0.1", "::1", host.strip("[]")})


# ---------------------------------------------------------------------------------------------
# Request bodies. Fields OpenAI defines that we do not implement are ignored. Strict: "4" is no integer and
# "yes" no boolean.


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class FunctionSchema(_Body):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionSchema


class FunctionName(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: FunctionName


class CalledFunction(_Body):
    name: str
    arguments: str


class ToolCall(_Body):
    id: str
    type: Literal["function"]
    function: CalledFunction


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingBody(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=128)  # choices per prompt (OpenAI's limit; the server's: max_prompts)


class ChatCompletionRequest(_SamplingBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # the model may always call several


class CompletionRequest(_SamplingBody):
    prompt: str | list[str]


# ---------------------------------------------------------------------------------------------
# Errors in OpenAI's shape.


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(status_code=error.status, content={"error": {
        "message": error.message, "type": error.type, "param": error.param, "code": error.code}})


def _http_error(error: StarletteHTTPException, request: Request) -> APIError:
    if error.status_code == 404:
        return APIError(404, f"Unknown request URL: {request.method} {request.url.path}", code="unknown_url")
    if error.status_code == 405:
        return APIError(405, f"Method {request.method} is not allowed for {request.url.path}",
                        code="method_not_allowed")
    return APIError(error.status_code, str(error.detail))


def _validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    problems, param = [], None
    for item in error.errors():
        location = [str(part) for part in item["loc"] if part != "body"]
        if item["type"] == "json_invalid":
            return "the request body is not valid JSON", None
        if item["type"] == "model_attributes_type" and not location:
            return "the request body must be a JSON object", None
        where = ".".join(location)
        param = param or where or None
        problems.append(f"{where}: {item['msg']}" if where else item["msg"])
    return "invalid request: " + "; ".join(problems), param


# ---------------------------------------------------------------------------------------------


def _sampling(body: _SamplingBody, max_tokens: int | None) -> SamplingParams:
    """OpenAI's defaults: temperature 1, top_p 1; no max_tokens: as much as the engine allows."""
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return SamplingParams(max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
                          top_p=1.0 if body.top_p is None else body.top_p, stop=stop, seed=body.seed)


def _message_text(message: ChatMessage) -> str:
    if isinstance(message.content, list):
        return "".join(part.text for part in message.content)
    return message.content or ""


def _chat_inputs(engine: Engine, body: ChatCompletionRequest) -> tuple[list[dict[str, Any]], ToolPlan,
                                                                       ToolFormat | None]:
    """The request's messages in the engine's form, what its tools and tool_choice ask for, and the model's tool
    format (when it has tools); requests that break OpenAI's tool rules are a 400."""
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools or []]
    choice = body.tool_choice.model_dump() if isinstance(body.tool_choice, NamedToolChoice) else body.tool_choice
    try:
        messages = engine_messages([{"role": "system" if m.role == "developer" else m.role,
                                     "content": _message_text(m), "tool_call_id": m.tool_call_id,
                                     "tool_calls": [c.model_dump() for c in m.tool_calls or []]}
                                    for m in body.messages])
        tool_format = engine.tool_format(body.model) if tools else None
        return messages, plan_tools(tools, choice, tool_format), tool_format
    except ToolRequestError as error:
        raise APIError(400, str(error), param=error.param) from None


def _usage(generations: list[Generation]) -> dict[str, int]:
    prompt = sum(g.prompt_tokens for g in generations)
    completion = sum(g.completion_tokens for g in generations)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def _install_error_handlers(app: FastAPI) -> None:
    """Every error a client sees in OpenAI's shape (the Guard middleware turns the rest into a plain 500)."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return _error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return _error_response(_http_error(error, request))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(error)
        return _error_response(APIError(400, message, param=param))

    @app.exception_handler(WeitiaoError)
    async def engine_error(request: Request, error: WeitiaoError) -> JSONResponse:
        if isinstance(error, UnknownModelError):
            return _error_response(APIError(404, str(error), param="model", code="model_not_found"))
        if isinstance(error, EngineBusyError):
            return _error_response(APIError(503, str(error), type_="server_error", code="server_busy"))
        code = "context_length_exceeded" if isinstance(error, ContextLengthError) else None
        return _error_response(APIError(400, str(error), code=code))


def _api_key_check(api_key: str | None):
    """The dependency /v1/* runs first: with `api_key`, requests must send `Authorization: Bearer <api_key>`."""

    async def check_api_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            message = "Incorrect API key provided" if token else "Missing API key: send 'Authorization: Bearer KEY'"
            raise APIError(401, message, code="invalid_api_key")

    return check_api_key


def create_app(engine: Engine, api_key: str | None = None, limits: ServerLimits | None = None) -> FastAPI:
    """The API over `engine`. With `api_key`, /v1/* requires `Authorization: Bearer <api_key>`."""
    limits = limits or ServerLimits()
    app = FastAPI(title="weitiao", docs_url=None, redoc_url=None, openapi_url=None)

    _install_error_handlers(app)
    check_api_key = _api_key_check(api_key)
    app.add_middleware(Guard, limits=limits)
    app.add_middleware(HostCheck, allowed_hosts=limits.allowed_hosts)
    app.add_middleware(RequestLog)
    api = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": engine.names, "queued": engine.queued}

    @api.get("/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "weitiao",
                                            **({"parent": engine.base_name} if served.adapter else {})}
                                           for name, served in engine.models.items()]}

    @api.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await _chat_completion(engine, limits, body, request)

    @api.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await _completion(engine, limits, body, request)

    app.include_router(api)
    return app


def _choices(body: _SamplingBody, prompts: int, limits: ServerLimits) -> int:
    """n, within what one request may ask for (each reply takes a place in the queue)."""
    choices = body.n or 1
    if prompts * choices > limits.max_prompts:
        raise APIError(400, f"at most {limits.max_prompts} replies per request (prompts x n), asked for "
                            f"{prompts} x {choices}", param="n" if choices > 1 else "prompt")
    return choices


async def _chat_completion(engine: Engine, limits: ServerLimits, body: ChatCompletionRequest, request: Request):
    """POST /v1/chat/completions: n replies (choices), whole or streamed as chunks (tool calls parsed from their
    text)."""
    engine.get(body.model)
    params = _sampling(body, body.max_completion_tokens or body.max_tokens)
    choices = _choices(body, 1, limits)
    messages, plan, tool_format = _chat_inputs(engine, body)

    def submit() -> list[Generation]:  # tokenizing takes time: off the event loop
        text = engine.render_chat(body.model, messages, plan.tools, plan.prefill)
        return engine.submit(body.model, [text], params, chat=True, choices=choices)

    generations = await run_in_threadpool(submit)
    request.state.generations = generations
    request.state.model = body.model
    reply_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def finish_reason(generation: Generation, calls: bool) -> str | None:
        return "tool_calls" if calls and generation.finish_reason == "stop" else generation.finish_reason

    if not body.stream:
        await _replies(request, generations)
        replies = [reply_message(generation.text, plan, tool_format) for generation in generations]
        return {"id": reply_id, "object": "chat.completion", "created": created, "model": body.model,
                "choices": [{"index": index, "message": message, "logprobs": None,
                             "finish_reason": finish_reason(generation, calls)}
                            for index, (generation, (message, calls)) in enumerate(zip(generations, replies))],
                "usage": _usage(generations)}

    def chunk(index: int, delta: dict[str, Any], finish_reason: str | None = None) -> str:
        return _sse({"id": reply_id, "object": "chat.completion.chunk", "created": created, "model": body.model,
                     "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]})

    async def events() -> AsyncIterator[str]:
        streams = [CallStream(plan, tool_format) for _ in generations]
        for index in range(len(generations)):
            yield chunk(index, {"role": "assistant", "content": ""})
        async for index, piece in _interleaved(generations):
            if piece is not None:
                for delta in streams[index].feed(piece):
                    yield chunk(index, delta)
                continue
            for delta in streams[index].finish():
                yield chunk(index, delta)
            yield chunk(index, {}, finish_reason(generations[index], streams[index].calls))
        if body.stream_options and body.stream_options.include_usage:
            yield _sse({"id": reply_id, "object": "chat.completion.chunk", "created": created,
                        "model": body.model, "choices": [], "usage": _usage(generations)})
        yield _sse("[DONE]")

    return _event_stream(events(), generations)


async def _interleaved(generations: list[Generation]) -> AsyncIterator[tuple[int, str | None]]:
    """(index, piece) of several replies as they come, and (index, None) when reply `index` has ended."""
    pieces: asyncio.Queue[tuple[int, str | None | BaseException]] = asyncio.Queue()

    async def pump(index: int, generation: Generation) -> None:
        try:
            async for piece in generation.stream_async():
                await pieces.put((index, piece))
            await pieces.put((index, None))
        except Exception as error:  # handed to the reader, which reports it in the stream
            await pieces.put((index, error))

    pumps = [asyncio.ensure_future(pump(index, generation)) for index, generation in enumerate(generations)]
    try:
        for _ in range(len(generations)):
            while True:
                index, item = await pieces.get()
                if isinstance(item, BaseException):
                    raise item
                yield index, item
                if item is None:
                    break
    finally:
        for task in pumps:
            task.cancel()


async def _completion(engine: Engine, limits: ServerLimits, body: CompletionRequest, request: Request):
    """POST /v1/completions: n replies per prompt (choice prompt x n + i), all queued or none, whole or streamed
    one reply after another."""
    engine.get(body.model)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts:
        raise APIError(400, "prompt must not be empty", param="prompt")
    choices = _choices(body, len(prompts), limits)
    # All queued or none (a full queue refuses the whole request); each reply takes one place in the queue.
    generations = await run_in_threadpool(engine.submit, body.model, prompts, _sampling(body, body.max_tokens),
                                          False, choices)
    request.state.generations = generations
    request.state.model = body.model
    reply_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    if not body.stream:
        await _replies(request, generations)
        return {"id": reply_id, "object": "text_completion", "created": created, "model": body.model,
                "choices": [{"index": index, "text": g.text, "logprobs": None, "finish_reason": g.finish_reason}
                            for index, g in enumerate(generations)],
                "usage": _usage(generations)}

    def chunk(index: int, text: str, finish_reason: str | None = None) -> str:
        return _sse({"id": reply_id, "object": "text_completion", "created": created, "model": body.model,
                     "choices": [{"index": index, "text": text, "logprobs": None,
                                  "finish_reason": finish_reason}]})

    async def events() -> AsyncIterator[str]:
        for index, generation in enumerate(generations):
            async for piece in generation.stream_async():
                yield chunk(index, piece)
            yield chunk(index, "", generation.finish_reason)
        if body.stream_options and body.stream_options.include_usage:
            yield _sse({"id": reply_id, "object": "text_completion", "created": created, "model": body.model,
                        "choices": [], "usage": _usage(generations)})
        yield _sse("[DONE]")

    return _event_stream(events(), generations)


async def _replies(request: Request, generations: list[Generation]) -> None:
    """Wait for whole replies. A client that hangs up meanwhile (a timeout, a closed program) cancels them,
    so abandoned requests do not hold the queue."""
    replies = asyncio.ensure_future(asyncio.gather(*(g.result_async() for g in generations)))
    try:
        while not replies.done():
            await asyncio.wait({replies}, timeout=0.25)
            if not replies.done() and await request.is_disconnected():
                break
    finally:
        for generation in generations:
            generation.cancel()
    if replies.done():
        replies.result()  # re-raise a generation error
    else:
        replies.cancel()


def _event_stream(events: AsyncIterator[str], generations: list[Generation]) -> StreamingResponse:
    async def guarded() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield event
        except Exception:  # headers are sent: report in the stream, as OpenAI does (the details go to the log)
            log.exception("generation failed mid-stream")
            yield _sse({"error": {"message": "internal error", "type": "server_error", "param": None,
                                  "code": None}})
        finally:  # the client went away (or the stream ended): nothing more to generate for it
            for generation in generations:
                generation.cancel()

    return StreamingResponse(guarded(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class HostCheck:
    """Answer only requests whose Host header names an allowed host (None: any); others get a 400. Used by the
    API and the web UI."""

    def __init__(self, app, allowed_hosts: list[str] | None):
        self.app, self.allowed_hosts = app, allowed_hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket") and self.allowed_hosts is not None:
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if not _host_allowed(host, self.allowed_hosts):
                log.warning("refused a request for Host %r", host[:100])
                if scope["type"] == "websocket":
                    return await send({"type": "websocket.close", "code": 1008})  # policy violation
                return await _send_error(send, APIError(
                    400, f"invalid Host header: this server answers requests for {', '.join(self.allowed_hosts)} "
                    "only (--allowed-host NAME adds one)", code="invalid_host"))
        return await self.app(scope, receive, send)


class Guard:
    """Before the app: the body size cap. Around it: any exception becomes a 500 with no internal text (the
    traceback goes to the log), and the connection stays usable for the next request."""

    def __init__(self, app, limits: ServerLimits):
        self.app, self.limits = app, limits

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]}
        cap = self.limits.max_body_bytes
        if int(headers.get("content-length") or 0) > cap:
            return await _send_error(send, _too_large(cap))
        received, too_large, started = 0, False, False

        async def capped_receive():
            # Past the cap the app is told the client left, and its answer to that is dropped: ours is the 413.
            nonlocal received, too_large
            if too_large:
                return {"type": "http.disconnect"}
            message = await receive()
            received += len(message.get("body", b""))
            if received > cap:
                too_large = True
                return {"type": "http.disconnect"}
            return message

        async def watched_send(message):
            nonlocal started
            if too_large:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, capped_receive, watched_send)
        except Exception:
            if not too_large:
                log.exception("request failed: %s %s", scope["method"], scope["path"])
                if not started:
                    await _send_error(send, APIError(500, "internal error (the server log has the details)",
                                                     type_="server_error"))
        if too_large and not started:
            await _send_error(send, _too_large(cap))


def _too_large(cap: int) -> APIError:
    return APIError(413, f"the request body is larger than {cap // 2**20} MiB", code="request_too_large")


async def _send_error(send, error: APIError) -> None:
    await _error_response(error)({"type": "http"}, None, send)


def _host_allowed(host_header: str, allowed: list[str] | None) -> bool:
    if allowed is None:
        return True
    if host_header.startswith("["):  # [::1]:8000
        name = host_header[1:].split("]", 1)[0]
    else:  # example.com:8000, 127.0.0.1
        head, sep, port = host_header.rpartition(":")
        name = head if sep and port.isdigit() and ":" not in head else host_header
    return name.lower() in {host.lower() for host in allowed}


class RequestLog:
    """One log line per request, written when its response (streamed or not) has been sent in full:
    method, path, status, model, latency, and for generations the queue wait, tokens and tokens/s."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500

        async def send_and_watch(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            state = scope.get("state", {})
            generations: list[Generation] = state.get("generations", [])
            seconds = time.perf_counter() - started
            line = f"{scope['method']} {scope['path']} {status} {seconds:.3f}s"
            if generations:
                completion = sum(g.completion_tokens for g in generations)
                waited = max(0.0, (generations[0].started or generations[0].created) - generations[0].created)
                line += (f" model={state.get('model')} queued={waited:.3f}s prompt_tokens="
                         f"{sum(g.prompt_tokens for g in generations)} completion_tokens={completion} "
                         f"({completion / max(seconds - waited, 1e-9):.1f} tokens/s)"
                         + (" cancelled" if any(g.was_cancelled for g in generations) else ""))
            log.info(line)


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind the listening socket before loading the model, so a taken port fails at once and clearly."""
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as error:
        raise WeitiaoError(f"cannot resolve --host {host}: {error.strerror}") from None
    sock = socket.socket(family, kind, protocol)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        reason = "in use" if error.errno == errno.EADDRINUSE else error.strerror
        raise WeitiaoError(f"cannot listen on {host}:{port}: port {reason}; choose another with --port") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def open_file_budget(reserve: int = 64) -> tuple[int, int]:
    """Raise this process's open-file limit to its hard limit; return (connections, backlog): how many sockets the
    server may hold and accept in one go. asyncio accepts up to `backlog` connections at a time before any of them
    is seen (twice, at worst, before the guard runs), so both come out of what the limit leaves after the files
    already open and a reserve (model files, logs, the event loop's own)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        wanted = 65536 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    try:
        already = len(os.listdir("/proc/self/fd"))
    except OSError:
        already = 64
    budget = max(16, soft - already - reserve)
    backlog = max(4, min(2048, budget // 8))
    return max(8, budget - 3 * backlog), backlog


def guarded_protocol(request_timeout: float, max_connections: int):
    """uvicorn's HTTP/1.1 protocol with two guards it lacks. A connection must send a request's headers within
    `request_timeout` seconds of opening (or of its last response), else it is closed: idle sockets cannot pile
    up. When `max_connections` are open, a new one evicts the oldest connection that has no request in flight
    (and is closed itself when every one is busy), so the server never runs out of file descriptors, which would
    lock every client out."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None
        opened = 0.0

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.opened = time.monotonic()
            if len(self.connections) > max_connections:
                idle = [c for c in self.connections if c is not self and c.idle and not c.transport.is_closing()]
                victim = min(idle, key=lambda c: c.opened) if idle else self
                victim.transport.close()
                self.connections.discard(victim)  # gone now for the count, before its connection_lost runs
                if victim is self:
                    return
            self._arm()

        @property
        def idle(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = self.loop.call_later(request_timeout, self._expire, self.cycle)

        def _expire(self, cycle) -> None:
            if self.cycle is cycle and self.idle and not self.transport.is_closing():
                self.transport.close()  # no request came in time

    return GuardedH11Protocol


class RepeatFilter(logging.Filter):
    """Let a log message through at most once per `period` seconds, then say how many repeats were dropped: an
    accept loop that fails on every connection must not write gigabytes of the same traceback."""

    def __init__(self, period: float = 10.0):
        super().__init__()
        self.period = period
        self._last: dict[tuple[str, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = time.monotonic()
        last, dropped = self._last.get(key, (-self.period, 0))
        if now - last < self.period:
            self._last[key] = (last, dropped + 1)
            return False
        self._last[key] = (now, 0)
        if dropped:
            record.msg = f"{record.msg} (and {dropped} more like it in the last {now - last:.0f} s)"
        return True


def run_server(engine: Engine, sock: socket.socket, api_key: str | None = None,
               limits: ServerLimits | None = None) -> None:
    """Serve until interrupted, on a socket from bind_socket."""
    import uvicorn

    limits = limits or ServerLimits()
    host, port = sock.getsockname()[:2]
    app = create_app(engine, api_key, limits)
    connections, backlog = open_file_budget()
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5,
                            timeout_keep_alive=5, limit_concurrency=connections + 1,  # the guard keeps fewer open
                            backlog=backlog,
                            http=guarded_protocol(limits.request_timeout, connections))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    repeats = RepeatFilter()
    for name in ("asyncio", "uvicorn.error"):
        logging.getLogger(name).addFilter(repeats)
    shown_host = f"[{host}]" if ":" in host else host
    log.info("serving %s at http://%s:%d/v1 (OpenAI-compatible)%s; at most %d connections", ", ".join(engine.names),
             shown_host, port, "; API key required" if api_key else "", connections)
    uvicorn.Server(config).run(sockets=[sock])
