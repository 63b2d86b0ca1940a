"""The one native path both APIs share: admit (bounded), submit to the engine, stream text deltas with
disconnect handling, finish with the engine's Completion. The adapters only translate shapes."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Mapping

from starlette.requests import Request

from runner.engine.grammar import json_grammar
from runner.engine.types import ChatMessage, Completion, Delta, Engine, Generation, SamplingParams, Tools
from runner.core.errors import ContextOverflowError, LlmrunError
from runner.server.errors import ApiError, from_llmrun
from runner.server.metrics import Metrics

__all__ = ["NativeRequest", "Run", "Gate", "ClientGone", "json_grammar"]


@dataclass(frozen=True)
class NativeRequest:
    """Exactly one of `messages` (chat) and `prompt` (raw completion). `ignored`: request fields that had no
    effect (the X-Llmrun-Ignored-Fields header)."""

    params: SamplingParams
    messages: tuple[ChatMessage, ...] | None = None
    prompt: str | None = None
    tools: Tools | None = None
    template_kwargs: Mapping[str, Any] | None = None
    ignored: tuple[str, ...] = ()


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


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _race_disconnect(awaitable, request: Request):
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
    """One admitted generation (all its choices). `start()` submits and waits for the first delta (so bad input
    and context overflow still get a proper HTTP status); then iterate `deltas()` or `collect()`;
    `completions` (one per choice) at the end. `close()` always runs (the response wrappers call it): cancels
    an unfinished generation, frees the gate."""

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

    def _submit(self) -> Generation:
        """Runs in a worker thread: rendering the template, tokenizing, building the sampler and compiling a
        grammar (or a child process's round trip) take milliseconds to seconds and must not hold the event loop."""
        req = self.request
        if req.messages is not None:
            return self.engine.chat(req.messages, req.params, tools=req.tools, template_kwargs=req.template_kwargs)
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
            self._it = _merge(self.generation.choices)
            try:
                self._first = await _race_disconnect(self._it.__anext__(), self.http)
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
        # the iteration ends only once every choice finished, so their completions are there: nothing to wait for
        self.completions = tuple(c for c in (g.completion for g in self.choices) if c is not None)
        if self.completions:
            self.metrics.tokens(self.completions[0].usage.prompt_tokens,
                                sum(c.usage.completion_tokens for c in self.completions))
            failed = next((c for c in self.completions if c.finish_reason == "error"), None)
            if failed is not None:
                raise from_llmrun(_engine_error(failed))

    async def deltas(self) -> AsyncIterator[tuple[int, Delta]]:
        """(choice index, delta), the first one included. Raises ApiError if the engine fails mid-way."""
        try:
            if self._first:
                yield self._first
            if self._finished:
                return
            if self._it is None:
                raise RuntimeError("Run.deltas() before Run.start()")
            try:
                async for item in self._it:
                    now = time.perf_counter()
                    self.metrics.token_gap(now - self._last)
                    self._last = now
                    yield item
                await self._finish()
            except LlmrunError as e:
                raise from_llmrun(e) from e
        finally:
            if not self._finished:
                await self.close()

    async def collect(self) -> tuple[Completion, ...]:
        """Wait for every choice; their completions."""
        async def drain() -> None:
            async for _ in self.deltas():
                pass
        try:
            await _race_disconnect(drain(), self.http)
            return self.completions
        finally:
            await self.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.generation is not None and not self._finished:
            for choice in self.generation.choices:
                choice.cancel()
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


def _cancel_submitted(task: asyncio.Future[Generation]) -> None:
    if not task.cancelled() and task.exception() is None:
        task.result().cancel()


def _engine_error(c: Completion) -> LlmrunError:
    from runner.core.errors import EngineError

    return EngineError(f"generation failed: {c.error or 'unknown engine error'}")
