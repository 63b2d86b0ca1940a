"""A FAKE engine for HTTP-behaviour tests of the server (429, disconnects, bad input, fuzzing). It implements
the Engine protocol of runner/engine/types.py deterministically, without a model: every reply is the same
scripted text, one word per "token", with a configurable delay per token. It does NOT enforce grammars (with a
grammar it just emits a fixed JSON object) and its token counts are word counts. Tests of real generation use
the real engine with the demo model instead."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import AsyncIterator, Iterator

from runner.engine.types import ChatMessage, Completion, EngineStats, SamplingParams, Usage
from runner.errors import ContextOverflowError

REPLY = "Hello from the fake engine , one word per token , until the limit or the end ."
JSON_REPLY = ['{"fake"', ': ', 'true}']
FAIL_PROMPT = "FAKE-ENGINE-FAIL"      # a prompt containing this ends the generation with finish_reason "error"


class FakeGeneration:
    def __init__(self, engine: "FakeEngine", pieces: list[str], prompt_tokens: int, params: SamplingParams,
                 fail: bool):
        self.engine, self.pieces, self.prompt_tokens, self.params, self.fail = engine, pieces, prompt_tokens, params, fail
        self._items: list[str] = []
        self._ended = False
        self._cv = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._completion: Completion | None = None
        self.slot_released = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    # producer
    def _push(self, item: str | None) -> None:
        with self._cv:
            if item is None:
                self._ended = True
            else:
                self._items.append(item)
            self._cv.notify_all()
            waiters = list(self._waiters)
        for loop, ev in waiters:
            try:
                loop.call_soon_threadsafe(ev.set)
            except RuntimeError:      # that loop is closed
                pass

    def _run(self) -> None:
        e = self.engine
        with e._lock:
            e._queued += 1
        e._slots.acquire()
        with e._lock:
            e._queued -= 1
            e._busy += 1
            e.max_busy = max(e.max_busy, e._busy)
        t0 = time.perf_counter()
        ttft = 0.0
        text, n, reason, error = "", 0, "stop", None
        try:
            limit = self.params.max_tokens
            for piece in self.pieces:
                if self._cancel.is_set():
                    reason = "cancelled"
                    break
                if limit is not None and n >= limit:
                    reason = "length"
                    break
                if self.fail and n == 2:
                    reason, error = "error", "the fake engine was told to fail"
                    break
                time.sleep(e.token_delay)
                n += 1
                candidate = text + piece
                hit = next((s for s in self.params.stop if s in candidate), None)
                if hit is not None:
                    cut = candidate[:candidate.index(hit)]
                    if len(cut) > len(text):
                        self._push(cut[len(text):])
                    text = cut
                    break
                if n == 1:
                    ttft = time.perf_counter() - t0
                text = candidate
                self._push(piece)
            if limit is not None and n >= limit and reason == "stop" and n < len(self.pieces):
                reason = "length"
        finally:
            with e._lock:
                e._busy -= 1
                e.tokens_in += self.prompt_tokens
                e.tokens_out += n
            e._slots.release()
            self.slot_released.set()
            elapsed = time.perf_counter() - t0
            self._completion = Completion(text=text, finish_reason=reason,
                                          usage=Usage(self.prompt_tokens, n), time_to_first_token_s=ttft,
                                          decode_tokens_per_s=n / elapsed if elapsed > 0 else 0.0, error=error)
            self._done.set()
            self._push(None)

    # consumers
    def __iter__(self) -> Iterator[str]:
        i = 0
        while True:
            with self._cv:
                while i >= len(self._items) and not self._ended:
                    self._cv.wait()
                if i < len(self._items):
                    item = self._items[i]
                    i += 1
                else:
                    return
            yield item

    async def __aiter__(self) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        ev = asyncio.Event()
        entry = (loop, ev)
        with self._cv:
            self._waiters.append(entry)
        i = 0
        try:
            while True:
                with self._cv:
                    item = None
                    if i < len(self._items):
                        item = self._items[i]
                        i += 1
                    elif self._ended:
                        return
                    else:
                        ev.clear()
                if item is not None:
                    yield item
                else:
                    await ev.wait()
        finally:
            with self._cv:
                self._waiters.remove(entry)

    def cancel(self) -> None:
        self._cancel.set()

    def result(self, timeout: float | None = None) -> Completion:
        if not self._done.wait(timeout):
            raise TimeoutError("generation still running")
        return self._completion


class FakeEngine:
    """n_parallel slots (a semaphore), token_delay seconds per token; everything observable for tests."""

    def __init__(self, *, model_name: str = "fake-model", n_ctx: int = 256, n_parallel: int = 2,
                 token_delay: float = 0.002):
        self.model_name, self.n_ctx, self.n_parallel, self.token_delay = model_name, n_ctx, n_parallel, token_delay
        self._slots = threading.Semaphore(n_parallel)
        self._lock = threading.Lock()
        self._busy = 0
        self._queued = 0
        self.max_busy = 0                 # most slots ever busy at once
        self.tokens_in = 0
        self.tokens_out = 0
        self.generations: list[FakeGeneration] = []
        self.submitted: list[tuple[str, object, SamplingParams]] = []
        self.closed = False

    def tokenize(self, text: str) -> list[int]:
        return [len(w) for w in text.split()]

    def _submit(self, prompt_text: str, params: SamplingParams) -> FakeGeneration:
        n = len(self.tokenize(prompt_text)) + 1
        if n >= self.n_ctx:
            raise ContextOverflowError(f"the prompt is {n} tokens; the context holds {self.n_ctx}",
                                       hint="shorten the prompt or start with a larger --ctx")
        pieces = list(JSON_REPLY) if params.grammar else [(" " if i else "") + w for i, w in enumerate(REPLY.split())]
        gen = FakeGeneration(self, pieces, n, params, fail=FAIL_PROMPT in prompt_text)
        self.generations.append(gen)
        return gen

    def chat(self, messages: list[ChatMessage], params: SamplingParams) -> FakeGeneration:
        self.submitted.append(("chat", list(messages), params))
        return self._submit(" ".join(f"{m.role}: {m.content}" for m in messages), params)

    def complete(self, prompt: str, params: SamplingParams) -> FakeGeneration:
        self.submitted.append(("complete", prompt, params))
        return self._submit(prompt, params)

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(model=self.model_name, n_ctx=self.n_ctx, n_parallel=self.n_parallel,
                               busy_slots=self._busy, queued=self._queued, tokens_in=self.tokens_in,
                               tokens_out=self.tokens_out, load_seconds=0.0)

    def close(self) -> None:
        self.closed = True
