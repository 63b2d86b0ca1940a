"""Anthropic's Messages API (/v1/messages, /v1/messages/count_tokens), as the `anthropic` SDK and Claude Code speak
it: a thin adapter over the native path. Content blocks become chat turns (`text`; `tool_use` in assistant turns,
`tool_result` in user turns become the calls and tool results the engine renders), `tools`/`tool_choice` go to
the engine's tool calling, and the reply comes back as content blocks with Anthropic's stop reasons, in JSON or
as its server-sent event sequence. Errors have Anthropic's shape (runner.server.errors); the API key may come as
`x-api-key` (runner.server.app); `anthropic-version` and `anthropic-beta` headers are not needed.

Lenient as the other adapters: a field the models below do not define is accepted, has no effect, and is named
in the X-Llmrun-Ignored-Fields header (`metadata`, `thinking`, `cache_control`...); `output_config.format` (structured
outputs) becomes a grammar, as `response_format` does on /v1/chat/completions; refused (400) only where
ignoring it would change the answer (images, documents, server tools, an assistant turn to continue)."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any, AsyncIterator, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from runner.core.errors import LlmrunError, UsageError
from runner.engine.types import ChatMessage, Completion, Tool, ToolCall, Tools
from runner.server.common import (RunStream, WireModel, note_ignored, notice_headers, sampling, start_run,
                                  state_of)
from runner.server.embeddings_api import engine_for
from runner.server.errors import ApiError, anthropic_error, from_llmrun, rename_fields
from runner.server.native import NativeRequest, Run, json_grammar

router = APIRouter()

MAX_STOP_SEQUENCES = 16



class Block(WireModel):
    """Any content block; which fields it needs depends on `type` (checked in `_turns`)."""

    type: str | None = None
    text: str | None = None
    id: str | None = None                              # tool_use
    name: str | None = None
    input: Any = None                                  # an object (checked in `_turns`)
    tool_use_id: str | None = None                     # tool_result
    content: str | list[Block] | None = None
    is_error: bool | None = None


class Message(WireModel):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class ToolDef(WireModel):
    type: str | None = None                            # "custom" or absent; server tools are refused
    name: str = Field(min_length=1)
    description: str | None = None
    input_schema: dict[str, Any] | None = None         # required for a client tool (checked in `_tools`)


class ToolChoice(WireModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class OutputFormat(WireModel):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(WireModel):
    format: OutputFormat | None = None                 # structured outputs: a grammar; `effort` is ignored


class CountTokensRequest(WireModel):
    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    system: str | list[Block] | None = None
    tools: list[ToolDef] | None = None
    tool_choice: ToolChoice | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1, le=2 ** 31 - 1)
    stop_sequences: list[str] | None = Field(default=None, max_length=MAX_STOP_SEQUENCES)
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0, le=2 ** 31 - 1)
    stream: bool = False
    output_config: OutputConfig | None = None


def _invalid(param: str, why: str) -> ApiError:
    return ApiError(400, f"{param}: {why}", param=param, code="invalid_value")


def _unsupported(param: str, why: str) -> ApiError:
    return ApiError(400, f"{param}: {why}", param=param, code="unsupported_parameter")


def _texts(blocks: str | list[Block], where: str) -> str:
    """The text of a string or of text blocks (a system prompt, a tool result)."""
    if isinstance(blocks, str):
        return blocks
    out = []
    for j, b in enumerate(blocks):
        if b.type is None:
            raise _invalid(f"{where}[{j}].type", "this field is required")
        if b.type != "text":
            raise _unsupported(f"{where}[{j}].type", f"blocks of type {b.type!r} are not supported here (text only)")
        if b.text is None:
            raise _invalid(f"{where}[{j}].text", "this field is required for a text block")
        out.append(b.text)
    return "\n".join(out)


def _turns(body: CountTokensRequest) -> tuple[ChatMessage, ...]:
    """The system prompt and the messages as chat turns: an assistant turn's tool_use blocks become its calls, a
    user turn's tool_result blocks become tool turns (before the turn's own text)."""
    out: list[ChatMessage] = []
    if body.system is not None:
        system = _texts(body.system, "system")
        if system:
            out.append(ChatMessage("system", system))
    calls: dict[str, str] = {}            # tool_use id -> the function's name
    for i, m in enumerate(body.messages):
        where = f"messages[{i}].content"
        if isinstance(m.content, str):
            out.append(ChatMessage(m.role, m.content))
            continue
        texts: list[str] = []
        uses: list[ToolCall] = []
        results: list[ChatMessage] = []
        for j, b in enumerate(m.content):
            at = f"{where}[{j}]"
            if b.type is None:
                raise _invalid(f"{at}.type", "this field is required")
            if b.type == "text":
                if b.text is None:
                    raise _invalid(f"{at}.text", "this field is required for a text block")
                texts.append(b.text)
            elif b.type == "tool_use":
                if m.role != "assistant":
                    raise _invalid(f"{at}.type", "tool_use blocks belong in assistant turns")
                if not b.id or not b.name:
                    raise _invalid(f"{at}.{'name' if b.id else 'id'}", "this field is required for a tool_use block")
                if not isinstance(b.input, dict | None):
                    raise _invalid(f"{at}.input", "a tool_use block's input is an object (the tool's arguments)")
                uses.append(ToolCall(b.id, b.name, json.dumps(b.input or {}, ensure_ascii=False)))
                calls[b.id] = b.name
            elif b.type == "tool_result":
                if m.role != "user":
                    raise _invalid(f"{at}.type", "tool_result blocks belong in user turns")
                if b.tool_use_id is None:
                    raise _invalid(f"{at}.tool_use_id", "this field is required for a tool_result block")
                if b.tool_use_id not in calls:
                    raise _invalid(f"{at}.tool_use_id", f"{b.tool_use_id!r} answers no earlier tool_use block")
                text = _texts(b.content if b.content is not None else "", f"{at}.content")
                results.append(ChatMessage("tool", f"Error: {text}" if b.is_error else text,
                                           tool_call_id=b.tool_use_id, name=calls[b.tool_use_id]))
            elif b.type in ("thinking", "redacted_thinking"):
                continue       # this server's models write no thinking blocks; a client may send back another's
            else:
                raise _unsupported(f"{at}.type", f"content blocks of type {b.type!r} are not supported (text, "
                                   "tool_use, tool_result: no image or document input)")
        if m.role == "assistant":
            out.append(ChatMessage("assistant", "\n".join(texts), tool_calls=tuple(uses)))
        else:
            out += results
            if texts or not results:
                out.append(ChatMessage("user", "\n".join(texts)))
    return tuple(out)


def _tools(body: CountTokensRequest) -> Tools | None:
    funcs = []
    for i, t in enumerate(body.tools or []):
        if t.type not in (None, "custom"):
            raise _unsupported(f"tools[{i}].type", f"tools of type {t.type!r} are not supported (client tools "
                               "with an input_schema only: no server tools)")
        if t.input_schema is None:
            raise _invalid(f"tools[{i}].input_schema", "this field is required (a JSON schema of the tool's input)")
        funcs.append(Tool(t.name, t.description or "", t.input_schema))
    choice = body.tool_choice
    if not funcs:
        if choice is not None and choice.type in ("any", "tool"):
            raise _invalid("tool_choice", f"tool_choice {choice.type!r} needs tools")
        return None
    parallel = not (choice is not None and choice.disable_parallel_tool_use)
    if choice is None or choice.type == "auto":
        return Tools(tuple(funcs), parallel=parallel)
    if choice.type == "tool":
        if not choice.name:
            raise _invalid("tool_choice.name", "this field is required for tool_choice type 'tool'")
        return Tools(tuple(funcs), choice="function", function=choice.name, parallel=parallel)
    return Tools(tuple(funcs), choice="required" if choice.type == "any" else "none", parallel=parallel)


def _grammar(body: MessagesRequest) -> str | None:
    """GBNF text for structured outputs (`output_config.format`), or None."""
    fmt = body.output_config.format if body.output_config is not None else None
    if fmt is None:
        return None
    try:
        return json_grammar(fmt.schema_, param="output_config.format.schema")
    except UsageError as e:
        raise ApiError(400, e.message, param="output_config.format.schema", code="invalid_value") from e


def _anthropic_fields(e: ApiError) -> ApiError:
    """The engine names tool fields as OpenAI's chat does; here `tools[0].name`, `tools[0].input_schema`."""
    e = rename_fields(e, r"tools\[(\d+)\]\.function\.parameters", r"tools[\1].input_schema")
    return rename_fields(e, r"tools\[(\d+)\]\.function", r"tools[\1]")


def _input(arguments: str) -> dict[str, Any] | None:
    """A call's arguments as the tool_use block's input object; None when they are not one (cut short by
    max_tokens)."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def stop_reason(c: Completion) -> str:
    if c.finish_reason == "length":
        return "max_tokens"
    if c.finish_reason == "tool_calls":
        return "tool_use"
    return "stop_sequence" if c.stop_sequence is not None else "end_turn"


def usage(c: Completion) -> dict[str, Any]:
    """Anthropic counts prompt tokens read from the cache apart from the others."""
    u = c.usage
    return {"input_tokens": u.prompt_tokens - u.cached_tokens, "output_tokens": u.completion_tokens,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": u.cached_tokens}


def content(c: Completion) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    if c.text.strip() or not c.tool_calls:
        blocks.append({"type": "text", "text": c.text})
    for t in c.tool_calls:
        args = _input(t.arguments)
        if args is not None:
            blocks.append({"type": "tool_use", "id": t.id, "name": t.name, "input": args})
    return blocks


async def _events(run: Run, head: dict[str, Any]) -> AsyncIterator[str]:
    """Anthropic's stream: message_start, then per content block content_block_start, content_block_delta
    (text_delta, or input_json_delta for a tool_use block) and content_block_stop (a ping after the first
    start), then message_delta (stop reason, usage) and message_stop."""
    def ev(kind: str, **data: Any) -> str:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **data}, ensure_ascii=False)}\n\n"

    n_blocks = 0
    open_block: tuple[str, int] | None = None       # ("text", index) or ("call", the engine's call index)

    def start(kind: str, key: int, block: dict[str, Any]) -> list[str]:
        nonlocal n_blocks, open_block
        out = stop()
        out.append(ev("content_block_start", index=n_blocks, content_block=block))
        if n_blocks == 0:
            out.append(ev("ping"))
        open_block = (kind, key)
        n_blocks += 1
        return out

    def stop() -> list[str]:
        nonlocal open_block
        if open_block is None:
            return []
        open_block = None
        return [ev("content_block_stop", index=n_blocks - 1)]

    yield ev("message_start", message={**head, "content": [], "stop_reason": None, "stop_sequence": None,
                                       "usage": {"input_tokens": 0, "output_tokens": 0}})
    try:
        async for _, d in run.deltas():
            if d.text:
                if open_block is None or open_block[0] != "text":
                    for line in start("text", 0, {"type": "text", "text": ""}):
                        yield line
                yield ev("content_block_delta", index=n_blocks - 1, delta={"type": "text_delta", "text": d.text})
            for piece in d.tool_calls:
                if open_block != ("call", piece.index):
                    block = {"type": "tool_use", "id": piece.id or "", "name": piece.name or "", "input": {}}
                    for line in start("call", piece.index, block):
                        yield line
                if piece.arguments:
                    yield ev("content_block_delta", index=n_blocks - 1,
                             delta={"type": "input_json_delta", "partial_json": piece.arguments})
    except ApiError as e:
        yield ev("error", error=anthropic_error(e)["error"])
        return
    c = run.completion
    assert c is not None, "the run finished without a completion"
    if n_blocks == 0:                  # an empty answer is still a text block, as the JSON answer has it
        for line in start("text", 0, {"type": "text", "text": ""}):
            yield line
    for line in stop():
        yield line
    yield ev("message_delta", delta={"stop_reason": stop_reason(c), "stop_sequence": c.stop_sequence},
             usage=usage(c))
    yield ev("message_stop")


@router.post("/v1/messages", tags=["anthropic"])
async def messages(body: MessagesRequest, request: Request):
    if body.messages[-1].role == "assistant":
        raise _unsupported(f"messages[{len(body.messages) - 1}].role", "the last message must be a user turn: "
                           "continuing an assistant turn (prefill) is not supported")
    turns = _turns(body)
    tools = _tools(body)
    grammar = _grammar(body)
    if grammar is not None and tools is not None and tools.choice != "none":
        raise _unsupported("output_config.format", "cannot be combined with tools the model may call; leave it "
                           'out, or send tool_choice {"type": "none"}')
    state = state_of(request)
    state.resolve(body.model)
    params = sampling(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, max_tokens=body.max_tokens,
                      stop=body.stop_sequences, grammar=grammar)
    native = NativeRequest(params=params, messages=turns, tools=tools, ignored=note_ignored(request, body),
                           grammar_field="output_config.format.schema" if grammar else None)
    try:
        run = await start_run(request, body.model, native)
    except ApiError as e:
        raise _anthropic_fields(e) from e
    head = {"id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant", "model": body.model}
    if not body.stream:
        c = (await run.collect())[0]
        return JSONResponse({**head, "content": content(c), "stop_reason": stop_reason(c),
                             "stop_sequence": c.stop_sequence, "usage": usage(c)}, headers=notice_headers(run))
    return RunStream(run, _events(run, head), media_type="text/event-stream")


@router.post("/v1/messages/count_tokens", tags=["anthropic"])
async def count_tokens(body: CountTokensRequest, request: Request):
    """The prompt's tokens exactly as /v1/messages would evaluate them (the chat template with the tools)."""
    turns = _turns(body)
    tools = _tools(body)
    async with engine_for(request, body.model, admit=False) as engine:
        try:
            n = await asyncio.to_thread(lambda: len(engine.prompt_tokens(engine.apply_template(turns, tools=tools))))
        except LlmrunError as e:
            raise _anthropic_fields(from_llmrun(e)) from e
    return {"input_tokens": n}
