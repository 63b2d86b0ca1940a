"""One OS thread per process runs every llama.cpp computation (`llama_decode`) of every engine.

Why: llama-cpp-python's CPU backend is built with OpenMP, and libgomp gives each thread that starts a parallel
region a team of its own, kept for the thread's lifetime. Once a process holds more OpenMP threads than it has
cores (two engines with 2 threads each on 2 cores), libgomp throttles the spin-wait at every barrier from ~300,000
spins to 100, and llama.cpp meets a barrier after every op: each step then sleeps and wakes through futexes.
Measured on the demo model, 2 threads, 2 cores: one engine decoded 159 tok/s alone and 88 tok/s once a second,
idle engine in the same process had decoded once (docs/benchmarks.md, "Optimisation log"). So every engine hands
its `llama_decode` calls to this one thread: one team per process however many models are loaded, and decodes of
different models are serialised, which on a CPU they would be anyway (they share the cores).

The hand-off costs an event wake-up per call (tens of microseconds) against a decode step of milliseconds.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import llama_cpp as lc

T = TypeVar("T")


class _Call:
    __slots__ = ("fn", "args", "done", "value", "error")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]):
        self.fn, self.args = fn, args
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None


class ComputeThread:
    """Runs `call(fn, *args)` on its own daemon thread, one call at a time, in submission order."""

    def __init__(self, name: str = "llmrun-compute"):
        self._name = name
        self._inbox: queue.SimpleQueue[_Call] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self._name

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        if threading.current_thread() is self._thread:      # already on it (a call made from a call)
            return fn(*args)
        self._ensure_started()
        c = _Call(fn, args)
        self._inbox.put(c)
        c.done.wait()
        if c.error is not None:
            raise c.error
        return c.value

    def _ensure_started(self) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    t = threading.Thread(target=self._run, name=self._name, daemon=True)
                    t.start()
                    self._thread = t

    def _run(self) -> None:
        while True:
            c = self._inbox.get()
            try:
                c.value = c.fn(*c.args)
            except BaseException as e:  # noqa: BLE001 - handed back to the caller, raised there
                c.error = e
            c.done.set()


COMPUTE = ComputeThread()       # the process's one


def decode(ctx: Any, batch: Any) -> int:
    """`llama_decode(ctx, batch)` on the compute thread; its return code."""
    return int(COMPUTE.call(lc.llama_decode, ctx, batch))
