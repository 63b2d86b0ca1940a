"""The HTTP shapes of tool calls, n choices and the parameters real clients send, against the FAKE engine
(tests/fake_engine.py: a forced tool choice makes it call the first offered function with {"fake": true}):
which request field reaches which SamplingParams / Tools value, what is ignored and named, and the response
shapes, streamed and not. Generation by the real model is in test_server_tools.py."""

from __future__ import annotations

import json
import logging

import httpx
import pytest

from fake_engine import FakeEngine
from live_server import running
from runner.server.app import create_app
from runner.server.config import ModelCard, ServerConfig

USER = [{"role": "user", "content": "hi"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def fake():
    engine = FakeEngine(n_parallel=4)
    with running(create_app(ServerConfig(), engine=engine, card=ModelCard(name="fake-model"))) as base:
        yield base, engine


def sse(text: str) -> list:
    return [b[6:] if b[6:] == "[DONE]" else json.loads(b[6:]) for b in text.strip().split("\n\n")]


def test_every_sampling_field_reaches_the_engine(fake):
    base, engine = fake
    r = httpx.post(base + CHAT, json={
        "model": "fake-model", "messages": USER, "frequency_penalty": 0.5, "presence_penalty": -0.5,
        "logit_bias": {"42": -100, "7": 3.5}, "top_k": 9, "min_p": 0.1, "typical_p": 0.8, "repeat_penalty": 1.3,
        "repeat_last_n": -1, "mirostat": 2, "mirostat_tau": 3.0, "mirostat_eta": 0.2, "seed": 5,
        "logprobs": True, "top_logprobs": 3, "n": 2, "chat_template_kwargs": {"enable_thinking": False}})
    assert r.status_code == 200 and "x-llmrun-ignored-fields" not in r.headers
    p = engine.submitted[-1][2]
    assert (p.frequency_penalty, p.presence_penalty, p.logit_bias) == (0.5, -0.5, ((42, -100.0), (7, 3.5)))
    assert (p.top_k, p.min_p, p.typical_p, p.repeat_penalty, p.repeat_last_n) == (9, 0.1, 0.8, 1.3, -1)
    assert (p.mirostat, p.mirostat_tau, p.mirostat_eta, p.seed) == (2, 3.0, 0.2, 5)
    assert (p.logprobs, p.top_logprobs, p.n) == (True, 3, 2)
    assert engine.chat_options[-1] == (None, {"enable_thinking": False})
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["choices"][0]["logprobs"] == {"content": [], "refusal": None}   # the fake computes none
    assert body["usage"]["completion_tokens"] == 2 * 18 and body["usage"]["prompt_tokens"] == 3


def test_unknown_fields_are_accepted_named_and_logged_once(fake, caplog):
    base, _ = fake
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi", "name": "bob"}],
            "reasoning_effort": "low", "metadata": {"a": "b"}, "stream_options": {"include_obfuscation": True},
            "weird\r\nX-Injected": 1, "max_tokens": 2}
    with caplog.at_level(logging.WARNING, logger="llmrun.server"):
        for stream in (False, True):
            r = httpx.post(base + CHAT, json={**body, "stream": stream})
            assert r.status_code == 200
            named = r.headers["x-llmrun-ignored-fields"].split(", ")
            assert set(named) == {"reasoning_effort", "metadata", "stream_options.include_obfuscation",
                                  "messages[].name", "weird??X-Injected"}
            assert "x-injected" not in r.headers
    logged = [rec.getMessage() for rec in caplog.records if "ignoring the request field" in rec.getMessage()]
    assert sum("'reasoning_effort'" in m for m in logged) == 1, "once per field name"
    r = httpx.post(f"{base}/api/chat", json={"model": "fake-model", "stream": False, "keep_alive": "5m",
                                              "messages": [{"role": "user", "content": "hi", "thinking": "hm"}],
                                              "options": {"num_gpu": 99, "num_thread": 4}})
    assert set(r.headers["x-llmrun-ignored-fields"].split(", ")) == {"messages[].thinking", "options.num_gpu",
                                                                     "options.num_thread"}


def test_tools_reach_the_engine(fake):
    base, engine = fake
    r = httpx.post(base + CHAT, json={"model": "fake-model", "messages": USER, "tools": [WEATHER],
                                      "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
                                      "parallel_tool_calls": False})
    assert r.status_code == 200
    tools, _ = engine.chat_options[-1]
    assert (tools.choice, tools.function, tools.parallel) == ("function", "get_weather", False)
    assert tools.functions[0].name == "get_weather" and tools.functions[0].parameters["properties"]["city"]
    httpx.post(base + CHAT, json={"model": "fake-model", "messages": USER, "tools": [WEATHER]})
    assert engine.chat_options[-1][0].choice == "auto" and engine.chat_options[-1][0].parallel


def test_tool_call_answer_shape(fake):
    base, _ = fake
    r = httpx.post(base + CHAT, json={"model": "fake-model", "messages": USER, "tools": [WEATHER],
                                      "tool_choice": "required"}).json()
    choice = r["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_fake0", "type": "function", "function": {"name": "get_weather", "arguments": '{"fake": true}'}}]}


def test_tool_call_stream_shape(fake):
    base, _ = fake
    events = sse(httpx.post(base + CHAT, json={"model": "fake-model", "messages": USER, "tools": [WEATHER],
                                                "tool_choice": "required", "stream": True}).text)
    assert events[-1] == "[DONE]"
    deltas = [e["choices"][0]["delta"] for e in events[:-1]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    pieces = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert pieces[0] == {"index": 0, "id": "call_fake0", "type": "function",
                         "function": {"name": "get_weather", "arguments": ""}}
    assert all(set(p) == {"index", "function"} for p in pieces[1:])
    assert "".join(p["function"]["arguments"] for p in pieces) == '{"fake": true}'
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"


def test_legacy_functions_shape(fake):
    base, engine = fake
    fn = WEATHER["function"]
    r = httpx.post(base + CHAT, json={"model": "fake-model", "messages": USER, "functions": [fn],
                                      "function_call": {"name": "get_weather"}}).json()
    assert r["choices"][0]["finish_reason"] == "function_call"
    assert r["choices"][0]["message"]["function_call"] == {"name": "get_weather", "arguments": '{"fake": true}'}
    assert engine.chat_options[-1][0].parallel is False
    events = sse(httpx.post(base + CHAT, json={"model": "fake-model", "messages": USER, "functions": [fn],
                                                "function_call": {"name": "get_weather"}, "stream": True}).text)
    fcs = [e["choices"][0]["delta"]["function_call"] for e in events[:-1] if "function_call" in
           e["choices"][0]["delta"]]
    assert fcs[0]["name"] == "get_weather" and "".join(f["arguments"] for f in fcs) == '{"fake": true}'


def test_history_with_calls_and_results_is_translated(fake):
    base, engine = fake
    history = USER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "x"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "sunny"}]},
        {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": "{}"}},
        {"role": "function", "name": "get_weather", "content": "rainy"}]
    r = httpx.post(base + CHAT, json={"model": "fake-model", "messages": history, "tools": [WEATHER]})
    assert r.status_code == 200, r.text
    msgs = engine.submitted[-1][1]
    assert msgs[1].tool_calls[0].id == "call_1" and msgs[1].tool_calls[0].arguments == '{"city": "x"}'
    assert (msgs[2].role, msgs[2].tool_call_id, msgs[2].content) == ("tool", "call_1", "sunny")
    assert msgs[3].tool_calls[0].name == "get_weather" and (msgs[4].role, msgs[4].name) == ("tool", "get_weather")


def test_n_choices_stream(fake):
    base, _ = fake
    events = sse(httpx.post(base + CHAT, json={"model": "fake-model", "messages": USER, "n": 3, "max_tokens": 2,
                                                "stream": True}).text)
    by_index: dict[int, str] = {}
    finishes = {}
    for e in events[:-1]:
        c = e["choices"][0]
        by_index[c["index"]] = by_index.get(c["index"], "") + c["delta"].get("content", "")
        if c["finish_reason"]:
            finishes[c["index"]] = c["finish_reason"]
    assert by_index == {0: "Hello from", 1: "Hello from", 2: "Hello from"}
    assert finishes == {0: "length", 1: "length", 2: "length"}


def test_completions_echo_n_and_logprobs(fake):
    base, engine = fake
    r = httpx.post(f"{base}/v1/completions", json={"model": "fake-model", "prompt": "once", "echo": True,
                                                    "max_tokens": 2, "n": 2, "best_of": 2}).json()
    assert [c["text"] for c in r["choices"]] == ["onceHello from", "onceHello from"]
    httpx.post(f"{base}/v1/completions", json={"model": "fake-model", "prompt": "once", "logprobs": 3})
    p = engine.submitted[-1][2]
    assert (p.logprobs, p.top_logprobs) == (True, 3)


def test_ollama_tools_and_options(fake):
    import ollama

    base, engine = fake
    client = ollama.Client(host=base)

    def get_weather(city: str) -> str:
        """Weather in a city.

        Args:
            city: the city
        """
        return "sunny"

    r = client.chat(model="fake-model", messages=USER, tools=[get_weather],
                    options={"num_ctx": 128, "repeat_last_n": -1, "typical_p": 0.5, "mirostat": 1,
                             "presence_penalty": 0.3, "frequency_penalty": 0.2})
    tools, _ = engine.chat_options[-1]
    assert tools.choice == "auto" and tools.functions[0].name == "get_weather"
    assert tools.functions[0].parameters["properties"]["city"]["type"] == "string"
    p = engine.submitted[-1][2]
    assert (p.n_ctx, p.repeat_last_n, p.typical_p, p.mirostat, p.presence_penalty, p.frequency_penalty) == \
        (128, -1, 0.5, 1, 0.3, 0.2)
    assert r.message.content                     # `auto`: the fake answers in text
    history = USER + [{"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny", "tool_name": "get_weather"}]
    client.chat(model="fake-model", messages=history, tools=[get_weather])
    msgs = engine.submitted[-1][1]
    assert json.loads(msgs[1].tool_calls[0].arguments) == {"city": "Paris"}
    assert (msgs[2].role, msgs[2].name, msgs[2].tool_call_id) == ("tool", "get_weather", None)
    assert "tools" in client.show("fake-model").capabilities
