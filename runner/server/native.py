"""The one native path both APIs share: admit (bounded), submit to the engine, stream text deltas with
disconnect handling, finish with the engine's Completion. The adapters only translate shapes."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, TypeVar

from starlette.requests import Request
from starlette.types import Receive

from runner.engine.types import ChatMessage, Completion, Engine, Generation, SamplingParams
from runner.core.errors import ContextOverflowError, GrammarError, LlmrunError, UsageError
from runner.server.errors import ApiError, from_llmrun
from runner.server.metrics import Metrics

T = TypeVar("T")


@dataclass(frozen=True)
class NativeRequest:
    """Exactly one of `messages` (chat) and `prompt` (raw completion)."""

    params: SamplingParams
    messages: tuple[ChatMessage, ...] | None = None
    prompt: str | None = None
    grammar_field: str | None = None     # the request field params.grammar was made from ("response_format"...)


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


def json_grammar(schema: object | None = None, *, param: str) -> str:
    """GBNF text for "any JSON object" (schema None) or for a JSON schema, via llama.cpp's own converter in
    llama-cpp-python (pure Python text conversion; the engine does the constrained sampling)."""
    from llama_cpp import llama_grammar

    if schema is None:
        return llama_grammar.JSON_GBNF
    if not isinstance(schema, dict):
        raise UsageError(f"{param} must be a JSON schema object", hint='e.g. {"type": "object", "properties": {}}')
    try:
        return llama_grammar.json_schema_to_gbnf(json.dumps(schema))
    # the converter signals unsupported schemas with assertions and attribute/key errors on odd shapes
    except (AssertionError, ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError) as e:
        raise UsageError(f"{param} is not a JSON schema llama.cpp grammars support: {e}",
                         hint="use plain types, properties, required, enum, arrays; no remote $ref") from e


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
    """One admitted generation. `start()` submits and waits for the first delta (so bad input and context
    overflow still get a proper HTTP status); then iterate `deltas()` or `collect()`; `completion` at the end.

    From `start()` to `close()` a watcher listens for the client leaving, whatever the response does meanwhile
    (submitting, waiting in the engine's queue, generating text a stop string or a grammar holds back, or
    blocked on a slow socket): it cancels the generation and frees the gate at once, and whoever is waiting on
    the run gets ClientGone. It does not rely on the response noticing (Starlette's StreamingResponse stops
    listening under ASGI 2.4, where only a failed send reveals a gone client). `close()` always runs (the
    response wrappers call it): cancels an unfinished generation, frees the gate."""

    def __init__(self, engine: Engine, gate: Gate, metrics: Metrics, request: NativeRequest, http: Request):
        self.engine, self.gate, self.metrics, self.request, self.http = engine, gate, metrics, request, http
        self.generation: Generation | None = None
        self.completion: Completion | None = None
        self.t0 = time.perf_counter()
        self._it: AsyncIterator[str] | None = None
        self._first: str | None = None
        self._finished = False
        self._closed = False
        self._last = self.t0
        self._gone: asyncio.Future[None] | None = None     # done once the client left
        self._watcher: asyncio.Task[None] | None = None
        self._submitted: asyncio.Future[Generation] | None = None

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
            return self.engine.chat(req.messages, req.params)
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
            self._it = self.generation.__aiter__()
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
        gen = self.generation
        # the iteration ends only once the generation finished, so its completion is there: nothing to wait for
        self.completion = gen.completion if gen is not None else None
        if self.completion is not None:
            u = self.completion.usage
            self.metrics.tokens(u.prompt_tokens, u.completion_tokens)
            if self.completion.finish_reason == "error":
                raise from_llmrun(_engine_error(self.completion))

    async def _iterate(self, *, race: bool) -> AsyncIterator[str]:
        """The text deltas, the first one included; with `race`, each wait for the next one also ends with
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

    async def deltas(self) -> AsyncIterator[str]:
        """Text deltas, the first one included. Raises ApiError if the engine fails mid-way, ClientGone once the
        client left."""
        try:
            async for delta in self._iterate(race=True):
                yield delta
        finally:
            if not self._finished:
                await self.close()

    async def collect(self) -> str:
        """The whole text. Raises ApiError if the engine fails, ClientGone once the client left."""
        async def drain() -> str:
            return "".join([d async for d in self._iterate(race=False)])
        try:
            return await self._race(drain())
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
                self.generation.cancel()
                self.metrics.cancel()
        elif self._submitted is not None and not _failed(self._submitted):
            # cancelled, or the client left, while submitting (or before start() saw the submission end): cancel
            # what the submission started, once it has (at once if it has)
            self._submitted.add_done_callback(_cancel_submitted)
            self.metrics.cancel()
        self.gate.leave()


def _failed(task: asyncio.Future[Generation]) -> bool:
    return task.done() and (task.cancelled() or task.exception() is not None)


def _cancel_submitted(task: asyncio.Future[Generation]) -> None:
    if not _failed(task):
        task.result().cancel()


def _engine_error(c: Completion) -> LlmrunError:
    from runner.core.errors import EngineError

    return EngineError(f"generation failed: {c.error or 'unknown engine error'}")
