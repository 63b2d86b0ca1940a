"""/v1/responses (OpenAI's Responses API) and /v1/messages (Anthropic's Messages API) end to end: `llmrun serve`
with the demo model (SmolLM2-135M), and the official `openai` and `anthropic` clients, unchanged. Edge cases
against the fake engine: tests/test_server_apis_fake.py."""

from __future__ import annotations

import json

import httpx
import pytest

from test_server_real import cli_server

pytestmark = pytest.mark.llama

WEATHER = {"type": "function", "name": "get_weather", "description": "Get the current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city"}},
                          "required": ["city"], "additionalProperties": False}}
YES_NO = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
          "required": ["answer"], "additionalProperties": False}
ASK = "What is the weather like in Paris today?"


@pytest.fixture(scope="module")
def server(demo_gguf):
    with cli_server(demo_gguf, "--parallel", "2", "--ctx", "2048") as (base, proc, lines):
        yield base


@pytest.fixture(scope="module")
def oai(server):
    import openai

    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def claude(server):
    import anthropic

    return anthropic.Anthropic(base_url=server, api_key="unused", max_retries=0)


# ---- /v1/responses -----------------------------------------------------------------------------------------

def test_responses_text(oai):
    r = oai.responses.create(model="demo", input="Say hello.", instructions="You are terse.", max_output_tokens=12,
                             temperature=0)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == "demo"
    assert r.status in ("completed", "incomplete") and r.output_text.strip()
    assert r.output[0].type == "message" and r.output[0].role == "assistant"
    assert 0 < r.usage.output_tokens <= 12 and r.usage.input_tokens > 5
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens" and r.usage.output_tokens == 12


def test_responses_stream_events_parse(oai):
    from openai.types.responses import ResponseCompletedEvent, ResponseTextDeltaEvent

    events = list(oai.responses.create(model="demo", input="Count to five.", max_output_tokens=10, temperature=0,
                                       stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          events[-1].type] and events[-1].type in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e for e in events if isinstance(e, ResponseTextDeltaEvent)]
    assert deltas and all(e.item_id == events[2].item.id for e in deltas)
    final = events[-1].response
    assert "".join(e.delta for e in deltas) == final.output_text == events[-4].text
    assert final.usage.output_tokens == 10 or isinstance(events[-1], ResponseCompletedEvent)
    # the same prompt, greedy, without streaming: the same text
    plain = oai.responses.create(model="demo", input="Count to five.", max_output_tokens=10, temperature=0)
    assert plain.output_text == final.output_text


def test_responses_json_schema_streamed_with_the_helper(oai):
    fmt = {"type": "json_schema", "name": "yes_no", "schema": YES_NO, "strict": True}
    with oai.responses.stream(model="demo", input="Is Paris in France? Answer in JSON.", text={"format": fmt},
                              max_output_tokens=40, temperature=0) as stream:
        texts = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.status == "completed" and json.loads(final.output_text)["answer"] in ("yes", "no")
    assert "".join(texts) == final.output_text


def test_responses_parse_with_a_pydantic_model(oai):
    from typing import Literal

    from pydantic import BaseModel

    class YesNo(BaseModel):
        answer: Literal["yes", "no"]

    r = oai.responses.parse(model="demo", input="Is the sky blue?", text_format=YesNo, max_output_tokens=40,
                            temperature=0)
    assert r.output_parsed is not None and r.output_parsed.answer in ("yes", "no")
    obj = oai.responses.create(model="demo", input="Give a JSON object.", text={"format": {"type": "json_object"}},
                               max_output_tokens=60, temperature=0)
    if obj.status == "completed":
        assert isinstance(json.loads(obj.output_text), dict)


def test_responses_tool_round_trip(oai):
    first = oai.responses.create(model="demo", input=ASK, tools=[WEATHER], tool_choice="required",
                                 parallel_tool_calls=False, max_output_tokens=60, temperature=0)
    calls = [o for o in first.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].call_id
    assert isinstance(json.loads(calls[0].arguments)["city"], str)
    result = {"type": "function_call_output", "call_id": calls[0].call_id, "output": "18 degrees and sunny"}
    # stateful: the call comes from the stored response
    after = oai.responses.create(model="demo", previous_response_id=first.id, input=[result], tools=[WEATHER],
                                 tool_choice="none", max_output_tokens=30, temperature=0)
    assert after.output_text.strip() and not [o for o in after.output if o.type == "function_call"]
    # stateless: the call sent back as an input item gives the same prompt
    items = [{"role": "user", "content": ASK}, calls[0].model_dump(exclude_none=True), result]
    again = oai.responses.create(model="demo", input=items, tools=[WEATHER], tool_choice="none",
                                 max_output_tokens=30, temperature=0)
    assert again.usage.input_tokens == after.usage.input_tokens
    assert again.output_text == after.output_text


def test_responses_streamed_tool_call(oai):
    with oai.responses.stream(model="demo", input=ASK, tools=[WEATHER], tool_choice="required",
                              parallel_tool_calls=False, max_output_tokens=60, temperature=0) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    call = next(o for o in final.output if o.type == "function_call")
    assert done.arguments == call.arguments and json.loads(call.arguments)["city"]
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert json.loads(deltas) == json.loads(call.arguments)


def test_previous_response_id_continues_and_unknown_is_404(oai):
    import openai

    first = oai.responses.create(model="demo", input="My name is Zed.", max_output_tokens=8, temperature=0)
    second = oai.responses.create(model="demo", previous_response_id=first.id, input="What is my name?",
                                  max_output_tokens=8, temperature=0)
    alone = oai.responses.create(model="demo", input="What is my name?", max_output_tokens=8, temperature=0)
    assert second.previous_response_id == first.id
    # the first turn and its answer are in the prompt
    assert second.usage.input_tokens >= alone.usage.input_tokens + first.usage.output_tokens + 5
    assert oai.responses.retrieve(first.id).output_text == first.output_text
    with pytest.raises(openai.NotFoundError) as e:
        oai.responses.create(model="demo", previous_response_id="resp_unknown", input="hi", max_output_tokens=4)
    assert e.value.body["param"] == "previous_response_id" and "resp_unknown" in e.value.body["message"]
    unstored = oai.responses.create(model="demo", input="hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(unstored.id)
    oai.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(first.id)


# ---- /v1/messages --------------------------------------------------------------------------------------------

GREEDY = {"temperature": 0}     # the anthropic client no longer has sampling parameters; Claude Code still sends them
CLAUDE_TOOL = {"name": "get_weather", "description": "Get the current weather in a city",
               "input_schema": WEATHER["parameters"]}


def test_messages_create(claude):
    m = claude.messages.create(model="demo", max_tokens=12, system="You are terse.", extra_body=GREEDY,
                               messages=[{"role": "user", "content": [{"type": "text", "text": "Say hello."}]}])
    assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg_") and m.model == "demo"
    assert m.content[0].type == "text" and m.content[0].text.strip()
    assert m.stop_reason in ("end_turn", "max_tokens") and m.stop_sequence is None
    assert 0 < m.usage.output_tokens <= 12 and m.usage.input_tokens + m.usage.cache_read_input_tokens > 5
    count = claude.messages.count_tokens(model="demo", system="You are terse.",
                                         messages=[{"role": "user", "content": "Say hello."}])
    assert count.input_tokens == m.usage.input_tokens + m.usage.cache_read_input_tokens


def test_messages_stream(claude, server):
    kwargs = dict(model="demo", max_tokens=16, extra_body=GREEDY, messages=[{"role": "user", "content": "Count to five."}])
    with claude.messages.stream(**kwargs) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.content[0].text == text
    assert final.stop_reason in ("end_turn", "max_tokens") and final.usage.output_tokens > 0
    assert final.usage.input_tokens + (final.usage.cache_read_input_tokens or 0) > 5
    assert claude.messages.create(**kwargs).content[0].text == text
    assert "".join(e.delta.text for e in claude.messages.create(**kwargs, stream=True)
                   if e.type == "content_block_delta") == text
    body = {"model": "demo", "max_tokens": 16, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": "Count to five."}]}
    with httpx.stream("POST", f"{server}/v1/messages", json=body, timeout=60) as r:   # the client hides pings
        raw = [line.removeprefix("event: ") for line in r.iter_lines() if line.startswith("event: ")]
    assert raw[:3] == ["message_start", "content_block_start", "ping"]
    assert raw[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(raw[3:-3]) == {"content_block_delta"}


def test_messages_stop_sequences(claude):
    ask = [{"role": "user", "content": "Write one sentence about the sea."}]
    free = claude.messages.create(model="demo", max_tokens=30, extra_body=GREEDY, messages=ask).content[0].text
    words = free.split()
    assert len(words) >= 4, free
    stop = " " + words[3]
    cut = claude.messages.create(model="demo", max_tokens=30, extra_body=GREEDY, messages=ask, stop_sequences=[stop])
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert cut.content[0].text == free[:free.index(stop)]
    with claude.messages.stream(model="demo", max_tokens=30, extra_body=GREEDY, messages=ask,
                                stop_sequences=["zzz-never", stop]) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == stop


def test_messages_tool_use_round_trip(claude):
    ask = [{"role": "user", "content": ASK}]
    first = claude.messages.create(model="demo", max_tokens=60, extra_body=GREEDY, messages=ask, tools=[CLAUDE_TOOL],
                                   tool_choice={"type": "any", "disable_parallel_tool_use": True})
    uses = [b for b in first.content if b.type == "tool_use"]
    assert first.stop_reason == "tool_use" and len(uses) == 1
    assert uses[0].name == "get_weather" and isinstance(uses[0].input["city"], str) and uses[0].id
    history = ask + [{"role": "assistant", "content": [b.model_dump() for b in first.content]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id,
                                                   "content": "18 degrees and sunny"}]}]
    final = claude.messages.create(model="demo", max_tokens=30, extra_body=GREEDY, messages=history, tools=[CLAUDE_TOOL],
                                   tool_choice={"type": "none"})
    assert final.stop_reason in ("end_turn", "max_tokens") and final.content[0].type == "text"
    alone = claude.messages.create(model="demo", max_tokens=1, messages=ask, tools=[CLAUDE_TOOL],
                                   tool_choice={"type": "none"})
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens > \
        alone.usage.input_tokens + alone.usage.cache_read_input_tokens + 15, "the call and its result are in the prompt"
    # streamed: the input_json_delta pieces give the same input
    with claude.messages.stream(model="demo", max_tokens=60, extra_body=GREEDY, messages=ask, tools=[CLAUDE_TOOL],
                                tool_choice={"type": "tool", "name": "get_weather"}) as stream:
        streamed = stream.get_final_message()
    block = next(b for b in streamed.content if b.type == "tool_use")
    assert streamed.stop_reason == "tool_use" and block.name == "get_weather" and block.input["city"]


def test_messages_errors_have_anthropic_shape(claude):
    import anthropic

    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model="demo", max_tokens=8, extra_body={"temperature": 1.5},
                               messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "invalid_request_error"
    assert "temperature" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError) as e:
        claude.messages.create(model="no-such-model", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.count_tokens(model="demo", messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}])
    assert "messages[0].content[0].type" in e.value.body["error"]["message"]


def test_messages_structured_output(claude):
    from typing import Literal

    from pydantic import BaseModel

    class YesNo(BaseModel):
        answer: Literal["yes", "no"]

    r = claude.messages.parse(model="demo", max_tokens=40, extra_body=GREEDY, output_format=YesNo,
                              messages=[{"role": "user", "content": "Is the sky blue?"}])
    assert r.stop_reason == "end_turn" and r.parsed_output is not None and r.parsed_output.answer in ("yes", "no")
