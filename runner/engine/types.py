"""The engine's native request/response values: the one path that `chat`, the OpenAI adapter and the Ollama
adapter all use. No llama_cpp import here, so the server and tests can use these without loading anything."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator, Literal, Mapping, Protocol, Sequence

from runner.core.errors import LlmrunError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8          # 0 = greedy
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64
    seed: int | None = None           # None = random
    max_tokens: int | None = None     # None = until end of generation or context end
    stop: tuple[str, ...] = ()
    grammar: str | None = None        # GBNF text (JSON mode / json_schema are compiled to this)
    ignore_eos: bool = False          # never sample end-of-generation tokens (benchmarks: fixed lengths)


@dataclass(frozen=True)
class ChatMessage:
    role: Literal["system", "user", "assistant", "tool"]
    content: str


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0            # prompt tokens reused from a kept KV prefix

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: FinishReason
    usage: Usage
    time_to_first_token_s: float
    decode_tokens_per_s: float
    error: str | None = None
    notice: str | None = None         # e.g. "context full: dropped the 2 oldest messages" (chat only)
    dropped_messages: int = 0         # messages left out of the prompt to fit the context


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
    """A submitted request. Iterate (sync or async) for text deltas; `result()` waits for the end. The one
    implementation is runner.engine.generation.GenerationHandle; engines differ only in what produces into it."""

    notice: str | None                 # what the engine had to do to fit the request, e.g. oldest turns left out
    dropped_messages: int              # chat messages left out of the prompt to fit the context

    @property
    def completion(self) -> Completion | None: ...   # the end, once finished; never blocks
    def __iter__(self) -> Iterator[str]: ...
    def __aiter__(self) -> AsyncIterator[str]: ...
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

    def chat(self, messages: Sequence[ChatMessage], params: SamplingParams) -> Generation: ...
    def complete(self, prompt: str, params: SamplingParams) -> Generation: ...
    def generate(self, tokens: Sequence[int], params: SamplingParams) -> Generation: ...
    def tokenize(self, text: str) -> list[int]: ...         # text as tokens, no BOS, special tokens parsed
    def prompt_tokens(self, text: str) -> list[int]: ...    # a raw prompt as it is evaluated (BOS as the model wants)
    def embed(self, inputs: Sequence[EmbedInput], *, truncate: bool = False) -> Embeddings: ...
    # ^ blocks until done: many inputs go in one llama_decode, one sequence each (see docs/engine.md)
    def tokenize_with(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]: ...
    def detokenize(self, tokens: Sequence[int]) -> str: ...          # control tokens rendered as their text
    def token_pieces(self, tokens: Sequence[int]) -> list[bytes]: ... # each token's bytes (control tokens too)
    def apply_template(self, messages: Sequence[ChatMessage]) -> str: ...  # the chat prompt the model would read
    def stats(self) -> EngineStats: ...
    def health(self) -> LlmrunError | None: ...             # None while serving, else the outage (HTTP 503)
    def close(self) -> None: ...
