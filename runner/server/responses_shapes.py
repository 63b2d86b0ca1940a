"""The Responses API's shapes, from the native path's values: the response object, its output items (an assistant
`message` with one `output_text` part, and one `function_call` item per call), usage, and the typed server-sent
event stream the `openai` client parses (`response.created` ... `response.completed`, each event with its
`sequence_number`)."""

from __future__ import annotations

import itertools
import json
import uuid
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

from runner.engine.types import Completion, Tools
from runner.server.errors import ApiError
from runner.server.native import Run

if TYPE_CHECKING:
    from runner.server.responses_api import ResponsesRequest


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def response_object(rid: str, body: "ResponsesRequest", created: int, tools: Tools | None) -> dict[str, Any]:
    """The response as it starts (status in_progress, no output yet): the request's settings echoed."""
    fmt = body.text.format if body.text is not None else None
    choice: Any = "auto"
    if tools is not None:
        choice = {"type": "function", "name": tools.function} if tools.choice == "function" else tools.choice
    elif isinstance(body.tool_choice, str):
        choice = body.tool_choice
    return {
        "id": rid, "object": "response", "created_at": created, "status": "in_progress", "background": False,
        "error": None, "incomplete_details": None, "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens, "model": body.model, "output": [],
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "previous_response_id": body.previous_response_id, "reasoning": {"effort": None, "summary": None},
        "store": body.store, "temperature": body.temperature, "top_p": body.top_p,
        "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt is not None else {"type": "text"}},
        "tool_choice": choice,
        "tools": [{"type": "function", "name": t.name, "description": t.description or None,
                   "parameters": t.parameters, "strict": bool(t.strict)} for t in body.tools or ()],
        "truncation": "disabled", "usage": None, "user": None, "metadata": body.metadata or {},
    }


def usage(c: Completion) -> dict[str, Any]:
    u = c.usage
    return {"input_tokens": u.prompt_tokens, "input_tokens_details": {"cached_tokens": u.cached_tokens},
            "output_tokens": u.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": u.total_tokens}


def _status(c: Completion) -> str:
    return "incomplete" if c.finish_reason == "length" else "completed"


def _message(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "status": status, "role": "assistant",
            "content": [_part(text)]}


def _part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _call(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "status": status, "call_id": call_id, "name": name,
            "arguments": arguments}


def output_items(c: Completion) -> list[dict[str, Any]]:
    """The answer's text as a message item (left out when the turn is only calls), then its calls."""
    items = []
    if c.text.strip() or not c.tool_calls:
        items.append(_message(_item_id("msg"), c.text, _status(c)))
    items += [_call(_item_id("fc"), t.id, t.name, t.arguments, "completed") for t in c.tool_calls]
    return items


def finished(base: dict[str, Any], output: list[dict[str, Any]], c: Completion) -> dict[str, Any]:
    status = _status(c)
    return {**base, "status": status, "output": output, "usage": usage(c),
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None}


async def events(run: Run, base: dict[str, Any],
                 keep: Callable[[dict[str, Any], Completion], None]) -> AsyncIterator[str]:
    """The typed SSE stream: response.created and .in_progress; per output item .output_item.added, then for a
    message .content_part.added, .output_text.delta..., .output_text.done, .content_part.done, for a call
    .function_call_arguments.delta..., .function_call_arguments.done; .output_item.done; finally
    response.completed (or .incomplete when max_output_tokens cut it). `keep` stores the finished response."""
    seq = itertools.count()

    def ev(kind: str, **fields: Any) -> str:
        data = {"type": kind, "sequence_number": next(seq), **fields}
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

    items: list[dict[str, Any]] = []
    message: dict[str, Any] | None = None          # the open message item, while text comes
    text = ""                                      # its text so far
    calls: dict[int, dict[str, Any]] = {}         # the call items by the engine's call index

    def open_message() -> list[str]:
        nonlocal message, text
        message, text = {**_message(_item_id("msg"), "", "in_progress"), "content": []}, ""
        items.append(message)
        out = len(items) - 1
        return [ev("response.output_item.added", output_index=out, item=message),
                ev("response.content_part.added", item_id=message["id"], output_index=out, content_index=0,
                   part=_part(""))]

    def close_message(status: str) -> list[str]:
        nonlocal message
        if message is None:
            return []
        m, message = message, None
        out = items.index(m)
        m.update(status=status, content=[_part(text)])
        return [ev("response.output_text.done", item_id=m["id"], output_index=out, content_index=0, text=text,
                   logprobs=[]),
                ev("response.content_part.done", item_id=m["id"], output_index=out, content_index=0,
                   part=_part(text)),
                ev("response.output_item.done", output_index=out, item=m)]

    yield ev("response.created", response=base)
    yield ev("response.in_progress", response=base)
    try:
        async for _, d in run.deltas():
            if d.text:
                if message is None:
                    for line in open_message():
                        yield line
                assert message is not None
                text += d.text
                yield ev("response.output_text.delta", item_id=message["id"], output_index=items.index(message),
                         content_index=0, delta=d.text, logprobs=[])
            for piece in d.tool_calls:
                call = calls.get(piece.index)
                if call is None:
                    for line in close_message("completed"):
                        yield line
                    call = calls[piece.index] = _call(_item_id("fc"), piece.id or "", piece.name or "", "",
                                                      "in_progress")
                    items.append(call)
                    yield ev("response.output_item.added", output_index=len(items) - 1, item=dict(call))
                if piece.arguments:
                    call["arguments"] += piece.arguments
                    yield ev("response.function_call_arguments.delta", item_id=call["id"],
                             output_index=items.index(call), delta=piece.arguments)
    except ApiError as e:
        yield ev("error", code=e.code, message=e.message, param=e.param)
        return
    c = run.completion
    assert c is not None, "the run finished without a completion"
    if not items:                      # an empty answer is still a message, as the JSON answer has it
        for line in open_message():
            yield line
    for line in close_message(_status(c)):
        yield line
    for index, call in sorted(calls.items()):
        final = c.tool_calls[index] if index < len(c.tool_calls) else None
        if final is not None:          # the parsed call: what the deltas add up to, normalised
            call.update(name=final.name, arguments=final.arguments)
        call["status"] = "completed"
        out = items.index(call)
        yield ev("response.function_call_arguments.done", item_id=call["id"], output_index=out, name=call["name"],
                 arguments=call["arguments"])
        yield ev("response.output_item.done", output_index=out, item=call)
    response = finished(base, items, c)
    keep(response, c)
    yield ev("response.incomplete" if response["status"] == "incomplete" else "response.completed",
             response=response)
