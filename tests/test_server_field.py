"""Field findings against the server (issue 12), on the FAKE engine (tests/fake_engine.py): a generation that
outlives its client whatever the ASGI server reports, the --max-tokens backstop, lone surrogates, grammar
errors. The same findings against a live server of the demo model are in test_server_kill_fuzz.py."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest

from fake_engine import FakeEngine, FakeGeneration
from live_server import running
from runner.engine.types import SamplingParams
from runner.server.app import create_app
from runner.server.config import DEFAULT_MAX_TOKENS, ModelCard, ServerConfig

USER = [{"role": "user", "content": "hi"}]


class SilentEngine(FakeEngine):
    """Generates one word, then `n_tokens` tokens that detokenize to nothing (as text a stop string holds back,
    or pieces of a UTF-8 character, look to the server): after its first delta the response has nothing to send
    for n_tokens x token_delay."""

    def __init__(self, n_tokens: int = 500, **kwargs: Any):
        super().__init__(**kwargs)
        self.n_tokens = n_tokens

    def _submit(self, prompt_text: str, params: SamplingParams) -> FakeGeneration:
        gen = FakeGeneration(self, ["Hello"] + [""] * self.n_tokens, len(prompt_text.split()) + 1, params, fail=False)
        self.generations.append(gen)
        return gen


class Asgi:
    """Calls the app the way an ASGI server does, with the spec version it claims: the request body, then
    nothing until `leave()`, then `http.disconnect` for ever. Sends never fail (as sends to a gone client under
    ASGI 2.3), so only the disconnect message can tell the app."""

    def __init__(self, spec_version: str):
        self.spec_version = spec_version
        self.sent: list[dict] = []
        self._gone: asyncio.Event | None = None

    def leave(self) -> None:
        assert self._gone is not None
        self._gone.set()

    async def call(self, app: Any, path: str, body: dict) -> None:
        self._gone = asyncio.Event()
        payload = json.dumps(body).encode()
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": self.spec_version}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
                 "root_path": "", "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8080), "state": {},
                 "headers": [(b"host", b"x"), (b"content-type", b"application/json"),
                             (b"content-length", str(len(payload)).encode())]}
        delivered = False

        async def receive() -> dict:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": payload, "more_body": False}
            assert self._gone is not None
            await self._gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            self.sent.append(message)

        await app(scope, receive, send)


ROUTES = [
    ("/v1/chat/completions", {"model": "fake-model", "messages": USER, "stream": True}),
    ("/v1/chat/completions", {"model": "fake-model", "messages": USER}),
    ("/v1/completions", {"model": "fake-model", "prompt": "x", "stream": True}),
    ("/api/chat", {"model": "fake-model", "messages": USER}),
    ("/api/generate", {"model": "fake-model", "prompt": "x", "stream": False}),
]


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
@pytest.mark.parametrize("path,body", ROUTES)
def test_a_gone_client_cancels_a_generation_that_sends_nothing(spec_version, path, body):
    """Under ASGI 2.4 Starlette's StreamingResponse no longer listens for http.disconnect: a stream with nothing
    to send (text held back) would then never learn its client left. The run's own watcher must."""
    engine = SilentEngine(n_tokens=500, token_delay=0.01, n_parallel=1)     # 5 s of silence
    app = create_app(ServerConfig(), engine=engine, card=ModelCard(name="fake-model"))
    asgi = Asgi(spec_version)

    async def scenario() -> float:
        call = asyncio.ensure_future(asgi.call(app, path, body))
        while not engine.generations:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        asgi.leave()
        t0 = time.perf_counter()
        await asyncio.wait_for(call, 3)
        return time.perf_counter() - t0

    elapsed = asyncio.run(scenario())
    gen = engine.generations[0]
    assert gen.slot_released.wait(1.0), "the generation kept its slot after its client left"
    assert gen.result(1).finish_reason == "cancelled"
    assert elapsed < 1.0
    assert app.state.llm.in_flight == 0
    assert app.state.llm.metrics.cancelled == 1


# ---- --max-tokens: the backstop for requests that set no limit ----------------------------------------------------

def _submitted_max_tokens(base: str, engine: FakeEngine, path: str, body: dict) -> int | None:
    r = httpx.post(f"{base}{path}", json=body, timeout=10)
    assert r.status_code == 200, r.text
    return engine.submitted[-1][2].max_tokens


@pytest.mark.parametrize("path,body,expected", [
    ("/v1/chat/completions", {"messages": USER}, DEFAULT_MAX_TOKENS),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 5000}, 5000),               # a request raises it
    ("/v1/chat/completions", {"messages": USER, "max_completion_tokens": 9}, 9),
    ("/v1/completions", {"prompt": "x"}, DEFAULT_MAX_TOKENS),
    ("/v1/completions", {"prompt": "x", "max_tokens": 3000}, 3000),
    ("/api/chat", {"messages": USER, "stream": False}, DEFAULT_MAX_TOKENS),
    ("/api/generate", {"prompt": "x", "stream": False}, DEFAULT_MAX_TOKENS),
    ("/api/generate", {"prompt": "x", "stream": False, "options": {"num_predict": 4000}}, 4000),
    ("/api/generate", {"prompt": "x", "stream": False, "options": {"num_predict": -1}}, None),   # the context
    ("/api/chat", {"messages": USER, "stream": False, "options": {"num_predict": -2}}, None),    # the context
    ("/api/chat", {"messages": USER, "stream": False, "options": {"num_predict": 0}}, 1),
])
def test_default_max_tokens_applies_when_a_request_sets_none(path, body, expected):
    engine = FakeEngine(n_parallel=2, token_delay=0.0)
    app = create_app(ServerConfig(), engine=engine, card=ModelCard(name="fake-model"))
    with running(app) as base:
        assert _submitted_max_tokens(base, engine, path, {"model": "fake-model", **body}) == expected


def test_max_tokens_backstop_is_configurable_and_can_be_off():
    engine = FakeEngine(n_parallel=2, token_delay=0.0)
    for limit in (7, None):
        app = create_app(ServerConfig(max_tokens=limit), engine=engine, card=ModelCard(name="fake-model"))
        with running(app) as base:
            assert _submitted_max_tokens(base, engine, "/v1/chat/completions",
                                         {"model": "fake-model", "messages": USER}) == limit
            assert _submitted_max_tokens(base, engine, "/api/generate",
                                         {"model": "fake-model", "prompt": "x", "stream": False}) == limit


def test_the_backstop_ends_a_request_with_finish_reason_length():
    engine = FakeEngine(n_parallel=1, token_delay=0.0)
    app = create_app(ServerConfig(max_tokens=3), engine=engine, card=ModelCard(name="fake-model"))
    with running(app) as base:
        r = httpx.post(f"{base}/v1/chat/completions", json={"model": "fake-model", "messages": USER})
        assert r.json()["choices"][0]["finish_reason"] == "length"
        assert r.json()["usage"]["completion_tokens"] == 3
        r = httpx.post(f"{base}/api/generate", json={"model": "fake-model", "prompt": "x", "stream": False})
        assert r.json()["done_reason"] == "length" and r.json()["eval_count"] == 3


# ---- a client that sends more than its request ---------------------------------------------------------------------

@pytest.mark.parametrize("path,body", ROUTES)
def test_a_client_that_sent_bytes_past_its_request_is_noticed_leaving(path, body):
    """uvicorn stops reading a connection whose client sends more than its request (here a pipelined request)
    while the answer is pending, and reads it again only inside receive(): waiting on one receive() never sees
    that client leave (found by the kill fuzz, test_server_kill_fuzz.py)."""
    import socket

    engine = SilentEngine(n_tokens=500, token_delay=0.01, n_parallel=1)     # 5 s
    app = create_app(ServerConfig(), engine=engine, card=ModelCard(name="fake-model"))
    with running(app) as base:
        host, port = base.removeprefix("http://").split(":")
        payload = json.dumps(body).encode()
        s = socket.create_connection((host, int(port)))
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        deadline = time.monotonic() + 5
        while not engine.generations:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.3)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.2)
        s.close()
        gen = engine.generations[0]
        assert gen.slot_released.wait(1.5), "the generation kept its slot after its client left"
        assert gen.result(1).finish_reason == "cancelled"


# ---- lone surrogates: valid JSON, not valid Unicode ---------------------------------------------------------------

LONE = "ab\ud800c"          # json.dumps escapes it as "ab\ud800c": valid JSON, and not valid Unicode


@pytest.mark.parametrize("path,body,field", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONE}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "ok"}, {"role": "user", "content": [
        {"type": "text", "text": "fine"}, {"type": "text", "text": LONE}]}]}, "messages[1].content[1].text"),
    ("/v1/chat/completions", {"messages": USER, "stop": ["ok", LONE]}, "stop[1]"),
    ("/v1/chat/completions", {"messages": USER, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"description": LONE}}}}}},
     "response_format.json_schema.schema.properties.a.description"),
    ("/v1/chat/completions", {"messages": USER, "user": LONE}, "user"),
    ("/v1/completions", {"prompt": LONE}, "prompt"),
    ("/v1/completions", {"prompt": [LONE]}, "prompt[0]"),
    ("/api/chat", {"messages": [{"role": "user", "content": LONE}]}, "messages[0].content"),
    ("/api/chat", {"messages": USER, "tools": [{"type": "function", "function": {"name": LONE}}]},
     "tools[0].function.name"),
    ("/api/generate", {"prompt": LONE}, "prompt"),
    ("/api/generate", {"prompt": "hi", "system": LONE}, "system"),
    ("/api/generate", {"prompt": "hi", "options": {"stop": [LONE]}}, "options.stop[0]"),
    ("/api/generate", {"prompt": "hi", "format": {"type": "object", "properties": {LONE: {"type": "string"}}}},
     f"format.properties.{LONE}"),
    ("/api/show", {"model": LONE}, "model"),
])
def test_a_lone_surrogate_is_a_400_naming_the_field(fake_server, path, body, field):
    base, _ = fake_server
    r = httpx.post(f"{base}{path}", content=json.dumps({"model": "fake-model", **body}),
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    message = error if path.startswith("/api/") else error["message"]
    assert "lone UTF-16 surrogate" in message and "\\ud800" in message
    shown = field.encode("utf-8", "backslashreplace").decode()        # a key holding the surrogate, escaped
    assert message.startswith(f"{shown}: ")
    if path.startswith("/v1/"):
        assert error["param"] == shown
    r.content.decode("ascii")           # the answer itself is plain ASCII JSON


def test_the_400_names_the_field_on_both_faces(fake_server):
    base, _ = fake_server
    r = httpx.post(f"{base}/api/chat", content=json.dumps({"model": "fake-model", "messages": [
        {"role": "user", "content": "x"}, {"role": "user", "content": "\udc00"}]}),
        headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"].startswith("messages[1].content: ")
    r = httpx.post(f"{base}/v1/completions", content=json.dumps({"model": "fake-model", "prompt": "\udfff"}),
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("prompt: ")


def test_paired_surrogates_and_escaped_backslashes_pass(fake_server):
    base, engine = fake_server
    for text in ("smile \U0001F600", "a literal \\ud800 is six characters"):
        r = httpx.post(f"{base}/v1/completions", content=json.dumps({"model": "fake-model", "prompt": text}),
                       headers={"Content-Type": "application/json"})
        assert r.status_code == 200, r.text
        assert engine.submitted[-1][1] == text


@pytest.fixture(scope="module")
def fake_server():
    engine = FakeEngine(n_parallel=2, token_delay=0.0)
    app = create_app(ServerConfig(), engine=engine, card=ModelCard(name="fake-model"))
    with running(app) as base:
        yield base, engine


# ---- /api/generate with "prompt": null: Ollama's load request, kept ------------------------------------------------

@pytest.mark.parametrize("path,body", [
    ("/api/generate", {"prompt": None}),
    ("/api/generate", {"prompt": ""}),
    ("/api/generate", {}),
    ("/api/chat", {"messages": []}),
    ("/api/chat", {}),
])
def test_an_empty_ollama_request_is_the_load_request(fake_server, path, body):
    base, engine = fake_server
    before = len(engine.submitted)
    r = httpx.post(f"{base}{path}", json={"model": "fake-model", **body})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["done"] is True and answer["done_reason"] == "load"
    assert answer.get("response", answer.get("message", {}).get("content")) == ""
    assert len(engine.submitted) == before, "a load request generates nothing"


def test_an_api_key_with_bytes_that_are_not_utf8():
    """`--api-key` / $LLMRUN_API_KEY come from argv or the environment, where bytes that are not UTF-8 arrive as
    surrogates: the server compares the bytes the client sends (it crashed at start, UnicodeEncodeError)."""
    import os

    key = os.fsdecode(b"k\xffey")
    app = create_app(ServerConfig(api_key=key), engine=FakeEngine(), card=ModelCard(name="fake-model"))
    with running(app) as base:
        assert httpx.get(f"{base}/v1/models", headers={"Authorization": b"Bearer k\xffey"}).status_code == 200
        assert httpx.get(f"{base}/v1/models", headers={"Authorization": b"Bearer key"}).status_code == 401
