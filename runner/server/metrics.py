"""Prometheus text exposition, hand-written (no extra dependency): request counts by endpoint and status, tokens
in and out, queue depth, busy slots, histograms of time to first token and per-token latency, and per model:
loads, unloads, evictions, load seconds, bytes held per device (and the budget)."""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from collections.abc import Sequence

from runner.app.pool import ModelPool

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)   # last = +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, cumulative = [], 0
        for bound, n in zip(self.buckets, self.counts):
            cumulative += n
            out.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{name}_sum {self.sum:.6f}")
        out.append(f"{name}_count {self.count}")
        return out


class Metrics:
    """Thread-safe counters; `render(stats)` adds the engine's live gauges."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.tokens_in = 0
        self.tokens_out = 0
        self.rejected_busy = 0
        self.cancelled = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.per_token = Histogram(TOKEN_BUCKETS)

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def tokens(self, prompt: int, completion: int) -> None:
        with self._lock:
            self.tokens_in += prompt
            self.tokens_out += completion

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def token_gap(self, seconds: float) -> None:
        with self._lock:
            self.per_token.observe(seconds)

    def busy(self) -> None:
        with self._lock:
            self.rejected_busy += 1

    def cancel(self) -> None:
        with self._lock:
            self.cancelled += 1

    def render(self, *, in_flight: int, queued: int, busy_slots: int, slots: int, ready: bool,
               models: Sequence[str] = ()) -> str:
        with self._lock:
            lines = [
                "# HELP llmrun_requests_total HTTP requests by endpoint and status.",
                "# TYPE llmrun_requests_total counter",
            ]
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(f'llmrun_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
            lines += [
                "# HELP llmrun_prompt_tokens_total Prompt tokens processed.",
                "# TYPE llmrun_prompt_tokens_total counter",
                f"llmrun_prompt_tokens_total {self.tokens_in}",
                "# HELP llmrun_completion_tokens_total Tokens generated.",
                "# TYPE llmrun_completion_tokens_total counter",
                f"llmrun_completion_tokens_total {self.tokens_out}",
                "# HELP llmrun_rejected_busy_total Requests answered 429 because the queue was full.",
                "# TYPE llmrun_rejected_busy_total counter",
                f"llmrun_rejected_busy_total {self.rejected_busy}",
                "# HELP llmrun_cancelled_total Generations cancelled because the client went away.",
                "# TYPE llmrun_cancelled_total counter",
                f"llmrun_cancelled_total {self.cancelled}",
                "# HELP llmrun_requests_in_flight Generation requests admitted and not finished.",
                "# TYPE llmrun_requests_in_flight gauge",
                f"llmrun_requests_in_flight {in_flight}",
                "# HELP llmrun_queue_depth Requests waiting for a free slot.",
                "# TYPE llmrun_queue_depth gauge",
                f"llmrun_queue_depth {queued}",
                "# HELP llmrun_busy_slots Engine slots decoding now.",
                "# TYPE llmrun_busy_slots gauge",
                f"llmrun_busy_slots {busy_slots}",
                "# HELP llmrun_slots Engine slots (--parallel).",
                "# TYPE llmrun_slots gauge",
                f"llmrun_slots {slots}",
                "# HELP llmrun_ready 1 once the model is loaded.",
                "# TYPE llmrun_ready gauge",
                f"llmrun_ready {int(ready)}",
                "# HELP llmrun_time_to_first_token_seconds From request admitted to first generated text.",
                "# TYPE llmrun_time_to_first_token_seconds histogram",
                *self.ttft.lines("llmrun_time_to_first_token_seconds"),
                "# HELP llmrun_token_latency_seconds Time between streamed tokens.",
                "# TYPE llmrun_token_latency_seconds histogram",
                *self.per_token.lines("llmrun_token_latency_seconds"),
                *models,
            ]
        return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def model_metrics(pool: ModelPool) -> list[str]:
    """The pool's per-model counters and gauges, and the memory budget."""
    lines = [
        "# HELP llmrun_model_loads_total Loads of each model.",
        "# TYPE llmrun_model_loads_total counter",
        "# HELP llmrun_model_load_failures_total Loads of each model that failed (or were refused).",
        "# TYPE llmrun_model_load_failures_total counter",
        "# HELP llmrun_model_unloads_total Unloads of each model (keep_alive expired, evicted, asked, shutdown).",
        "# TYPE llmrun_model_unloads_total counter",
        "# HELP llmrun_model_evictions_total Unloads of each model to make room for another.",
        "# TYPE llmrun_model_evictions_total counter",
        "# HELP llmrun_model_load_seconds_total Seconds spent loading each model.",
        "# TYPE llmrun_model_load_seconds_total counter",
    ]
    for name, c in sorted(pool.counters.items()):
        m = _label(name)
        lines += [f'llmrun_model_loads_total{{model="{m}"}} {c.loads}',
                  f'llmrun_model_load_failures_total{{model="{m}"}} {c.load_failures}',
                  f'llmrun_model_unloads_total{{model="{m}"}} {c.unloads}',
                  f'llmrun_model_evictions_total{{model="{m}"}} {c.evictions}',
                  f'llmrun_model_load_seconds_total{{model="{m}"}} {c.load_seconds:.6f}']
    lines += ["# HELP llmrun_model_resident_bytes Bytes each model holds per device (measured; estimated while "
              "loading).",
              "# TYPE llmrun_model_resident_bytes gauge"]
    status = pool.status()
    for s in sorted(status, key=lambda s: s.name):
        for dev, n in sorted(s.resident.items()):
            lines.append(f'llmrun_model_resident_bytes{{model="{_label(s.name)}",device="{dev}",'
                         f'state="{s.state.value}"}} {n}')
    lines += ["# HELP llmrun_models_loaded Models in memory.", "# TYPE llmrun_models_loaded gauge",
              f"llmrun_models_loaded {sum(1 for s in status if s.state.value == 'loaded')}"]
    if pool.budget.bounded:
        used = pool.used()
        lines += ["# HELP llmrun_memory_budget_bytes Bytes the server may hold per device.",
                  "# TYPE llmrun_memory_budget_bytes gauge",
                  *(f'llmrun_memory_budget_bytes{{device="{d}"}} {n}' for d, n in sorted(pool.budget.limits.items())),
                  "# HELP llmrun_memory_used_bytes Bytes held per device: the process, loaded models (measured), "
                  "loads under way (estimated).",
                  "# TYPE llmrun_memory_used_bytes gauge",
                  *(f'llmrun_memory_used_bytes{{device="{d}"}} {n}' for d, n in sorted(used.items()))]
    return lines
