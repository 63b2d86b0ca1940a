"""`llmrun chat`: a conversation with a loaded engine, in a terminal REPL (prompt_toolkit) or once from a pipe.

The conversation state (`ChatSession`) is separate from the terminal (`Repl`), so both are testable; the REPL
streams the reply, stops it on Ctrl-C (cancelling the generation, which frees its KV cells), and keeps history
across sessions in dirs.home()/chat_history."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, TextIO

from runner.engine.types import ChatMessage, Completion, Engine, Generation, SamplingParams
from runner.core.errors import LlmrunError, UsageError
from runner.core.files import atomic_write_json

DEFAULT_SYSTEM = "You are a helpful assistant."
SETTABLE = {"temperature": float, "top_p": float, "max_tokens": int, "seed": int}
ALIASES = {"top-p": "top_p", "max-tokens": "max_tokens", "temp": "temperature"}

HELP = """\
/help                 this help
/bye                  exit (or Ctrl-D)
/clear                forget the conversation
/system TEXT          set the system prompt (empty: none)
/set KEY VALUE        temperature, top_p, max_tokens, seed (max_tokens/seed: "none" to unset)
/stats                tokens, speed, context used
/save FILE            save the conversation as JSON
/load FILE            load a conversation saved with /save
\"\"\"                   start and end a multi-line message (or Alt-Enter / Esc-Enter for a new line)
Ctrl-C                stop the reply"""


@dataclass
class TurnStats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    decode_tps: float = 0.0
    ttft_s: float = 0.0


@dataclass
class ChatSession:
    """The conversation: system prompt, messages, sampling parameters and counters."""

    engine: Engine
    params: SamplingParams = field(default_factory=SamplingParams)
    system: str | None = DEFAULT_SYSTEM
    messages: list[ChatMessage] = field(default_factory=list)
    total_prompt_tokens: int = 0
    total_completion_tokens: int = 0
    last: TurnStats = field(default_factory=TurnStats)
    context_used: int = 0

    def conversation(self) -> list[ChatMessage]:
        return ([ChatMessage("system", self.system)] if self.system else []) + self.messages

    def ask(self, text: str) -> Generation:
        """Submit a user message; returns the Generation. Call `record()` with its Completion afterwards."""
        self.messages.append(ChatMessage("user", text))
        try:
            return self.engine.chat(self.conversation(), self.params)
        except LlmrunError:
            self.messages.pop()
            raise

    def record(self, c: Completion) -> None:
        """Add the answer (even a stopped, partial one) and drop the turns the engine had to leave out."""
        if c.text or c.finish_reason != "cancelled":
            self.messages.append(ChatMessage("assistant", c.text))
        elif self.messages and self.messages[-1].role == "user":
            self.messages.pop()  # stopped before any text: forget the question too
        if c.dropped_messages:
            del self.messages[:c.dropped_messages]
        self.total_prompt_tokens += c.usage.prompt_tokens - c.usage.cached_tokens
        self.total_completion_tokens += c.usage.completion_tokens
        self.last = TurnStats(c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.cached_tokens,
                              c.decode_tokens_per_s, c.time_to_first_token_s)
        self.context_used = c.usage.prompt_tokens + c.usage.completion_tokens

    def clear(self) -> None:
        self.messages.clear()
        self.context_used = 0
        self.last = TurnStats()

    def set(self, key: str, value: str) -> str:
        """`/set key value`: returns a confirmation; UsageError for unknown keys or bad values."""
        from runner.engine.batching import validate_params

        key = ALIASES.get(key.lower(), key.lower())
        if key not in SETTABLE:
            raise UsageError(f"cannot set {key!r}", hint="settable: " + ", ".join(SETTABLE))
        if value.lower() in ("none", "off", "default") and key in ("max_tokens", "seed"):
            parsed = None
        else:
            try:
                parsed = SETTABLE[key](value)
            except ValueError:
                kind = "a number" if SETTABLE[key] is float else "a whole number"
                raise UsageError(f"{key} must be {kind}, not {value!r}") from None
        change: dict[str, Any] = {key: parsed}   # key is one of SETTABLE, parsed to its type
        params = replace(self.params, **change)
        validate_params(params)
        self.params = params
        return f"{key} = {parsed}"

    def stats_text(self) -> str:
        n_ctx = self.engine.n_ctx
        pct = 100 * self.context_used / n_ctx if n_ctx else 0
        lines = [f"model           {self.engine.model_name}",
                 f"context used    {self.context_used} / {n_ctx} tokens ({pct:.0f}%)",
                 f"messages        {len(self.messages)}",
                 f"tokens          {self.total_prompt_tokens} prompt evaluated, {self.total_completion_tokens} generated"]
        if self.last.completion_tokens:
            lines.append(f"last reply      {self.last.completion_tokens} tokens, {self.last.decode_tps:.1f} tok/s, "
                         f"first token after {self.last.ttft_s:.2f} s, {self.last.cached_tokens} prompt tokens reused")
        p = self.params
        lines.append(f"sampling        temperature {p.temperature}, top_p {p.top_p}, max_tokens {p.max_tokens}, "
                     f"seed {p.seed}")
        return "\n".join(lines)

    def save(self, path: Path) -> None:
        data = {"model": self.engine.model_name, "system": self.system,
                "messages": [asdict(m) for m in self.messages],
                "params": {k: getattr(self.params, k) for k in SETTABLE}}
        path = Path(path).expanduser()
        try:
            atomic_write_json(path, data, ensure_ascii=False)
        except OSError as e:
            raise UsageError(f"cannot save to {path}: {e.strerror}") from e

    def load(self, path: Path) -> int:
        path = Path(path).expanduser()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise UsageError(f"cannot read {path}: {e.strerror}") from e
        except json.JSONDecodeError as e:
            raise UsageError(f"{path} is not JSON: {e.msg} at line {e.lineno}",
                             hint="load a file written by /save") from e
        try:
            messages = [ChatMessage(m["role"], m["content"]) for m in data["messages"]]
            system = data.get("system")
        except (KeyError, TypeError) as e:
            raise UsageError(f"{path} is not a saved conversation (no messages list)",
                             hint="load a file written by /save") from e
        bad = [m.role for m in messages if m.role not in ("user", "assistant", "system", "tool")
               or not isinstance(m.content, str)]
        if bad:
            raise UsageError(f"{path} has messages with bad roles or content: {bad[:3]}")
        self.messages = [m for m in messages if m.role != "system"]
        self.system = system if isinstance(system, str) else self.system
        self.context_used = 0
        return len(self.messages)


def stream_reply(session: ChatSession, text: str, out: TextIO, err: TextIO) -> Completion:
    """Ask, stream the reply to `out`, and record it. Ctrl-C stops the reply (KeyboardInterrupt is consumed)."""
    gen = session.ask(text)
    if gen.notice:
        err.write(f"[{gen.notice}]\n")
        err.flush()
    try:
        for delta in gen:
            out.write(delta)
            out.flush()
    except KeyboardInterrupt:
        gen.cancel()
        out.write("\n[stopped]")
    c = gen.result()
    out.write("\n")
    out.flush()
    if c.finish_reason == "error":
        err.write(f"error: {c.error}\n")
    elif c.finish_reason == "length" and session.params.max_tokens is None:
        err.write("[the reply reached the end of the context]\n")
    session.record(c)
    return c


class Repl:
    """The interactive loop. `read` is injected (prompt_toolkit by default) so the loop runs without a terminal."""

    def __init__(self, session: ChatSession, *, out: TextIO = sys.stdout, err: TextIO = sys.stderr,
                 read: Callable[[str], str] | None = None):
        self.session = session
        self.out, self.err = out, err
        self.read = read or self._prompt_toolkit_reader()

    def _prompt_toolkit_reader(self) -> Callable[[str], str]:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory
        from prompt_toolkit.key_binding import KeyBindings

        from runner.core import dirs

        kb = KeyBindings()

        @kb.add("escape", "enter")
        def _newline(event):
            event.current_buffer.insert_text("\n")

        history = None
        try:
            dirs.home().mkdir(parents=True, exist_ok=True)
            history = FileHistory(str(dirs.home() / "chat_history"))
        except OSError:
            pass
        ps = PromptSession(history=history, key_bindings=kb, enable_history_search=False)
        return lambda prompt: ps.prompt(prompt)

    def _read_message(self) -> str | None:
        """One message: a line, or a \"\"\" block. None at Ctrl-D."""
        try:
            line = self.read(">>> ")
        except EOFError:
            return None
        if not line.lstrip().startswith('"""'):
            return line
        body = line.lstrip()[3:]
        if body.rstrip().endswith('"""'):
            return body.rstrip()[:-3]
        parts = [body] if body else []
        while True:
            try:
                nxt = self.read("... ")
            except EOFError:
                return "\n".join(parts)
            if nxt.rstrip().endswith('"""'):
                parts.append(nxt.rstrip()[:-3])
                return "\n".join(p for p in parts if p is not None).strip("\n")
            parts.append(nxt)

    def say(self, text: str) -> None:
        self.err.write(text + "\n")
        self.err.flush()

    def run(self) -> int:
        self.say(f"chatting with {self.session.engine.model_name}; /help for commands, /bye or Ctrl-D to exit")
        while True:
            try:
                text = self._read_message()
            except KeyboardInterrupt:
                self.say("(use /bye or Ctrl-D to exit)")
                continue
            if text is None:
                self.out.write("\n")
                return 0
            if not text.strip():
                continue
            try:
                if text.startswith("/") and not text.startswith("//"):
                    if self.command(text) == "bye":
                        return 0
                    continue
                stream_reply(self.session, text, self.out, self.err)
            except LlmrunError as e:
                self.say(f"error: {e.message}" + (f"\nhint: {e.hint}" if e.hint else ""))
            except KeyboardInterrupt:
                self.say("(stopped)")

    def command(self, line: str) -> str | None:
        cmd, _, arg = line[1:].partition(" ")
        cmd, arg = cmd.lower(), arg.strip()
        s = self.session
        if cmd in ("bye", "exit", "quit"):
            return "bye"
        if cmd in ("help", "?"):
            self.say(HELP)
        elif cmd == "clear":
            s.clear()
            self.say("conversation cleared")
        elif cmd == "system":
            s.system = arg or None
            self.say(f"system prompt set" if arg else "system prompt removed")
        elif cmd == "set":
            key, _, value = arg.partition(" ")
            if not key or not value.strip():
                raise UsageError("usage: /set KEY VALUE", hint="keys: " + ", ".join(SETTABLE))
            self.say(s.set(key, value.strip()))
        elif cmd == "stats":
            self.say(s.stats_text())
        elif cmd == "save":
            if not arg:
                raise UsageError("usage: /save FILE")
            s.save(Path(arg))
            self.say(f"saved {len(s.messages)} messages to {arg}")
        elif cmd == "load":
            if not arg:
                raise UsageError("usage: /load FILE")
            self.say(f"loaded {s.load(Path(arg))} messages from {arg}")
        else:
            raise UsageError(f"unknown command /{cmd}", hint="/help lists the commands")
        return None


def answer_once(session: ChatSession, text: str, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Non-interactive: one question, one streamed answer. Exit status 0, or 1 if the engine failed."""
    if not text.strip():
        raise UsageError("no question given", hint='echo "question" | llmrun chat, or llmrun run "question"')
    c = stream_reply(session, text.strip(), out, err)
    return 1 if c.finish_reason == "error" else 0
