"""The streaming side of tool calling: turns generated text into answer text and tool calls as it arrives.

A reply is answer text, then (from a format's marker on: `<tool_call>`, `[TOOL_CALLS]`, or a JSON object that
opens the reply) a call region holding JSON call objects `{"name": ..., "arguments": {...}}` at a known
nesting depth. The answer text streams with any possible start of a marker held back (as stop strings are);
in the call region each call streams as soon as its name is known: a first piece with its id and name, then
fragments of its arguments JSON as they are generated. Their concatenation is the call's `arguments`, the same
text a non-streamed answer carries. Pure Python, no llama.cpp."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable

from runner.engine.types import ToolCall, ToolCallDelta

ARGUMENT_KEYS = ("arguments", "parameters")     # Llama 3.x writes "parameters"


@dataclass
class _Call:
    index: int
    id: str
    name: str | None = None
    args: str | None = None          # complete arguments text, once known
    args_start: int | None = None    # offset of a streaming arguments object in the region
    emitted_header: bool = False
    emitted: int = 0                 # characters of the arguments already emitted
    pieces: list[str] = field(default_factory=list)


class CallScanner:
    """Follows the JSON structure of a call region incrementally. Call objects are the objects opened at
    nesting `depth` (0: top-level objects between tags; 1: inside `[`; 2: in `{"tool_calls": [`); text outside
    JSON at depth 0 (tags, separators) is skipped."""

    def __init__(self, depth: int, new_id: Callable[[], str]):
        self.depth = depth
        self.new_id = new_id
        self.buf = ""
        self.stack: list[str] = []
        self.in_str = False
        self.esc = False
        self.str_start = 0
        self.calls: list[_Call] = []
        self.call: _Call | None = None
        self.expect = "key"              # at call level: key, colon, value, after
        self.key: str | None = None
        self.value_start: int | None = None
        self.value_kind: str | None = None    # container, string, primitive

    @property
    def level(self) -> int:
        return self.depth + 1

    def feed(self, text: str) -> list[ToolCallDelta]:
        start = len(self.buf)
        self.buf += text
        for i in range(start, len(self.buf)):
            self._char(i, self.buf[i])
        return self._emit(final=False)

    def close(self) -> list[ToolCallDelta]:
        """At the end of the generation: what is left of the calls (a truncated one keeps what it has)."""
        if self.call is not None and self.value_kind == "primitive" and self.value_start is not None:
            self._value_done(self.buf[self.value_start:].strip(), decode=True)
        return self._emit(final=True)

    # -------------------------------------------------------------------------------------------- structure
    def _char(self, i: int, ch: str) -> None:
        if self.in_str:
            if self.esc:
                self.esc = False
            elif ch == "\\":
                self.esc = True
            elif ch == '"':
                self.in_str = False
                self._string_done(i)
            return
        at_level = self.call is not None and len(self.stack) == self.level
        if at_level and self.value_kind == "primitive" and (ch in ",}]" or ch.isspace()):
            assert self.value_start is not None
            self._value_done(self.buf[self.value_start:i], decode=True)
        if ch == '"':
            self.in_str = True
            self.str_start = i
            if at_level and self.expect == "value":
                self.value_start, self.value_kind = i, "string"
        elif ch in "{[":
            if self.call is None and len(self.stack) == self.depth and ch == "{":
                self.call = _Call(index=len(self.calls), id=self.new_id())
                self.calls.append(self.call)
                self.expect, self.key = "key", None
            elif at_level and self.expect == "value":
                self.value_start, self.value_kind = i, "container"
                if self.key in ARGUMENT_KEYS and self.call is not None and self.call.args is None:
                    self.call.args_start = i
            self.stack.append(ch)
        elif ch in "}]":
            before = len(self.stack)
            if self.stack:
                self.stack.pop()
            if self.call is not None and before == self.level:       # the call object closed
                self.call, self.value_kind, self.value_start = None, None, None
            elif self.call is not None and before == self.level + 1 and self.value_kind == "container":
                assert self.value_start is not None
                self._value_done(self.buf[self.value_start:i + 1], decode=False)
        elif at_level and ch == ":" and self.expect == "colon":
            self.expect = "value"
        elif at_level and ch == ",":
            self.expect, self.key = "key", None
        elif at_level and self.expect == "value" and not ch.isspace() and self.value_kind is None:
            self.value_start, self.value_kind = i, "primitive"

    def _string_done(self, i: int) -> None:
        if self.call is None or len(self.stack) != self.level:
            return
        raw = self.buf[self.str_start:i + 1]
        if self.expect == "key":
            key = _loads(raw)
            self.key = key if isinstance(key, str) else None
            self.expect = "colon"
        elif self.expect == "value" and self.value_kind == "string":
            self._value_done(raw, decode=True)

    def _value_done(self, raw: str, *, decode: bool) -> None:
        call, key = self.call, self.key
        self.value_kind, self.value_start = None, None
        self.expect = "after"
        if call is None:
            return
        if key == "name" and decode and call.name is None:
            name = _loads(raw)
            call.name = name if isinstance(name, str) else None
        elif key in ARGUMENT_KEYS and call.args is None:
            call.args_start = None
            if not decode:                      # an object (or array): its text as generated
                call.args = raw
            else:                               # a JSON string holding the arguments' JSON text, or a literal
                value = _loads(raw)
                call.args = value if isinstance(value, str) else raw.strip()

    # -------------------------------------------------------------------------------------------- output
    def _emit(self, *, final: bool) -> list[ToolCallDelta]:
        out: list[ToolCallDelta] = []
        for call in self.calls:
            if call.name is None:
                continue
            if not call.emitted_header:
                call.emitted_header = True
                out.append(ToolCallDelta(call.index, id=call.id, name=call.name))
            text = self._args_text(call, final)
            if len(text) > call.emitted:
                piece = text[call.emitted:]
                call.emitted = len(text)
                call.pieces.append(piece)
                out.append(ToolCallDelta(call.index, arguments=piece))
        return out

    def _args_text(self, call: _Call, final: bool) -> str:
        if call.args is not None:
            return call.args
        if call.args_start is not None:         # an arguments object being generated: stream what there is
            return self.buf[call.args_start:]
        return "{}" if final else ""          # a call without arguments (a function that takes none)

    def tool_calls(self) -> tuple[ToolCall, ...]:
        """The calls that got a name, each with the arguments text streamed for it."""
        return tuple(ToolCall(c.id, c.name, "".join(c.pieces)) for c in self.calls if c.name is not None)


def _loads(raw: str) -> object:
    try:
        return json.loads(raw)
    except ValueError:
        return None


class ToolStream:
    """Splits a reply into answer text and tool calls. `feed(text)` and `close()` return (text to emit, call
    pieces); afterwards `text` is the whole answer text and `tool_calls` the calls."""

    def __init__(self, markers: tuple[str, ...], *, at_start: bool, depth: int, new_id: Callable[[], str]):
        self.markers = markers
        self.at_start = at_start
        self.scanner = CallScanner(depth, new_id)
        self.text = ""                   # answer text emitted
        self._held = ""
        self._region: str | None = None  # raw text from the marker on
        self._decided = False            # at_start formats: the reply began with text, not a call

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        if self._region is not None:
            self._region += text
            return "", self.scanner.feed(text)
        buf = self._held + text
        self._held = ""
        if self.at_start and not self._decided:
            body = buf.lstrip()
            if not body or any(m.startswith(body) and m != body for m in self.markers):
                self._held = buf                     # whitespace, or what may become a marker
                return "", []
            marker = next((m for m in self.markers if body.startswith(m)), None)
            if marker is None:
                self._decided = True
                return self._out(buf), []
            return "", self._enter(body, marker)
        if self.at_start:
            return self._out(buf), []
        first = min(((buf.find(m), m) for m in self.markers if m in buf), default=None)
        if first is not None:
            i, marker = first
            return self._out(buf[:i]), self._enter(buf[i:], marker)
        keep = 0
        for m in self.markers:
            for k in range(min(len(m) - 1, len(buf)), 0, -1):
                if buf.endswith(m[:k]):
                    keep = max(keep, k)
                    break
        self._held = buf[len(buf) - keep:] if keep else ""
        return self._out(buf[:len(buf) - keep]), []

    def close(self) -> tuple[str, list[ToolCallDelta]]:
        if self._region is None:
            rest, self._held = self._held, ""
            return self._out(rest), []
        pieces = self.scanner.close()
        if not self.scanner.tool_calls():       # a marker but no call in what followed: it was text after all
            region, self._region = self._region, None
            return self._out(region), []
        return "", pieces

    @property
    def tool_calls(self) -> tuple[ToolCall, ...]:
        return self.scanner.tool_calls() if self._region is not None else ()

    def _out(self, text: str) -> str:
        self.text += text
        return text

    def _enter(self, region: str, marker: str) -> list[ToolCallDelta]:
        self._region = region
        body = region if marker == "{" else region[len(marker):]   # a `{` marker is the call's own brace
        return self.scanner.feed(body)
