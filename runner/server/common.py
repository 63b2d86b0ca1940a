"""What both adapters share: the app's live state (the model pool), request-to-native helpers, the run that
holds its model, and the streaming response that always releases its generation and its model."""

from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterable, Iterator

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from runner.app.manage import ModelManager
from runner.app.models import ModelRef
from runner.app.pool import Lease, Model, ModelPool
from runner.core.errors import ModelNotLocalError, UnknownModelError, UsageError
from runner.core.units import parse_duration
from runner.engine.types import SamplingParams
from runner.server.config import ServerConfig
from runner.server.errors import ApiError, from_llmrun
from runner.server.metrics import Metrics
from runner.server.native import ClientGone, Gate, NativeRequest, Run
from runner.server.response_store import ResponseStore

SEED_MOD = 2 ** 32   # llama.cpp seeds are uint32
Int64 = Field(default=None, ge=-(2 ** 63), le=2 ** 63 - 1)     # an optional integer field the clients send as int64


class WireModel(BaseModel):
    """A request body of the OpenAI, Responses and Anthropic faces: values checked strictly (no coercion), unknown
    fields kept so that `note_ignored` can name them, fields filled by name or alias."""

    model_config = ConfigDict(extra="allow", strict=True, populate_by_name=True)
IGNORED_HEADER = "X-Llmrun-Ignored-Fields"

log = logging.getLogger("llmrun.server")


@dataclass
class AppState:
    """The server's live state: the model pool (runner.app.pool) and its management (pulls, deletes, copies:
    runner.app.manage), one admission gate per loaded model, the metrics, the stored responses, and the start-up load of the model
    `llmrun serve --model` named (503 for everything until it is ready, as a one-model server always
    answered)."""

    config: ServerConfig
    pool: ModelPool
    metrics: Metrics = field(default_factory=Metrics)
    starting: bool = False
    load_error: str | None = None
    started_at: float = field(default_factory=time.time)
    gates: "weakref.WeakKeyDictionary[Model, Gate]" = field(default_factory=weakref.WeakKeyDictionary)
    logged_ignored: set[str] = field(default_factory=set)    # ignored request fields already logged
    manager: ModelManager = field(init=False)
    responses: ResponseStore = field(init=False)     # /v1/responses kept for previous_response_id

    def __post_init__(self) -> None:
        self.manager = ModelManager(self.pool)
        self.responses = ResponseStore(self.config.responses_kept, self.config.responses_kept_bytes)

    def require_started(self) -> None:
        """A 503 while the start-up model loads (or after it failed to)."""
        if self.starting or self.load_error:
            msg = f"The model failed to load: {self.load_error}" if self.load_error else "The model is still loading."
            raise ApiError(503, msg, type="server_error", code="model_loading",
                           headers={"Retry-After": str(self.config.retry_after_s)})

    def resolve(self, name: str) -> ModelRef:
        """The model `name` names (404 with close matches otherwise); nothing is loaded."""
        self.require_started()
        try:
            return self.pool.resolve(name)
        except (UnknownModelError, ModelNotLocalError) as e:
            raise from_llmrun(e, param="model") from e

    async def acquire(self, name: str, keep_alive: float | None = None, *, embeddings: bool = False) -> Lease:
        """A lease on the model, loaded on demand (404, 503, 507 as the pool decides); `embeddings`: with room
        for its embedding context."""
        self.require_started()
        try:
            return await self.pool.acquire(name, keep_alive, embeddings=embeddings)
        except (UnknownModelError, ModelNotLocalError) as e:
            raise from_llmrun(e, param="model") from e

    @property
    def in_flight(self) -> int:
        """Generation requests admitted and not finished, over every model."""
        return sum(g.in_flight for g in self.gates.values())

    def gate(self, lease: Lease) -> Gate:
        """The admission gate of the leased model's engine (one per load: --parallel slots plus --queue)."""
        gate = self.gates.get(lease.model)
        if gate is None:
            gate = self.gates[lease.model] = Gate(lease.engine.n_parallel, self.config.queue,
                                                  self.config.retry_after_s)
        return gate


def keep_alive_of(value: float | int | str | None) -> float | None:
    """A request's keep_alive (Ollama's forms) in seconds, or None when it did not say; 400 when unreadable."""
    if value is None:
        return None
    try:
        return parse_duration(value, what="keep_alive")
    except UsageError as e:
        raise ApiError(400, e.message + (f" ({e.hint})" if e.hint else ""), param="keep_alive",
                       code="invalid_value") from e


def state_of(request: Request) -> AppState:
    return request.app.state.llm


def sampling(*, temperature=None, top_p=None, top_k=None, min_p=None, typical_p=None, repeat_penalty=None,
             repeat_last_n=None, frequency_penalty=None, presence_penalty=None, logit_bias=None, mirostat=None,
             mirostat_tau=None, mirostat_eta=None, seed=None, max_tokens=None, stop=None, grammar=None, n=None,
             logprobs=None, top_logprobs=None, n_ctx=None) -> SamplingParams:
    """SamplingParams from the values a request set (None = engine default)."""
    given = {
        "temperature": temperature, "top_p": top_p, "top_k": top_k, "min_p": min_p, "typical_p": typical_p,
        "repeat_penalty": repeat_penalty, "repeat_last_n": repeat_last_n, "frequency_penalty": frequency_penalty,
        "presence_penalty": presence_penalty, "mirostat": mirostat, "mirostat_tau": mirostat_tau,
        "mirostat_eta": mirostat_eta, "seed": None if seed is None else seed % SEED_MOD, "max_tokens": max_tokens,
        "grammar": grammar, "n": n, "logprobs": logprobs, "top_logprobs": top_logprobs, "n_ctx": n_ctx,
    }
    kwargs: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    if stop:
        kwargs["stop"] = (stop,) if isinstance(stop, str) else tuple(s for s in stop if s)
    if logit_bias:
        kwargs["logit_bias"] = tuple(logit_bias)
    return SamplingParams(**kwargs)


def ignored_fields(body: BaseModel, prefix: str = "") -> Iterator[str]:
    """The fields of a request that the server does not use: those its model does not define (pydantic's
    extras), nested ones as `stream_options.include_obfuscation`, in list items as `messages[].name`."""
    for name in body.model_extra or {}:
        yield prefix + name
    for name in type(body).model_fields:
        value = getattr(body, name)
        if isinstance(value, BaseModel):
            yield from ignored_fields(value, f"{prefix}{name}.")
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, BaseModel):
                    yield from ignored_fields(item, f"{prefix}{name}[].")


def _header_safe(name: str) -> str:
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "_.-[]$@:/") else "?" for c in name)
    return safe[:64] + ("..." if len(safe) > 64 else "")


def note_ignored(request: Request, body: BaseModel, also: Iterable[str] = ()) -> tuple[str, ...]:
    """The request's ignored fields (those its model does not define, and `also`: defined ones the adapter
    found without effect), made safe for a header (ASCII, no separators, at most 64 characters each, 32
    names), each logged the first time this server sees it."""
    names = tuple(dict.fromkeys(_header_safe(n) for n in [*ignored_fields(body), *also]))[:32]
    state = state_of(request)
    for name in names:
        if name not in state.logged_ignored:
            state.logged_ignored.add(name)
            log.warning("ignoring the request field %r on %s (no effect here; named in the %s response header "
                        "of each request that sends it)", name, request.url.path, IGNORED_HEADER)
    return names


class LeasedRun(Run):
    """A Run that holds its model: the lease is released when the run closes, however it ends (finished, client
    gone, error, refused at the gate), exactly once."""

    def __init__(self, lease: Lease, gate: Gate, metrics: Metrics, native: NativeRequest, http: Request):
        super().__init__(lease.engine, gate, metrics, native, http)
        self.lease = lease

    async def close(self) -> None:
        try:
            await super().close()
        finally:
            self.lease.release()


async def start_run(request: Request, model: str, native: NativeRequest, keep_alive: float | None = None) -> LeasedRun:
    """Acquire `model` (loading it when needed), admit the request at its gate and start generating."""
    state = state_of(request)
    lease = await state.acquire(model, keep_alive)
    try:
        run = LeasedRun(lease, state.gate(lease), state.metrics, native, request)
        await run.start()
    except ApiError as e:
        lease.release()
        if e.status == 429:
            state.metrics.busy()
        raise
    except BaseException:
        lease.release()
        raise
    return run


def notice_headers(run: Run) -> dict[str, str]:
    """Never truncate silently: when the engine left old chat turns out to fit the context, say so. Never
    ignore silently: name the request fields that had no effect."""
    headers = {}
    if run.notice:
        headers["X-Llmrun-Notice"] = run.notice.encode("ascii", "replace").decode()
    if run.request.ignored:
        headers[IGNORED_HEADER] = ", ".join(run.request.ignored).encode("ascii", "replace").decode()
    return headers


class RunStream(StreamingResponse):
    """A streaming response that closes its Run however the response ends (finished, client gone, error):
    an unfinished generation is cancelled and its slot freed.

    It streams the same way under every ASGI spec version: without Starlette's own disconnect listener (which
    it runs only below spec 2.4). The Run's watcher notices a gone client, however the server reports it, and
    ends the stream with ClientGone; a send that fails (spec 2.4) ends it too."""

    def __init__(self, run: Run, content: AsyncIterator[str], media_type: str):
        super().__init__(content, media_type=media_type, headers=notice_headers(run) | {
            "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.run = run

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.stream_response(send)
        except (ClientGone, OSError):
            pass   # the client went away: nothing more to send; close() cancels what is left
        finally:
            await self.run.close()
