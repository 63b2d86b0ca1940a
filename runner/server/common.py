"""What both adapters share: the app's live state, request-to-native helpers, and the streaming response that
always releases its generation."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from runner.engine.types import Engine, SamplingParams
from runner.server.config import ModelCard, ServerConfig
from runner.server.errors import ApiError, unknown_model
from runner.server.metrics import Metrics
from runner.server.native import ClientGone, Gate, NativeRequest, Run

SEED_MOD = 2 ** 32   # llama.cpp seeds are uint32


@dataclass(frozen=True)
class Ready:
    """The loaded model, its card and its admission gate: set together, once, when loading finished."""

    engine: Engine
    card: ModelCard
    gate: Gate


@dataclass
class AppState:
    config: ServerConfig
    metrics: Metrics = field(default_factory=Metrics)
    ready: Ready | None = None
    load_error: str | None = None
    started_at: float = field(default_factory=time.time)

    def set_ready(self, engine: Engine, card: ModelCard) -> None:
        self.ready = Ready(engine, card, Gate(engine.n_parallel, self.config.queue, self.config.retry_after_s))

    @property
    def engine(self) -> Engine | None:
        return self.ready.engine if self.ready is not None else None

    @property
    def gate(self) -> Gate | None:
        return self.ready.gate if self.ready is not None else None

    def require_ready(self) -> Ready:
        """The loaded model, or a 503 while it is loading (or failed to load)."""
        if self.ready is None:
            msg = f"The model failed to load: {self.load_error}" if self.load_error else "The model is still loading."
            raise ApiError(503, msg, type="server_error", code="model_loading",
                           headers={"Retry-After": str(self.config.retry_after_s)})
        return self.ready

    def check_model(self, name: str) -> Ready:
        """The loaded model when `name` names it; a 503 while loading, a 404 for another name."""
        ready = self.require_ready()
        if not ready.card.answers_to(name):
            raise unknown_model(name, ready.card.name)
        return ready


def state_of(request: Request) -> AppState:
    return request.app.state.llm


def sampling(*, temperature=None, top_p=None, top_k=None, min_p=None, repeat_penalty=None, repeat_last_n=None,
             seed=None, max_tokens=None, stop=None, grammar=None) -> SamplingParams:
    """SamplingParams from the values a request set (None = engine default)."""
    given = {
        "temperature": temperature, "top_p": top_p, "top_k": top_k, "min_p": min_p,
        "repeat_penalty": repeat_penalty, "repeat_last_n": repeat_last_n,
        "seed": None if seed is None else seed % SEED_MOD, "max_tokens": max_tokens, "grammar": grammar,
    }
    kwargs = {k: v for k, v in given.items() if v is not None}
    if stop:
        kwargs["stop"] = (stop,) if isinstance(stop, str) else tuple(s for s in stop if s)
    return SamplingParams(**kwargs)


async def start_run(request: Request, native: NativeRequest) -> Run:
    state = state_of(request)
    ready = state.require_ready()
    run = Run(ready.engine, ready.gate, state.metrics, native, request)
    try:
        await run.start()
    except ApiError as e:
        if e.status == 429:
            state.metrics.busy()
        raise
    return run


def notice_headers(run: Run) -> dict[str, str]:
    """Never truncate silently: when the engine left old chat turns out to fit the context, say so."""
    notice = run.notice
    return {"X-Llmrun-Notice": notice.encode("ascii", "replace").decode()} if notice else {}


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
