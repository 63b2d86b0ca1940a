"""Tool calling in the engine layer, without a model: which format each real chat template gets (the templates
in tests/data/templates are the models' own, as llama.cpp keeps them in models/templates), how tools, calls and
results are rendered through them, the grammars, and the streaming parser, fed whole and one character at a
time. The same paths with the demo model generating are in test_engine_tools_model.py."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from runner.core.errors import UsageError
from runner.engine import tools as T
from runner.engine.template import ChatFormat
from runner.engine.types import ChatMessage, SamplingParams, Tool, ToolCall, Tools

TEMPLATES = Path(__file__).parent / "data" / "templates"
WEATHER = Tool("get_weather", "Get the weather", {"type": "object", "properties": {"city": {"type": "string"}},
                                                  "required": ["city"]})
TIME = Tool("get_time", "Local time", {"type": "object", "properties": {"zone": {"type": "string"}}})


def template(name: str) -> ChatFormat:
    return ChatFormat((TEMPLATES / name).read_text(), "<s>", "</s>")


@pytest.mark.parametrize("name, expected", [
    ("Qwen-Qwen2.5-7B-Instruct.jinja", "hermes"),
    ("NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja", "hermes"),
    ("meta-llama-Llama-3.1-8B-Instruct.jinja", "llama3"),
    ("meta-llama-Llama-3.2-3B-Instruct.jinja", "llama3"),
    ("mistralai-Mistral-Nemo-Instruct-2407.jinja", "mistral"),
    ("google-gemma-2-2b-it.jinja", "generic"),            # no tool support in the template
    ("meetkai-functionary-medium-v3.2.jinja", "generic"),  # its `>>>name` calls have no parser here (yet)
])
def test_format_detection(name, expected):
    f = template(name)
    assert T.detect(f.template, f.takes_tools).name == expected


def test_no_template_and_chatml_without_tools_are_generic():
    assert T.detect(None, False) is T.GENERIC
    smol = ChatFormat("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
    assert not smol.takes_tools and T.detect(smol.template, smol.takes_tools) is T.GENERIC


HISTORY = [ChatMessage("user", "Weather in Paris?"),
           ChatMessage("assistant", "", tool_calls=(ToolCall("call_abc", "get_weather", '{"city": "Paris"}'),)),
           ChatMessage("tool", "18C and sunny", tool_call_id="call_abc")]


def render(name: str, messages, tools: Tools | None) -> str:
    f = template(name)
    turn = T.prepare(messages, SamplingParams(), tools, T.detect(f.template, f.takes_tools))
    return f.render(turn.messages, tools=turn.template_tools)


def test_qwen_renders_tools_calls_and_results():
    text = render("Qwen-Qwen2.5-7B-Instruct.jinja", HISTORY, Tools((WEATHER,)))
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<tool_response>\n18C and sunny\n</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_llama3_renders_tools_and_call_as_parameters():
    text = render("meta-llama-Llama-3.2-3B-Instruct.jinja", HISTORY, Tools((WEATHER,)))
    assert "Environment: ipython" in text and '"name": "get_weather"' in text
    assert '{"name": "get_weather", "parameters": {"city": "Paris"}}' in text
    # the template writes a result with tojson (a string is "iterable" to Jinja): as transformers renders it
    assert '<|start_header_id|>ipython<|end_header_id|>\n\n"18C and sunny"' in text


def test_mistral_gets_nine_character_ids_for_any_client_ids():
    text = render("mistralai-Mistral-Nemo-Instruct-2407.jinja", HISTORY, Tools((WEATHER,)))
    call_id = T._short_id("call_abc", 9)
    assert f'"id": "{call_id}"' in text and f'"call_id": "{call_id}"' in text    # the same id for call and result
    assert "[AVAILABLE_TOOLS]" in text


def test_generic_describes_tools_and_renders_history_as_the_envelope():
    text = render("google-gemma-2-2b-it.jinja", HISTORY, Tools((WEATHER,), choice="required"))
    assert '"name": "get_weather"' in text and '{"tool_calls": [{"name": "<function name>"' in text
    assert '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}' in text
    assert '{"tool_response": {"name": "get_weather", "id": "call_abc", "content": "18C and sunny"}}' in text
    assert "Call one of the functions now." in text


def test_tool_choice_none_describes_no_tools_but_keeps_history():
    text = render("Qwen-Qwen2.5-7B-Instruct.jinja", HISTORY, Tools((WEATHER,), choice="none"))
    assert "<tools>" not in text and "<tool_call>" in text


def test_ollama_history_without_ids_pairs_results_with_calls():
    msgs = [ChatMessage("user", "x"),
            ChatMessage("assistant", "", tool_calls=(ToolCall("", "get_weather", "{}"), ToolCall("", "get_time", "{}"))),
            ChatMessage("tool", "noon", name="get_time"), ChatMessage("tool", "sunny")]
    out = T.normalize(msgs, T.GENERIC)
    ids = [c.id for c in out[1].tool_calls]
    assert all(ids) and out[2].tool_call_id == ids[1] and out[3].tool_call_id == ids[0]
    assert out[3].name == "get_weather"


def test_checks_name_the_field():
    with pytest.raises(UsageError) as e:
        T.check(Tools((WEATHER, WEATHER)), [])
    assert e.value.field == "tools[1].function.name"
    with pytest.raises(UsageError) as e:
        T.check(Tools((Tool("f", "", {"type": "array"}),)), [])
    assert e.value.field == "tools[0].function.parameters"
    with pytest.raises(UsageError) as e:
        T.check(Tools((WEATHER,), choice="function", function="nope"), [])
    assert e.value.field == "tool_choice"
    with pytest.raises(UsageError) as e:
        T.check(None, HISTORY[:2] + [ChatMessage("tool", "x", tool_call_id="call_zzz")])
    assert e.value.field == "messages[2].tool_call_id"
    T.check(Tools((WEATHER, TIME)), HISTORY)


@pytest.mark.parametrize("fmt", [T.GENERIC, T.HERMES, T.LLAMA3, T.MISTRAL], ids=lambda f: f.name)
def test_grammars(fmt):
    forced = T.grammar(fmt, Tools((WEATHER, TIME), choice="required"))
    assert forced is not None and forced.triggers == ()
    assert "root ::= " in forced.text and '"\\"get_weather\\""' in forced.text
    assert 'char ::= [^"\\\\\\x7F\\x00-\\x1F]' in forced.text, "JSON strings exclude control characters"
    lazy = T.grammar(fmt, Tools((WEATHER,)))
    assert lazy is not None and lazy.triggers == (fmt.trigger,)
    named = T.grammar(fmt, Tools((WEATHER, TIME), choice="function", function="get_time"))
    assert named is not None and "get_weather" not in named.text
    assert T.grammar(fmt, Tools((WEATHER,), choice="none")) is None


def test_parallel_calls_in_the_grammar_only_when_allowed():
    assert ")*" in T.grammar(T.HERMES, Tools((WEATHER,), choice="required")).text
    assert ")*" not in T.grammar(T.HERMES, Tools((WEATHER,), choice="required", parallel=False)).text.split(
        "root ::=")[1]
    assert ")*" not in T.grammar(T.LLAMA3, Tools((WEATHER,), choice="required")).text.split("root ::=")[1]


def test_arguments_defs_move_up_so_refs_resolve():
    nested = Tool("book", "", {"type": "object", "properties": {"who": {"$ref": "#/$defs/Person"}},
                               "$defs": {"Person": {"type": "object", "properties": {"name": {"type": "string"}}}}})
    assert "name" in T.grammar(T.GENERIC, Tools((nested,), choice="required")).text


# ---- the streaming parser ---------------------------------------------------------------------------------------

OUTPUTS = {
    "generic": (T.GENERIC, '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}, '
                           '{"name": "get_time", "arguments": {"zone": "CET"}}]}', ""),
    "hermes": (T.HERMES, 'Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                         '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>',
               "Let me check. "),
    "llama3": (T.LLAMA3, '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}', ""),
    "mistral": (T.MISTRAL, '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "a1b2c3d4e"},'
                           ' {"name": "get_time", "arguments": {"zone": "CET"}}]', ""),
}


def parse(fmt: T.ToolFormat, text: str, step: int):
    stream = fmt.stream()
    out, pieces = [], []
    for i in range(0, len(text), step):
        t, p = stream.feed(text[i:i + step])
        out.append(t)
        pieces += p
    t, p = stream.close()
    return "".join(out) + t, stream.tool_calls, pieces


@pytest.mark.parametrize("case", OUTPUTS, ids=str)
def test_parser_whole_and_char_by_char_agree(case):
    fmt, text, content = OUTPUTS[case]
    whole = parse(fmt, text, len(text))
    for step in (1, 2, 7):
        again = parse(fmt, text, step)
        assert again[0] == whole[0] == content
        assert [(c.name, c.arguments) for c in again[1]] == [(c.name, c.arguments) for c in whole[1]]
    names = [c.name for c in whole[1]]
    assert names[0] == "get_weather" and json.loads(whole[1][0].arguments) == {"city": "Paris"}
    if case != "llama3":
        assert names == ["get_weather", "get_time"]
    pieces = parse(fmt, text, 1)[2]
    heads = [p for p in pieces if p.name]
    assert [p.name for p in heads] == names and all(p.id for p in heads)
    for i, call in enumerate(parse(fmt, text, 1)[1]):    # the pieces join into each call's arguments
        assert "".join(p.arguments for p in pieces if p.index == i) == call.arguments


def test_mistral_ids_are_nine_alphanumerics():
    ids = {T.MISTRAL.new_id() for _ in range(20)}
    assert len(ids) == 20 and all(len(i) == 9 and i.isalnum() for i in ids)


@pytest.mark.parametrize("fmt, text", [
    (T.GENERIC, "The weather is {sunny} today."),
    (T.HERMES, "I cannot use <tool_ca... tools here."),
    (T.LLAMA3, "  Hello there"),
    (T.GENERIC, '{"not": "a call"}'),
])
def test_text_is_text(fmt, text):
    for step in (1, 3, len(text)):
        got, calls, _ = parse(fmt, text, step)
        assert got == text and calls == ()


def test_truncated_call_keeps_what_it_has():
    got, calls, _ = parse(T.GENERIC, '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Par', 4)
    assert got == "" and calls[0].name == "get_weather" and calls[0].arguments == '{"city": "Par'


def test_arguments_given_as_a_json_string():
    got, calls, _ = parse(T.HERMES, '<tool_call>\n{"name": "f", "arguments": "{\\"a\\": 1}"}\n</tool_call>', 3)
    assert calls[0].arguments == '{"a": 1}'


def test_ids_are_unique():
    ids = [T.GENERIC.new_id() for _ in range(100)]
    assert len(set(ids)) == 100 and all(i.startswith("call_") for i in ids)
    assert list(itertools.islice(ids, 1))
