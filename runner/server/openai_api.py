"""OpenAI-compatible adapter: /v1/chat/completions, /v1/completions, /v1/models. Translates request shapes to
the native path and native events to OpenAI's JSON / server-sent events; nothing else.

Lenient as OpenAI-compatible servers are: a field the models below do not define is accepted, has no effect,
and is named in the X-Llmrun-Ignored-Fields header. A field is refused (400) only where ignoring it would
change the answer (audio output, image input, fill-in-the-middle...)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from runner.engine.template import RESERVED_VARIABLES
from runner.engine.types import ChatMessage, Tool, ToolCall, Tools
from runner.core.errors import UsageError
from runner.server import openai_shapes as shapes
from runner.server.common import (Int64, RunStream, WireModel, note_ignored, notice_headers, sampling, start_run,
                                  state_of)
from runner.server.config import ModelCard
from runner.server.errors import ApiError
from runner.server.native import NativeRequest, json_grammar

router = APIRouter()



class ContentPart(WireModel):
    type: str
    text: str | None = None


class FunctionCall(WireModel):
    name: str
    arguments: str | dict[str, Any] = ""


class ToolCallIn(WireModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(WireModel):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None                  # a tool or function result: the function's name
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    function_call: FunctionCall | None = None    # the legacy functions API


class StreamOptions(WireModel):
    include_usage: bool = False


class JsonSchemaSpec(WireModel):
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None               # schemas are always enforced (a grammar)
    description: str | None = None


class ResponseFormat(WireModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class FunctionDef(WireModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None               # calls are always grammar-constrained when forced


class ToolDef(WireModel):
    type: str
    function: FunctionDef | None = None


class NamedFunction(WireModel):
    name: str


class NamedTool(WireModel):
    type: Literal["function"]
    function: NamedFunction


class _Sampling(WireModel):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=2 ** 31 - 1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0, le=2 ** 31 - 1)          # llama.cpp extension
    min_p: float | None = Field(default=None, ge=0, le=1)                  # llama.cpp extension
    typical_p: float | None = Field(default=None, gt=0, le=1)              # llama.cpp extension
    repeat_penalty: float | None = Field(default=None, gt=0, le=10)        # llama.cpp extension
    repeat_last_n: int | None = Field(default=None, ge=-1, le=2 ** 31 - 1)  # llama.cpp extension
    mirostat: Literal[0, 1, 2] | None = None                               # llama.cpp extension
    mirostat_tau: float | None = Field(default=None, gt=0, le=100)
    mirostat_eta: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Int64
    stop: str | list[str] | None = Field(default=None)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=None, ge=1, le=128)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    grammar: str | None = None                                             # llama.cpp extension: GBNF
    json_schema: dict[str, Any] | None = None                              # llama.cpp extension


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=2 ** 31 - 1)
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[ToolDef] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedTool | None = None
    parallel_tool_calls: bool | None = None
    functions: list[FunctionDef] | None = None                             # the legacy functions API
    function_call: Literal["auto", "none"] | NamedFunction | None = None
    chat_template_kwargs: dict[str, Any] | None = None                     # llama.cpp / vLLM extension
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] = Field(min_length=1)
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1, le=20)
    logprobs: int | None = Field(default=None, ge=0, le=5)
    response_format: ResponseFormat | None = None


def _unsupported(param: str, why: str) -> ApiError:
    return ApiError(400, f"{param}: {why}", param=param, code="unsupported_parameter")


def _invalid(param: str, why: str) -> ApiError:
    return ApiError(400, f"{param}: {why}", param=param, code="invalid_value")


def _logit_bias(bias: dict[str, float] | None) -> list[tuple[int, float]]:
    out = []
    for key, value in (bias or {}).items():
        if not key.strip().isdigit():
            raise _invalid("logit_bias", f"keys are token ids (whole numbers as strings), not {key!r}")
        if not -100 <= value <= 100:
            raise _invalid("logit_bias", f"biases are -100 to 100, not {value} (token {key})")
        out.append((int(key), value))
    return out


def _grammar(body: ChatCompletionRequest | CompletionRequest) -> str | None:
    """GBNF text enforcing `response_format`, or llama.cpp's `json_schema` / `grammar` extensions (None for
    plain text); a schema llama.cpp can't compile is a 400."""
    fmt = body.response_format
    given = [name for name, on in (("response_format", fmt is not None and fmt.type != "text"),
                                   ("json_schema", body.json_schema is not None), ("grammar", bool(body.grammar)))
             if on]
    if len(given) > 1:
        raise _unsupported(given[1], f"send one of {' and '.join(given)}: both constrain the same output")
    if body.grammar:
        return body.grammar                   # llama.cpp checks it when the sampler is built (a 400 if bad)
    try:
        if body.json_schema is not None:
            return json_grammar(body.json_schema, param="json_schema")
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return json_grammar(None, param="response_format")
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise _invalid("response_format.json_schema.schema", "this field is required for type json_schema")
        return json_grammar(fmt.json_schema.schema_, param="response_format.json_schema.schema")
    except UsageError as e:
        raise ApiError(400, e.message, param="json_schema" if body.json_schema is not None else "response_format",
                       code="invalid_value") from e


def _grammar_field(body: ChatCompletionRequest | CompletionRequest) -> str | None:
    """The field a grammar was made from, to name in a 400 when llama.cpp rejects it."""
    if body.grammar:
        return "grammar"
    if body.json_schema is not None:
        return "json_schema"
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    return "response_format.json_schema.schema" if fmt.type == "json_schema" else "response_format"


def _params(req: _Sampling, max_tokens: int | None, grammar: str | None, *, logprobs: bool, top: int):
    if isinstance(req.stop, list) and len(req.stop) > 16:
        raise _unsupported("stop", "at most 16 stop sequences")
    return sampling(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
                    typical_p=req.typical_p, repeat_penalty=req.repeat_penalty, repeat_last_n=req.repeat_last_n,
                    frequency_penalty=req.frequency_penalty, presence_penalty=req.presence_penalty,
                    logit_bias=_logit_bias(req.logit_bias), mirostat=req.mirostat, mirostat_tau=req.mirostat_tau,
                    mirostat_eta=req.mirostat_eta, seed=req.seed, max_tokens=max_tokens, stop=req.stop,
                    grammar=grammar, n=req.n, logprobs=logprobs or None, top_logprobs=top or None)


def _text(content: str | list[ContentPart] | None, where: str) -> str:
    if not isinstance(content, list):
        return content or ""
    texts = []
    for j, part in enumerate(content):
        if part.type == "refusal":
            continue
        if part.type != "text" or part.text is None:
            raise _unsupported(f"{where}[{j}]", f"content parts of type {part.type!r} are not supported (text only)")
        texts.append(part.text)
    return "".join(texts)


def _arguments(args: str | dict[str, Any]) -> str:
    return args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)


def _messages(messages: list[Message]) -> tuple[ChatMessage, ...]:
    out = []
    for i, m in enumerate(messages):
        if m.content is None and m.role not in ("assistant",):
            raise _invalid(f"messages[{i}].content", "this field is required")
        content = _text(m.content, f"messages[{i}].content")
        calls = tuple(ToolCall(c.id or "", c.function.name, _arguments(c.function.arguments))
                      for c in m.tool_calls or ())
        if m.function_call is not None:
            calls += (ToolCall("", m.function_call.name, _arguments(m.function_call.arguments)),)
        if m.role == "tool" or m.role == "function":
            out.append(ChatMessage("tool", content, tool_call_id=m.tool_call_id, name=m.name))
        elif m.role == "assistant":
            out.append(ChatMessage("assistant", content, tool_calls=calls))
        elif m.role == "developer":
            out.append(ChatMessage("system", content))
        else:
            out.append(ChatMessage(m.role, content))
    return tuple(out)


def _tools(body: ChatCompletionRequest) -> Tools | None:
    """`tools` + `tool_choice` + `parallel_tool_calls`, or the legacy `functions` + `function_call`."""
    if body.tools is not None and body.functions is not None:
        raise _unsupported("functions", "send tools or the older functions, not both")
    named: str | None = None
    mode: Literal["auto", "none", "required"] = "auto"
    if body.functions is not None:
        funcs = [_tool(f) for f in body.functions]
        if isinstance(body.function_call, NamedFunction):
            named = body.function_call.name
        elif body.function_call is not None:
            mode = body.function_call
        parallel = False
    else:
        funcs = []
        for i, t in enumerate(body.tools or []):
            if t.type != "function":
                raise _unsupported(f"tools[{i}].type", f"tools of type {t.type!r} are not supported (function "
                                   "tools only)")
            if t.function is None:
                raise _invalid(f"tools[{i}].function", "this field is required for a function tool")
            funcs.append(_tool(t.function))
        if isinstance(body.tool_choice, NamedTool):
            named = body.tool_choice.function.name
        elif body.tool_choice is not None:
            mode = body.tool_choice
        parallel = body.parallel_tool_calls is not False
    if not funcs:
        if named is not None or mode == "required":
            raise _invalid("tool_choice", f"{'a named function' if named else repr(mode)} needs tools")
        return None
    if named is not None:
        return Tools(tuple(funcs), choice="function", function=named, parallel=parallel)
    return Tools(tuple(funcs), choice=mode, parallel=parallel)


def _tool(f: FunctionDef) -> Tool:
    return Tool(f.name, f.description or "",
                f.parameters if f.parameters is not None else {"type": "object", "properties": {}})


def _include_usage(body: _Sampling) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


@router.post("/v1/chat/completions", tags=["openai"])
async def chat_completions(body: ChatCompletionRequest, request: Request):
    if body.audio is not None or (body.modalities and set(body.modalities) != {"text"}):
        raise _unsupported("modalities" if body.modalities else "audio", "only text output is supported")
    tools = _tools(body)
    legacy = body.functions is not None
    reserved = sorted(RESERVED_VARIABLES & set(body.chat_template_kwargs or {}))
    if reserved:
        raise _invalid(f"chat_template_kwargs.{reserved[0]}", "is set by the server from the request")
    state = state_of(request)
    state.resolve(body.model)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if max_tokens is None:
        max_tokens = state.config.max_tokens      # the server's backstop (--max-tokens)
    grammar = _grammar(body)
    if grammar and tools is not None and tools.choice != "none":
        field = "grammar" if body.grammar else "json_schema" if body.json_schema is not None else "response_format"
        raise _unsupported(field, "cannot be combined with tools the model may call; leave it out, or send "
                           'tool_choice "none"')
    top = body.top_logprobs or 0
    params = _params(body, max_tokens, grammar, logprobs=bool(body.logprobs) or top > 0, top=top)
    named = ["messages[].name"] if any(m.name and m.role not in ("tool", "function") for m in body.messages) else []
    native = NativeRequest(params=params, messages=_messages(body.messages), tools=tools,
                           template_kwargs=body.chat_template_kwargs, ignored=note_ignored(request, body, named),
                           grammar_field=_grammar_field(body))
    run = await start_run(request, body.model, native)
    rid, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), body.model

    if not body.stream:
        completions = await run.collect()
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": i, "message": shapes.message(c, legacy=legacy),
                         "logprobs": shapes.chat_logprobs(c.logprobs), "finish_reason": shapes.finish(c, legacy)}
                        for i, c in enumerate(completions)],
            "usage": shapes.usage(run), "system_fingerprint": "llmrun",
        }, headers=notice_headers(run))

    head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
    return RunStream(run, shapes.chat_events(run, head, _include_usage(body), legacy=legacy),
                     media_type="text/event-stream")


@router.post("/v1/completions", tags=["openai"])
async def completions(body: CompletionRequest, request: Request):
    if body.suffix:
        raise _unsupported("suffix", "fill-in-the-middle suffixes are not supported")
    if body.best_of not in (None, 1, body.n or 1):
        raise _unsupported("best_of", "only best_of equal to n (or 1) is supported: the choices are not ranked")
    if body.echo and body.logprobs:
        raise _unsupported("echo", "echo with logprobs would need the prompt's log probabilities, which are not "
                           "computed")
    if isinstance(body.prompt, list):
        if len(body.prompt) != 1:
            raise _unsupported("prompt", "exactly one prompt per request (a list of one string at most)")
        prompt = body.prompt[0]
    else:
        prompt = body.prompt
    state = state_of(request)
    state.resolve(body.model)
    grammar = _grammar(body)
    max_tokens = body.max_tokens if body.max_tokens is not None else state.config.max_tokens
    params = _params(body, max_tokens, grammar, logprobs=body.logprobs is not None, top=body.logprobs or 0)
    native = NativeRequest(params=params, prompt=prompt, ignored=note_ignored(request, body),
                           grammar_field=_grammar_field(body))
    run = await start_run(request, body.model, native)
    rid, created, model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), body.model
    echo = prompt if body.echo else ""

    if not body.stream:
        done = await run.collect()
        return JSONResponse({
            "id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": i, "text": echo + c.text, "logprobs": shapes.completion_logprobs(c.logprobs,
                                                                                                    len(echo)),
                         "finish_reason": shapes.finish(c)} for i, c in enumerate(done)],
            "usage": shapes.usage(run), "system_fingerprint": "llmrun"}, headers=notice_headers(run))

    head = {"id": rid, "object": "text_completion", "created": created, "model": model}
    return RunStream(run, shapes.completion_events(run, head, _include_usage(body), echo=echo),
                     media_type="text/event-stream")


def _model(card: ModelCard, started_at: float) -> dict[str, Any]:
    return {"id": card.name, "object": "model", "created": int(card.modified_at or started_at), "owned_by": "llmrun"}


@router.get("/v1/models", tags=["openai"])
async def list_models(request: Request):
    state = state_of(request)
    state.require_started()
    return {"object": "list", "data": [_model(card, state.started_at) for card in await state.pool.cards()]}


@router.get("/v1/models/{model_id:path}", tags=["openai"])
async def get_model(model_id: str, request: Request):
    state = state_of(request)
    state.resolve(model_id)
    return _model(state.pool.card(model_id), state.started_at)
