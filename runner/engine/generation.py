"""A submitted request as its caller sees it (`Generation`: sync and async iteration over text deltas, result,
cancel), and the per-request text pipeline the engine thread runs: UTF-8-safe incremental detokenizing and
stop strings that never leak a partial match."""

from __future__ import annotations

import asyncio
import codecs
import threading
import time
from typing import AsyncIterator, Callable, Iterable, Iterator, Sequence

from runner.engine.tool_stream import ToolStream
from runner.engine.types import Completion, Delta, FinishReason, TokenLogprob, ToolCall, ToolCallDelta, Usage


class StopText:
    """Turns a stream of byte pieces into text deltas, holding back what could be the start of a stop string.
    `feed()` returns (delta, stopped)."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""
        self.text = ""          # everything emitted so far
        self.matched: str | None = None   # the stop string that ended the text, once one did

    def _emit(self, s: str) -> str:
        self.text += s
        return s

    @property
    def decoded(self) -> int:
        """Characters decoded so far: emitted, plus held back."""
        return len(self.text) + len(self._held)

    def feed(self, piece: bytes) -> tuple[str, bool]:
        held = self._held + self._decoder.decode(piece)
        if not self.stops:
            self._held = ""
            return self._emit(held), False
        first = None
        for stop in self.stops:
            i = held.find(stop)
            if i >= 0 and (first is None or i < first):
                first, self.matched = i, stop
        if first is not None:
            self._held = ""
            return self._emit(held[:first]), True
        keep = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(held)), 0, -1):
                if held.endswith(stop[:k]):
                    keep = max(keep, k)
                    break
        self._held = held[len(held) - keep:] if keep else ""
        return self._emit(held[:len(held) - keep]), False

    def flush(self) -> str:
        """At the end (no stop string matched): what was held back, and any incomplete UTF-8 as U+FFFD."""
        rest = self._held + self._decoder.decode(b"", final=True)
        self._held = ""
        return self._emit(rest)


class Output:
    """One request's output pipeline on the engine thread: token bytes → text with stop strings held back →
    answer text and tool calls (when the request offers tools). With logprobs, each token's entry is released
    with the first character of its text, so a delta's logprobs are those of the tokens behind its text, and
    the tokens of a matched stop string are left out as their text is."""

    def __init__(self, stops: tuple[str, ...], tools: ToolStream | None = None, logprobs: bool = False):
        self.stop = StopText(stops)
        self.tools = tools
        self.logprobs: list[TokenLogprob] | None = [] if logprobs else None
        self._pending: list[tuple[int, TokenLogprob]] = []    # (offset of the token's text, entry)

    def feed(self, piece: bytes, logprob: TokenLogprob | None = None) -> tuple[Delta, bool]:
        """(what to push, whether a stop string matched)."""
        if logprob is not None:
            self._pending.append((self.stop.decoded, logprob))
        text, stopped = self.stop.feed(piece)
        return self._delta(text), stopped

    def end(self, stopped: bool) -> Delta:
        """The rest at the end: what stop strings held back (unless one matched), and the tool calls' tail."""
        text = "" if stopped else self.stop.flush()
        calls: list[ToolCallDelta] = []
        if self.tools is not None:
            more, calls = self.tools.feed(text) if text else ("", [])
            tail, last = self.tools.close()
            text, calls = more + tail, calls + last
        return Delta(text, self._release(final=not stopped), tuple(calls))

    def _delta(self, text: str) -> Delta:
        calls: list[ToolCallDelta] = []
        lps = self._release(final=False) if self._pending else ()
        if self.tools is not None and text:
            text, calls = self.tools.feed(text)
        return Delta(text, lps, tuple(calls))

    def _release(self, *, final: bool) -> tuple[TokenLogprob, ...]:
        if self.logprobs is None:
            return ()
        emitted = len(self.stop.text)
        out = [lp for start, lp in self._pending if final or start < emitted]
        self._pending = [] if final else [(start, lp) for start, lp in self._pending if start >= emitted]
        self.logprobs.extend(out)
        return tuple(out)

    @property
    def text(self) -> str:
        return self.tools.text if self.tools is not None else self.stop.text

    @property
    def tool_calls(self) -> tuple[ToolCall, ...]:
        return self.tools.tool_calls if self.tools is not None else ()


class GenerationHandle:
    """Implements runner.engine.types.Generation. The engine thread pushes deltas and finishes it; callers
    iterate from any thread or event loop."""

    def __init__(self, on_cancel: Callable[["GenerationHandle"], None], *, notice: str | None = None,
                 dropped_messages: int = 0):
        self._cond = threading.Condition()      # wakes sync iterators on each delta
        self._finished = threading.Event()      # wakes result() once, at the end (not on every delta)
        self._chunks: list[Delta] = []
        self._completion: Completion | None = None
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._on_cancel = on_cancel
        self.cancelled = False
        self.notice = notice                    # e.g. "context full: dropped the 2 oldest messages"
        self.dropped_messages = dropped_messages
        self.submitted_at = time.perf_counter()
        self._choices: tuple[GenerationHandle, ...] = (self,)

    @property
    def choices(self) -> "tuple[GenerationHandle, ...]":
        """Every choice of the request (SamplingParams.n), this one first."""
        return self._choices

    def set_choices(self, choices: "Sequence[GenerationHandle]") -> None:
        self._choices = tuple(choices)

    # ---- engine side
    def _wake(self) -> None:
        for loop, event in self._waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # loop closed
                pass

    def push(self, delta: str | Delta, *, wake: bool = True) -> bool:
        """Add a delta (an empty one is dropped: returns False). With wake=False the async iterators are not woken
        here: the caller wakes them with `wake_all`, once per event loop for every handle it pushed to in one
        decode step, instead of one call into the loop per token."""
        if isinstance(delta, str):
            if not delta:
                return False
            delta = Delta(delta)
        elif not (delta.text or delta.logprobs or delta.tool_calls):
            return False
        with self._cond:
            self._chunks.append(delta)
            self._cond.notify_all()
            if wake:
                self._wake()
        return True

    def finish(self, completion: Completion) -> None:
        with self._cond:
            if self._completion is None:
                self._completion = completion
            self._cond.notify_all()
            self._wake()
        self._finished.set()

    @property
    def done(self) -> bool:
        return self._completion is not None

    @property
    def completion(self) -> Completion | None:
        """The end of the generation once it finished, else None (never blocks)."""
        return self._completion

    def text_so_far(self) -> str:
        """Every delta's text pushed so far, joined."""
        with self._cond:
            return "".join(d.text for d in self._chunks)

    # ---- caller side
    def deltas(self) -> Iterator[Delta]:
        i = 0
        while True:
            with self._cond:
                while i >= len(self._chunks) and self._completion is None:
                    self._cond.wait()
                chunks = self._chunks[i:]
                finished = self._completion is not None
            i += len(chunks)
            yield from chunks
            if finished and i >= len(self._chunks):
                return

    def __iter__(self) -> Iterator[str]:
        return (d.text for d in self.deltas() if d.text)

    async def adeltas(self) -> AsyncIterator[Delta]:
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        with self._cond:
            self._waiters.append((loop, event))
        try:
            i = 0
            while True:
                event.clear()
                with self._cond:
                    chunks = self._chunks[i:]
                    finished = self._completion is not None
                i += len(chunks)
                for c in chunks:
                    yield c
                if finished and not chunks:
                    with self._cond:
                        if i >= len(self._chunks):
                            return
                    continue
                if not chunks:
                    await event.wait()
        finally:
            with self._cond:
                self._waiters = [w for w in self._waiters if w[1] is not event]

    async def __aiter__(self) -> AsyncIterator[str]:
        async for d in self.adeltas():
            if d.text:
                yield d.text

    def cancel(self) -> None:
        if self._completion is None and not self.cancelled:
            self.cancelled = True
            self._on_cancel(self)

    def result(self, timeout: float | None = None) -> Completion:
        if not self._finished.wait(timeout):
            raise TimeoutError(f"the generation did not finish within {timeout} s")
        assert self._completion is not None   # set before _finished
        return self._completion


def _set_all(events: list[asyncio.Event]) -> None:
    for event in events:
        event.set()


def wake_all(handles: Iterable[GenerationHandle]) -> None:
    """Wake the async iterators of `handles` (pushed to with wake=False): one call_soon_threadsafe per event loop
    (one self-pipe write, one wake-up of the loop) whatever the number of handles."""
    per_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Event]] = {}
    for h in handles:
        with h._cond:
            for loop, event in h._waiters:
                per_loop.setdefault(loop, []).append(event)
    for loop, events in per_loop.items():
        try:
            loop.call_soon_threadsafe(_set_all, events)
        except RuntimeError:  # loop closed
            pass


def completion(text: str, reason: FinishReason, *, prompt_tokens: int, completion_tokens: int, cached_tokens: int,
               ttft: float, decode_tps: float, error: str | None = None, notice: str | None = None,
               dropped_messages: int = 0, tool_calls: tuple[ToolCall, ...] = (),
               logprobs: tuple[TokenLogprob, ...] | None = None, stop_sequence: str | None = None) -> Completion:
    return Completion(text=text, finish_reason=reason,
                      usage=Usage(prompt_tokens, completion_tokens, cached_tokens),
                      time_to_first_token_s=ttft, decode_tokens_per_s=decode_tps, error=error,
                      notice=notice, dropped_messages=dropped_messages, tool_calls=tool_calls, logprobs=logprobs,
                      stop_sequence=stop_sequence)
