#!/usr/bin/env python
"""What tool calling and logprobs cost the engine, on one model (default: the demo model), one slot.

1. Constrained generation: a forced tool call (`tool_choice` required: the call grammar built from the tool's
   schema) against `response_format` json_schema with the schema of the same call object (what a client had to
   do before tools were supported), from the same prompt (the demo model's template has no tools, so the tool
   prompt is the generic format's: the json_schema request gets that very system prompt); and `auto` (a lazy
   grammar that waits for a call to start) against no tools, answered in text.
2. logprobs: the engine's time per decode step outside llama_decode (batch building, sampling, detokenizing,
   stop strings, streaming) without logprobs, with logprobs, and with top_logprobs=5.

Runs are interleaved (A, B, A, B, ...) so a machine shared with other work affects each alike; medians over
the repeats. Per-step times come from the engine thread itself: the time of each decode step minus the time
inside llama_decode, for steps that decode one token (the prompt's steps are left out).

    PYTHONPATH=. python scripts/bench_tools.py [MODEL.gguf] [--repeats 5] [--tokens 48] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import llama_cpp as lc  # noqa: E402

from runner.core.run_settings import RunSettings  # noqa: E402
from runner.engine import tools as tool_formats  # noqa: E402
from runner.engine.batching import LlamaEngine, start_engine  # noqa: E402
from runner.engine.grammar import json_grammar  # noqa: E402
from runner.engine.types import ChatMessage, SamplingParams, Tool, Tools  # noqa: E402

ASK = [ChatMessage("user", "What will the weather be in Paris this week?")]
HAMLET = [ChatMessage("user", "Who wrote Hamlet? Answer in one long sentence.")]
FORECAST = Tool("get_forecast", "The weather forecast for a city", {
    "type": "object", "additionalProperties": False, "required": ["city", "unit", "days"],
    "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                   "days": {"type": "integer", "minimum": 1, "maximum": 14}}})
CALL_SCHEMA = {"type": "object", "properties": {"tool_calls": {"type": "array", "minItems": 1, "maxItems": 1, "items": {
    "type": "object", "properties": {"name": {"const": "get_forecast"}, "arguments": FORECAST.parameters},
    "required": ["name", "arguments"]}}}, "required": ["tool_calls"]}


class StepClock:
    """Engine-thread time per single-token decode step, outside llama_decode (µs)."""

    def __init__(self, engine: LlamaEngine):
        self.samples: list[float] = []
        self._in_decode = 0.0
        self._single = False
        real_decode, real_step = lc.llama_decode, engine._step

        def decode(ctx, batch):
            t0 = time.perf_counter()
            try:
                return real_decode(ctx, batch)
            finally:
                self._in_decode += time.perf_counter() - t0
                self._single = batch.n_tokens == 1

        def step(batch, t_turn):
            self._in_decode, self._single = 0.0, False
            t0 = time.perf_counter()
            real_step(batch, t_turn)
            if self._single:
                self.samples.append((time.perf_counter() - t0 - self._in_decode) * 1e6)

        lc.llama_decode = decode
        engine._step = step   # type: ignore[method-assign]  # the engine thread looks it up on each step

    def take(self) -> list[float]:
        out, self.samples = self.samples, []
        return out


def run(engine: LlamaEngine, clock: StepClock, messages, params: SamplingParams, tools: Tools | None = None):
    clock.take()
    t0 = time.perf_counter()
    c = engine.chat(messages, params, tools=tools).result()
    wall = time.perf_counter() - t0
    steps = clock.take()
    return {"tokens": c.usage.completion_tokens, "prompt": c.usage.prompt_tokens, "wall_s": wall,
            "ttft_ms": 1000 * c.time_to_first_token_s, "decode_tps": c.decode_tokens_per_s,
            "overhead_us": statistics.median(steps) if steps else 0.0, "calls": len(c.tool_calls),
            "valid": c.finish_reason in ("tool_calls", "stop")}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.model:
        path = Path(a.model)
    else:
        from runner.store.fetch import demo_model_path

        path = demo_model_path()
    engine = start_engine(path, RunSettings(n_ctx=2048), n_parallel=1, threads=a.threads)
    clock = StepClock(engine)
    grammar = json_grammar(CALL_SCHEMA, param="bench")
    forced = Tools((FORECAST,), choice="required", parallel=False)
    same_prompt = tool_formats.generic_messages(ASK, forced)       # what the tools request is prompted with
    cases = {
        "json_schema (the call's schema)": lambda s: run(engine, clock, same_prompt, SamplingParams(
            temperature=0.7, seed=s, max_tokens=200, grammar=grammar)),
        "tools, tool_choice required": lambda s: run(engine, clock, ASK, SamplingParams(
            temperature=0.7, seed=s, max_tokens=200), forced),
        "no tools (text)": lambda s: run(engine, clock, HAMLET, SamplingParams(
            temperature=0, max_tokens=a.tokens, ignore_eos=True)),
        "tools, auto, answered in text": lambda s: run(engine, clock, HAMLET, SamplingParams(
            temperature=0, max_tokens=a.tokens, ignore_eos=True), Tools((FORECAST,))),
        "no logprobs": lambda s: run(engine, clock, HAMLET, SamplingParams(
            temperature=0, max_tokens=a.tokens, ignore_eos=True)),
        "logprobs": lambda s: run(engine, clock, HAMLET, SamplingParams(
            temperature=0, max_tokens=a.tokens, ignore_eos=True, logprobs=True)),
        "logprobs, top_logprobs=5": lambda s: run(engine, clock, HAMLET, SamplingParams(
            temperature=0, max_tokens=a.tokens, ignore_eos=True, logprobs=True, top_logprobs=5)),
    }
    results: dict[str, list[dict]] = {k: [] for k in cases}
    for name, case in cases.items():           # warm-up (template compile, grammar, first-use costs)
        case(0)
    for rep in range(a.repeats):
        for name, case in cases.items():
            results[name].append(case(rep + 1))
    engine.close()
    rows = {}
    print(f"model {path.name}, {a.threads} threads, 1 slot, medians of {a.repeats}")
    print("engine us/step: the engine thread's time per single-token decode step outside llama_decode")
    print(f"{'case':34} {'prompt':>7} {'tokens':>7} {'TTFT ms':>8} {'decode tok/s':>13} {'engine us/step':>15}")
    for name, rs in results.items():
        prompt = statistics.median(r["prompt"] for r in rs)
        tokens = statistics.median(r["tokens"] for r in rs)
        ttft = statistics.median(r["ttft_ms"] for r in rs)
        tps = statistics.median(r["decode_tps"] for r in rs)
        over = statistics.median(r["overhead_us"] for r in rs)
        rows[name] = {"prompt_tokens": prompt, "tokens": tokens, "ttft_ms": ttft, "decode_tps": tps,
                      "engine_us_per_step": over, "calls": [r["calls"] for r in rs],
                      "all_finished": all(r["valid"] for r in rs)}
        print(f"{name:34} {prompt:7.0f} {tokens:7.0f} {ttft:8.1f} {tps:13.1f} {over:15.0f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"model": path.name, "threads": a.threads, "repeats": a.repeats,
                                            "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
