"""The engine thread's own time per decode step, apart from llama.cpp's: how much Python (building the batch,
sampling calls, detokenizing, stop strings, handing deltas to the callers, the loop between steps) each step and
each sampled sequence costs, in microseconds. Unlike tokens per second it hardly depends on what else the machine
runs, so optimisations of the engine's Python are measured with it (scripts/bench_engine.py --overhead)."""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class StepTimes:
    """Totals over the decode steps (steps that evaluate no prompt token: the next token of every decoding
    sequence) since the engine started, or since `StepClock.reset()`."""

    steps: int = 0               # decode steps (llama_decode calls of the generation context)
    outputs: int = 0             # sequences sampled in them
    tokens: int = 0              # tokens evaluated in them
    loop_ns: int = 0             # engine-thread wall time from the start of the loop turn to the end of the step
    decode_ns: int = 0           # of which inside llama_decode
    python_cpu_ns: int = 0       # the engine thread's CPU time in the turn outside llama_decode: what the Python
                                 # costs, not counting time the thread waited for the GIL or a core (robust to load)

    @property
    def python_ns(self) -> int:
        return self.loop_ns - self.decode_ns

    @property
    def python_cpu_us_per_step(self) -> float:
        return self.python_cpu_ns / 1e3 / self.steps if self.steps else 0.0

    @property
    def python_cpu_us_per_output(self) -> float:
        return self.python_cpu_ns / 1e3 / self.outputs if self.outputs else 0.0

    @property
    def python_us_per_step(self) -> float:
        return self.python_ns / 1e3 / self.steps if self.steps else 0.0

    @property
    def python_us_per_output(self) -> float:
        return self.python_ns / 1e3 / self.outputs if self.outputs else 0.0

    @property
    def decode_ms_per_step(self) -> float:
        return self.decode_ns / 1e6 / self.steps if self.steps else 0.0


class StepClock:
    """Accumulates StepTimes on the engine thread (one call per step); read from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._t = StepTimes()

    def add(self, *, outputs: int, tokens: int, loop_ns: int, decode_ns: int, python_cpu_ns: int) -> None:
        with self._lock:
            t = self._t
            self._t = StepTimes(t.steps + 1, t.outputs + outputs, t.tokens + tokens, t.loop_ns + loop_ns,
                                t.decode_ns + decode_ns, t.python_cpu_ns + python_cpu_ns)

    def read(self) -> StepTimes:
        with self._lock:
            return self._t

    def reset(self) -> None:
        with self._lock:
            self._t = StepTimes()
