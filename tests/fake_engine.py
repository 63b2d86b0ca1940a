"""A FAKE engine for HTTP-behaviour tests of the server (429, disconnects, bad input, fuzzing). It implements
the Engine protocol of runner/engine/types.py deterministically, without a model: every reply is the same
scripted text, one word per "token", with a configurable delay per token. It does NOT enforce grammars (with a
grammar it just emits a fixed JSON object), its token counts are word counts, it gives no log probabilities
(an empty list when asked), and with tools it either answers its text (`auto`, `none`) or makes one scripted
call of the first offered function with the arguments {"fake": true} (`required`, a named function). Tool
definitions and histories are checked by the real runner.engine.tools.check. Only the producer is fake: what
the server iterates is the real GenerationHandle, so HTTP tests exercise the real sync and async iteration,
cancellation and completion. Tests of real generation use the real engine with the demo model instead."""

from __future__ import annotations

import re
import threading
import time
from typing import Any, Mapping, Sequence

from runner.core.errors import ContextOverflowError, LlmrunError, UsageError
from runner.engine import tools as tool_formats
from runner.engine.generation import GenerationHandle, completion
from runner.engine.types import (ChatMessage, Delta, EmbedInput, Embeddings, EngineStats, SamplingParams, ToolCall,
                                 ToolCallDelta, Tools)

REPLY = "Hello from the fake engine , one word per token , until the limit or the end ."
JSON_REPLY = ['{"fake"', ': ', 'true}']
FAIL_PROMPT = "FAKE-ENGINE-FAIL"      # a prompt containing this ends the generation with finish_reason "error"
EMBED_DIMS = 8                        # the fake's embeddings: 8 numbers derived from the input's words
N_VOCAB = 1000                        # token ids the fake accepts (detokenize, token arrays)


class FakeGeneration(GenerationHandle):
    """The real handle, produced into by a thread of the fake engine (one per request, slots a semaphore)."""

    def __init__(self, engine: "FakeEngine", pieces: list[str], prompt_tokens: int, params: SamplingParams,
                 fail: bool, call: str | None = None):
        super().__init__(lambda handle: None)
        self.engine, self.pieces, self.prompt_tokens, self.params, self.fail = engine, pieces, prompt_tokens, params, fail
        self.call = call                  # the function to call: pieces are then its arguments
        self.slot_released = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        e = self.engine
        with e._lock:
            e._queued += 1
        e._slots.acquire()
        with e._lock:
            e._queued -= 1
            e._busy += 1
            e.max_busy = max(e.max_busy, e._busy)
        t0 = time.perf_counter()
        ttft = 0.0
        text, n, reason, error, matched = "", 0, "stop", None, None
        if self.call is not None:
            self.push(Delta(tool_calls=(ToolCallDelta(0, id="call_fake0", name=self.call),)))
        try:
            limit = self.params.max_tokens
            for piece in self.pieces:
                if self.cancelled:
                    reason = "cancelled"
                    break
                if limit is not None and n >= limit:
                    reason = "length"
                    break
                if self.fail and n == 2:
                    reason, error = "error", "the fake engine was told to fail"
                    break
                time.sleep(e.token_delay)
                n += 1
                candidate = text + piece
                hit = next((s for s in self.params.stop if s in candidate), None)
                if hit is not None:
                    cut = candidate[:candidate.index(hit)]
                    if len(cut) > len(text):
                        self.push(cut[len(text):])
                    text, matched = cut, hit
                    break
                if n == 1:
                    ttft = time.perf_counter() - t0
                text = candidate
                if self.call is not None:
                    self.push(Delta(tool_calls=(ToolCallDelta(0, arguments=piece),)))
                else:
                    self.push(Delta(piece, logprobs=()))
            if limit is not None and n >= limit and reason == "stop" and n < len(self.pieces) and matched is None:
                reason = "length"
        finally:
            with e._lock:
                e._busy -= 1
                e.tokens_in += self.prompt_tokens
                e.tokens_out += n
            e._slots.release()
            self.slot_released.set()
            elapsed = time.perf_counter() - t0
            calls: tuple[ToolCall, ...] = ()
            if self.call is not None:
                calls, text = (ToolCall("call_fake0", self.call, text),), ""
                reason = "tool_calls" if reason == "stop" else reason
            self.finish(completion(text, reason, prompt_tokens=self.prompt_tokens, completion_tokens=n,
                                   cached_tokens=0, ttft=ttft, decode_tps=n / elapsed if elapsed > 0 else 0.0,
                                   error=error, tool_calls=calls, logprobs=() if self.params.logprobs else None,
                                   stop_sequence=matched))


class FakeEngine:
    """n_parallel slots (a semaphore), token_delay seconds per token; everything observable for tests."""

    def __init__(self, *, model_name: str = "fake-model", n_ctx: int = 256, n_parallel: int = 2,
                 token_delay: float = 0.002, reply: str = REPLY, notice: str | None = None):
        self.model_name, self.n_ctx, self.n_parallel, self.token_delay = model_name, n_ctx, n_parallel, token_delay
        self.reply = reply                # one "token" per word, with the whitespace before it
        self.notice = notice              # what every chat generation says it had to do to fit (X-Llmrun-Notice)
        self._slots = threading.Semaphore(n_parallel)
        self._lock = threading.Lock()
        self._busy = 0
        self._queued = 0
        self.max_busy = 0                 # most slots ever busy at once
        self.tokens_in = 0
        self.tokens_out = 0
        self.generations: list[FakeGeneration] = []
        self.submitted: list[tuple[str, object, SamplingParams]] = []
        self.chat_options: list[tuple[Tools | None, Mapping[str, Any] | None]] = []   # tools, template kwargs
        self.closed = False
        self.embed_calls = 0
        self.outage: LlmrunError | None = None   # what health() reports

    @property
    def buffers(self) -> Mapping[str, int]:
        return {}

    def tokenize(self, text: str) -> list[int]:
        return [len(w) for w in text.split()]

    def prompt_tokens(self, text: str) -> list[int]:
        return [1] + self.tokenize(text)

    def _submit(self, prompt_text: str, params: SamplingParams, call: str | None = None) -> FakeGeneration:
        n = len(self.tokenize(prompt_text)) + 1
        if n >= self.n_ctx:
            raise ContextOverflowError(f"the prompt is {n} tokens; the context holds {self.n_ctx}",
                                       hint="shorten the prompt or start with a larger --ctx")
        if params.n > self.n_parallel:
            raise UsageError(f"n={params.n} choices need {params.n} slots; the fake engine has {self.n_parallel}",
                             field="n")
        if params.n_ctx is not None and params.n_ctx > self.n_ctx:
            raise UsageError(f"a context of {params.n_ctx} tokens was asked for (num_ctx); the model is loaded "
                             f"with {self.n_ctx} tokens per sequence", field="num_ctx")
        pieces = list(JSON_REPLY) if params.grammar or call else re.findall(r"\s*\S+", self.reply)
        gens = [FakeGeneration(self, pieces, n, params, fail=FAIL_PROMPT in prompt_text, call=call)
                for _ in range(params.n)]
        for gen in gens:
            gen.set_choices(gens)
            gen.notice = self.notice
            self.generations.append(gen)
        return gens[0]

    def chat(self, messages: Sequence[ChatMessage], params: SamplingParams, *, tools: Tools | None = None,
             template_kwargs: Mapping[str, Any] | None = None) -> FakeGeneration:
        tool_formats.check(tools, messages)
        self.submitted.append(("chat", list(messages), params))
        self.chat_options.append((tools, template_kwargs))
        forced = tools is not None and tools.choice in ("required", "function")
        call = (tools.function or tools.functions[0].name) if forced and tools is not None else None
        text = " ".join(f"{m.role}: {m.content}" for m in messages)
        # subclasses of the tests override _submit(prompt_text, params): pass `call` only to make a call
        return self._submit(text, params) if call is None else self._submit(text, params, call=call)

    def complete(self, prompt: str, params: SamplingParams) -> FakeGeneration:
        self.submitted.append(("complete", prompt, params))
        return self._submit(prompt, params)

    def generate(self, tokens: Sequence[int], params: SamplingParams) -> FakeGeneration:
        self.submitted.append(("generate", list(tokens), params))
        return self._submit(" ".join(str(t) for t in tokens), params)

    def embed(self, inputs: Sequence[EmbedInput], *, truncate: bool = False) -> Embeddings:
        """Deterministic vectors (not a model's: a hash of the tokens), same limits as the real engine: an empty
        input, a token id outside the vocabulary or an input longer than the context is refused."""
        if not inputs:
            raise UsageError("embeddings need at least one input")
        vectors, cut, n_tokens = [], [], 0
        for i, item in enumerate(inputs):
            tokens = self.tokenize(item) if isinstance(item, str) else list(item)
            if not tokens:
                raise UsageError(f"input[{i}] is empty: there is nothing to embed")
            for t in tokens if not isinstance(item, str) else ():
                if not 0 <= t < N_VOCAB:
                    raise UsageError(f"input[{i}]: token {t} is not a token id: the vocabulary has ids 0 to {N_VOCAB - 1}")
            if len(tokens) > self.n_ctx:
                if not truncate:
                    raise ContextOverflowError(f"input[{i}] is {len(tokens)} tokens; this model embeds at most "
                                               f"{self.n_ctx} tokens per input")
                tokens = tokens[:self.n_ctx]
                cut.append(i)
            n_tokens += len(tokens)
            vectors.append(tuple(float((sum(tokens) * (k + 3) + len(tokens) * 7 * (k + 1)) % 17 - 8)
                                 for k in range(EMBED_DIMS)))
        with self._lock:
            self.embed_calls += 1
            self.tokens_in += n_tokens
        return Embeddings(tuple(vectors), prompt_tokens=n_tokens, pooling="mean", decodes=1, truncated=tuple(cut))

    def tokenize_with(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        return ([1] if add_special else []) + self.tokenize(text)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return "".join(p.decode() for p in self.token_pieces(tokens))

    def token_pieces(self, tokens: Sequence[int]) -> list[bytes]:
        for t in tokens:
            if not 0 <= t < N_VOCAB:
                raise UsageError(f"token {t} is not a token id: the vocabulary has ids 0 to {N_VOCAB - 1}")
        return [f"<{t}>".encode() for t in tokens]

    def apply_template(self, messages: Sequence[ChatMessage], *, tools: Tools | None = None) -> str:
        if not messages:
            raise UsageError("a chat needs at least one message")
        tool_formats.check(tools, messages)
        offered = "".join(f"<tool>{t.name}\n" for t in tool_formats.offered(tools))
        return offered + "".join(f"<{m.role}>{m.content}\n" for m in messages) + "<assistant>"

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(model=self.model_name, n_ctx=self.n_ctx, n_parallel=self.n_parallel,
                               busy_slots=self._busy, queued=self._queued, tokens_in=self.tokens_in,
                               tokens_out=self.tokens_out, load_seconds=0.0)

    def health(self) -> LlmrunError | None:
        return self.outage

    def close(self) -> None:
        self.closed = True
