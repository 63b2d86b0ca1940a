"""/v1/responses and /v1/messages against the FAKE engine (tests/fake_engine.py): the API key (Bearer, and
Anthropic's x-api-key), the body limit, deterministic tool calls through the official clients' stream helpers,
a generation that fails mid-stream, the stored responses' bounds, and metrics labels. The real model:
tests/test_server_apis.py."""

from __future__ import annotations

import contextlib

import httpx
import pytest

from fake_engine import FAIL_PROMPT, FakeEngine
from live_server import running
from runner.engine.types import ChatMessage
from runner.server.app import create_app
from runner.server.config import ModelCard, ServerConfig
from runner.server.response_store import ResponseStore

TOOL = {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}}}}
ROUTES = {
    "/v1/responses": {"model": "fake-model", "input": "hi", "max_output_tokens": 2},
    "/v1/messages": {"model": "fake-model", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]},
    "/v1/messages/count_tokens": {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]},
}


@contextlib.contextmanager
def serve(config: ServerConfig | None = None, **engine_kwargs):
    engine = FakeEngine(**engine_kwargs)
    with running(create_app(config or ServerConfig(), engine=engine, card=ModelCard(name="fake-model"))) as base:
        yield base


@pytest.fixture(scope="module")
def base():
    with serve() as b:
        yield b


@pytest.mark.parametrize("path", ROUTES)
def test_api_key_and_body_limit_apply(path):
    with serve(ServerConfig(api_key="s3cret", max_body_bytes=2000)) as base:
        assert httpx.post(base + path, json=ROUTES[path]).status_code == 401
        ok = httpx.post(base + path, json=ROUTES[path], headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200, ok.text
        big = dict(ROUTES[path], model="x" * 3000)
        r = httpx.post(base + path, json=big, headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 413
        if path.startswith("/v1/messages"):
            assert r.json() == {"type": "error", "error": {"type": "request_too_large", "message": r.json()["error"][
                "message"]}}
        else:
            assert r.json()["error"]["code"] == "request_too_large"
        metrics = httpx.get(f"{base}/metrics", headers={"Authorization": "Bearer s3cret"}).text
        assert f'endpoint="{path}",status="200"' in metrics and f'endpoint="{path}",status="413"' in metrics


def test_anthropic_client_sends_x_api_key():
    import anthropic

    with serve(ServerConfig(api_key="s3cret")) as base:
        good = anthropic.Anthropic(base_url=base, api_key="s3cret", max_retries=0)
        assert good.messages.create(model="fake-model", max_tokens=2, messages=[{"role": "user", "content": "hi"}]
                                    ).content[0].text == "Hello from"
        assert good.messages.count_tokens(model="fake-model", messages=[{"role": "user", "content": "a b"}]
                                          ).input_tokens > 0
        bad = anthropic.Anthropic(base_url=base, api_key="wrong", max_retries=0)
        with pytest.raises(anthropic.AuthenticationError) as e:
            bad.messages.create(model="fake-model", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
        assert e.value.body["error"]["type"] == "authentication_error" and "x-api-key" in e.value.body["error"]["message"]
        # x-api-key is Anthropic's header: the OpenAI routes still want Bearer
        r = httpx.post(f"{base}/v1/responses", json=ROUTES["/v1/responses"], headers={"x-api-key": "s3cret"})
        assert r.status_code == 401


def test_responses_streamed_tool_call_with_the_helper(base):
    import openai

    oai = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    with oai.responses.stream(model="fake-model", input="weather?", tools=[TOOL], tool_choice="required") as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     *["response.function_call_arguments.delta"] * 3, "response.function_call_arguments.done",
                     "response.output_item.done", "response.completed"]
    (call,) = final.output
    assert call.type == "function_call" and call.name == "get_weather" and call.arguments == '{"fake": true}'
    assert call.call_id == "call_fake0" and call.status == "completed"
    # the call's result continues the stored response
    after = oai.responses.create(model="fake-model", previous_response_id=final.id, input=[
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}], max_output_tokens=3)
    assert after.output_text == "Hello from the" and after.status == "incomplete"


def test_previous_response_id_carries_the_conversation():
    import openai

    engine = FakeEngine()
    with running(create_app(ServerConfig(), engine=engine, card=ModelCard(name="fake-model"))) as base:
        oai = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        first = oai.responses.create(model="fake-model", input="one two three", instructions="be brief",
                                     max_output_tokens=4)
        oai.responses.create(model="fake-model", previous_response_id=first.id, input="four", instructions="new",
                             max_output_tokens=4)
    # the first input and its answer come back; the first instructions do not (OpenAI's rule), the new ones do
    assert engine.submitted[-1][1] == [ChatMessage("system", "new"), ChatMessage("user", "one two three"),
                                       ChatMessage("assistant", first.output_text), ChatMessage("user", "four")]
    assert engine.submitted[-2][1] == [ChatMessage("system", "be brief"), ChatMessage("user", "one two three")]


def test_messages_failure_mid_stream_is_an_error_event(base):
    body = {"model": "fake-model", "max_tokens": 10, "stream": True,
            "messages": [{"role": "user", "content": FAIL_PROMPT}]}
    with httpx.stream("POST", f"{base}/v1/messages", json=body, timeout=30) as r:
        lines = list(r.iter_lines())
    assert "event: error" in lines and "event: message_stop" not in lines
    body = {"model": "fake-model", "input": FAIL_PROMPT, "stream": True}
    with httpx.stream("POST", f"{base}/v1/responses", json=body, timeout=30) as r:
        lines = list(r.iter_lines())
    assert "event: error" in lines and "event: response.completed" not in lines


def test_messages_ignored_fields_are_named(base):
    r = httpx.post(f"{base}/v1/messages", json={**ROUTES["/v1/messages"], "metadata": {"user_id": "u"},
                                                "thinking": {"type": "enabled", "budget_tokens": 1024}},
                   headers={"anthropic-version": "2023-06-01"})
    assert r.status_code == 200 and r.json()["stop_reason"] == "max_tokens"
    assert set(r.headers["X-Llmrun-Ignored-Fields"].split(", ")) == {"metadata", "thinking"}


def test_response_store_is_bounded_by_count_and_bytes():
    store = ResponseStore(max_items=2, max_bytes=10_000)
    turn = (ChatMessage("user", "hi"),)
    for rid in ("a", "b", "c"):
        assert store.put(rid, {"id": rid}, turn)
    assert len(store) == 2 and store.get("a") is None and store.get("b") is not None
    store.put("d", {"id": "d"}, turn)          # "b" was used last: "c" goes
    assert store.get("c") is None and store.get("b") is not None
    big = (ChatMessage("user", "x" * 6000),)
    assert store.put("e", {"id": "e"}, big) and len(store) == 2 and store.bytes <= 10_000
    assert store.put("f", {"id": "f"}, big) and store.get("e") is None and store.bytes <= 10_000
    assert not store.put("g", {"id": "g"}, (ChatMessage("user", "x" * 20_000),)) and store.get("g") is None
    assert store.delete("f") and not store.delete("f") and store.bytes == sum(
        store.get(k).size for k in ("b", "d") if store.get(k) is not None)
