"""Ollama-compatible adapter: /api/chat, /api/generate (NDJSON streaming by default), /api/tags, /api/ps,
/api/show, /api/version (model management, /api/pull, /api/delete, /api/copy: runner.server.manage_api). Shapes
follow the official `ollama` Python client; generation goes through the same native path as the OpenAI
adapter."""

from __future__ import annotations

import json
import math
import time
from datetime import datetime, timezone
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from runner import __version__
from runner.engine.types import ChatMessage, SamplingParams, Tool, ToolCall, ToolCallDelta, Tools
from runner.core.errors import UsageError
from runner.app.pool_values import State
from runner.server.common import (Int64, LeasedRun, RunStream, keep_alive_of, note_ignored, notice_headers, sampling,
                                  start_run, state_of)
from runner.server.config import ModelCard
from runner.server.errors import ApiError
from runner.server.native import NativeRequest, Run, json_grammar

MAX_TIMESTAMP = datetime(9999, 12, 31, tzinfo=timezone.utc).timestamp()

router = APIRouter()


class Options(BaseModel):
    """Ollama's runtime options: every one llama.cpp's sampling can honour is used. The others (load-time
    settings such as num_gpu, num_thread, num_batch, use_mmap; num_keep; options llama.cpp dropped such as
    tfs_z and penalize_newline) are ignored, as Ollama ignores options that do not apply, and named in the
    X-Llmrun-Ignored-Fields header."""

    model_config = ConfigDict(extra="allow", strict=True)
    temperature: float | None = Field(default=None, ge=0, le=100)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0, le=2 ** 31 - 1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    typical_p: float | None = Field(default=None, gt=0, le=1)
    repeat_penalty: float | None = Field(default=None, gt=0, le=10)
    repeat_last_n: int | None = Field(default=None, ge=-1, le=2 ** 31 - 1)   # -1 = the whole context
    presence_penalty: float | None = Field(default=None, ge=-100, le=100)
    frequency_penalty: float | None = Field(default=None, ge=-100, le=100)
    mirostat: Literal[0, 1, 2] | None = None
    mirostat_tau: float | None = Field(default=None, gt=0, le=100)
    mirostat_eta: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Int64
    num_predict: int | None = Field(default=None, ge=-2, le=2 ** 31 - 1)   # -1 = no limit, -2 = fill context
    stop: list[str] | str | None = None
    num_ctx: int | None = Field(default=None, ge=0, le=2 ** 31 - 1)


class _Loose(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class FunctionCall(_Loose):
    name: str
    arguments: dict[str, Any] | str = Field(default_factory=dict)


class ToolCallIn(_Loose):
    id: str | None = None
    function: FunctionCall


class Message(_Loose):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_name: str | None = None          # a tool result: the function's name (Ollama >= 0.9)
    name: str | None = None               # older clients' spelling
    tool_call_id: str | None = None


class FunctionDef(_Loose):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolDef(_Loose):
    type: str = "function"
    function: FunctionDef


class _Base(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    model: str = Field(min_length=1)
    stream: bool = True
    format: Literal["", "json"] | dict[str, Any] | None = None
    options: Options | None = None
    keep_alive: float | int | str | None = None
    think: bool | str | None = None


class ChatRequest(_Base):
    messages: list[Message] = Field(default_factory=list)
    tools: list[ToolDef] | None = None


class GenerateRequest(_Base):
    prompt: str | None = None
    system: str | None = None
    suffix: str | None = None
    template: str | None = None
    raw: bool | None = None
    images: list[str] | None = None
    context: list[int] | None = None


def _bad(param: str, why: str) -> ApiError:
    return ApiError(400, f"{param}: {why}", param=param, code="unsupported_parameter")


def _max_tokens(num_predict: int | None, default: int | None) -> int | None:
    """Ollama's num_predict as a token limit: absent → the server's backstop (--max-tokens); -1 (no limit) and
    -2 (fill the context) → until the context is full; 0 ("evaluate the prompt only") → 1, the least we
    generate."""
    if num_predict is None:
        return default
    if num_predict < 0:
        return None
    return max(num_predict, 1)


def _params(req: _Base, default_max_tokens: int | None):
    o = req.options or Options()
    max_tokens = _max_tokens(o.num_predict, default_max_tokens)
    grammar = None
    try:
        if req.format == "json":
            grammar = json_grammar(None, param="format")
        elif isinstance(req.format, dict):
            grammar = json_grammar(req.format, param="format")
    except UsageError as e:
        raise ApiError(400, e.message, param="format") from e
    return sampling(temperature=o.temperature, top_p=o.top_p, top_k=o.top_k, min_p=o.min_p, typical_p=o.typical_p,
                    repeat_penalty=o.repeat_penalty, repeat_last_n=o.repeat_last_n,
                    presence_penalty=o.presence_penalty, frequency_penalty=o.frequency_penalty,
                    mirostat=o.mirostat, mirostat_tau=o.mirostat_tau, mirostat_eta=o.mirostat_eta,
                    seed=o.seed, max_tokens=max_tokens, stop=o.stop, grammar=grammar, n_ctx=o.num_ctx or None)


def _checks(req: _Base, request: Request) -> float | None:
    """Refuse what cannot be served; the request's keep_alive in seconds (None: it did not say)."""
    if req.think not in (None, False, "", "false"):
        raise _bad("think", f"{req.model!r} does not support thinking")
    keep_alive = keep_alive_of(req.keep_alive)
    state_of(request).resolve(req.model)
    return keep_alive


def _tools(body: ChatRequest) -> Tools | None:
    if not body.tools:
        return None
    funcs = []
    for i, t in enumerate(body.tools):
        if t.type != "function":
            raise _bad(f"tools[{i}].type", f"tools of type {t.type!r} are not supported (function tools only)")
        f = t.function
        funcs.append(Tool(f.name, f.description or "",
                          f.parameters if f.parameters is not None else {"type": "object", "properties": {}}))
    if body.format:
        raise _bad("format", "cannot be combined with tools (the model either calls a tool or answers)")
    return Tools(tuple(funcs))


def _message(i: int, m: Message) -> ChatMessage:
    if m.images:
        raise _bad(f"messages[{i}].images", "image input is not supported")
    if m.role == "tool":
        return ChatMessage("tool", m.content, tool_call_id=m.tool_call_id, name=m.tool_name or m.name)
    calls = tuple(ToolCall(c.id or "", c.function.name, c.function.arguments if isinstance(c.function.arguments, str)
                           else json.dumps(c.function.arguments, ensure_ascii=False)) for c in m.tool_calls or ())
    return ChatMessage(m.role, m.content, tool_calls=calls)


def _calls(calls: tuple[ToolCall, ...]) -> list[dict[str, Any]]:
    """Tool calls as Ollama answers them: arguments as an object (a call whose arguments are not a JSON object,
    cut short by num_predict, is left out; the reply's done_reason says "length")."""
    out = []
    for i, c in enumerate(calls):
        try:
            args = json.loads(c.arguments)
        except ValueError:
            continue
        if isinstance(args, dict):
            out.append({"id": c.id, "function": {"index": i, "name": c.name, "arguments": args}})
    return out


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _final_stats(run: LeasedRun, t_start: float) -> dict:
    c = run.completion
    total_ns = int((time.perf_counter() - t_start) * 1e9)
    load_ns = int(run.lease.waited_s * 1e9)          # loading the model (or waiting for its load) for this request
    if c is None:
        return {"total_duration": total_ns, "load_duration": load_ns, "prompt_eval_count": 0, "eval_count": 0}
    ttft_ns = int(c.time_to_first_token_s * 1e9)
    tps = c.decode_tokens_per_s
    eval_ns = int(c.usage.completion_tokens / tps * 1e9) if tps and math.isfinite(tps) and tps > 0 else 0
    return {"total_duration": total_ns, "load_duration": load_ns,
            "prompt_eval_count": c.usage.prompt_tokens, "prompt_eval_duration": ttft_ns,
            "eval_count": c.usage.completion_tokens, "eval_duration": eval_ns}


def _done_reason(run: Run) -> str:
    c = run.completion
    return "length" if c and c.finish_reason == "length" else "stop"


def _line(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"


async def _answer(request: Request, native: NativeRequest, stream: bool, model: str, keep_alive: float | None,
                  shape):
    """Run `native`; `shape(text, calls)` builds the per-chunk payload (message or response field). Tool calls
    stream whole, each as soon as the next one starts or the reply ends, as Ollama streams them."""
    t_start = time.perf_counter()
    run = await start_run(request, model, native, keep_alive)
    if not stream:
        done = await run.collect()
        c = done[0] if done else None
        return JSONResponse({"model": model, "created_at": _now(),
                             **shape(c.text if c else "", c.tool_calls if c else ()), "done": True,
                             "done_reason": _done_reason(run), **_final_stats(run, t_start)},
                            headers=notice_headers(run))

    async def lines():
        pending: list[ToolCallDelta] = []
        sent = 0

        def ready_calls(final: bool) -> tuple[ToolCall, ...]:
            nonlocal sent
            heads = [d for d in pending if d.name is not None]
            upto = len(heads) if final else len(heads) - 1       # the last call may still be growing
            calls = tuple(ToolCall(h.id or "", h.name or "", "".join(d.arguments for d in pending
                                                                      if d.index == h.index))
                          for h in heads[sent:upto])
            sent = max(sent, upto)
            return calls

        try:
            async for _, delta in run.deltas():
                pending.extend(delta.tool_calls)
                calls = ready_calls(final=False) if delta.tool_calls else ()
                if delta.text or calls:
                    yield _line({"model": model, "created_at": _now(), **shape(delta.text, calls), "done": False})
        except ApiError as e:
            yield _line({"error": e.message})
            return
        calls = ready_calls(final=True)
        if calls:
            yield _line({"model": model, "created_at": _now(), **shape("", calls), "done": False})
        yield _line({"model": model, "created_at": _now(), **shape("", ()), "done": True,
                     "done_reason": _done_reason(run), **_final_stats(run, t_start)})

    return RunStream(run, lines(), media_type="application/x-ndjson")


async def _load_or_unload(request: Request, model: str, keep_alive: float | None, shape) -> dict:
    """Ollama answers an empty chat/generate by loading the model (or, with keep_alive 0, unloading it) and
    returning at once; so do we."""
    state = state_of(request)
    if keep_alive == 0:
        await state.pool.unload(model)
        reason = "unload"
    else:
        lease = await state.acquire(model, keep_alive)
        lease.release()
        reason = "load"
    return {"model": model, "created_at": _now(), **shape("", ()), "done": True, "done_reason": reason}


@router.post("/api/chat", tags=["ollama"])
async def chat(body: ChatRequest, request: Request):
    keep_alive = _checks(body, request)
    tools = _tools(body)
    messages = [_message(i, m) for i, m in enumerate(body.messages)]

    def shape(text: str, calls: tuple[ToolCall, ...]) -> dict:
        msg: dict[str, Any] = {"role": "assistant", "content": text}
        if calls:
            msg["tool_calls"] = _calls(calls)
        return {"message": msg}

    if not messages:
        return await _load_or_unload(request, body.model, keep_alive, shape)
    native = NativeRequest(params=_params(body, state_of(request).config.max_tokens), messages=tuple(messages),
                           tools=tools, ignored=note_ignored(request, body), grammar_field="format")
    return await _answer(request, native, body.stream, body.model, keep_alive, shape)


@router.post("/api/generate", tags=["ollama"])
async def generate(body: GenerateRequest, request: Request):
    keep_alive = _checks(body, request)
    if body.images:
        raise _bad("images", "image input is not supported")
    if body.suffix:
        raise _bad("suffix", "fill-in-the-middle suffixes are not supported")
    if body.template:
        raise _bad("template", "custom prompt templates are not supported; the model's own template is used")
    if body.context:
        raise _bad("context", "continuing from a context array is not supported; use /api/chat with messages")

    def shape(text: str, calls: tuple[ToolCall, ...]) -> dict:
        return {"response": text}

    if not body.prompt:
        return await _load_or_unload(request, body.model, keep_alive, shape)
    params = _params(body, state_of(request).config.max_tokens)
    ignored = note_ignored(request, body)
    if body.raw:
        native = NativeRequest(params=params, prompt=body.prompt, ignored=ignored, grammar_field="format")
    else:
        msgs = ([ChatMessage("system", body.system)] if body.system else []) + [ChatMessage("user", body.prompt)]
        native = NativeRequest(params=params, messages=tuple(msgs), ignored=ignored, grammar_field="format")
    return await _answer(request, native, body.stream, body.model, keep_alive, shape)


def _details(card: ModelCard) -> dict:
    return {"parent_model": "", "format": "gguf", "family": card.family, "families": [card.family] if card.family
            else None, "parameter_size": card.parameter_size, "quantization_level": card.quantization}


def _time(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat().replace("+00:00", "Z")


def _modified(card: ModelCard, started_at: float) -> str:
    return _time(card.modified_at or started_at)


@router.get("/api/tags", tags=["ollama"])
async def tags(request: Request):
    state = state_of(request)
    state.require_started()
    return {"models": [{"name": card.name, "model": card.name, "modified_at": _modified(card, state.started_at),
                        "size": card.size_bytes, "digest": "", "details": _details(card)}
                       for card in await state.pool.cards()]}


FOREVER_AS_OLLAMA_S = (2 ** 63 - 1) / 1e9      # Ollama shows "forever" as now + Go's longest duration


@router.get("/api/ps", tags=["ollama"])
async def ps(request: Request):
    """The models in memory: their real size (RAM + VRAM, from llama.cpp's buffers), VRAM share, context per
    request, and when keep_alive will unload them."""
    state = state_of(request)
    state.require_started()
    out = []
    for s in state.pool.status():
        if s.state is not State.LOADED:
            continue
        expires = s.expires_at if math.isfinite(s.expires_at) else time.time() + FOREVER_AS_OLLAMA_S
        out.append({"name": s.name, "model": s.name, "size": sum(s.resident.values()),
                    "size_vram": sum(n for d, n in s.resident.items() if d != "CPU"), "digest": "",
                    "details": _details(s.card), "expires_at": _time(min(expires, MAX_TIMESTAMP)),
                    "context_length": s.n_ctx})
    return {"models": out}


class ShowRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    model: str | None = Field(default=None, min_length=1)
    name: str | None = Field(default=None, min_length=1)    # older clients send "name"
    verbose: bool | None = None


TOOL_CALLING = True    # every model calls tools (the generic format serves templates without tool support)


EMBEDDING = True       # /api/embed, /api/embeddings and /v1/embeddings are served (runner/server/embeddings_api.py)


def capabilities(card: ModelCard) -> list[str]:
    """What this server does with the model, in Ollama's words. An embedding model (its GGUF declares a pooling
    type, the rule Ollama and llama.cpp use) embeds and does nothing else; any other model completes text, calls
    tools when this server does tool calling, and embeds when this server serves /api/embed."""
    if card.pooling:
        return ["embedding"] if EMBEDDING else []
    return ["completion"] + (["tools"] if TOOL_CALLING else []) + (["embedding"] if EMBEDDING else [])


def _parameters(n_ctx: int | None) -> str:
    """The settings a request gets when it sets none, as Ollama's Modelfile PARAMETER lines: the context per
    request (once the model is loaded) and the sampling defaults."""
    d = SamplingParams()
    values: list[tuple[str, object]] = [("num_ctx", n_ctx)] if n_ctx else []
    values += [("temperature", d.temperature), ("top_k", d.top_k), ("top_p", d.top_p), ("min_p", d.min_p),
               ("repeat_penalty", d.repeat_penalty), ("repeat_last_n", d.repeat_last_n)]
    return "".join(f"{k:<30} {v}\n" for k, v in values)


@router.post("/api/show", tags=["ollama"])
async def show(body: ShowRequest, request: Request):
    name = body.model or body.name
    if not name:
        raise ApiError(400, "model: this field is required", param="model")
    state = state_of(request)
    ref = state.resolve(name)
    card, engine = state.pool.card(name), state.pool.engine(name)
    info: dict[str, Any] = {"general.architecture": card.family or "unknown", "general.name": card.name}
    if engine is not None:
        info[f"{card.family or 'llm'}.context_length"] = engine.n_ctx
    info.update(card.extra)
    parameters = _parameters(engine.n_ctx if engine is not None else None)
    modelfile = f"FROM {card.path or card.name}\n" + "".join(f"PARAMETER {line}\n"
                                                            for line in parameters.splitlines())
    out = {"modelfile": modelfile, "parameters": parameters, "template": card.chat_template,
           "details": _details(card), "model_info": info, "capabilities": capabilities(card),
           "modified_at": _modified(card, state.started_at)}
    lic = ref.entry.card if ref.entry is not None else None
    if lic is not None:     # the licence's name and where to read it (Ollama gives the text; we point to it)
        out["license"] = lic.license_name + (f"\n{lic.license_url}" if lic.license_url else "")
    return out


@router.get("/api/version", tags=["ollama"])
async def version():
    return {"version": __version__}
