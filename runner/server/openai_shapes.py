"""OpenAI's response shapes, from the native path's values: chat messages with tool calls (or the legacy
`function_call`), finish reasons, usage, log probabilities (chat's `content` list and completions' legacy
arrays), and the server-sent event streams of both endpoints, one or n choices."""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

from runner.engine.types import Completion, Delta, TokenLogprob, ToolCallDelta
from runner.server.errors import ApiError
from runner.server.native import Run


def message(c: Completion, *, legacy: bool = False) -> dict[str, Any]:
    """The assistant message: content (null when the turn is only tool calls), and the calls."""
    content = c.text if c.text.strip() or not c.tool_calls else None
    msg: dict[str, Any] = {"role": "assistant", "content": content}
    if c.tool_calls and legacy:
        first = c.tool_calls[0]
        msg["function_call"] = {"name": first.name, "arguments": first.arguments}
    elif c.tool_calls:
        msg["tool_calls"] = [{"id": t.id, "type": "function", "function": {"name": t.name, "arguments": t.arguments}}
                             for t in c.tool_calls]
    return msg


def finish(c: Completion | None, legacy: bool = False) -> str:
    if c is None:
        return "stop"
    if c.finish_reason == "length":
        return "length"
    if c.finish_reason == "tool_calls":
        return "function_call" if legacy else "tool_calls"
    return "stop"


def usage(run: Run) -> dict[str, Any]:
    cs = run.completions
    p = cs[0].usage.prompt_tokens if cs else 0
    n = sum(c.usage.completion_tokens for c in cs)
    out: dict[str, Any] = {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}
    if cs and cs[0].usage.cached_tokens:
        out["prompt_tokens_details"] = {"cached_tokens": cs[0].usage.cached_tokens}
    return out


def timings(run: Run) -> dict[str, Any] | None:
    """The engine's own clock, as llama-server reports it next to the usage (its `timings` object): prompt
    evaluation up to the first token, then decoding (the first choice's). None when the generation did not
    finish."""
    c = run.completion
    if c is None:
        return None
    n = c.usage.completion_tokens
    # the engine times decoding from the first token to the last: n - 1 steps
    predicted_ms = 1000 * (n - 1) / c.decode_tokens_per_s if c.decode_tokens_per_s > 0 and n > 1 else 0.0
    return {"prompt_n": c.usage.prompt_tokens, "prompt_ms": round(1000 * c.time_to_first_token_s, 3),
            "predicted_n": n, "predicted_ms": round(predicted_ms, 3),
            "predicted_per_second": round(c.decode_tokens_per_s, 3)}


def _entry(t: TokenLogprob) -> dict[str, Any]:
    return {"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes),
            "top_logprobs": [{"token": a.token, "logprob": a.logprob, "bytes": list(a.bytes)} for a in t.top]}


def chat_logprobs(lps: tuple[TokenLogprob, ...] | None) -> dict[str, Any] | None:
    return None if lps is None else {"content": [_entry(t) for t in lps], "refusal": None}


def completion_logprobs(lps: tuple[TokenLogprob, ...] | None, offset: int = 0) -> dict[str, Any] | None:
    """The completions endpoint's legacy shape: parallel arrays, `top_logprobs` as {token: logprob}."""
    if lps is None:
        return None
    offsets = []
    for t in lps:
        offsets.append(offset)
        offset += len(t.token)
    return {"tokens": [t.token for t in lps], "token_logprobs": [t.logprob for t in lps],
            "top_logprobs": [{a.token: a.logprob for a in t.top} for t in lps], "text_offset": offsets}


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _error_event(e: ApiError) -> str:
    return _sse({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}})


def _call_pieces(calls: tuple[ToolCallDelta, ...], legacy: bool) -> dict[str, Any]:
    if legacy:             # the legacy API streams one function_call: its name, then its arguments
        first = [c for c in calls if c.index == 0]
        fc: dict[str, Any] = {"arguments": "".join(c.arguments for c in first)}
        if any(c.name for c in first):
            fc["name"] = next(c.name for c in first if c.name)
        return {"function_call": fc} if first else {}
    out = []
    for c in calls:
        if c.name is not None:
            out.append({"index": c.index, "id": c.id, "type": "function",
                        "function": {"name": c.name, "arguments": c.arguments}})
        else:
            out.append({"index": c.index, "function": {"arguments": c.arguments}})
    return {"tool_calls": out}


async def chat_events(run: Run, head: dict[str, Any], include_usage: bool, *, legacy: bool) -> AsyncIterator[str]:
    """The chat SSE stream, as OpenAI sends it: a first chunk per choice with the role, chunks with content
    and/or tool-call pieces (and logprobs when asked), a last chunk per choice with its finish reason, the
    usage chunk when asked for, then `[DONE]`."""
    def chunk(index: int, delta: dict[str, Any], finish_reason: str | None, lps: Any = None) -> str:
        obj = {**head, "system_fingerprint": "llmrun",
               "choices": [{"index": index, "delta": delta, "logprobs": lps, "finish_reason": finish_reason}]}
        if include_usage:
            obj["usage"] = None
        return _sse(obj)

    for i in range(len(run.choices)):
        yield chunk(i, {"role": "assistant", "content": ""}, None)
    try:
        async for i, d in run.deltas():
            delta: dict[str, Any] = {}
            if d.text or not d.tool_calls:
                delta["content"] = d.text
            if d.tool_calls:
                delta.update(_call_pieces(d.tool_calls, legacy))
            lps = {"content": [_entry(t) for t in d.logprobs], "refusal": None} if d.logprobs else None
            yield chunk(i, delta, None, lps)
    except ApiError as e:
        yield _error_event(e)
        return
    for i, c in enumerate(run.completions):
        yield chunk(i, {}, finish(c, legacy))
    if include_usage:
        yield _sse({**head, "system_fingerprint": "llmrun", "choices": [], "usage": usage(run),
                    "timings": timings(run)})
    yield "data: [DONE]\n\n"


async def completion_events(run: Run, head: dict[str, Any], include_usage: bool, *, echo: str) -> AsyncIterator[str]:
    """The completions SSE stream: text chunks (the prompt first with echo), a last chunk per choice, usage,
    `[DONE]`."""
    offsets = [0] * len(run.choices)

    def chunk(index: int, text: str, finish_reason: str | None, d: Delta | None = None) -> str:
        lps = completion_logprobs(d.logprobs, offsets[index]) if d is not None and d.logprobs else None
        offsets[index] += sum(len(t.token) for t in d.logprobs) if d is not None else len(text)
        obj = {**head, "system_fingerprint": "llmrun",
               "choices": [{"index": index, "text": text, "logprobs": lps, "finish_reason": finish_reason}]}
        if include_usage:
            obj["usage"] = None
        return _sse(obj)

    if echo:
        for i in range(len(run.choices)):
            yield chunk(i, echo, None)
    try:
        async for i, d in run.deltas():
            yield chunk(i, d.text, None, d)
    except ApiError as e:
        yield _error_event(e)
        return
    for i, c in enumerate(run.completions):
        yield chunk(i, "", finish(c))
    if include_usage:
        yield _sse({**head, "system_fingerprint": "llmrun", "choices": [], "usage": usage(run),
                    "timings": timings(run)})
    yield "data: [DONE]\n\n"
