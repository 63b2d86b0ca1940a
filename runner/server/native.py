"""The one native path both APIs share: admit (bounded), submit to the engine, stream text deltas with
disconnect handling, finish with the engine's Completion. The adapters only translate shapes."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Mapping, TypeVar

from starlette.requests import Request
from starlette.types import Receive

from runner.engine.grammar import json_grammar
from runner.engine.types import ChatMessage, Completion, Delta, Engine, Generation, SamplingParams, Tools
from runner.core.errors import ContextOverflowError, GrammarError, LlmrunError
from runner.server.errors import ApiError, from_llmrun
from runner.server.metrics import Metrics

T = TypeVar("T")

__all__ = ["NativeRequest", "Run", "Gate", "ClientGone", "json_grammar", "race_disconnect"]


@dataclass(frozen=True)
class NativeRequest:
    """Exactly one of `messages` (chat) and `prompt` (raw completion)."""

    params: SamplingParams
    messages: tuple[ChatMessage, ...] | None = None
    prompt: str | None = None
    grammar_field: str | None = None     # the request field params.grammar was made from ("response_format"...)
    tools: Tools | None = None
    template_kwargs: Mapping[str, Any] | None = None
    ignored: tuple[str, ...] = ()        # request fields without effect (the X-Llmrun-Ignored-Fields header)


class ClientGone(Exception):
    """The client closed the connection; its generation was cancelled."""


class Gate:
    """Admission control: at most `slots + queue` generations in flight; beyond that 429 with Retry-After,
    never an unbounded pile-up. Used only from the event loop (no lock needed)."""

    def __init__(self, slots: int, queue: int, retry_after_s: int = 1):
        self.capacity = max(1, slots + queue)
        self.retry_after_s = retry_after_s
        self.in_flight = 0

    def enter(self) -> None:
        if self.in_flight >= self.capacity:
            raise ApiError(429, f"The server is busy: {self.in_flight} requests are running or queued (the "
                                "limit is --parallel plus --queue). Retry shortly.",
                           type="rate_limit_error", code="server_busy",
                           headers={"Retry-After": str(self.retry_after_s)})
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1


# How often the disconnect watcher asks the server again (seconds). A client that closes its connection is
# normally reported at once; re-asking matters for one the server stopped reading (below).
DISCONNECT_POLL_S = 0.25


async def _wait_disconnect(receive: Receive) -> None:
    """Return once the server reports the client gone (`http.disconnect`). Asks `receive()` again every
    DISCONNECT_POLL_S rather than waiting on one call: uvicorn stops reading a connection whose client sent
    bytes after its request (a pipelined request, stray bytes) and reads it again only inside `receive()`, so a
    single long wait would never see that client leave."""
    while True:
        try:
            message = await asyncio.wait_for(receive(), DISCONNECT_POLL_S)
        except TimeoutError:
            continue
        if message["type"] == "http.disconnect":
            return


async def race_disconnect(awaitable: Awaitable[T], request: Request) -> T:
    """Await `awaitable`, or raise ClientGone (after cancelling it) if the client disconnects first (for waits
    outside a Run: a pull's progress)."""
    task = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        waiters: set[asyncio.Future[Any]] = {task, watcher}
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, StopAsyncIteration):
                pass
    if not task.done() or task.cancelled():
        raise ClientGone()
    return task.result()


class Run:
    """One admitted generation (all its choices, SamplingParams.n). `start()` submits and waits for the first
    delta (so bad input and context overflow still get a proper HTTP status); then iterate `deltas()` (choice
    index, Delta) or `collect()`; `completions` (one per choice) at the end.

    From `start()` to `close()` a watcher listens for the client leaving, whatever the response does meanwhile
    (submitting, waiting in the engine's queue, generating text a stop string or a grammar holds back, or
    blocked on a slow socket): it cancels the generation and frees the gate at once, and whoever is waiting on
    the run gets ClientGone. It does not rely on the response noticing (Starlette's StreamingResponse stops
    listening under ASGI 2.4, where only a failed send reveals a gone client). `close()` always runs (the
    response wrappers call it): cancels an unfinished generation, frees the gate."""

    def __init__(self, engine: Engine, gate: Gate, metrics: Metrics, request: NativeRequest, http: Request):
        self.engine, self.gate, self.metrics, self.request, self.http = engine, gate, metrics, request, http
        self.generation: Generation | None = None
        self.completions: tuple[Completion, ...] = ()
        self.t0 = time.perf_counter()
        self._it: AsyncIterator[tuple[int, Delta]] | None = None
        self._first: tuple[int, Delta] | None = None
        self._finished = False
        self._closed = False
        self._last = self.t0
        self._gone: asyncio.Future[None] | None = None     # done once the client left
        self._watcher: asyncio.Task[None] | None = None
        self._submitted: asyncio.Future[Generation] | None = None

    @property
    def completion(self) -> Completion | None:
        """The first choice's end (the only one unless n > 1)."""
        return self.completions[0] if self.completions else None

    @property
    def choices(self) -> tuple[Generation, ...]:
        return self.generation.choices if self.generation is not None else ()

    @property
    def notice(self) -> str | None:
        """What the engine had to do to fit the request (e.g. oldest chat turns left out), if anything."""
        return self.generation.notice if self.generation is not None else None

    @property
    def client_gone(self) -> bool:
        return self._gone is not None and self._gone.done()

    def _submit(self) -> Generation:
        """Runs in a worker thread: rendering the template, tokenizing, building the sampler and compiling a
        grammar (or a child process's round trip) take milliseconds to seconds and must not hold the event loop."""
        req = self.request
        if req.messages is not None:
            return self.engine.chat(req.messages, req.params, tools=req.tools, template_kwargs=req.template_kwargs)
        return self.engine.complete(req.prompt or "", req.params)

    async def _watch(self) -> None:
        await _wait_disconnect(self.http.receive)
        if self._gone is not None and not self._gone.done():
            self._gone.set_result(None)
        await self.close()

    async def _race(self, awaitable: Awaitable[T]) -> T:
        """`awaitable`'s result, or ClientGone (after cancelling it) as soon as the client is gone."""
        task = asyncio.ensure_future(awaitable)
        gone = self._gone
        try:
            if gone is not None and not gone.done():
                waiters: set[asyncio.Future[Any]] = {task, gone}
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if task.done():       # finished (or failed) first: nothing to lose by returning it
            return task.result()
        if gone is None or not gone.done():   # no watcher (start() not called): just wait
            return await task
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, StopAsyncIteration, ClientGone):
            pass
        raise ClientGone()

    async def start(self) -> None:
        self.gate.enter()
        self._gone = asyncio.get_running_loop().create_future()
        self._watcher = asyncio.ensure_future(self._watch())
        try:
            self._submitted = asyncio.ensure_future(asyncio.to_thread(self._submit))
            self.generation = await self._race(asyncio.shield(self._submitted))
            if self.client_gone:
                raise ClientGone()
            self._it = _merge(self.generation.choices)
            try:
                self._first = await self._race(self._it.__anext__())
            except StopAsyncIteration:
                self._first = None
                await self._finish()
        except LlmrunError as e:
            await self.close()
            param = None
            if isinstance(e, ContextOverflowError):
                param = "messages" if self.request.messages is not None else "prompt"
            elif isinstance(e, GrammarError) and self.request.grammar_field:
                param = self.request.grammar_field
                e = GrammarError(f"{param}: llama.cpp cannot use the grammar made from it: {e.message}", hint=e.hint)
            raise from_llmrun(e, param=param) from e
        except BaseException:
            await self.close()
            raise
        if self._first is not None:
            self._mark_first()

    def _mark_first(self) -> None:
        now = time.perf_counter()
        self.metrics.first_token(now - self.t0)
        self._last = now

    async def _finish(self) -> None:
        if self.client_gone:
            raise ClientGone()
        self._finished = True
        # the iteration ends only once every choice finished, so their completions are there: nothing to wait for
        self.completions = tuple(c for c in (g.completion for g in self.choices) if c is not None)
        if self.completions:
            self.metrics.tokens(self.completions[0].usage.prompt_tokens,
                                sum(c.usage.completion_tokens for c in self.completions))
            failed = next((c for c in self.completions if c.finish_reason == "error"), None)
            if failed is not None:
                raise from_llmrun(_engine_error(failed))

    async def _iterate(self, *, race: bool) -> AsyncIterator[tuple[int, Delta]]:
        """(choice index, delta), the first one included; with `race`, each wait for the next one also ends with
        ClientGone as soon as the client is gone."""
        if self._first:
            yield self._first
        if self._finished:
            return
        if self._it is None:
            raise RuntimeError("Run.deltas() before Run.start()")
        try:
            while True:
                try:
                    delta = await (self._race(self._it.__anext__()) if race else self._it.__anext__())
                except StopAsyncIteration:
                    break
                now = time.perf_counter()
                self.metrics.token_gap(now - self._last)
                self._last = now
                yield delta
            await self._finish()
        except LlmrunError as e:
            raise from_llmrun(e) from e

    async def deltas(self) -> AsyncIterator[tuple[int, Delta]]:
        """(choice index, delta), the first one included. Raises ApiError if the engine fails mid-way, ClientGone
        once the client left."""
        try:
            async for delta in self._iterate(race=True):
                yield delta
        finally:
            if not self._finished:
                await self.close()

    async def collect(self) -> tuple[Completion, ...]:
        """Every choice's completion. Raises ApiError if the engine fails, ClientGone once the client left."""
        async def drain() -> None:
            async for _ in self._iterate(race=False):
                pass
        try:
            await self._race(drain())
            return self.completions
        finally:
            await self.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        watcher = self._watcher
        if watcher is not None and watcher is not asyncio.current_task():
            watcher.cancel()
        if self.generation is not None:
            if not self._finished:
                for choice in self.generation.choices:
                    choice.cancel()
                self.metrics.cancel()
        elif self._submitted is not None and not _failed(self._submitted):
            # cancelled, or the client left, while submitting (or before start() saw the submission end): cancel
            # what the submission started, once it has (at once if it has)
            self._submitted.add_done_callback(_cancel_submitted)
            self.metrics.cancel()
        self.gate.leave()


async def _merge(choices: tuple[Generation, ...]) -> AsyncIterator[tuple[int, Delta]]:
    """The deltas of every choice as they come, tagged with the choice's index."""
    if len(choices) == 1:
        async for d in choices[0].adeltas():
            yield 0, d
        return
    queue: asyncio.Queue[tuple[int, Delta | None]] = asyncio.Queue()

    async def pump(i: int, g: Generation) -> None:
        try:
            async for d in g.adeltas():
                await queue.put((i, d))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(choices)]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if item is None:
                running -= 1
            else:
                yield index, item
    finally:
        for t in tasks:
            t.cancel()


def _failed(task: asyncio.Future[Generation]) -> bool:
    return task.done() and (task.cancelled() or task.exception() is not None)


def _cancel_submitted(task: asyncio.Future[Generation]) -> None:
    if not _failed(task):
        for choice in task.result().choices:
            choice.cancel()


def _engine_error(c: Completion) -> LlmrunError:
    from runner.core.errors import EngineError

    return EngineError(f"generation failed: {c.error or 'unknown engine error'}")
