"""The corpus of bad requests in tests/bad_requests/: each file is a request and what must come back (status,
and the field named: OpenAI `error.param`, text in Ollama's `error`, or in Anthropic's `error.message`). After every one the server is still
healthy and answers a normal request. Runs against the fake engine (tests/fake_engine.py)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from fake_engine import FakeEngine
from live_server import running
from runner.server.config import ModelCard, ServerConfig
from runner.server.app import create_app

CORPUS = sorted((Path(__file__).parent / "bad_requests").glob("*.json"))


@pytest.fixture(scope="module")
def base():
    engine = FakeEngine(n_parallel=2)
    with running(create_app(ServerConfig(), engine=engine, card=ModelCard(name="fake-model"))) as url:
        yield url


def test_corpus_is_large():
    assert len(CORPUS) >= 240


@pytest.mark.parametrize("case", CORPUS, ids=lambda p: p.stem)
def test_bad_request(base, case):
    spec = json.loads(case.read_text())
    kwargs = {}
    if "raw" in spec:
        kwargs = {"content": spec["raw"].encode(), "headers": {"Content-Type": "application/json"}}
    elif "body" in spec:
        kwargs = {"json": spec["body"]}
    r = httpx.request(spec["method"], base + spec["path"], timeout=30, **kwargs)
    expect = spec["expect"]
    assert r.status_code == expect["status"], r.text
    body = r.json()
    if spec["path"].startswith("/api/"):
        assert isinstance(body["error"], str) and expect["ollama_error_contains"] in body["error"]
    elif spec["path"].startswith("/v1/messages"):      # Anthropic's shape
        assert set(body) == {"type", "error"} and body["type"] == "error", body
        assert set(body["error"]) == {"type", "message"} and body["error"]["message"]
        assert body["error"]["type"] == expect.get("anthropic_type", "invalid_request_error")
        if "param" in expect:
            assert expect["param"] in body["error"]["message"], body
    else:
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        if "param" in expect:
            assert error["param"] == expect["param"], error
            assert expect["param"] in error["message"] or expect["status"] == 404 or "code" in expect
        if "code" in expect:
            assert error["code"] == expect["code"]
    # still healthy, still answering
    assert httpx.get(f"{base}/health").status_code == 200
    ok = httpx.post(f"{base}/v1/chat/completions", json={"model": "fake-model", "max_tokens": 2,
                                                          "messages": [{"role": "user", "content": "hi"}]}, timeout=30)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "Hello from"
