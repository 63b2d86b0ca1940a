"""OpenAI's Responses API (/v1/responses, GET and DELETE /v1/responses/{id}): a thin adapter over the native
path, as the chat adapter is. Input items become chat turns (messages, `function_call`, `function_call_output`),
`text.format` becomes a grammar, function tools and `tool_choice` go to the engine's tool calling, and the reply
comes back as output items, in JSON or as the typed server-sent events the `openai` client parses
(runner.server.responses_shapes). Responses are kept in memory (runner.server.response_store) for
`previous_response_id`, unless the request says `store: false`.

Lenient as the chat adapter: a field the models below do not define is accepted, has no effect, and is named in
the X-Llmrun-Ignored-Fields header; refused (400) only where ignoring it would change the answer (image or file
input, hosted tools, background runs, conversations, log probabilities)."""

from __future__ import annotations

import time
import uuid
from dataclasses import replace
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from runner.core.errors import UsageError
from runner.engine.types import ChatMessage, Completion, Tool, ToolCall, Tools
from runner.server import responses_shapes as shapes
from runner.server.common import (Int64, RunStream, WireModel, note_ignored, notice_headers, sampling, start_run,
                                  state_of)
from runner.server.errors import ApiError, rename_fields
from runner.server.native import NativeRequest, json_grammar

router = APIRouter()



class Part(WireModel):
    type: str
    text: str | None = None


class InputItem(WireModel):
    """Any input item; which fields it needs depends on `type` (checked in `_turns`)."""

    type: str | None = None                 # absent: a message (the "easy" input message)
    role: str | None = None
    content: str | list[Part] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: Any = None                   # JSON text (checked in `_turns`)
    output: str | list[Part] | None = None
    id: str | None = None
    status: str | None = None


class TextFormat(WireModel):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None               # schemas are always enforced (a grammar)
    description: str | None = None


class TextConfig(WireModel):
    format: TextFormat | None = None


class FunctionTool(WireModel):
    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None               # calls are always grammar-constrained when forced


class ToolChoiceObject(WireModel):
    type: str
    name: str | None = None


class ResponsesRequest(WireModel):
    model: str = Field(min_length=1)
    input: str | list[InputItem] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1, le=2 ** 31 - 1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0, le=2 ** 31 - 1)          # llama.cpp extension
    seed: int | None = Int64  # llama.cpp extension
    text: TextConfig | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["auto", "none", "required"] | ToolChoiceObject | None = None
    parallel_tool_calls: bool | None = None
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = Field(default=None, min_length=1)
    metadata: dict[str, str] | None = None
    background: bool | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


ROLES: dict[str, Literal["user", "assistant", "system"]] = {"user": "user", "assistant": "assistant",
                                                             "system": "system", "developer": "system"}
TEXT_PARTS = {"input_text", "output_text", "text"}


def _unsupported(param: str, why: str) -> ApiError:
    return ApiError(400, f"{param}: {why}", param=param, code="unsupported_parameter")


def _invalid(param: str, why: str) -> ApiError:
    return ApiError(400, f"{param}: {why}", param=param, code="invalid_value")


def not_found(rid: str, param: str | None) -> ApiError:
    return ApiError(404, f"Response with id {rid!r} not found: it was never stored here (store: false), was deleted, "
                         "or was evicted (the server keeps recent responses in memory only, and not across "
                         "restarts).", param=param, code="previous_response_not_found" if param else "not_found")


def _text(content: str | list[Part], where: str) -> str:
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.type == "refusal":
            continue
        if part.type not in TEXT_PARTS or part.text is None:
            what = "a text part needs its text" if part.type in TEXT_PARTS else \
                f"content parts of type {part.type!r} are not supported (input_text only: no image, file or audio input)"
            raise _unsupported(f"{where}[{j}]", what)
        texts.append(part.text)
    return "".join(texts)


def _required(value: Any, where: str, kind: str) -> Any:
    if value is None:
        raise _invalid(where, f"this field is required for a {kind} item")
    return value


def _turns(body: ResponsesRequest, history: tuple[ChatMessage, ...]) -> tuple[ChatMessage, ...]:
    """This request's input as chat turns (after `history`, the turns of `previous_response_id`)."""
    if body.input is None:
        if body.previous_response_id is None:
            raise _invalid("input", "this field is required (a string or a list of input items)")
        return ()
    if isinstance(body.input, str):
        return (ChatMessage("user", body.input),)
    if not body.input and body.previous_response_id is None:
        raise _invalid("input", "send at least one input item")
    calls = {c.id: c.name for m in history for c in m.tool_calls}
    out: list[ChatMessage] = []
    for i, item in enumerate(body.input):
        where = f"input[{i}]"
        kind = item.type or "message"
        if kind == "message":
            role = ROLES.get(_required(item.role, f"{where}.role", kind))
            if role is None:
                raise _invalid(f"{where}.role", f"{item.role!r} is not a role (user, assistant, system or developer)")
            out.append(ChatMessage(role, _text(_required(item.content, f"{where}.content", kind), f"{where}.content")))
        elif kind == "function_call":
            call_id = _required(item.call_id, f"{where}.call_id", kind)
            name = _required(item.name, f"{where}.name", kind)
            if not name:
                raise _invalid(f"{where}.name", "the function's name is empty")
            arguments = _required(item.arguments, f"{where}.arguments", kind)
            if not isinstance(arguments, str):
                raise _invalid(f"{where}.arguments", 'the arguments are JSON text (a string such as "{\\"city\\": '
                               '\\"Paris\\"}"), not a JSON value')
            call = ToolCall(call_id, name, arguments)
            calls[call_id] = call.name
            if out and out[-1].role == "assistant":      # calls after the turn's text belong to the same turn
                out[-1] = replace(out[-1], tool_calls=out[-1].tool_calls + (call,))
            else:
                out.append(ChatMessage("assistant", "", tool_calls=(call,)))
        elif kind == "function_call_output":
            call_id = _required(item.call_id, f"{where}.call_id", kind)
            if call_id not in calls:
                raise _invalid(f"{where}.call_id", f"{call_id!r} answers no function_call: send the function_call "
                               "item before it, or the previous_response_id of the response that made the call")
            output = _text(_required(item.output, f"{where}.output", kind), f"{where}.output")
            out.append(ChatMessage("tool", output, tool_call_id=call_id, name=calls[call_id]))
        elif kind == "reasoning":
            continue     # this server's models write no reasoning items; a client may send back another's
        else:
            raise _unsupported(f"{where}.type", f"input items of type {kind!r} are not supported (message, "
                               "function_call, function_call_output)")
    return tuple(out)


def _tools(body: ResponsesRequest) -> Tools | None:
    funcs = []
    for i, t in enumerate(body.tools or []):
        if t.type != "function":
            raise _unsupported(f"tools[{i}].type", f"tools of type {t.type!r} are not supported (function tools "
                               "only: no hosted tools)")
        if not t.name:
            raise _invalid(f"tools[{i}].name", "this field is required for a function tool")
        funcs.append(Tool(t.name, t.description or "",
                          t.parameters if t.parameters is not None else {"type": "object", "properties": {}}))
    named: str | None = None
    mode: Literal["auto", "none", "required"] = "auto"
    if isinstance(body.tool_choice, ToolChoiceObject):
        if body.tool_choice.type != "function":
            raise _unsupported("tool_choice.type", f"{body.tool_choice.type!r} is not supported (auto, none, "
                               "required, or {\"type\": \"function\", \"name\": ...})")
        if not body.tool_choice.name:
            raise _invalid("tool_choice.name", "this field is required for a function")
        named = body.tool_choice.name
    elif body.tool_choice is not None:
        mode = body.tool_choice
    if not funcs:
        if named is not None or mode == "required":
            raise _invalid("tool_choice", f"{'a named function' if named else repr(mode)} needs tools")
        return None
    parallel = body.parallel_tool_calls is not False
    if named is not None:
        return Tools(tuple(funcs), choice="function", function=named, parallel=parallel)
    return Tools(tuple(funcs), choice=mode, parallel=parallel)


def _grammar(body: ResponsesRequest) -> tuple[str | None, str | None]:
    """(GBNF text, the field it came from) for `text.format`; (None, None) for plain text."""
    fmt = body.text.format if body.text is not None else None
    if fmt is None or fmt.type == "text":
        return None, None
    field = "text.format" if fmt.type == "json_object" else "text.format.schema"
    try:
        if fmt.type == "json_object":
            return json_grammar(None, param=field), field
        if fmt.schema_ is None:
            raise _invalid(field, "this field is required for type json_schema")
        return json_grammar(fmt.schema_, param=field), field
    except UsageError as e:
        raise ApiError(400, e.message, param=field, code="invalid_value") from e


def _refusals(body: ResponsesRequest) -> None:
    if body.background:
        raise _unsupported("background", "background responses are not supported: send the request and wait, "
                           "or stream it")
    if body.conversation is not None:
        raise _unsupported("conversation", "conversations are not supported: use previous_response_id")
    if body.prompt is not None:
        raise _unsupported("prompt", "stored prompt templates are not supported: send instructions and input")
    if body.top_logprobs:
        raise _unsupported("top_logprobs", "log probabilities are not returned by /v1/responses (use "
                           "/v1/chat/completions with logprobs)")


@router.post("/v1/responses", tags=["openai"])
async def create_response(body: ResponsesRequest, request: Request):
    _refusals(body)
    state = state_of(request)
    history: tuple[ChatMessage, ...] = ()
    if body.previous_response_id is not None:
        stored = state.responses.get(body.previous_response_id)
        if stored is None:
            raise not_found(body.previous_response_id, "previous_response_id")
        history = stored.conversation
    turns = _turns(body, history)
    tools = _tools(body)
    grammar, grammar_field = _grammar(body)
    if grammar and tools is not None and tools.choice != "none":
        raise _unsupported("text.format", "cannot be combined with tools the model may call; leave it out, or send "
                           'tool_choice "none"')
    state.resolve(body.model)
    max_tokens = body.max_output_tokens if body.max_output_tokens is not None else state.config.max_tokens
    params = sampling(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, seed=body.seed,
                      max_tokens=max_tokens, grammar=grammar)
    system = (ChatMessage("system", body.instructions),) if body.instructions else ()
    native = NativeRequest(params=params, messages=system + history + turns, tools=tools, grammar_field=grammar_field,
                           ignored=note_ignored(request, body))
    try:
        run = await start_run(request, body.model, native)
    except ApiError as e:
        raise rename_fields(e, r"tools\[(\d+)\]\.function", r"tools[\1]") from e   # flat tools here
    rid = f"resp_{uuid.uuid4().hex}"
    base = shapes.response_object(rid, body, int(time.time()), tools)

    def keep(response: dict[str, Any], c: Completion) -> None:
        if body.store:
            answer = ChatMessage("assistant", c.text, tool_calls=c.tool_calls)
            state.responses.put(rid, response, history + turns + (answer,))

    if not body.stream:
        completion = (await run.collect())[0]
        response = shapes.finished(base, shapes.output_items(completion), completion)
        keep(response, completion)
        return JSONResponse(response, headers=notice_headers(run))
    return RunStream(run, shapes.events(run, base, keep), media_type="text/event-stream")


@router.get("/v1/responses/{response_id}", tags=["openai"])
async def get_response(response_id: str, request: Request):
    stored = state_of(request).responses.get(response_id)
    if stored is None:
        raise not_found(response_id, None)
    return stored.response


@router.delete("/v1/responses/{response_id}", tags=["openai"])
async def delete_response(response_id: str, request: Request):
    if not state_of(request).responses.delete(response_id):
        raise not_found(response_id, None)
    return {"id": response_id, "object": "response", "deleted": True}
