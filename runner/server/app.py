"""The FastAPI app: middleware (metrics, CORS, API key, body size, model management only with a key when
exposed), the error table wired to handlers, /health, /metrics, the two adapters and model management
(`manage_api`), the chat page (`webui`) and its status route (`status`). `create_app` takes
a model pool (models loaded on demand by name), or one engine already loaded."""

from __future__ import annotations

import asyncio
import hmac
import logging
from contextlib import asynccontextmanager
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runner import __version__
from runner.app.pool import ModelPool, pool_of_engine
from runner.app.pool_values import State
from runner.core.errors import LlmrunError
from runner.engine.types import Engine
from runner.hardware.types import HardwareProfile
from runner.server import errors as err
from runner.server.common import AppState
from runner.server.config import ModelCard, ServerConfig
from runner.server.metrics import model_metrics
from runner.server.native import ClientGone
from runner.server.manage_api import MANAGE_PATHS
from runner.server.status import MachineProbe, default_probe
from runner.server.webui import OPEN_PATHS as PAGE_PATHS

log = logging.getLogger("llmrun.server")
OPEN_PATHS = {"/health"} | PAGE_PATHS  # answered without the API key: liveness probes, the chat page's files
KNOWN_PATHS = {"/", "/health", "/metrics", "/llmrun/status", "/v1/chat/completions", "/v1/completions",
               "/v1/models", "/api/chat", "/api/generate", "/api/tags", "/api/ps", "/api/show", "/api/version",
               "/openapi.json", "/docs"} | MANAGE_PATHS
KNOWN_PATHS |= {"/v1/embeddings", "/api/embed", "/api/embeddings", "/tokenize", "/detokenize", "/apply-template",
                "/v1/responses", "/v1/messages", "/v1/messages/count_tokens"}


def _endpoint_label(path: str) -> str:
    if path in KNOWN_PATHS:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    if path.startswith("/v1/responses/"):
        return "/v1/responses/{id}"
    if path.startswith("/ui/"):
        return "/ui/{file}"
    return "other"


async def _send_error(send: Send, path: str, e: err.ApiError) -> None:
    payload = err.body(e, path)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in e.headers.items()]
    await send({"type": "http.response.start", "status": e.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


class MetricsMiddleware:
    """Counts every HTTP request by endpoint and final status."""

    def __init__(self, app: ASGIApp, state: AppState):
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 499}   # nothing sent: the client went away

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.state.metrics.request(_endpoint_label(scope["path"]), status["code"])


class GuardMiddleware:
    """API key (Bearer, or x-api-key on Anthropic's routes; constant-time comparison), model management refused (403) on a server exposed beyond
    localhost without a key, the request body size limit (413, every method that may carry a body), and text that
    is not valid Unicode (a lone surrogate: 400 naming the field, every route), before any parsing."""

    def __init__(self, app: ASGIApp, config: ServerConfig):
        self.app, self.config = app, config
        # the bytes a client sends (a key from the environment may hold undecodable bytes, kept as surrogates)
        self.key = config.api_key.encode("utf-8", "surrogateescape") if config.api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        headers = dict(scope["headers"])
        if self.key is not None and path not in OPEN_PATHS:
            auth = headers.get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            anthropic = err.is_anthropic_path(path)     # Anthropic's clients send the key as x-api-key
            if not ((scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key))
                    or (anthropic and hmac.compare_digest(headers.get(b"x-api-key", b"").strip(), self.key))):
                how = "'x-api-key: <key>' or 'Authorization: Bearer <key>'" if anthropic else \
                    "'Authorization: Bearer <key>'"
                return await _send_error(send, path, err.ApiError(
                    401, f"Missing or wrong API key: send the header {how} with the key given to `llmrun serve "
                         "--api-key`.", type="authentication_error", code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"}))
        if path in MANAGE_PATHS and self.config.exposed_without_key:
            return await _send_error(send, path, err.ApiError(
                403, f"Model management ({path}) is refused: this server listens on {self.config.host}, beyond "
                     "this machine, without an API key, so anyone who reaches it could pull, delete or copy models. "
                     "Restart it with --api-key KEY (or $LLMRUN_API_KEY; clients send 'Authorization: Bearer "
                     "KEY'), or with --host 127.0.0.1.", type="permission_error", code="management_needs_api_key"))
        limit = self.config.max_body_bytes
        too_big = err.ApiError(413, f"The request body is larger than the limit of {limit} bytes.",
                               code="request_too_large")
        length = headers.get(b"content-length")
        if length is not None:
            try:
                if int(length) > limit:
                    return await _send_error(send, path, too_big)
            except ValueError:
                return await _send_error(send, path, err.ApiError(400, "Invalid Content-Length header."))
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        # read the body here, bounded (also when chunked without Content-Length), then replay it
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await _send_error(send, path, too_big)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        surrogate = err.lone_surrogate(b"".join(chunks))
        if surrogate is not None:
            return await _send_error(send, path, surrogate)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def create_app(config: ServerConfig | None = None, *, pool: ModelPool | None = None, preload: str | None = None,
               engine: Engine | None = None, card: ModelCard | None = None,
               on_load_failed: Callable[[BaseException], None] | None = None, close_engine: bool = True,
               probe: Callable[[], HardwareProfile] = default_probe) -> FastAPI:
    """The app over a model pool (runner.app.pool), or over one `engine` already loaded (+ its `card`). With
    `preload`, that model is loaded right after startup and every route answers 503 until it is ready (a failure
    is reported to `on_load_failed`). At shutdown every engine is closed (`close_engine=False`: not the one
    handed over). `probe` describes the machine for /llmrun/status; it runs once, in a background thread
    started at startup."""
    from runner.server import (anthropic_api, embeddings_api, manage_api, ollama_api, openai_api, responses_api,
                               status, tokens_api, webui)

    config = config or ServerConfig()
    if pool is None:
        if engine is None:
            raise TypeError("create_app needs a pool or an engine")
        pool = pool_of_engine(engine, card or ModelCard(name=engine.model_name))
    state = AppState(config, pool, starting=preload is not None)

    async def load_at_start(name: str) -> None:
        try:
            lease = await pool.acquire(name)
            lease.release()
        except (LlmrunError, OSError, MemoryError) as e:
            hint = e.hint if isinstance(e, LlmrunError) else None
            state.load_error = str(e) + (f" ({hint})" if hint else "")
            log.error("model failed to load: %s", state.load_error)
            if on_load_failed:
                on_load_failed(e)
        else:
            log.info("model %s ready: %d slots, context %d per sequence", lease.card.name, lease.engine.n_parallel,
                     lease.engine.n_ctx)
        finally:
            state.starting = False

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        machine.start()
        await pool.start()
        startup = asyncio.ensure_future(load_at_start(preload)) if preload is not None else None
        yield
        if startup is not None and not startup.done():
            startup.cancel()
        state.manager.stop()
        await pool.aclose(close_engines=close_engine)

    app = FastAPI(title="llmrun", version=__version__, lifespan=lifespan,
                  description="OpenAI- and Ollama-compatible API for local llama.cpp models.")
    machine = MachineProbe(probe)
    app.state.llm = state
    app.state.machine = machine
    app.include_router(openai_api.router)
    app.include_router(ollama_api.router)
    app.include_router(responses_api.router)
    app.include_router(anthropic_api.router)
    app.include_router(embeddings_api.router)
    app.include_router(tokens_api.router)
    app.include_router(manage_api.router)
    app.include_router(status.router)
    app.include_router(webui.router)

    @app.get("/health", tags=["server"])
    async def health():
        if state.load_error:
            return JSONResponse({"status": "error", "error": state.load_error}, status_code=503)
        if state.starting:
            return JSONResponse({"status": "loading"}, status_code=503,
                                headers={"Retry-After": str(config.retry_after_s)})
        loaded = [s for s in pool.status() if s.state is State.LOADED]
        for s in loaded:
            engine = pool.models[s.name].engine
            outage = engine.health() if engine is not None else None   # e.g. an RPC worker is down
            if outage is not None:
                return JSONResponse({"status": "unavailable", "model": s.name, "error": outage.message},
                                    status_code=503, headers={"Retry-After": str(config.retry_after_s)})
        slots = sum(s.n_parallel for s in loaded)
        if len(loaded) == 1:
            return {"status": "ok", "model": loaded[0].name, "slots": slots}
        return {"status": "ok", "loaded": [s.name for s in loaded], "slots": slots}

    @app.get("/metrics", tags=["server"], response_class=PlainTextResponse)
    async def metrics():
        engines = [m.engine for m in pool.models.values() if m.state is State.LOADED and m.engine is not None]
        # a child process's round trip (cluster) must not hold the loop
        stats = [await asyncio.to_thread(e.stats) for e in engines]
        text = state.metrics.render(in_flight=state.in_flight,
                                    queued=sum(s.queued for s in stats), busy_slots=sum(s.busy_slots for s in stats),
                                    slots=sum(s.n_parallel for s in stats),
                                    ready=not state.starting and not state.load_error,
                                    models=model_metrics(pool))
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.exception_handler(err.ApiError)
    async def api_error(request: Request, e: err.ApiError):
        return Response(err.body(e, request.url.path), status_code=e.status, headers=e.headers,
                        media_type="application/json")

    @app.exception_handler(LlmrunError)
    async def llmrun_error(request: Request, e: LlmrunError):
        return await api_error(request, err.from_llmrun(e))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        return await api_error(request, err.validation_error(list(e.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        message = {404: f"No route {request.url.path}.", 405: f"Method {request.method} is not allowed on "
                   f"{request.url.path}."}.get(e.status_code, str(e.detail))
        return await api_error(request, err.ApiError(e.status_code, message, headers=dict(e.headers or {})))

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, e: ClientGone):
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return await api_error(request, err.ApiError(500, f"Internal error: {type(e).__name__}.",
                                                     type="server_error", code="internal_error"))

    app.add_middleware(GuardMiddleware, config=config)
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["*"],
                           allow_headers=["*"], max_age=600,
                           expose_headers=["X-Llmrun-Ignored-Fields", "X-Llmrun-Notice"])
    app.add_middleware(MetricsMiddleware, state=state)
    return app
