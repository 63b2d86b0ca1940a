"""The measurement logic of scripts/bench_serve.py, apart from the servers so that tests/test_bench_stats.py can
check it in a second: reading the OpenAI-style event streams of llmrun, llama-server and llama_cpp.server,
per-request timings, percentiles, per-level aggregates over rounds, ratios to the anchor (llama-server),
llama-bench's JSON output and the markdown table.

Definitions (what the table's columns mean):
- tokens of a request: `usage.completion_tokens` of its stream when the server reports it (llmrun and llama-server
  with `stream_options.include_usage`), else the number of chunks that carried text (llama_cpp.server sends one
  token per chunk);
- TTFT: from sending the request to the first chunk that carries text;
- inter-token latency (ITL): the gaps between consecutive text-carrying chunks of one request, pooled over all
  requests of a level;
- aggregate tok/s of a level in a round: all tokens of its successful requests / the level's wall time; over R
  rounds the median of the rounds' values (each round's value is kept too);
- TTFT and ITL percentiles over rounds: pooled over every request of every round.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

ANCHOR = "llama-server"


def percentile(values: Iterable[float], q: float) -> float:
    """The q-quantile (0 <= q <= 1) with linear interpolation between closest ranks (numpy's default); nan when
    there are no values."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be between 0 and 1, not {q}")
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def parse_sse_data(line: str) -> dict[str, Any] | None:
    """The JSON object of one `data: {...}` line of an event stream; None for anything else: blank lines,
    comments and keep-alives (`: ping`), `event:`/`id:` lines, `data: [DONE]`, and data that is not a JSON
    object."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if not data or data == "[DONE]":
        return None
    try:
        obj = json.loads(data)
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def chunk_text(obj: dict[str, Any]) -> str:
    """The generated text a chunk carries: `choices[0].delta.content` (chat) or `choices[0].text` (completions);
    '' for role-only, usage-only and final chunks."""
    choices = obj.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return ""
    choice = choices[0]
    delta = choice.get("delta")
    if isinstance(delta, dict):
        content = delta.get("content")
        return content if isinstance(content, str) else ""
    text = choice.get("text")
    return text if isinstance(text, str) else ""


@dataclass(frozen=True)
class RequestResult:
    """One request as its client saw it."""

    status: int
    ttft: float | None                    # seconds to the first text chunk; None when no text came
    tokens: int
    itl: tuple[float, ...]                # seconds between consecutive text chunks
    seconds: float                        # whole request
    server_decode_ms: float | None = None  # llama-server's own `timings.predicted_per_token_ms`, when sent
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None


@dataclass
class StreamTrace:
    """Collects one streamed response: `feed` every line with the time it arrived, then `result`."""

    t0: float
    text_times: list[float] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    usage_tokens: int | None = None
    timings: dict[str, Any] | None = None
    error: str | None = None              # an error event inside the stream (the status was already 200)

    def feed(self, line: str, t: float) -> None:
        obj = parse_sse_data(line)
        if obj is None:
            return
        piece = chunk_text(obj)
        if piece:
            self.text_times.append(t)
            self.text.append(piece)
        usage = obj.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            self.usage_tokens = usage["completion_tokens"]
        timings = obj.get("timings")
        if isinstance(timings, dict):
            self.timings = timings
        err = obj.get("error")
        if err:
            self.error = str(err.get("message", err) if isinstance(err, dict) else err)[:200]

    def result(self, status: int, t_end: float, error: str | None = None) -> RequestResult:
        times = self.text_times
        tokens = self.usage_tokens if self.usage_tokens is not None else len(times)
        decode_ms = (self.timings or {}).get("predicted_per_token_ms")
        return RequestResult(status=status, ttft=times[0] - self.t0 if times else None, tokens=tokens,
                             itl=tuple(b - a for a, b in pairwise(times)), seconds=t_end - self.t0,
                             server_decode_ms=float(decode_ms) if isinstance(decode_ms, (int, float)) else None,
                             error=error or self.error)


def summarize(results: Sequence[RequestResult], wall: float) -> dict[str, Any]:
    """One level of one server in one round: requests, errors, tokens, aggregate tok/s, TTFT and ITL p50/p95."""
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    itls = [x for r in ok for x in r.itl]
    tokens = sum(r.tokens for r in ok)
    failed = sorted({f"{r.status}: {r.error}" if r.error else str(r.status) for r in results if not r.ok})
    return {"requests": len(results), "errors": len(results) - len(ok), "error_samples": failed[:3], "tokens": tokens,
            "tok_s": tokens / wall if wall > 0 else math.nan, "wall_s": wall,
            "ttft_p50": percentile(ttfts, 0.5), "ttft_p95": percentile(ttfts, 0.95),
            "itl_p50": percentile(itls, 0.5), "itl_p95": percentile(itls, 0.95)}


def combine_rounds(rounds: Sequence[tuple[Sequence[RequestResult], float]]) -> dict[str, Any]:
    """One level of one server over R rounds (each: its requests and its wall time): the median of the rounds'
    aggregate tok/s (and each round's), TTFT/ITL percentiles pooled over all requests, errors summed, and the
    median of the server's own per-token decode time where it reports one."""
    if not rounds:
        raise ValueError("no rounds to combine")
    per_round = [summarize(results, wall) for results, wall in rounds]
    pooled = [r for results, _ in rounds for r in results]
    out = summarize(pooled, sum(wall for _, wall in rounds))
    rates = [s["tok_s"] for s in per_round]
    out["tok_s"] = statistics.median(rates)
    out["tok_s_rounds"] = rates
    decode = [r.server_decode_ms for r in pooled if r.ok and r.server_decode_ms is not None]
    out["server_decode_ms_p50"] = statistics.median(decode) if decode else None
    return out


def with_ratios(levels: dict[str, dict[int, dict[str, Any]]], anchor: str = ANCHOR) -> dict[str, dict[int, dict[str, Any]]]:
    """levels[server][clients] summaries, each given `ratio` (its tok/s over the anchor's at the same level) and
    `ttft_p95_ratio` (its TTFT p95 over the anchor's); None where the anchor did not run that level or measured
    nothing."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for server, by_level in levels.items():
        out[server] = {}
        for clients, s in by_level.items():
            a = levels.get(anchor, {}).get(clients)
            out[server][clients] = {**s, "ratio": _ratio(s["tok_s"], a["tok_s"] if a else None),
                                    "ttft_p95_ratio": _ratio(s["ttft_p95"], a["ttft_p95"] if a else None)}
    return out


def _ratio(x: float, anchor: float | None) -> float | None:
    if anchor is None or not anchor or math.isnan(anchor) or math.isnan(x):
        return None
    return x / anchor


def parse_llama_bench(text: str) -> dict[str, Any]:
    """llama-bench's `-o json` output (a list of tests) -> {"pp": {...}, "tg": {...}, "build_commit", "n_threads"}:
    for the prompt test (n_gen 0) and the generation test (n_prompt 0) their token count `n`, mean tok/s `tps`
    and its standard deviation `stddev`."""
    try:
        tests = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"llama-bench output is not JSON: {e}") from e
    if not isinstance(tests, list) or not all(isinstance(t, dict) for t in tests):
        raise ValueError("llama-bench output is not a list of test objects")
    out: dict[str, Any] = {}
    for t in tests:
        if t.get("n_gen") == 0 and t.get("n_prompt", 0) > 0:
            kind, n = "pp", t["n_prompt"]
        elif t.get("n_prompt") == 0 and t.get("n_gen", 0) > 0:
            kind, n = "tg", t["n_gen"]
        else:
            continue
        out[kind] = {"n": n, "tps": float(t["avg_ts"]), "stddev": float(t.get("stddev_ts", 0.0))}
        out["build_commit"] = t.get("build_commit")
        out["n_threads"] = t.get("n_threads")
    if "tg" not in out and "pp" not in out:
        raise ValueError("llama-bench output has no prompt (pp) or generation (tg) test")
    return out


def _f(x: float | None, fmt: str) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def markdown_table(levels: dict[str, dict[int, dict[str, Any]]], servers: Sequence[str]) -> list[str]:
    """The side-by-side table: one row per level and server (levels from `with_ratios`)."""
    lines = [("| clients | server | tok/s (median; rounds) | × llama-server | TTFT p50 / p95 (s) | "
              "ITL p50 / p95 (ms) | errors |"),
             "|---:|---|---:|---:|---:|---:|---:|"]
    all_levels = sorted({c for by_level in levels.values() for c in by_level})
    for c in all_levels:
        for server in servers:
            s = levels.get(server, {}).get(c)
            if s is None:
                continue
            rounds = "; ".join(_f(x, ".1f") for x in s.get("tok_s_rounds", []))
            ratio = s.get("ratio")
            lines.append(f"| {c} | {server} | {_f(s['tok_s'], '.1f')} ({rounds}) | "
                         f"{_f(ratio, '.2f') + '×' if ratio is not None else '—'} | "
                         f"{_f(s['ttft_p50'], '.3f')} / {_f(s['ttft_p95'], '.3f')} | "
                         f"{_f(s['itl_p50'] * 1000, '.1f')} / {_f(s['itl_p95'] * 1000, '.1f')} | "
                         f"{s['errors']}/{s['requests']} |")
    return lines


def ceiling_line(runs: Sequence[dict[str, Any]], threads: int) -> str:
    """One sentence on llama-bench's pp/tg (the ceiling with no server), each run's values."""
    def part(kind: str) -> str:
        vals = [r[kind] for r in runs if kind in r]
        if not vals:
            return ""
        return f"{kind}{vals[0]['n']} " + " / ".join(f"{v['tps']:.1f}" for v in vals) + " tok/s"
    parts = [p for p in (part("tg"), part("pp")) if p]
    return (f"llama-bench (same llama.cpp build, {threads} threads, no server; "
            f"{len(runs)} run{'s' if len(runs) != 1 else ''}): " + ", ".join(parts) + ".")
