"""Tool calling and the parameters real clients send, end to end: `llmrun serve` with the demo model
(SmolLM2-135M, whose template has no tool support, so the generic format and its grammars are what runs),
driven by the official `openai` and `ollama` clients and by LangChain (`langchain-openai`, `langchain-ollama`).

A 135M model rarely chooses a tool by itself: with `auto` (Ollama's only mode) the prompts below ask for the
call in words, at temperature 0, and the model then starts the JSON call, which the lazy grammar completes.
With `required` or a named function the grammar makes the call whatever the model would have said."""

from __future__ import annotations

import json

import httpx
import pytest

from test_server_real import cli_server

pytestmark = pytest.mark.llama

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "The city"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]


def get_weather(city: str) -> str:
    """Get the current weather for a city.

    Args:
        city: The name of the city
    """
    return f"It is sunny in {city}."


@pytest.fixture(scope="module")
def server(demo_gguf):
    with cli_server(demo_gguf, "--parallel", "4", "--ctx", "2048") as (base, proc, lines):
        yield base


@pytest.fixture(scope="module")
def oai(server):
    import openai

    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def _valid(arguments: str, tool: dict) -> dict:
    import jsonschema

    args = json.loads(arguments)
    jsonschema.validate(args, tool["function"]["parameters"])
    return args


# ---- OpenAI ---------------------------------------------------------------------------------------------------

def test_required_gives_one_valid_call(oai):
    r = oai.chat.completions.create(model="demo", messages=ASK, tools=[WEATHER], tool_choice="required",
                                    parallel_tool_calls=False, temperature=0, max_tokens=80)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert _valid(call.function.arguments, WEATHER)["city"]


def test_named_function_is_called(oai):
    r = oai.chat.completions.create(model="demo", messages=ASK, tools=[WEATHER, TIME], temperature=0,
                                    tool_choice={"type": "function", "function": {"name": "get_time"}},
                                    max_tokens=80)
    calls = r.choices[0].message.tool_calls
    assert calls and {c.function.name for c in calls} == {"get_time"}
    for c in calls:
        _valid(c.function.arguments, TIME)


def test_auto_without_need_answers_in_text(oai):
    r = oai.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Who wrote Hamlet?"}],
                                    tools=[WEATHER], tool_choice="auto", temperature=0, max_tokens=40)
    msg = r.choices[0].message
    assert msg.tool_calls is None and msg.content and msg.content.strip()
    assert r.choices[0].finish_reason in ("stop", "length")


def test_round_trip_call_result_answer(oai):
    first = oai.chat.completions.create(model="demo", messages=ASK, tools=[WEATHER], tool_choice="required",
                                        parallel_tool_calls=False, temperature=0, max_tokens=80)
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"}]
    # tool_choice "none" asks for the answer now (with `auto` a 135M model tends to imitate its own call)
    final = oai.chat.completions.create(model="demo", messages=history, tools=[WEATHER], tool_choice="none",
                                        temperature=0, max_tokens=60)
    msg = final.choices[0].message
    assert msg.content and msg.content.strip() and not msg.tool_calls
    alone = oai.chat.completions.create(model="demo", messages=ASK, tools=[WEATHER], tool_choice="none",
                                        max_tokens=1)
    assert final.usage.prompt_tokens > alone.usage.prompt_tokens + 15, "the call and its result are in the prompt"


def test_streamed_calls_reassemble_to_the_same_calls(oai):
    kwargs = dict(model="demo", messages=ASK, tools=[WEATHER, TIME], tool_choice="required", temperature=0,
                  max_tokens=120, seed=3)
    whole = oai.chat.completions.create(**kwargs).choices[0].message.tool_calls
    chunks = list(oai.chat.completions.create(stream=True, **kwargs))
    pieces = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(pieces) > len(whole), "the arguments arrive in several pieces"
    with oai.chat.completions.stream(**kwargs) as stream:   # the client's own reassembly
        final = stream.get_final_completion()
    assert [(c.id and True, c.function.name, c.function.arguments) for c in final.choices[0].message.tool_calls] \
        == [(True, c.function.name, c.function.arguments) for c in whole]
    assert final.choices[0].finish_reason == "tool_calls"


def test_parallel_tool_calls(oai):
    ask = [{"role": "user", "content": "What is the weather in Paris and in Tokyo?"}]
    many = oai.chat.completions.create(model="demo", messages=ask, tools=[WEATHER], tool_choice="required",
                                       temperature=0, max_tokens=150)
    one = oai.chat.completions.create(model="demo", messages=ask, tools=[WEATHER], tool_choice="required",
                                      parallel_tool_calls=False, temperature=0, max_tokens=150)
    assert len(many.choices[0].message.tool_calls) >= 2
    assert len(one.choices[0].message.tool_calls) == 1
    for c in many.choices[0].message.tool_calls + one.choices[0].message.tool_calls:
        _valid(c.function.arguments, WEATHER)


def test_n_choices(oai):
    r = oai.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Tell me a joke."}],
                                    n=3, temperature=1.0, seed=7, max_tokens=16)
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.message.content for c in r.choices]
    assert all(texts) and len(set(texts)) > 1, "each choice draws from its own seed stream"
    one = oai.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Tell me a joke."}],
                                      temperature=1.0, seed=7, max_tokens=16)
    assert one.choices[0].message.content == texts[0], "choice 0 is what n=1 gives with the same seed"
    assert r.usage.prompt_tokens == one.usage.prompt_tokens, "the prompt is counted (and evaluated) once"
    assert r.usage.completion_tokens > one.usage.completion_tokens, "the choices' tokens are summed"


def test_logprobs_top5(oai):
    r = oai.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Say hello."}],
                                    temperature=0, max_tokens=8, logprobs=True, top_logprobs=5,
                                    extra_body={"repeat_penalty": 1.0})   # the logprobs are the raw model's
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        tops = [a.logprob for a in t.top_logprobs]
        assert len(tops) == 5 and all(lp <= 0 for lp in tops) and tops == sorted(tops, reverse=True)
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == t.logprob, "greedy = top"
        assert bytes(t.bytes).decode("utf-8", "replace") == t.token


def test_logprobs_streamed_match(oai):
    kwargs = dict(model="demo", messages=[{"role": "user", "content": "Count to five."}], temperature=0,
                  max_tokens=10, logprobs=True, top_logprobs=2)
    whole = oai.chat.completions.create(**kwargs).choices[0].logprobs.content
    streamed = [t for c in oai.chat.completions.create(stream=True, **kwargs)
                if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in whole]


def test_completions_logprobs_and_n(oai):
    r = oai.completions.create(model="demo", prompt="The capital of France is", max_tokens=5, temperature=0,
                               logprobs=3, n=2)
    assert len(r.choices) == 2
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert all(x <= 0 for x in lp.token_logprobs) and all(len(d) <= 3 for d in lp.top_logprobs)


def test_bias_and_penalties_change_the_answer(oai, demo_gguf):
    import llama_cpp

    base = dict(model="demo", temperature=0, max_tokens=8)
    hello = [{"role": "user", "content": "Say hello."}]
    plain = oai.chat.completions.create(messages=hello, logprobs=True, **base)
    first = bytes(plain.choices[0].logprobs.content[0].bytes)
    vocab = llama_cpp.Llama(str(demo_gguf), vocab_only=True, verbose=False)
    ids = [t for t in range(vocab.n_vocab()) if vocab.detokenize([t]) == first]
    assert ids
    banned = oai.chat.completions.create(messages=hello, logit_bias={str(i): -100 for i in ids}, **base)
    assert banned.choices[0].message.content and not banned.choices[0].message.content.encode().startswith(first)
    cats = [{"role": "user", "content": "Write the word cat twenty times."}]
    kwargs = dict(base, max_tokens=40, extra_body={"repeat_penalty": 1.0})
    free = oai.chat.completions.create(messages=cats, **kwargs).choices[0].message.content
    penalised = oai.chat.completions.create(messages=cats, frequency_penalty=1.5, presence_penalty=1.5,
                                            **kwargs).choices[0].message.content
    assert penalised != free and free.lower().count("cat") > penalised.lower().count("cat")


def test_unknown_fields_are_accepted_and_named(server):
    r = httpx.post(f"{server}/v1/chat/completions", timeout=60, json={
        "model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
        "reasoning_effort": "low", "prediction": {"type": "content", "content": "x"}, "cache_prompt": True,
        "stream_options": {"include_usage": True, "include_obfuscation": False}, "stream": True,
        "web_search_options": {}, "temprature": 0.5})
    assert r.status_code == 200
    named = set(r.headers["x-llmrun-ignored-fields"].split(", "))
    assert named == {"reasoning_effort", "prediction", "cache_prompt", "stream_options.include_obfuscation",
                     "web_search_options", "temprature"}
    ok = httpx.post(f"{server}/v1/chat/completions", timeout=60, json={
        "model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "top_k": 5, "min_p": 0.1,
        "typical_p": 0.9, "repeat_penalty": 1.2, "mirostat": 2, "mirostat_tau": 4.0,
        "chat_template_kwargs": {"enable_thinking": False}})
    assert ok.status_code == 200 and "x-llmrun-ignored-fields" not in ok.headers


def test_json_schema_without_name(oai):
    schema = {"type": "object", "properties": {"colour": {"type": "string", "maxLength": 10}},
              "required": ["colour"], "additionalProperties": False}
    r = oai.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Name a colour."}],
                                    temperature=0, max_tokens=40,
                                    response_format={"type": "json_schema", "json_schema": {"schema": schema}})
    assert set(json.loads(r.choices[0].message.content)) == {"colour"}


def test_legacy_functions(oai):
    r = oai.chat.completions.create(model="demo", messages=ASK, functions=[WEATHER["function"]],
                                    function_call={"name": "get_weather"}, temperature=0, max_tokens=80)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "function_call" and msg.function_call.name == "get_weather"
    _valid(msg.function_call.arguments, WEATHER)


# ---- Ollama ---------------------------------------------------------------------------------------------------

def test_ollama_tools_from_a_python_function(server):
    import ollama

    client = ollama.Client(host=server)
    ask = [{"role": "user", "content": "Please call get_weather with city Paris."}]
    r = client.chat(model="demo", messages=ask, tools=[get_weather], options={"temperature": 0, "num_predict": 60})
    calls = r.message.tool_calls
    assert calls and calls[0].function.name == "get_weather" and calls[0].function.arguments["city"]
    assert r.done_reason == "stop"
    parts = list(client.chat(model="demo", messages=ask, tools=[get_weather], stream=True,
                             options={"temperature": 0, "num_predict": 60}))
    streamed = [c for p in parts for c in (p.message.tool_calls or [])]
    assert [(c.function.name, dict(c.function.arguments)) for c in streamed] == \
        [(c.function.name, dict(c.function.arguments)) for c in calls]
    assert parts[-1].done
    # the result goes back as a tool message (Ollama's history has no ids) and the model answers
    history = ask + [r.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_name": "get_weather", "content": get_weather("Paris")}]
    final = client.chat(model="demo", messages=history, tools=[get_weather],
                        options={"temperature": 0, "num_predict": 40})
    assert final.message.content or final.message.tool_calls


def test_ollama_options_num_ctx(server):
    import ollama

    client = ollama.Client(host=server)
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="demo", messages=[{"role": "user", "content": "hi"}], options={"num_ctx": 100000})
    assert e.value.status_code == 400 and "2048" in str(e.value)
    r = client.chat(model="demo", messages=[{"role": "user", "content": "hi"}],
                    options={"num_ctx": 1024, "num_predict": 4, "typical_p": 0.9, "presence_penalty": 0.5,
                             "num_gpu": 0, "num_thread": 2})
    assert r.done


# ---- LangChain ------------------------------------------------------------------------------------------------

def _person_model():
    from pydantic import BaseModel, Field

    class Person(BaseModel):
        """A person."""

        name: str = Field(description="The person's first name", max_length=20)
        age: int = Field(description="Age in years", ge=0, le=120)

    return Person


def test_langchain_openai_bind_tools_and_structured_output(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=f"{server}/v1", api_key="unused", model="demo", temperature=0, max_tokens=80)
    msg = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("What is the weather in Paris?")
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "get_weather" and msg.tool_calls[0]["args"]["city"]
    Person = _person_model()
    for method in ("function_calling", "json_schema"):
        p = llm.with_structured_output(Person, method=method).invoke("Invent a person.")
        assert isinstance(p, Person) and p.name and 0 <= p.age <= 120


def test_langchain_ollama_bind_tools_and_structured_output(server):
    from langchain_ollama import ChatOllama

    llm = ChatOllama(base_url=server, model="demo", temperature=0, num_predict=80)
    msg = llm.bind_tools([get_weather]).invoke("Please call get_weather with city Paris.")
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "get_weather" and msg.tool_calls[0]["args"]["city"]
    Person = _person_model()
    p = llm.with_structured_output(Person).invoke("Invent a person.")
    assert isinstance(p, Person) and p.name and 0 <= p.age <= 120
