"""The one native path both APIs share: admit (bounded), submit to the engine, stream text deltas with
disconnect handling, finish with the engine's Completion. The adapters only translate shapes."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import AsyncIterator

from starlette.requests import Request

from runner.engine.types import ChatMessage, Completion, Engine, Generation, SamplingParams
from runner.core.errors import ContextOverflowError, LlmrunError, UsageError
from runner.server.errors import ApiError, from_llmrun
from runner.server.metrics import Metrics


@dataclass(frozen=True)
class NativeRequest:
    """Exactly one of `messages` (chat) and `prompt` (raw completion)."""

    params: SamplingParams
    messages: tuple[ChatMessage, ...] | None = None
    prompt: str | None = None


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


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def race_disconnect(awaitable, request: Request):
    """Await `awaitable`, or raise ClientGone (after cancelling it) if the client disconnects first."""
    task = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
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
    `close()` always runs (the response wrappers call it): cancels an unfinished generation, frees the gate."""

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

    @property
    def notice(self) -> str | None:
        """What the engine had to do to fit the request (e.g. oldest chat turns left out), if anything."""
        return self.generation.notice if self.generation is not None else None

    def _submit(self) -> Generation:
        """Runs in a worker thread: rendering the template, tokenizing, building the sampler and compiling a
        grammar (or a child process's round trip) take milliseconds to seconds and must not hold the event loop."""
        req = self.request
        if req.messages is not None:
            return self.engine.chat(req.messages, req.params)
        return self.engine.complete(req.prompt or "", req.params)

    async def start(self) -> None:
        self.gate.enter()
        try:
            submitted = asyncio.ensure_future(asyncio.to_thread(self._submit))
            try:
                self.generation = await asyncio.shield(submitted)
            except asyncio.CancelledError:   # the request was cancelled while submitting: cancel what it started
                submitted.add_done_callback(_cancel_submitted)
                raise
            self._it = self.generation.__aiter__()
            try:
                self._first = await race_disconnect(self._it.__anext__(), self.http)
            except StopAsyncIteration:
                self._first = None
                await self._finish()
        except LlmrunError as e:
            await self.close()
            param = None
            if isinstance(e, ContextOverflowError):
                param = "messages" if self.request.messages is not None else "prompt"
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
        self._finished = True
        gen = self.generation
        # the iteration ends only once the generation finished, so its completion is there: nothing to wait for
        self.completion = gen.completion if gen is not None else None
        if self.completion is not None:
            u = self.completion.usage
            self.metrics.tokens(u.prompt_tokens, u.completion_tokens)
            if self.completion.finish_reason == "error":
                raise from_llmrun(_engine_error(self.completion))

    async def deltas(self) -> AsyncIterator[str]:
        """Text deltas, the first one included. Raises ApiError if the engine fails mid-way."""
        try:
            if self._first:
                yield self._first
            if self._finished:
                return
            if self._it is None:
                raise RuntimeError("Run.deltas() before Run.start()")
            try:
                async for delta in self._it:
                    now = time.perf_counter()
                    self.metrics.token_gap(now - self._last)
                    self._last = now
                    yield delta
                await self._finish()
            except LlmrunError as e:
                raise from_llmrun(e) from e
        finally:
            if not self._finished:
                await self.close()

    async def collect(self) -> str:
        async def drain() -> str:
            return "".join([d async for d in self.deltas()])
        try:
            return await race_disconnect(drain(), self.http)
        finally:
            await self.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.generation is not None and not self._finished:
            self.generation.cancel()
            self.metrics.cancel()
        self.gate.leave()


def _cancel_submitted(task: asyncio.Future[Generation]) -> None:
    if not task.cancelled() and task.exception() is None:
        task.result().cancel()


def _engine_error(c: Completion) -> LlmrunError:
    from runner.core.errors import EngineError

    return EngineError(f"generation failed: {c.error or 'unknown engine error'}")
