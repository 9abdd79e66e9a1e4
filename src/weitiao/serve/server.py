"""`weitiao serve`: an OpenAI-compatible HTTP API over the engine (FastAPI + uvicorn).

Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions, POST /v1/completions. Streaming uses
server-sent events in OpenAI's chunk format, ending with `data: [DONE]`. Errors use OpenAI's error body
({"error": {"message", "type", "param", "code"}}) so the official clients raise their usual exceptions.
Requests queue on the engine's single worker; a client that leaves mid-stream cancels its generation.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import secrets
import socket
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from weitiao.errors import WeitiaoError
from weitiao.generation.engine import Engine
from weitiao.generation.requests import (ContextLengthError, EngineBusyError, Generation, SamplingParams,
                                  UnknownModelError)

log = logging.getLogger("weitiao.serve")

# ---------------------------------------------------------------------------------------------
# Request bodies. Fields OpenAI defines that we do not implement are ignored, except those that would
# change the answer's shape (n > 1), which are refused.


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingBody(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=1, description="only one choice per request is supported")


class ChatCompletionRequest(_SamplingBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens


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


def _usage(generations: list[Generation]) -> dict[str, int]:
    prompt = sum(g.prompt_tokens for g in generations)
    completion = sum(g.completion_tokens for g in generations)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def create_app(engine: Engine, api_key: str | None = None) -> FastAPI:
    """The API over `engine`. With `api_key`, /v1/* requires `Authorization: Bearer <api_key>`."""
    app = FastAPI(title="weitiao", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return _error_response(error)

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

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        log.exception("request failed")
        return _error_response(APIError(500, f"internal error: {error}", type_="server_error"))

    async def check_api_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            message = "Incorrect API key provided" if token else "Missing API key: send 'Authorization: Bearer KEY'"
            raise APIError(401, message, code="invalid_api_key")

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
        engine.get(body.model)
        params = _sampling(body, body.max_completion_tokens or body.max_tokens)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": _message_text(m)}
                    for m in body.messages]
        generation = engine.chat(body.model, messages, params)
        request.state.generations = [generation]
        request.state.model = body.model
        reply_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not body.stream:
            await _replies(request, [generation])
            return {"id": reply_id, "object": "chat.completion", "created": created, "model": body.model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": generation.text},
                                 "logprobs": None, "finish_reason": generation.finish_reason}],
                    "usage": _usage([generation])}

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> str:
            return _sse({"id": reply_id, "object": "chat.completion.chunk", "created": created, "model": body.model,
                         "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]})

        async def events() -> AsyncIterator[str]:
            yield chunk({"role": "assistant", "content": ""})
            async for piece in generation.stream_async():
                yield chunk({"content": piece})
            yield chunk({}, generation.finish_reason)
            if body.stream_options and body.stream_options.include_usage:
                yield _sse({"id": reply_id, "object": "chat.completion.chunk", "created": created,
                            "model": body.model, "choices": [], "usage": _usage([generation])})
            yield _sse("[DONE]")

        return _event_stream(events(), [generation])

    @api.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        engine.get(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise APIError(400, "prompt must not be empty", param="prompt")
        generations: list[Generation] = []
        try:
            for prompt in prompts:  # queued together, so they run back to back
                generations.append(engine.complete(body.model, prompt, _sampling(body, body.max_tokens)))
        except WeitiaoError:
            for generation in generations:
                generation.cancel()
            raise
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

    app.include_router(api)
    return app


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
        except Exception as error:  # headers are sent: report in the stream, as OpenAI does
            log.exception("generation failed mid-stream")
            yield _sse({"error": {"message": f"internal error: {error}", "type": "server_error", "param": None,
                                  "code": None}})
        finally:  # the client went away (or the stream ended): nothing more to generate for it
            for generation in generations:
                generation.cancel()

    return StreamingResponse(guarded(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


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


def run_server(engine: Engine, sock: socket.socket, api_key: str | None = None) -> None:
    """Serve until interrupted, on a socket from bind_socket."""
    import uvicorn

    host, port = sock.getsockname()[:2]
    app = create_app(engine, api_key)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    shown_host = f"[{host}]" if ":" in host else host
    log.info("serving %s at http://%s:%d/v1 (OpenAI-compatible)%s", ", ".join(engine.names), shown_host, port,
             "; API key required" if api_key else "")
    uvicorn.Server(config).run(sockets=[sock])
