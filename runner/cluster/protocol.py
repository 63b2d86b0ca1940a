"""The protocol between IsolatedEngine (runner.cluster.isolated) and its child process: one frozen dataclass per
message, pickled over a socketpair, and the allow-lists of what the child runs (`GENERATIONS`, `QUERIES`,
`CALLS`): nothing else a message names is ever called.

    parent -> child   Load (first), Generate, Query, Embed, Tokenize, Detokenize, ApplyTemplate, Cancel, Close
    child -> parent   Ready | LoadFailed (after Load), Started, Piece, Done (a generation), Reply | Raised (a call)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal, Mapping

from runner.core import errors
from runner.core.errors import EngineError, LlmrunError
from runner.core.run_settings import RunSettings
from runner.engine import types
from runner.engine.types import ChatMessage, Completion, EmbedInput, Engine, SamplingParams, Tools


GenerationOp = Literal["chat", "complete", "generate"]
QueryOp = Literal["tokenize", "prompt_tokens", "stats"]


@dataclass(frozen=True)
class ErrorInfo:
    """An LlmrunError across the process boundary (class name, message, hint)."""

    kind: str
    message: str
    hint: str | None

    @classmethod
    def of(cls, e: LlmrunError) -> "ErrorInfo":
        return cls(type(e).__name__, e.message, e.hint)

    def error(self) -> LlmrunError:
        """The error again, as the class it was when that is one of ours (EngineError otherwise)."""
        found = getattr(errors, self.kind, None)
        if isinstance(found, type) and issubclass(found, LlmrunError) and found is not errors.UnknownModelError:
            return found(self.message, hint=self.hint)
        return EngineError(self.message, hint=self.hint)


# parent -> child
@dataclass(frozen=True)
class Load:
    model_path: str
    settings: RunSettings
    options: Mapping[str, Any]       # keyword arguments of runner.engine.batching.start_engine


@dataclass(frozen=True)
class Generate:
    rid: int
    op: GenerationOp
    payload: Any                     # messages, prompt text or tokens
    params: SamplingParams
    tools: Tools | None = None                       # chat only
    template_kwargs: Mapping[str, Any] | None = None  # chat only


@dataclass(frozen=True)
class Query:
    rid: int
    op: QueryOp
    text: str = ""


@dataclass(frozen=True)
class Embed:
    rid: int
    inputs: tuple[EmbedInput, ...]
    truncate: bool
    op: ClassVar[str] = "embed"


@dataclass(frozen=True)
class Tokenize:
    rid: int
    text: str
    add_special: bool
    parse_special: bool
    op: ClassVar[str] = "tokenize"


@dataclass(frozen=True)
class Detokenize:
    rid: int
    tokens: tuple[int, ...]
    pieces: bool                     # True: each token's bytes (token_pieces), False: the text (detokenize)
    op: ClassVar[str] = "detokenize"


@dataclass(frozen=True)
class ApplyTemplate:
    rid: int
    messages: tuple[ChatMessage, ...]
    tools: Tools | None = None
    op: ClassVar[str] = "apply_template"


Call = Embed | Tokenize | Detokenize | ApplyTemplate


@dataclass(frozen=True)
class Cancel:
    rid: int


@dataclass(frozen=True)
class Close:
    pass


# child -> parent
@dataclass(frozen=True)
class Ready:
    model_name: str
    n_ctx: int
    n_parallel: int
    buffers: Mapping[str, int]


@dataclass(frozen=True)
class LoadFailed:
    error: ErrorInfo


@dataclass(frozen=True)
class Started:
    rid: int
    notice: str | None
    dropped_messages: int


@dataclass(frozen=True)
class Piece:
    rid: int
    index: int                       # the choice (SamplingParams.n)
    delta: types.Delta


@dataclass(frozen=True)
class Done:
    rid: int
    index: int
    completion: Completion


@dataclass(frozen=True)
class Reply:
    rid: int
    value: Any


@dataclass(frozen=True)
class Raised:
    rid: int
    error: ErrorInfo


GENERATIONS: Mapping[str, Callable[[Engine, Generate], Any]] = {
    "chat": lambda e, m: e.chat(m.payload, m.params, tools=m.tools, template_kwargs=m.template_kwargs),
    "complete": lambda e, m: e.complete(m.payload, m.params),
    "generate": lambda e, m: e.generate(m.payload, m.params),
}
QUERIES: Mapping[str, Callable[[Engine, str], Any]] = {
    "tokenize": lambda e, text: e.tokenize(text),
    "prompt_tokens": lambda e, text: e.prompt_tokens(text),
    "stats": lambda e, _text: e.stats(),
}
CALLS: Mapping[type, Callable[[Engine, Any], Any]] = {     # each runs in its own thread of the child (embed blocks)
    Embed: lambda e, m: e.embed(m.inputs, truncate=m.truncate),
    Tokenize: lambda e, m: e.tokenize_with(m.text, add_special=m.add_special, parse_special=m.parse_special),
    Detokenize: lambda e, m: e.token_pieces(m.tokens) if m.pieces else e.detokenize(m.tokens),
    ApplyTemplate: lambda e, m: e.apply_template(m.messages, tools=m.tools),
}
