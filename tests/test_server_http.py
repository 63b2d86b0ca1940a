"""HTTP behaviour of `llmrun serve` against the FAKE engine (tests/fake_engine.py): API shapes, parameter
mapping, streaming, admission (429), disconnects, auth, CORS, limits, errors. Real generation with the demo model
is tested in test_server_real.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time

import httpx
import pytest

from fake_engine import FAIL_PROMPT, REPLY, FakeEngine
from fake_pool import MiB, FakeLoader, fake_pool
from live_server import running, wait_ready
from runner.server.config import ModelCard, ServerConfig
from runner.server.app import create_app

FULL = " ".join(REPLY.split())
USER = [{"role": "user", "content": "hi"}]


@contextlib.contextmanager
def serve(config: ServerConfig | None = None, **engine_kwargs):
    engine = FakeEngine(**engine_kwargs)
    app = create_app(config or ServerConfig(), engine=engine, card=ModelCard(name=engine.model_name))
    with running(app) as base:
        yield base, engine, app


@pytest.fixture(scope="module")
def fake():
    with serve(n_parallel=4) as s:
        yield s


def sse_events(text: str) -> list:
    out = []
    for block in text.strip().split("\n\n"):
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


# ---- readiness, health ----------------------------------------------------------------------------------------

def test_health_is_503_while_loading_then_200(tmp_path):
    """The model `llmrun serve --model` names is loaded at start: until it is ready, /health and every model
    route answer 503."""
    release = threading.Event()
    loader = FakeLoader({"fake-model": 100 * MiB}, hold={"fake-model": release})
    app = create_app(ServerConfig(), pool=fake_pool(tmp_path, loader, budget=None), preload="fake-model")
    with running(app) as base:
        r = httpx.get(f"{base}/health")
        assert r.status_code == 503 and r.json()["status"] == "loading" and "retry-after" in r.headers
        r = httpx.post(f"{base}/v1/chat/completions", json={"model": "fake-model", "messages": USER})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        release.set()
        wait_ready(base)
        assert httpx.get(f"{base}/health").json() == {"status": "ok", "model": "fake-model", "slots": 2}
    assert loader.closes == ["fake-model"], "the engine is closed at shutdown"


def test_load_failure_is_reported_by_health_and_callback(tmp_path):
    failures = []
    loader = FakeLoader({"model": 100 * MiB}, fail={"model"})
    app = create_app(ServerConfig(), pool=fake_pool(tmp_path, loader, budget=None), preload="model",
                     on_load_failed=failures.append)
    with running(app) as base:
        assert wait_for(lambda: failures)
        r = httpx.get(f"{base}/health")
        assert r.status_code == 503 and "could not load" in r.json()["error"]


# ---- OpenAI shapes ----------------------------------------------------------------------------------------------

def test_chat_completion_non_streaming(fake):
    base, engine, _ = fake
    r = httpx.post(f"{base}/v1/chat/completions", json={
        "model": "fake-model", "messages": [{"role": "developer", "content": "be brief"}, *USER],
        "temperature": 0.2, "top_p": 0.5, "seed": 7, "stop": ["zzz", "yyy"], "max_completion_tokens": 50})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "fake-model"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": FULL}
    assert choice["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == len(REPLY.split())
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    kind, messages, params = engine.submitted[-1]
    assert kind == "chat" and messages[0].role == "system" and messages[1].content == "hi"
    assert (params.temperature, params.top_p, params.seed, params.stop, params.max_tokens) == \
        (0.2, 0.5, 7, ("zzz", "yyy"), 50)


def test_max_tokens_gives_finish_reason_length(fake):
    base, engine, _ = fake
    r = httpx.post(f"{base}/v1/chat/completions", json={"model": "fake-model", "messages": USER, "max_tokens": 3})
    assert r.json()["choices"][0]["finish_reason"] == "length"
    assert r.json()["choices"][0]["message"]["content"] == "Hello from the"
    assert engine.submitted[-1][2].max_tokens == 3


def test_stop_string_is_applied(fake):
    base, _, _ = fake
    r = httpx.post(f"{base}/v1/completions", json={"model": "fake-model", "prompt": "x", "stop": " engine"})
    assert r.json()["choices"][0]["text"] == "Hello from the fake"
    assert r.json()["choices"][0]["finish_reason"] == "stop"


def test_chat_streaming_sse(fake):
    base, _, _ = fake
    r = httpx.post(f"{base}/v1/chat/completions", json={"model": "fake-model", "messages": USER, "stream": True,
                                                         "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == FULL
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len(REPLY.split())


def test_completions_stream_and_prompt_list(fake):
    base, engine, _ = fake
    r = httpx.post(f"{base}/v1/completions", json={"model": "fake-model", "prompt": ["once upon"], "stream": True,
                                                    "max_tokens": 4})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "Hello from the fake"
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert engine.submitted[-1][:2] == ("complete", "once upon")


def test_models_list(fake):
    base, _, _ = fake
    data = httpx.get(f"{base}/v1/models").json()
    assert data["object"] == "list" and [m["id"] for m in data["data"]] == ["fake-model"]
    assert httpx.get(f"{base}/v1/models/fake-model").json()["id"] == "fake-model"
    r = httpx.get(f"{base}/v1/models/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_json_modes_pass_a_grammar(fake):
    from llama_cpp.llama_grammar import JSON_GBNF

    base, engine, _ = fake
    r = httpx.post(f"{base}/v1/chat/completions", json={"model": "fake-model", "messages": USER,
                                                         "response_format": {"type": "json_object"}})
    assert r.status_code == 200 and engine.submitted[-1][2].grammar == JSON_GBNF
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    r = httpx.post(f"{base}/v1/chat/completions", json={"model": "fake-model", "messages": USER, "response_format": {
        "type": "json_schema", "json_schema": {"name": "a", "schema": schema}}})
    assert r.status_code == 200
    grammar = engine.submitted[-1][2].grammar
    assert "answer" in grammar and "root ::=" in grammar
    r = httpx.post(f"{base}/api/generate", json={"model": "fake-model", "prompt": "x", "format": "json",
                                                  "stream": False})
    assert r.status_code == 200 and engine.submitted[-1][2].grammar == JSON_GBNF


def test_unsupported_json_schema_is_400_naming_the_field(fake):
    base, _, _ = fake
    r = httpx.post(f"{base}/v1/chat/completions", json={"model": "fake-model", "messages": USER, "response_format": {
        "type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "no-such-type"}}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"


def test_context_overflow_is_400(fake):
    base, _, _ = fake
    long = "word " * 400
    r = httpx.post(f"{base}/v1/chat/completions", json={"model": "fake-model",
                                                         "messages": [{"role": "user", "content": long}]})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded" and r.json()["error"]["param"] == "messages"
    r = httpx.post(f"{base}/api/generate", json={"model": "fake-model", "prompt": long})
    assert r.status_code == 400 and "context" in r.json()["error"]


def test_engine_failure_mid_stream_is_reported_not_hung(fake):
    base, _, _ = fake
    msgs = [{"role": "user", "content": FAIL_PROMPT}]
    r = httpx.post(f"{base}/v1/chat/completions", json={"model": "fake-model", "messages": msgs, "stream": True})
    events = sse_events(r.text)
    assert "error" in events[-1] and "fail" in events[-1]["error"]["message"]
    r = httpx.post(f"{base}/v1/chat/completions", json={"model": "fake-model", "messages": msgs})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    r = httpx.post(f"{base}/api/chat", json={"model": "fake-model", "messages": msgs})
    assert json.loads(r.text.strip().splitlines()[-1])["error"]
    assert httpx.get(f"{base}/health").status_code == 200


# ---- Ollama shapes (through the official client) ------------------------------------------------------------------

def test_ollama_client_against_fake(fake):
    import ollama

    base, engine, _ = fake
    client = ollama.Client(host=base)
    reply = client.chat(model="fake-model", messages=USER, options={"temperature": 0, "num_predict": 5, "seed": 3,
                                                                     "top_k": 7, "stop": ["xx"]})
    assert reply.message.content == "Hello from the fake engine" and reply.done and reply.done_reason == "length"
    assert reply.eval_count == 5 and reply.prompt_eval_count > 0
    params = engine.submitted[-1][2]
    assert (params.temperature, params.max_tokens, params.seed, params.top_k, params.stop) == (0, 5, 3, 7, ("xx",))
    parts = list(client.chat(model="fake-model:latest", messages=USER, stream=True))
    assert "".join(p.message.content for p in parts) == FULL and parts[-1].done
    gen = client.generate(model="fake-model", prompt="hello", system="sys")
    assert gen.response == FULL
    assert [m.role for m in engine.submitted[-1][1]] == ["system", "user"]
    client.generate(model="fake-model", prompt="raw text", raw=True)
    assert engine.submitted[-1][:2] == ("complete", "raw text")
    assert client.generate(model="fake-model").done_reason == "load"     # preload, as Ollama answers
    assert [m.model for m in client.list().models] == ["fake-model"]
    assert client.ps().models[0].context_length == engine.n_ctx
    assert client.show("fake-model").details.format == "gguf"
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="llama3", messages=USER)
    assert e.value.status_code == 404
    assert httpx.get(f"{base}/api/version").json()["version"]


# ---- load, disconnects --------------------------------------------------------------------------------------------

def test_eight_concurrent_streams_all_complete():
    async def one(client, base, i):
        text, finish = "", None
        async with client.stream("POST", f"{base}/v1/chat/completions", json={
                "model": "fake-model", "messages": [{"role": "user", "content": f"client {i}"}], "stream": True}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    c = json.loads(line[6:])["choices"][0]
                    text += c["delta"].get("content", "")
                    finish = c["finish_reason"] or finish
        return text, finish

    async def main(base):
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(*(one(client, base, i) for i in range(8)))

    with serve(n_parallel=4, token_delay=0.01) as (base, engine, _):
        results = asyncio.run(main(base))
        assert results == [(FULL, "stop")] * 8
        assert len({id(g) for g in engine.generations}) == 8
        assert engine.max_busy == 4, "requests share the slots, and never more than --parallel"


def _open_stream_and_drop(base: str, path: str, body: dict, read_bytes: int = 1):
    """Send a streaming request over a raw socket, read a little, then close the connection abruptly."""
    host, port = base.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    s = socket.create_connection((host, int(port)))
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    if read_bytes:
        s.recv(read_bytes)
    s.close()


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"model": "fake-model", "messages": USER, "stream": True}),
    ("/api/chat", {"model": "fake-model", "messages": USER}),
    ("/v1/chat/completions", {"model": "fake-model", "messages": USER}),   # non-streaming too
])
def test_disconnect_cancels_generation_and_frees_slot(path, body):
    with serve(n_parallel=1, token_delay=0.2) as (base, engine, app):
        stream = body.get("stream", path.startswith("/api/"))
        _open_stream_and_drop(base, path, body, read_bytes=1 if stream else 0)
        assert wait_for(lambda: engine.generations)
        gen = engine.generations[-1]
        assert gen.slot_released.wait(2.0), "slot still busy after the client left"
        assert gen.result(1).finish_reason == "cancelled"
        assert gen.result(1).usage.completion_tokens < len(REPLY.split())
        assert wait_for(lambda: app.state.llm.in_flight == 0)
        assert wait_for(lambda: all(m.in_flight == 0 for m in app.state.llm.pool.models.values())), \
            "the model is still held"
        r = httpx.post(f"{base}/v1/chat/completions", json={"model": "fake-model", "messages": USER,
                                                             "max_tokens": 2}, timeout=10)
        assert r.status_code == 200
        assert "llmrun_cancelled_total 1" in httpx.get(f"{base}/metrics").text


def test_queue_full_gives_429_with_retry_after_and_recovers():
    config = ServerConfig(queue=1)
    with serve(config, n_parallel=1, token_delay=0.05) as (base, engine, app):
        results = []

        def slow():
            results.append(httpx.post(f"{base}/v1/chat/completions", json={"model": "fake-model", "messages": USER},
                                      timeout=30).status_code)

        threads = [threading.Thread(target=slow) for _ in range(2)]
        for t in threads:
            t.start()
        assert wait_for(lambda: app.state.llm.in_flight == 2)
        r = httpx.post(f"{base}/v1/chat/completions", json={"model": "fake-model", "messages": USER})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
        r = httpx.post(f"{base}/api/generate", json={"model": "fake-model", "prompt": "x"})
        assert r.status_code == 429 and "busy" in r.json()["error"]
        for t in threads:
            t.join()
        assert results == [200, 200]
        assert app.state.llm.in_flight == 0
        assert all(m.in_flight == 0 for m in app.state.llm.pool.models.values()), "a 429 still holds its model"
        r = httpx.post(f"{base}/v1/chat/completions", json={"model": "fake-model", "messages": USER, "max_tokens": 1})
        assert r.status_code == 200
        metrics = httpx.get(f"{base}/metrics").text
        assert 'llmrun_requests_total{endpoint="/v1/chat/completions",status="429"} 1' in metrics
        assert "llmrun_rejected_busy_total 2" in metrics


# ---- metrics ------------------------------------------------------------------------------------------------------

def test_metrics_exposition(fake):
    base, _, _ = fake
    httpx.post(f"{base}/v1/chat/completions", json={"model": "fake-model", "messages": USER, "stream": True})
    text = httpx.get(f"{base}/metrics").text
    for name in ("llmrun_requests_total", "llmrun_prompt_tokens_total", "llmrun_completion_tokens_total",
                 "llmrun_queue_depth", "llmrun_busy_slots", "llmrun_time_to_first_token_seconds_bucket",
                 "llmrun_token_latency_seconds_count"):
        assert name in text
    count = [l for l in text.splitlines() if l.startswith("llmrun_time_to_first_token_seconds_count")][0]
    assert int(count.split()[-1]) >= 1
    inf = [l for l in text.splitlines() if l.startswith('llmrun_token_latency_seconds_bucket{le="+Inf"}')][0]
    assert int(inf.split()[-1]) >= len(REPLY.split()) - 1


# ---- auth, CORS, limits -------------------------------------------------------------------------------------------

def test_api_key_required_when_set():
    with serve(ServerConfig(api_key="s3cret")) as (base, _, _):
        assert httpx.get(f"{base}/health").status_code == 200
        r = httpx.get(f"{base}/v1/models")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(f"{base}/api/tags", headers={"Authorization": "s3cret"}).status_code == 401
        assert httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        import openai
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="s3cret")
        assert [m.id for m in client.models.list()] == ["fake-model"]


def test_cors_off_by_default_and_on_with_origin(fake):
    base, _, _ = fake
    r = httpx.get(f"{base}/v1/models", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    with serve(ServerConfig(cors_origins=("http://app.example",), api_key="k")) as (b2, _, _):
        pre = httpx.options(f"{b2}/v1/chat/completions", headers={
            "Origin": "http://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://app.example"
        r = httpx.get(f"{b2}/v1/models", headers={"Origin": "http://other.example", "Authorization": "Bearer k"})
        assert "access-control-allow-origin" not in r.headers


def test_body_size_limit_413():
    with serve(ServerConfig(max_body_bytes=1000)) as (base, _, _):
        big = {"model": "fake-model", "messages": [{"role": "user", "content": "x" * 2000}]}
        r = httpx.post(f"{base}/v1/chat/completions", json=big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        def chunked():
            yield json.dumps(big).encode()
        r = httpx.post(f"{base}/api/chat", content=chunked(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "limit" in r.json()["error"]
        assert httpx.get(f"{base}/health").status_code == 200


def test_exposure_warning():
    from runner.server.lifecycle import exposure_warning

    assert exposure_warning(ServerConfig()) is None
    assert "WITHOUT an API key" in exposure_warning(ServerConfig(host="0.0.0.0"))
    assert exposure_warning(ServerConfig(host="0.0.0.0", api_key="k")) is None


def test_port_in_use_is_a_clear_error():
    from runner.core.errors import ServerError
    from runner.server.lifecycle import bind

    s = bind("127.0.0.1", 0)
    try:
        with pytest.raises(ServerError) as e:
            bind("127.0.0.1", s.getsockname()[1])
        assert "--port" in e.value.hint
    finally:
        s.close()
