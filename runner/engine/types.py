"""The engine's native request/response values: the one path that `chat`, the OpenAI adapter and the Ollama
adapter all use. No llama_cpp import here, so the server and tests can use these without loading anything."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator, Literal, Mapping, Protocol, Sequence

from runner.core.errors import LlmrunError, UsageError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8          # 0 = greedy
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    typical_p: float = 1.0            # 1 = off (locally typical sampling)
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64           # the window of the three penalties (-1 = the whole context)
    frequency_penalty: float = 0.0    # OpenAI's: minus this times the count of each token in the window
    presence_penalty: float = 0.0     # OpenAI's: minus this once for each token present in the window
    logit_bias: tuple[tuple[int, float], ...] = ()   # (token id, added to its logit); -inf bans the token
    mirostat: Literal[0, 1, 2] = 0    # 1 or 2 replace top-k/top-p/min-p/typical-p with Mirostat (v1, v2)
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    seed: int | None = None           # None = random
    max_tokens: int | None = None     # None = until end of generation or context end
    stop: tuple[str, ...] = ()
    grammar: str | None = None        # GBNF text (JSON mode / json_schema / tool calls are compiled to this)
    grammar_triggers: tuple[str, ...] = ()   # lazy grammar: free text until one of these regexes matches
    ignore_eos: bool = False          # never sample end-of-generation tokens (benchmarks: fixed lengths)
    n: int = 1                        # choices from one prompt evaluation; choice i samples with seed + i
    logprobs: bool = False            # report each sampled token's log probability (Completion.logprobs)
    top_logprobs: int = 0             # and this many most likely alternatives per position (0-20)
    n_ctx: int | None = None          # a per-request context smaller than the loaded one (Ollama num_ctx)


def validate_params(p: SamplingParams) -> None:
    """Bad sampling values get a clear error before they reach llama.cpp."""
    if p.temperature < 0:
        raise UsageError(f"temperature must be 0 or more, not {p.temperature}", hint="0 = greedy; 0.7 is typical")
    if not 0 < p.top_p <= 1:
        raise UsageError(f"top_p must be in (0, 1], not {p.top_p}")
    if not 0 <= p.min_p <= 1:
        raise UsageError(f"min_p must be in [0, 1], not {p.min_p}")
    if p.top_k < 0:
        raise UsageError(f"top_k must be 0 (off) or more, not {p.top_k}")
    if p.max_tokens is not None and p.max_tokens < 1:
        raise UsageError(f"max_tokens must be at least 1, not {p.max_tokens}")
    if p.repeat_penalty <= 0:
        raise UsageError(f"repeat_penalty must be positive, not {p.repeat_penalty}")
    if not 0 < p.typical_p <= 1:
        raise UsageError(f"typical_p must be in (0, 1], not {p.typical_p}")
    for name in ("frequency_penalty", "presence_penalty", "mirostat_tau", "mirostat_eta"):
        if not math.isfinite(getattr(p, name)):
            raise UsageError(f"{name} must be a finite number, not {getattr(p, name)}")
    if p.mirostat not in (0, 1, 2):
        raise UsageError(f"mirostat must be 0 (off), 1 or 2, not {p.mirostat}")
    if p.n < 1:
        raise UsageError(f"n must be at least 1, not {p.n}")
    if not 0 <= p.top_logprobs <= 20:
        raise UsageError(f"top_logprobs must be 0 to 20, not {p.top_logprobs}")
    if p.n_ctx is not None and p.n_ctx < 1:
        raise UsageError(f"the request's context must be at least 1 token, not {p.n_ctx}")
    for token, bias in p.logit_bias:
        if math.isnan(bias) or bias == math.inf:
            raise UsageError(f"the logit bias of token {token} must be a number or -inf, not {bias}")


@dataclass(frozen=True)
class ToolCall:
    """A function call the model made (or made in an earlier turn). `arguments` is JSON text, as OpenAI sends
    it; `id` pairs it with the `tool` message that answers it."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Tool:
    """A function the model may call: its name, what it does, and a JSON schema of its arguments object."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})


@dataclass(frozen=True)
class Tools:
    """The tools a chat offers and how the model may use them: `auto` (call or answer), `none` (answer; the
    tools are not described), `required` (call at least one) or `function` (call `function`). With `required`
    and `function` a grammar makes every call valid JSON matching its schema; with `auto` the grammar takes
    over once the model starts a call. `parallel`: several calls in one turn."""

    functions: tuple[Tool, ...]
    choice: Literal["auto", "none", "required", "function"] = "auto"
    function: str | None = None       # with choice "function"
    parallel: bool = True


@dataclass(frozen=True)
class ChatMessage:
    role: Literal["system", "user", "assistant", "tool"]
    content: str
    tool_calls: tuple[ToolCall, ...] = ()   # an assistant turn's calls
    tool_call_id: str | None = None         # a tool turn: the call it answers
    name: str | None = None                 # a tool turn: the function's name (Ollama's tool_name)


@dataclass(frozen=True)
class TopLogprob:
    token: str
    bytes: bytes
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """One sampled token: its log probability under the model's distribution at that step (log-softmax of the
    raw logits over the whole vocabulary, before penalties, bias, grammar, temperature or truncation), and the
    `top` most likely tokens of that same distribution, most likely first."""

    token: str
    bytes: bytes
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of a streamed tool call: the first piece of call `index` carries its id and name, the next ones
    fragments of its arguments JSON (their concatenation is ToolCall.arguments)."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(frozen=True)
class Delta:
    """What a generation produced since the last delta: text, the log probabilities of the tokens behind it
    (when asked for), and tool-call pieces."""

    text: str = ""
    logprobs: tuple[TokenLogprob, ...] = ()
    tool_calls: tuple[ToolCallDelta, ...] = ()


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0            # prompt tokens reused from a kept KV prefix

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


FinishReason = Literal["stop", "length", "tool_calls", "cancelled", "error"]


@dataclass(frozen=True)
class Completion:
    text: str                         # the answer's text (without the tool calls' markup)
    finish_reason: FinishReason
    usage: Usage
    time_to_first_token_s: float
    decode_tokens_per_s: float
    error: str | None = None
    notice: str | None = None         # e.g. "context full: dropped the 2 oldest messages" (chat only)
    dropped_messages: int = 0         # messages left out of the prompt to fit the context
    tool_calls: tuple[ToolCall, ...] = ()
    logprobs: tuple[TokenLogprob, ...] | None = None   # with SamplingParams.logprobs: one per sampled token
    stop_sequence: str | None = None  # the stop string (SamplingParams.stop) that ended it, if one did


@dataclass(frozen=True)
class EngineStats:
    model: str
    n_ctx: int                        # per sequence
    n_parallel: int                   # slots
    busy_slots: int
    queued: int
    tokens_in: int
    tokens_out: int
    load_seconds: float
    buffers: dict[str, int] = field(default_factory=dict, compare=False)  # llama.cpp's logged buffer sizes
    # decode steps in which one sequence decoded alone (no other sequence, no prompt tokens): the tokens and the
    # seconds they took, i.e. this machine's real single-sequence decode speed for the planner (runner.app.bench)
    solo_decode_tokens: int = 0
    solo_decode_seconds: float = 0.0


Pooling = Literal["mean", "cls", "last"]


@dataclass(frozen=True)
class Embeddings:
    """What `Engine.embed` returns: one vector per input, in input order, pooled by llama.cpp over the model's
    last hidden states and NOT normalised (each API normalises as it specifies)."""

    vectors: tuple[tuple[float, ...], ...]
    prompt_tokens: int                 # tokens evaluated, every input together
    pooling: Pooling                   # the GGUF's pooling type, or "mean" for a model that declares none
    decodes: int                       # llama_decode calls that carried these inputs (64 short inputs: 1)
    truncated: tuple[int, ...] = ()    # indices of inputs cut to the embedding context (truncate=True only)

    @property
    def dimensions(self) -> int:
        return len(self.vectors[0]) if self.vectors else 0


EmbedInput = str | Sequence[int]       # a text, or token ids taken as they are


class Generation(Protocol):
    """A submitted request. Iterate (sync or async) for text deltas, or `deltas()` / `adeltas()` for Delta
    values (text, logprobs, tool-call pieces); `result()` waits for the end. With SamplingParams.n > 1 the
    engine returns the first choice and `choices` holds all n (itself first); otherwise `choices` is (self,).
    The one implementation is runner.engine.generation.GenerationHandle; engines differ only in what produces
    into it."""

    notice: str | None                 # what the engine had to do to fit the request, e.g. oldest turns left out
    dropped_messages: int              # chat messages left out of the prompt to fit the context

    @property
    def choices(self) -> "tuple[Generation, ...]": ...
    @property
    def completion(self) -> Completion | None: ...   # the end, once finished; never blocks
    def __iter__(self) -> Iterator[str]: ...
    def __aiter__(self) -> AsyncIterator[str]: ...
    def deltas(self) -> Iterator[Delta]: ...
    def adeltas(self) -> AsyncIterator[Delta]: ...
    def cancel(self) -> None: ...          # frees the slot and its KV cells within one decode step
    def result(self, timeout: float | None = None) -> Completion: ...


class Engine(Protocol):
    """What every engine offers: the in-process LlamaEngine, the cluster's IsolatedEngine (llama.cpp in a child
    process) and the tests' fake engine. Every method is thread-safe. `chat`, `complete` and `generate` return
    as soon as the request is queued, but may take milliseconds to seconds first (template rendering,
    tokenizing, grammar compilation, a child-process round trip): call them off an event loop
    (runner.server.native does, with asyncio.to_thread)."""

    model_name: str
    n_ctx: int                         # per sequence
    n_parallel: int                    # slots

    @property
    def buffers(self) -> Mapping[str, int]: ...      # llama.cpp's logged buffer sizes {"CPU KV": bytes, ...}

    def chat(self, messages: Sequence[ChatMessage], params: SamplingParams, *, tools: Tools | None = None,
             template_kwargs: Mapping[str, Any] | None = None) -> Generation: ...
    def complete(self, prompt: str, params: SamplingParams) -> Generation: ...
    def generate(self, tokens: Sequence[int], params: SamplingParams) -> Generation: ...
    def tokenize(self, text: str) -> list[int]: ...         # text as tokens, no BOS, special tokens parsed
    def prompt_tokens(self, text: str) -> list[int]: ...    # a raw prompt as it is evaluated (BOS as the model wants)
    def embed(self, inputs: Sequence[EmbedInput], *, truncate: bool = False) -> Embeddings: ...
    # ^ blocks until done: many inputs go in one llama_decode, one sequence each (see docs/engine.md)
    def tokenize_with(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]: ...
    def detokenize(self, tokens: Sequence[int]) -> str: ...          # control tokens rendered as their text
    def token_pieces(self, tokens: Sequence[int]) -> list[bytes]: ... # each token's bytes (control tokens too)
    def apply_template(self, messages: Sequence[ChatMessage], *, tools: Tools | None = None) -> str: ...
    # ^ the chat prompt the model would read (`chat` renders the same text: tools and past calls included)
    def stats(self) -> EngineStats: ...
    def health(self) -> LlmrunError | None: ...             # None while serving, else the outage (HTTP 503)
    def close(self) -> None: ...
