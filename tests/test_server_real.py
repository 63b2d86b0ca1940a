"""`llmrun serve` end to end: the real CLI in a subprocess, the real engine, the demo model (SmolLM2-135M), and
the official `openai` and `ollama` Python clients, unchanged."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from live_server import serve_process

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.llama


@contextlib.contextmanager
def cli_server(model: Path, *args: str, timeout: float = 120.0, home: Path | None = None):
    """`llmrun serve --model MODEL --port 0 ARGS` in a subprocess; yields (base_url, process, stderr lines). `home`:
    its own LLMRUN_HOME and hub cache (default: a new temporary one; a module-scoped server starts before the
    per-test isolated home is set, and the server lists every model in its home's store)."""
    home = home or Path(tempfile.mkdtemp(prefix="llmrun-home-"))
    with serve_process(home, "--model", str(model), "--name", "demo", "--log-level", "warning", *args,
                       timeout=timeout) as served:
        yield served


SERVER_LOG: dict[str, list[str]] = {}     # base URL → the server's stderr lines, as they come


@pytest.fixture(scope="module")
def server(demo_gguf):
    with cli_server(demo_gguf, "--parallel", "4", "--ctx", "1024") as (base, proc, lines):
        SERVER_LOG[base] = lines
        yield base


@pytest.fixture(scope="module")
def oai(server):
    import openai

    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def test_openai_chat(oai):
    r = oai.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Say hello."}],
                                    max_tokens=16, temperature=0, seed=1)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content.strip()
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 5 and 0 < r.usage.completion_tokens <= 16
    again = oai.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Say hello."}],
                                        max_tokens=16, temperature=0, seed=1)
    assert again.choices[0].message.content == r.choices[0].message.content, "greedy decoding is deterministic"


def test_openai_streaming_matches_usage(oai):
    stream = oai.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Count to ten."}],
                                         max_tokens=24, temperature=0, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text.strip() and finish == ["length"] or finish == ["stop"]
    assert chunks[-1].usage.completion_tokens <= 24 and chunks[-1].usage.completion_tokens > 0
    full = oai.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Count to ten."}],
                                       max_tokens=24, temperature=0)
    assert full.choices[0].message.content == text


def test_openai_completions_and_stop(oai):
    r = oai.completions.create(model="demo", prompt="The capital of France is", max_tokens=12, temperature=0)
    assert r.choices[0].text and r.usage.completion_tokens <= 12
    cut = r.choices[0].text.strip().split()[0]
    r2 = oai.completions.create(model="demo", prompt="The capital of France is", max_tokens=12, temperature=0,
                                stop=[cut])
    assert cut not in r2.choices[0].text and r2.choices[0].finish_reason == "stop"


def test_openai_models(oai):
    assert [m.id for m in oai.models.list()] == ["demo"]


def test_the_one_model_also_answers_to_its_short_names(oai, demo_gguf):
    for name in ("demo:latest", Path(demo_gguf).stem, Path(demo_gguf).stem + ":latest"):
        r = oai.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi."}], max_tokens=2)
        assert r.model == name and r.choices[0].message.content


def test_openai_json_mode_parses(oai):
    r = oai.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "Reply with a JSON object with the key colour."}],
        response_format={"type": "json_object"}, max_tokens=200, temperature=0)
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_openai_json_schema_is_enforced(oai):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    r = oai.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "Invent a person."}], max_tokens=200, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
    data = json.loads(r.choices[0].message.content)
    assert set(data) == {"name", "age"} and isinstance(data["age"], int) and isinstance(data["name"], str)


def test_openai_unknown_model_and_bad_request(oai):
    import openai

    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as e:   # more choices than the 4 sequences decoding together
        oai.chat.completions.create(model="demo", messages=[{"role": "user", "content": "x"}], n=5)
    assert e.value.body["param"] == "n"


def test_context_overflow_is_400(server):
    long = "hello " * 3000
    r = httpx.post(f"{server}/v1/completions", json={"model": "demo", "prompt": long, "max_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_ollama_client(server):
    import ollama

    client = ollama.Client(host=server)
    r = client.chat(model="demo", messages=[{"role": "user", "content": "Say hi."}],
                    options={"num_predict": 12, "temperature": 0})
    assert r.message.content.strip() and r.done and r.eval_count <= 12 and r.prompt_eval_count > 0
    parts = list(client.chat(model="demo", messages=[{"role": "user", "content": "Say hi."}], stream=True,
                             options={"num_predict": 12, "temperature": 0}))
    assert "".join(p.message.content for p in parts) == r.message.content and parts[-1].done
    g = client.generate(model="demo", prompt="Name a colour.", options={"num_predict": 8})
    assert g.response and g.done
    schema = {"type": "object", "properties": {"colour": {"type": "string", "maxLength": 12}},
              "required": ["colour"], "additionalProperties": False}
    j = client.generate(model="demo", prompt="What colour is the sky? Answer in JSON.", format=schema,
                        options={"num_predict": 100, "temperature": 0})
    assert set(json.loads(j.response)) == {"colour"}
    assert [m.model for m in client.list().models] == ["demo"]
    assert client.list().models[0].size > 50_000_000
    assert client.ps().models[0].context_length == 1024
    assert client.show("demo").modelinfo is not None


def _stream_text(base: str, i: int) -> tuple[str, str, int]:
    text, finish, usage = "", None, None
    with httpx.stream("POST", f"{base}/v1/chat/completions", timeout=120, json={
            "model": "demo", "messages": [{"role": "user", "content": f"Tell me fact number {i} about space."}],
            "max_tokens": 16, "temperature": 0.7, "seed": i, "stream": True,
            "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if obj.get("usage"):
                usage = obj["usage"]["completion_tokens"]
            if obj["choices"]:
                text += obj["choices"][0]["delta"].get("content", "")
                finish = obj["choices"][0]["finish_reason"] or finish
    return text, finish, usage


def test_eight_concurrent_streaming_clients(server):
    results: dict[int, tuple] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, _stream_text(server, i))) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results) == list(range(8))
    for text, finish, usage in results.values():
        assert text and finish in ("stop", "length") and 0 < usage <= 16
    metrics = httpx.get(f"{server}/metrics").text
    assert "llmrun_busy_slots 0" in metrics


def _busy(base: str) -> int:
    m = re.search(r"^llmrun_busy_slots (\d+)", httpx.get(f"{base}/metrics").text, re.M)
    return int(m.group(1))


def test_disconnect_frees_its_slot(server):
    host, port = server.removeprefix("http://").split(":")
    body = json.dumps({"model": "demo", "messages": [{"role": "user", "content": "Write a long story."}],
                       "max_tokens": 900, "stream": True}).encode()
    s = socket.create_connection((host, int(port)))
    s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    s.recv(1)              # the stream has started: a slot is decoding
    assert _busy(server) == 1
    s.close()
    deadline = time.monotonic() + 5
    while _busy(server) != 0:
        assert time.monotonic() < deadline, "the slot was not freed after the client disconnected"
        time.sleep(0.02)
    assert re.search(r"^llmrun_cancelled_total [1-9]", httpx.get(f"{server}/metrics").text, re.M)


def test_queue_full_429_and_sigterm_finishes_in_flight(demo_gguf):
    with cli_server(demo_gguf, "--parallel", "1", "--queue", "0", "--ctx", "512", "--grace", "120") as (base, proc,
                                                                                                          lines):
        host, port = base.removeprefix("http://").split(":")
        got: dict = {}

        def long_stream():
            got["result"] = _stream_text_long(base)

        t = threading.Thread(target=long_stream)
        t.start()
        deadline = time.monotonic() + 10
        while _busy(base) != 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        r = httpx.post(f"{base}/v1/chat/completions", json={"model": "demo", "messages": [
            {"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(OSError):       # no longer accepting
            socket.create_connection((host, int(port)), timeout=2).close()
        t.join(60)
        text, finish, events = got["result"]
        assert finish in ("stop", "length") and events[-1] == "[DONE]", "the in-flight stream was allowed to finish"
        assert proc.wait(30) == 0


def _stream_text_long(base: str):
    text, finish, events = "", None, []
    with httpx.stream("POST", f"{base}/v1/chat/completions", timeout=120, json={
            "model": "demo", "messages": [{"role": "user", "content": "Write a story."}], "max_tokens": 40,
            "stream": True}) as r:
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                events.append("[DONE]")
                continue
            obj = json.loads(line[6:])
            events.append(obj)
            text += obj["choices"][0]["delta"].get("content", "")
            finish = obj["choices"][0]["finish_reason"] or finish
    return text, finish, events


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/chat"])
def test_lone_surrogate_is_400_not_500(server, path):
    """Issue 12: `"\\ud800"` (valid JSON, invalid Unicode) as a message's content was a 500 UnicodeEncodeError."""
    r = httpx.post(f"{server}{path}", headers={"Content-Type": "application/json"}, content=json.dumps(
        {"model": "demo", "messages": [{"role": "user", "content": "\ud800"}], "stream": False}))
    assert r.status_code == 400, r.text
    message = r.json()["error"] if path.startswith("/api/") else r.json()["error"]["message"]
    assert message.startswith("messages[0].content: ") and "surrogate" in message


@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "mail", "schema": {
        "type": "string", "pattern": "^\\w+@\\w+$"}}}}, "response_format.json_schema.schema"),
    ("/api/chat", {"format": {"type": "string", "pattern": "^\\w+@\\w+$"}, "stream": False}, "format"),
])
def test_a_schema_llama_cpp_rejects_is_a_400_with_its_reason_and_nothing_on_stderr(server, path, body, param):
    """Issue 12: llama.cpp's grammar parser printed "parse: error parsing grammar: ..." on the server's terminal
    for every rejected schema; the reason belongs in the 400."""
    before = len(SERVER_LOG[server])
    r = httpx.post(f"{server}{path}", json={"model": "demo", "messages": [{"role": "user", "content": "hi"}], **body})
    assert r.status_code == 400, r.text
    message = r.json()["error"] if path.startswith("/api/") else r.json()["error"]["message"]
    assert message.startswith(f"{param}: ") and "llama.cpp says unknown escape" in message
    if not path.startswith("/api/"):
        assert r.json()["error"]["param"] == param
    time.sleep(0.3)     # the server's stderr is read by a thread
    assert not [line for line in SERVER_LOG[server][before:] if "grammar" in line]
