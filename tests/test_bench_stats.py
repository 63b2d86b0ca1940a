"""The measurement logic of scripts/bench_serve.py (scripts/bench_stats.py): percentiles, the event streams of the
three servers (recorded from llama-server, llama_cpp.server and llmrun serve of the pinned llama.cpp), per-level
aggregates over rounds, ratios to llama-server, llama-bench's JSON, and the docs block. One test runs the
benchmark's own client against the FAKE engine app, so the whole request path is checked without a model."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from fake_engine import FakeEngine
from live_server import running
from runner.server.app import create_app
from runner.server.config import ModelCard, ServerConfig

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module           # bench_serve imports bench_stats by name: both share this one
    spec.loader.exec_module(module)
    return module


stats = _load("bench_stats")
bench_serve = _load("bench_serve")

# `curl -N` of one streamed chat request (max_tokens 4, stream_options.include_usage) to each server
LLAMA_SERVER = """\
data: {"choices":[{"finish_reason":null,"index":0,"delta":{"role":"assistant","content":null}}],"created":1795926186,"id":"chatcmpl-Mp85","model":"bench","system_fingerprint":"b1-0c1e570","object":"chat.completion.chunk"}

data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":"Al"}}],"created":1795926186,"id":"chatcmpl-Mp85","model":"bench","system_fingerprint":"b1-0c1e570","object":"chat.completion.chunk"}

data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":"right"}}],"created":1795926186,"id":"chatcmpl-Mp85","model":"bench","system_fingerprint":"b1-0c1e570","object":"chat.completion.chunk"}

data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":","}}],"created":1795926186,"id":"chatcmpl-Mp85","model":"bench","system_fingerprint":"b1-0c1e570","object":"chat.completion.chunk"}

data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":" have"}}],"created":1795926187,"id":"chatcmpl-Mp85","model":"bench","system_fingerprint":"b1-0c1e570","object":"chat.completion.chunk"}

data: {"choices":[{"finish_reason":"length","index":0,"delta":{}}],"created":1795926187,"id":"chatcmpl-Mp85","model":"bench","system_fingerprint":"b1-0c1e570","object":"chat.completion.chunk"}

data: {"choices":[],"created":1795926187,"id":"chatcmpl-Mp85","model":"bench","system_fingerprint":"b1-0c1e570","object":"chat.completion.chunk","usage":{"completion_tokens":4,"prompt_tokens":32,"total_tokens":36,"prompt_tokens_details":{"cached_tokens":0}},"timings":{"cache_n":0,"prompt_n":32,"prompt_ms":1172.148,"prompt_per_token_ms":36.629625,"prompt_per_second":27.300306787197524,"predicted_n":4,"predicted_ms":533.236,"predicted_per_token_ms":177.74533333333332,"predicted_per_second":5.626026749881854}}

data: [DONE]

"""
LLAMA_CPP_SERVER = """\
data: {"id": "chatcmpl-6db6", "model": "bench", "created": 1795926197, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"role": "assistant"}, "logprobs": null, "finish_reason": null}]}

data: {"id": "chatcmpl-6db6", "model": "bench", "created": 1795926197, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "Al"}, "logprobs": null, "finish_reason": null}]}

data: {"id": "chatcmpl-6db6", "model": "bench", "created": 1795926197, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "right"}, "logprobs": null, "finish_reason": null}]}

data: {"id": "chatcmpl-6db6", "model": "bench", "created": 1795926197, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": ","}, "logprobs": null, "finish_reason": null}]}

data: {"id": "chatcmpl-6db6", "model": "bench", "created": 1795926197, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": " dear"}, "logprobs": null, "finish_reason": null}]}

data: {"id": "chatcmpl-6db6", "model": "bench", "created": 1795926197, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "logprobs": null, "finish_reason": "length"}]}

data: [DONE]

"""
LLMRUN = """\
data: {"id": "chatcmpl-1ab2", "object": "chat.completion.chunk", "created": 1795926201, "model": "bench", "system_fingerprint": "llmrun", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}], "usage": null}

data: {"id": "chatcmpl-1ab2", "object": "chat.completion.chunk", "created": 1795926201, "model": "bench", "system_fingerprint": "llmrun", "choices": [{"index": 0, "delta": {"content": "Al"}, "logprobs": null, "finish_reason": null}], "usage": null}

data: {"id": "chatcmpl-1ab2", "object": "chat.completion.chunk", "created": 1795926201, "model": "bench", "system_fingerprint": "llmrun", "choices": [{"index": 0, "delta": {"content": "right"}, "logprobs": null, "finish_reason": null}], "usage": null}

data: {"id": "chatcmpl-1ab2", "object": "chat.completion.chunk", "created": 1795926201, "model": "bench", "system_fingerprint": "llmrun", "choices": [{"index": 0, "delta": {"content": ","}, "logprobs": null, "finish_reason": null}], "usage": null}

data: {"id": "chatcmpl-1ab2", "object": "chat.completion.chunk", "created": 1795926201, "model": "bench", "system_fingerprint": "llmrun", "choices": [{"index": 0, "delta": {"content": " dear"}, "logprobs": null, "finish_reason": null}], "usage": null}

data: {"id": "chatcmpl-1ab2", "object": "chat.completion.chunk", "created": 1795926201, "model": "bench", "system_fingerprint": "llmrun", "choices": [{"index": 0, "delta": {}, "logprobs": null, "finish_reason": "length"}], "usage": null}

data: {"id": "chatcmpl-1ab2", "object": "chat.completion.chunk", "created": 1795926201, "model": "bench", "choices": [], "usage": {"prompt_tokens": 32, "completion_tokens": 4, "total_tokens": 36}}

data: [DONE]

"""
# `llama-bench -p 16 -n 8 -t 2 -r 1 -o json`, fields the script reads
LLAMA_BENCH_JSON = json.dumps([
    {"build_commit": "0c1e570", "n_threads": 2, "n_prompt": 16, "n_gen": 0, "avg_ts": 19.197136, "stddev_ts": 0.0},
    {"build_commit": "0c1e570", "n_threads": 2, "n_prompt": 0, "n_gen": 8, "avg_ts": 4.359813, "stddev_ts": 0.1}])


def replay(stream: str, t0: float = 100.0, step: float = 0.01):
    """Feed a recorded stream line by line, line i arriving at t0 + (i + 1) * step."""
    trace = stats.StreamTrace(t0=t0)
    lines = stream.split("\n")
    for i, line in enumerate(lines):
        trace.feed(line, t0 + (i + 1) * step)
    return trace, trace.result(200, t0 + (len(lines) + 1) * step)


def r(ttft, tokens, itl=(), status=200, decode_ms=None):
    return stats.RequestResult(status=status, ttft=ttft, tokens=tokens, itl=tuple(itl), seconds=1.0,
                               server_decode_ms=decode_ms)


def test_percentile_interpolates_between_ranks_like_numpy():
    xs = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert stats.percentile(xs, 0.5) == 3.0
    assert stats.percentile(xs, 0.95) == pytest.approx(4.8)
    assert stats.percentile(xs, 0.0) == 1.0 and stats.percentile(xs, 1.0) == 5.0
    assert stats.percentile([7.0], 0.95) == 7.0
    assert math.isnan(stats.percentile([], 0.5))
    with pytest.raises(ValueError):
        stats.percentile(xs, 95)


def test_sse_lines_that_carry_no_chunk_are_skipped():
    assert stats.parse_sse_data('data: {"a": 1}') == {"a": 1}
    assert stats.parse_sse_data('data:{"a": 1}') == {"a": 1}
    for line in ("", ": ping", "event: error", "data: [DONE]", "data: not json", "data: [1, 2]"):
        assert stats.parse_sse_data(line) is None, line
    assert stats.chunk_text({"choices": [{"delta": {"role": "assistant", "content": None}}]}) == ""
    assert stats.chunk_text({"choices": [{"text": "x"}]}) == "x"          # /v1/completions
    assert stats.chunk_text({"choices": []}) == ""


@pytest.mark.parametrize("stream, text, server_ms", [
    (LLAMA_SERVER, "Alright, have", 177.74533333333332),
    (LLAMA_CPP_SERVER, "Alright, dear", None),
    (LLMRUN, "Alright, dear", None),
])
def test_each_servers_stream_gives_tokens_ttft_and_inter_token_gaps(stream, text, server_ms):
    trace, res = replay(stream)
    assert "".join(trace.text) == text
    assert res.tokens == 4 and res.ok
    # blocks are separated by blank lines: text chunks are lines 2, 4, 6, 8 (arriving at 0.03 .. 0.09 s)
    assert res.ttft == pytest.approx(0.03)
    assert res.itl == pytest.approx((0.02, 0.02, 0.02))
    assert res.server_decode_ms == server_ms


def test_without_usage_the_text_chunks_are_counted_and_usage_wins_when_sent():
    no_usage = "\n".join(line for line in LLMRUN.split("\n") if '"usage": {' not in line)
    assert replay(no_usage)[1].tokens == 4
    one_chunk_many_tokens = LLMRUN.replace('"completion_tokens": 4', '"completion_tokens": 9')
    assert replay(one_chunk_many_tokens)[1].tokens == 9


def test_a_failed_request_counts_as_an_error_and_not_in_the_rates():
    bad = stats.StreamTrace(t0=0.0).result(503, 0.5, error="busy")
    rows = stats.summarize([r(0.1, 10, [0.01, 0.03]), bad], wall=2.0)
    assert rows["requests"] == 2 and rows["errors"] == 1 and rows["tokens"] == 10
    assert rows["tok_s"] == 5.0
    assert rows["ttft_p50"] == 0.1 and rows["itl_p50"] == pytest.approx(0.02)


def test_an_error_event_inside_a_200_stream_fails_the_request():
    stream = LLMRUN.split("\n\n")[1] + '\n\ndata: {"error": {"message": "llama.cpp could not decode"}}\n\n'
    res = replay(stream)[1]
    assert not res.ok and res.error == "llama.cpp could not decode"
    assert stats.summarize([res], 1.0)["error_samples"] == ["200: llama.cpp could not decode"]


def test_rounds_combine_to_the_median_rate_and_pooled_percentiles():
    rounds = [([r(0.1, 10, [0.01]), r(0.3, 10, [0.03])], 2.0),        # 10 tok/s
              ([r(0.2, 10, [0.02]), r(0.4, 10, [0.04], decode_ms=7.0)], 1.0),   # 20 tok/s
              ([r(0.5, 15, [0.05], decode_ms=9.0)], 0.5)]             # 30 tok/s
    s = stats.combine_rounds(rounds)
    assert s["tok_s_rounds"] == [10.0, 20.0, 30.0]
    assert s["tok_s"] == 20.0
    assert s["requests"] == 5 and s["errors"] == 0 and s["tokens"] == 55
    assert s["ttft_p50"] == pytest.approx(0.3)                   # of 0.1 .. 0.5 pooled
    assert s["ttft_p95"] == pytest.approx(0.48)
    assert s["itl_p50"] == pytest.approx(0.03)
    assert s["server_decode_ms_p50"] == 8.0
    with pytest.raises(ValueError):
        stats.combine_rounds([])


def test_ratios_are_to_llama_server_at_the_same_level():
    def lvl(tok_s, ttft_p95):
        return {"tok_s": tok_s, "ttft_p95": ttft_p95}
    out = stats.with_ratios({"llama-server": {1: lvl(100.0, 0.2), 8: lvl(200.0, 0.4)},
                             "llmrun": {1: lvl(90.0, 0.3), 8: lvl(150.0, 0.2), 16: lvl(160.0, 1.0)}})
    assert out["llmrun"][1]["ratio"] == pytest.approx(0.9)
    assert out["llmrun"][8]["ratio"] == pytest.approx(0.75)
    assert out["llmrun"][8]["ttft_p95_ratio"] == pytest.approx(0.5)
    assert out["llmrun"][16]["ratio"] is None                    # llama-server did not run 16
    assert out["llama-server"][1]["ratio"] == 1.0
    without_anchor = stats.with_ratios({"llmrun": {1: lvl(90.0, 0.3)}})
    assert without_anchor["llmrun"][1]["ratio"] is None
    assert stats.with_ratios({"llama-server": {1: lvl(0.0, math.nan)},
                              "llmrun": {1: lvl(5.0, 0.1)}})["llmrun"][1]["ratio"] is None


def test_llama_bench_json_gives_pp_and_tg():
    out = stats.parse_llama_bench(LLAMA_BENCH_JSON)
    assert out["pp"] == {"n": 16, "tps": 19.197136, "stddev": 0.0}
    assert out["tg"] == {"n": 8, "tps": 4.359813, "stddev": 0.1}
    assert out["build_commit"] == "0c1e570" and out["n_threads"] == 2
    line = stats.ceiling_line([out, out], threads=2)
    assert "tg8 4.4 / 4.4 tok/s" in line and "pp16 19.2 / 19.2 tok/s" in line and "2 runs" in line
    for bad in ("| model | size |", "{}", "[]"):
        with pytest.raises(ValueError):
            stats.parse_llama_bench(bad)


def test_markdown_table_has_one_row_per_level_and_server():
    base = {"tok_s_rounds": [9.0, 11.0], "ttft_p50": 0.1, "ttft_p95": 0.2, "itl_p50": 0.01, "itl_p95": 0.02,
            "errors": 0, "requests": 4}
    levels = stats.with_ratios({"llama-server": {1: {**base, "tok_s": 10.0}},
                                "llmrun": {1: {**base, "tok_s": 8.0}, 4: {**base, "tok_s": 20.0, "errors": 1}}})
    lines = stats.markdown_table(levels, ["llmrun", "llama-server"])
    assert lines[2] == "| 1 | llmrun | 8.0 (9.0; 11.0) | 0.80× | 0.100 / 0.200 | 10.0 / 20.0 | 0/4 |"
    assert lines[3].startswith("| 1 | llama-server | 10.0 (9.0; 11.0) | 1.00× |")
    assert lines[4].startswith("| 4 | llmrun | 20.0 (9.0; 11.0) | — |") and lines[4].endswith("| 1/4 |")
    assert len(lines) == 5


def test_the_benchmark_client_measures_llmruns_real_stream_from_the_fake_engine():
    engine = FakeEngine(model_name="bench", n_parallel=2, token_delay=0.01)
    app = create_app(ServerConfig(), engine=engine, card=ModelCard(name="bench"))
    with running(app) as base:
        results, wall = asyncio.run(bench_serve.run_load(base, clients=2, requests_per_client=2, max_tokens=5))
    assert len(results) == 4 and all(x.ok for x in results), results
    assert all(x.tokens == 5 and len(x.itl) == 4 for x in results)
    assert all(0.01 <= x.ttft < 5 for x in results)
    # chunks can arrive together (one read), so single gaps have no lower bound; the last of 5 tokens cannot
    # arrive before 5 token delays
    assert all(gap >= 0 for x in results for gap in x.itl)
    assert all(x.ttft + sum(x.itl) >= 5 * 0.01 for x in results)
    s = stats.summarize(results, wall)
    assert s["tokens"] == 20 and s["errors"] == 0 and s["tok_s"] > 0
    # the same sampling reaches the engine on every server: no repeat penalty, llama.cpp's defaults otherwise
    sent = engine.submitted[-1][2]
    assert (sent.temperature, sent.top_k, sent.top_p, sent.min_p, sent.repeat_penalty) == (0.8, 40, 0.95, 0.05, 1.0)


def test_docs_block_goes_under_serving_and_is_replaced_in_place(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## Serving\n\nHand-written notes.\n\n## Engine\n\nMore.\n")
    bench_serve.write_docs("| table one |\n", doc)
    first = doc.read_text()
    assert first.index("## Serving") < first.index("| table one |") < first.index("Hand-written notes.")
    bench_serve.write_docs("| table two |\n", doc)
    second = doc.read_text()
    assert "| table one |" not in second and second.count(bench_serve.DOCS_BEGIN) == 1
    assert "Hand-written notes." in second and "## Engine\n\nMore.\n" in second
    empty = tmp_path / "new.md"
    bench_serve.write_docs("| t |\n", empty)
    assert "## Serving" in empty.read_text() and "| t |" in empty.read_text()
