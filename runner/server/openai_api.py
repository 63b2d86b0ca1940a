"""OpenAI-compatible adapter: /v1/chat/completions, /v1/completions, /v1/models. Translates request shapes to
the native path and native events to OpenAI's JSON / server-sent events; nothing else."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from runner.engine.types import ChatMessage
from runner.core.errors import UsageError
from runner.server.common import RunStream, notice_headers, sampling, start_run, state_of
from runner.server.config import ModelCard
from runner.server.errors import ApiError
from runner.server.native import NativeRequest, Run, json_grammar

router = APIRouter()

Int64 = Field(default=None, ge=-(2 ** 63), le=2 ** 63 - 1)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)   # name, tool_call_id, refusal... are tolerated
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class JsonSchemaSpec(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, populate_by_name=True)
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class _Sampling(_Strict):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=2 ** 31 - 1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0, le=2 ** 31 - 1)          # llama.cpp extension
    min_p: float | None = Field(default=None, ge=0, le=1)                  # llama.cpp extension
    repeat_penalty: float | None = Field(default=None, gt=0, le=10)        # llama.cpp extension
    seed: int | None = Int64
    stop: str | list[str] | None = Field(default=None)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=None, ge=1, le=128)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    logprobs: bool | int | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=2 ** 31 - 1)
    response_format: ResponseFormat | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] = Field(min_length=1)
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1, le=20)
    response_format: ResponseFormat | None = None


def _unsupported(param: str, why: str) -> ApiError:
    return ApiError(400, f"{param}: {why}", param=param, code="unsupported_parameter")


def _common_checks(req: _Sampling) -> None:
    if req.n not in (None, 1):
        raise _unsupported("n", "only n=1 is supported (one choice per request); send several requests instead")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(req, name) not in (None, 0, 0.0):
            raise _unsupported(name, "not supported; use repeat_penalty (llama.cpp) instead, or leave it out")
    if req.logprobs not in (None, False, 0):
        raise _unsupported("logprobs", "log probabilities are not supported")
    if req.logit_bias:
        raise _unsupported("logit_bias", "not supported")
    if isinstance(req.stop, list) and len(req.stop) > 16:
        raise _unsupported("stop", "at most 16 stop sequences")


def _grammar(fmt: ResponseFormat | None) -> str | None:
    """GBNF text enforcing `response_format` (None for plain text); a schema llama.cpp can't compile is a 400."""
    try:
        return _grammar_of(fmt)
    except UsageError as e:
        raise ApiError(400, e.message, param="response_format", code="invalid_value") from e


def _grammar_of(fmt: ResponseFormat | None) -> str | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return json_grammar(None, param="response_format")
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise ApiError(400, "response_format.json_schema.schema is required for type json_schema",
                       param="response_format.json_schema.schema", code="invalid_value")
    return json_grammar(fmt.json_schema.schema_, param="response_format.json_schema.schema")


def _params(req: _Sampling, max_tokens: int | None, grammar: str | None):
    return sampling(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
                    repeat_penalty=req.repeat_penalty, seed=req.seed, max_tokens=max_tokens, stop=req.stop,
                    grammar=grammar)


def _messages(messages: list[Message]) -> tuple[ChatMessage, ...]:
    out = []
    for i, m in enumerate(messages):
        extra = m.model_extra or {}
        if extra.get("tool_calls"):
            raise _unsupported(f"messages[{i}].tool_calls", "tool calls are not supported")
        if isinstance(m.content, list):
            texts = []
            for j, part in enumerate(m.content):
                if part.type != "text" or part.text is None:
                    raise _unsupported(f"messages[{i}].content[{j}]",
                                       f"content parts of type {part.type!r} are not supported (text only)")
                texts.append(part.text)
            content = "".join(texts)
        else:
            content = m.content or ""
        if m.content is None and m.role != "assistant":
            raise ApiError(400, f"messages[{i}].content is required", param=f"messages[{i}].content",
                           code="invalid_value")
        out.append(ChatMessage(role="system" if m.role == "developer" else m.role, content=content))
    return tuple(out)


def _usage(run: Run) -> dict[str, Any]:
    c = run.completion
    p, n = (c.usage.prompt_tokens, c.usage.completion_tokens) if c else (0, 0)
    usage: dict[str, Any] = {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}
    if c and c.usage.cached_tokens:
        usage["prompt_tokens_details"] = {"cached_tokens": c.usage.cached_tokens}
    return usage


def _timings(run: Run) -> dict[str, Any] | None:
    """The engine's own clock, as llama-server reports it next to the usage (its `timings` object): prompt
    evaluation up to the first token, then decoding. None when the generation did not finish."""
    c = run.completion
    if c is None:
        return None
    n = c.usage.completion_tokens
    # the engine times decoding from the first token to the last: n - 1 steps
    predicted_ms = 1000 * (n - 1) / c.decode_tokens_per_s if c.decode_tokens_per_s > 0 and n > 1 else 0.0
    return {"prompt_n": c.usage.prompt_tokens, "prompt_ms": round(1000 * c.time_to_first_token_s, 3),
            "predicted_n": n, "predicted_ms": round(predicted_ms, 3),
            "predicted_per_second": round(c.decode_tokens_per_s, 3)}


def _finish_reason(run: Run) -> str:
    c = run.completion
    return "length" if c and c.finish_reason == "length" else "stop"


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _error_event(e: ApiError) -> str:
    return _sse({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}})


def _stream(run: Run, head: dict, include_usage: bool, piece, end: dict, start: dict | None = None) -> RunStream:
    """The SSE stream of one completion, as OpenAI sends it: an optional `start` chunk, one chunk per text delta
    (`piece(delta)` is the endpoint's choice body), an `end` chunk with the finish reason, the usage chunk when
    asked for, then `[DONE]`. `head` holds id, object, created and model."""

    def chunk(body: dict, finish: str | None) -> dict:
        obj = {**head, "system_fingerprint": "llmrun",
               "choices": [{"index": 0, **body, "logprobs": None, "finish_reason": finish}]}
        if include_usage:
            obj["usage"] = None
        return obj

    async def events():
        if start is not None:
            yield _sse(chunk(start, None))
        try:
            async for delta in run.deltas():
                yield _sse(chunk(piece(delta), None))
        except ApiError as e:
            yield _error_event(e)
            return
        yield _sse(chunk(end, _finish_reason(run)))
        if include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(run), "timings": _timings(run)})
        yield "data: [DONE]\n\n"

    return RunStream(run, events(), media_type="text/event-stream")


def _include_usage(body) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


@router.post("/v1/chat/completions", tags=["openai"])
async def chat_completions(body: ChatCompletionRequest, request: Request):
    _common_checks(body)
    if body.tools:
        raise _unsupported("tools", "tool calling is not supported")
    if body.top_logprobs:
        raise _unsupported("top_logprobs", "log probabilities are not supported")
    state_of(request).resolve(body.model)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    grammar = _grammar(body.response_format)
    native = NativeRequest(params=_params(body, max_tokens, grammar), messages=_messages(body.messages))
    run = await start_run(request, body.model, native)
    rid, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), body.model

    if not body.stream:
        text = await run.collect()
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": _finish_reason(run)}],
            "usage": _usage(run), "system_fingerprint": "llmrun",
        }, headers=notice_headers(run))

    head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
    return _stream(run, head, _include_usage(body), lambda delta: {"delta": {"content": delta}},
                   end={"delta": {}}, start={"delta": {"role": "assistant", "content": ""}})


@router.post("/v1/completions", tags=["openai"])
async def completions(body: CompletionRequest, request: Request):
    _common_checks(body)
    if body.echo:
        raise _unsupported("echo", "echoing the prompt is not supported")
    if body.suffix:
        raise _unsupported("suffix", "fill-in-the-middle suffixes are not supported")
    if body.best_of not in (None, 1):
        raise _unsupported("best_of", "only best_of=1 is supported")
    if isinstance(body.prompt, list):
        if len(body.prompt) != 1:
            raise _unsupported("prompt", "exactly one prompt per request (a list of one string at most)")
        prompt = body.prompt[0]
    else:
        prompt = body.prompt
    state_of(request).resolve(body.model)
    grammar = _grammar(body.response_format)
    native = NativeRequest(params=_params(body, body.max_tokens, grammar), prompt=prompt)
    run = await start_run(request, body.model, native)
    rid, created, model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), body.model

    if not body.stream:
        text = await run.collect()
        return {"id": rid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": _finish_reason(run)}],
                "usage": _usage(run), "system_fingerprint": "llmrun"}

    head = {"id": rid, "object": "text_completion", "created": created, "model": model}
    return _stream(run, head, _include_usage(body), lambda delta: {"text": delta}, end={"text": ""})


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
