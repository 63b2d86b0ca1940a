"""Tool calling, per chat-template family: how the prompt describes tools and renders past calls, the grammar
that makes calls valid, and how the reply is split into text and calls (runner.engine.tool_stream).

Families, recognised from the GGUF's chat template as llama.cpp's server recognises them:

| format  | template has            | a call looks like                                            |
|---------|-------------------------|--------------------------------------------------------------|
| hermes  | `<tool_call>`           | `<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>` (Hermes, Qwen 2.5/3) |
| llama3  | `<|start_header_id|>` + tools | `{"name": "f", "parameters": {...}}`, maybe after `<|python_tag|>` (Llama 3.1-3.3) |
| mistral | `[TOOL_CALLS]`          | `[TOOL_CALLS][{"name": "f", "arguments": {...}}, ...]`       |
| generic | anything else           | `{"tool_calls": [{"name": "f", "arguments": {...}}]}` (the reply is only this object) |

The first three templates take `tools` and render tools, calls and results themselves. The generic format
serves templates without tool support (SmolLM2, Llama 2, ...): the tool list and the envelope go into the
system prompt, past calls are rendered as that envelope and results as user turns.

Grammars (llama.cpp's grammar sampler): with `required` or a named function the whole reply must be calls
matching the tools' schemas; with `auto` the grammar is lazy, and takes over from the moment the reply
starts a call (a trigger pattern), so text stays free and calls stay valid."""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

from runner.core.errors import UsageError
from runner.engine.grammar import literal, rules_for
from runner.engine.tool_stream import ToolStream
from runner.engine.types import ChatMessage, SamplingParams, Tool, ToolCall, Tools

NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_ALNUM = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class ToolFormat:
    """One family's rules, as data."""

    name: str
    native: bool                     # the template takes `tools` and renders calls and results itself
    markers: tuple[str, ...]         # text that opens the calls
    at_start: bool                   # markers count only at the start of the reply (after whitespace)
    depth: int                       # JSON nesting of each call object after the marker
    open: str                        # the grammar: open call (sep call)* close
    sep: str
    close: str
    trigger: str                     # llama.cpp lazy-grammar trigger (std::regex; the grammar starts at group 1)
    args_key: str = "arguments"
    prefix: str = ""                 # an optional literal before `open` (Llama's <|python_tag|>)
    parallel: bool = True            # the family can write several calls in one turn
    preserved: tuple[str, ...] = ()  # special tokens the reply must show as text
    id_length: int = 0               # > 0: call ids of exactly this many letters and digits

    def new_id(self) -> str:
        if self.id_length:
            return _short_id(uuid.uuid4().hex, self.id_length)
        return "call_" + uuid.uuid4().hex[:24]

    def stream(self) -> ToolStream:
        return ToolStream(self.markers, at_start=self.at_start, depth=self.depth, new_id=self.new_id)


GENERIC = ToolFormat("generic", native=False, markers=("{",), at_start=True, depth=2,
                     open='{"tool_calls": [', sep=", ", close="]}", trigger=r"^\s*(\{)[\s\S]*$")
HERMES = ToolFormat("hermes", native=True, markers=("<tool_call>",), at_start=False, depth=0,
                    open="<tool_call>\n", sep="\n</tool_call>\n<tool_call>\n", close="\n</tool_call>",
                    trigger=r"(<tool_call>)[\s\S]*")
LLAMA3 = ToolFormat("llama3", native=True, markers=("{", "<|python_tag|>"), at_start=True, depth=0,
                    open="", sep="", close="", trigger=r"^\s*(\{|<\|python_tag\|>)[\s\S]*$",
                    args_key="parameters", prefix="<|python_tag|>", parallel=False, preserved=("<|python_tag|>",))
MISTRAL = ToolFormat("mistral", native=True, markers=("[TOOL_CALLS]",), at_start=False, depth=1,
                     open="[TOOL_CALLS][", sep=", ", close="]", trigger=r"(\[TOOL_CALLS\])[\s\S]*",
                     preserved=("[TOOL_CALLS]",), id_length=9)


def detect(template: str | None, takes_tools: bool) -> ToolFormat:
    """The family of a chat template (`takes_tools`: the template uses a `tools` variable)."""
    if not template or not takes_tools:
        return GENERIC
    if "<tool_call>" in template:
        return HERMES
    if "[TOOL_CALLS]" in template:
        return MISTRAL
    if "<|start_header_id|>" in template and ("ipython" in template or '"parameters"' in template):
        return LLAMA3
    return GENERIC


# ------------------------------------------------------------------------------------------------ validation

def check(tools: Tools | None, messages: Sequence[ChatMessage]) -> None:
    """Tool definitions and the conversation's calls make sense; else UsageError naming the field."""
    if tools is not None:
        seen: dict[str, int] = {}
        for i, t in enumerate(tools.functions):
            where = f"tools[{i}].function"
            if not NAME_RE.match(t.name):
                raise UsageError(f"{where}.name {t.name!r} is not a valid function name",
                                 hint="1 to 64 letters, digits, underscores, dots or dashes", field=f"{where}.name")
            if t.name in seen:
                raise UsageError(f"{where}.name: {t.name!r} is defined twice (also tools[{seen[t.name]}])",
                                 hint="give every function its own name", field=f"{where}.name")
            seen[t.name] = i
            p = t.parameters
            if not isinstance(p, Mapping) or p.get("type", "object") != "object":
                raise UsageError(f"{where}.parameters must be a JSON schema of an object",
                                 hint='e.g. {"type": "object", "properties": {"city": {"type": "string"}}}',
                                 field=f"{where}.parameters")
            rules_for([(_call_schema(t, "arguments"), "call", f"{where}.parameters")])   # compiles, or says why
        if tools.choice == "function" and tools.function not in seen:
            raise UsageError(f"tool_choice names the function {tools.function!r}, which is not in tools",
                             hint="tools: " + (", ".join(seen) or "none"), field="tool_choice")
        if tools.choice in ("required", "function") and not tools.functions:
            raise UsageError(f"tool_choice {tools.choice!r} needs at least one tool", field="tool_choice")
    known: set[str] = set()
    for i, m in enumerate(messages):
        for j, c in enumerate(m.tool_calls):
            if not c.name:
                raise UsageError(f"messages[{i}].tool_calls[{j}].function.name is empty",
                                 field=f"messages[{i}].tool_calls[{j}].function.name")
            if c.id:
                known.add(c.id)
        if m.role == "tool" and m.tool_call_id is not None and m.tool_call_id not in known:
            raise UsageError(f"messages[{i}].tool_call_id {m.tool_call_id!r} answers no earlier tool call",
                             hint="a tool message must follow the assistant message whose tool_calls has that id",
                             field=f"messages[{i}].tool_call_id")


# ------------------------------------------------------------------------------------------------ prompt

@dataclass(frozen=True)
class Turn:
    """A chat turn ready to render: the messages as the template gets them, the tools for a template that takes
    them, the sampling values with the call grammar, and the format whose parser reads the reply (None when the
    model may call nothing)."""

    messages: list[ChatMessage]
    params: SamplingParams
    template_tools: list[dict[str, Any]] | None
    parser: ToolFormat | None


def prepare(messages: Sequence[ChatMessage], params: SamplingParams, tools: Tools | None,
            fmt: ToolFormat) -> Turn:
    """Check the tools and the history, render calls and results the way `fmt` expects, add the grammar."""
    check(tools, messages)
    funcs = offered(tools)
    msgs = list(messages)
    template_tools = None
    if tools is not None or any(m.tool_calls or m.role == "tool" for m in msgs):
        msgs = normalize(msgs, fmt)
        if not fmt.native:
            msgs = generic_messages(msgs, tools)
        elif funcs:
            template_tools = template_tools_of(funcs)
    calls = grammar(fmt, tools) if tools is not None else None
    if calls is not None:
        if params.grammar:
            raise UsageError("a response format cannot be combined with tools the model may call",
                             hint='leave response_format out, or send tool_choice "none"', field="response_format")
        params = replace(params, grammar=calls.text, grammar_triggers=calls.triggers)
    return Turn(msgs, params, template_tools, fmt if funcs else None)


def normalize(messages: Sequence[ChatMessage], fmt: ToolFormat) -> list[ChatMessage]:
    """Every past call with an id and every tool result with the id and name of its call, as templates expect
    (Ollama's history carries neither ids nor, in older clients, names): a result without an id answers the
    earliest unanswered call (of its name, when it has one). Mistral's templates insist on 9-character ids:
    ids are mapped to such, the same way for a call and its result."""
    out: list[ChatMessage] = []
    open_calls: list[ToolCall] = []
    names: dict[str, str] = {}
    for m in messages:
        if m.tool_calls:
            calls = tuple(replace(c, id=c.id or fmt.new_id()) for c in m.tool_calls)
            open_calls.extend(calls)
            names.update({c.id: c.name for c in calls})
            m = replace(m, tool_calls=calls)
        elif m.role == "tool":
            call_id = m.tool_call_id
            if call_id is None:
                match = next((c for c in open_calls if m.name in (None, c.name)), None)
                call_id = match.id if match else fmt.new_id()
            open_calls = [c for c in open_calls if c.id != call_id]
            m = replace(m, tool_call_id=call_id, name=m.name or names.get(call_id))
        out.append(m)
    if fmt.id_length:
        out = [_short_ids(m, fmt.id_length) for m in out]
    return out


def _short_id(text: str, n: int) -> str:
    digest = int(hashlib.sha256(text.encode()).hexdigest(), 16)
    chars = []
    for _ in range(n):
        digest, r = divmod(digest, len(_ALNUM))
        chars.append(_ALNUM[r])
    return "".join(chars)


def _short_ids(m: ChatMessage, n: int) -> ChatMessage:
    def fix(i: str) -> str:
        return i if len(i) == n and i.isalnum() else _short_id(i, n)
    if m.tool_calls:
        return replace(m, tool_calls=tuple(replace(c, id=fix(c.id)) for c in m.tool_calls))
    if m.tool_call_id is not None:
        return replace(m, tool_call_id=fix(m.tool_call_id))
    return m


def template_tools_of(functions: Sequence[Tool]) -> list[dict[str, Any]]:
    """The tools as Hugging Face templates take them (OpenAI's shape)."""
    return [{"type": "function", "function": {"name": t.name, "description": t.description,
                                              "parameters": dict(t.parameters)}} for t in functions]


def offered(tools: Tools | None) -> tuple[Tool, ...]:
    """The functions the model may call now."""
    if tools is None or tools.choice == "none":
        return ()
    if tools.choice == "function":
        return tuple(t for t in tools.functions if t.name == tools.function)
    return tools.functions


def generic_messages(messages: Sequence[ChatMessage], tools: Tools | None) -> list[ChatMessage]:
    """The conversation for a template without tool support: the tools and the envelope described in the
    system prompt, past calls written as the envelope, results as user turns."""
    out: list[ChatMessage] = []
    for m in messages:
        if m.tool_calls:
            envelope = json.dumps({"tool_calls": [{"name": c.name, "arguments": _arguments(c.arguments)}
                                                  for c in m.tool_calls]}, ensure_ascii=False)
            out.append(ChatMessage("assistant", (m.content.strip() + "\n" if m.content.strip() else "") + envelope))
        elif m.role == "tool":
            out.append(ChatMessage("user", json.dumps({"tool_response": {
                "name": m.name, "id": m.tool_call_id, "content": m.content}}, ensure_ascii=False)))
        else:
            out.append(ChatMessage(m.role, m.content))
    funcs = offered(tools)
    if not funcs or tools is None:
        return out
    lines = ["You can call these functions (their arguments are given as JSON schemas):"]
    lines += [json.dumps({"name": t.name, "description": t.description, "parameters": t.parameters},
                         ensure_ascii=False) for t in funcs]
    lines += ["", "To call functions, reply with only this JSON object and nothing else:",
              '{"tool_calls": [{"name": "<function name>", "arguments": {<the arguments>}}]}']
    if tools.parallel and len(funcs) > 1:
        lines.append("You may list several calls.")
    if tools.choice == "auto":
        lines.append("If the user asks you to use a function, or a function is needed to answer, reply with the JSON "
                     "object only. Otherwise answer in plain text.")
    elif tools.choice == "function":
        lines.append(f"Call the function {tools.function} now.")
    else:
        lines.append("Call one of the functions now.")
    lines.append('A function\'s result comes back in a message {"tool_response": {...}}.')
    block = "\n".join(lines)
    if out and out[0].role == "system":
        return [ChatMessage("system", (out[0].content + "\n\n" if out[0].content else "") + block)] + out[1:]
    return [ChatMessage("system", block)] + out


def _arguments(text: str) -> Any:
    """A call's arguments as templates want them: the parsed object (its text if it is not JSON)."""
    try:
        return json.loads(text) if text.strip() else {}
    except ValueError:
        return text


def message_dict(m: ChatMessage) -> dict[str, Any]:
    """A message as Hugging Face chat templates take it; keys only when set (templates test `is defined`)."""
    d: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        d["tool_calls"] = [{"id": c.id, "type": "function",
                            "function": {"name": c.name, "arguments": _arguments(c.arguments)}}
                           for c in m.tool_calls]
    if m.tool_call_id is not None:
        d["tool_call_id"] = m.tool_call_id
    if m.name is not None:
        d["name"] = m.name
    return d


# ------------------------------------------------------------------------------------------------ grammar

def _call_schema(t: Tool, args_key: str) -> dict[str, Any]:
    """The JSON schema of one call object; the arguments' `$defs` move up so their `#/$defs/...` refs resolve."""
    params = dict(t.parameters)
    schema: dict[str, Any] = {"type": "object", "properties": {"name": {"const": t.name}, args_key: params},
                              "required": ["name", args_key]}
    for key in ("$defs", "definitions"):
        if key in params:
            schema[key] = params.pop(key)
    return schema


@dataclass(frozen=True)
class CallGrammar:
    text: str                        # GBNF
    triggers: tuple[str, ...]        # lazy: patterns that start it (empty: the whole reply)


def grammar(fmt: ToolFormat, tools: Tools) -> CallGrammar | None:
    """The grammar of the calls the model may make (None when it may make none)."""
    funcs = offered(tools)
    if not funcs:
        return None
    alternatives = [_call_schema(t, fmt.args_key) for t in funcs]
    index = {t.name: i for i, t in enumerate(tools.functions)}
    rules, names = rules_for([(schema, f"call{i}", f"tools[{index[t.name]}].function.parameters")
                              for i, (t, schema) in enumerate(zip(funcs, alternatives))])
    call = "call ::= " + " | ".join(names)
    one = "call"
    body = f"{literal(fmt.open)} {one}" if fmt.open else one
    if tools.parallel and fmt.parallel:
        body += f" ({literal(fmt.sep)} {one})*"
    if fmt.close:
        body += f" {literal(fmt.close)}"
    root = f"root ::= {'(' + literal(fmt.prefix) + ')? ' if fmt.prefix else ''}{body}"
    text = "\n".join([rules, call, root])
    lazy = tools.choice == "auto"
    return CallGrammar(text, (fmt.trigger,) if lazy else ())
