"""LlamaEngine: continuous batching over llama.cpp's low-level API.

One engine thread owns the llama context. Requests arrive on a thread-safe queue and join between steps. Each
step builds ONE llama_batch: the next token of every decoding sequence, then prompt chunks of the sequences still
reading their prompt (at most n_ubatch tokens per step, so a long prompt never stalls the others), calls
llama_decode once, and samples every sequence that produced logits with its own llama.cpp sampler chain.
Slots are llama.cpp sequences; a free slot keeps its tokens' KV cells, and a new request whose prompt shares a
prefix with them evaluates only the rest (multi-turn reuse)."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, cast

import llama_cpp as lc

from runner.engine import compute, native, tools as tool_formats
from runner.engine.embedding import EmbedJob, Embedder
from runner.engine.generation import GenerationHandle, Output, completion, wake_all
from runner.engine.steps import StepClock
from runner.engine.template import ChatFormat, fit_conversation
from runner.engine.types import (ChatMessage, EmbedInput, Embeddings, EngineStats, FinishReason, Pooling,
                                 SamplingParams, Tools, validate_params)
from runner.core.errors import ContextOverflowError, EngineError, LlmrunError, UsageError
from runner.core.run_settings import RunSettings, embedding_settings

_WAKE = object()
_NO_ABORT = lc.ggml_abort_callback()   # NULL: no abort callback


@dataclass(eq=False)
class _Request:
    handle: GenerationHandle
    prompt: list[int]
    params: SamplingParams
    sampler: native.Sampler | None                      # None once finished
    out: Output
    limit: int                                          # context for this request (tokens per sequence)
    special: frozenset[int] = frozenset()               # control tokens shown as text (a tool format's markers)
    pending: list[int] = field(default_factory=list)   # prompt tokens not yet evaluated
    next_token: int | None = None                       # sampled, to be evaluated in the next step
    followers: "list[_Request]" = field(default_factory=list)   # choices 2..n, waiting for this one's prompt
    cached_tokens: int = 0
    n_out: int = 0
    t_first: float | None = None
    t_last: float | None = None


@dataclass(eq=False)
class _Slot:
    seq: int
    tokens: list[int] = field(default_factory=list)     # tokens whose KV cells this sequence holds
    req: _Request | None = None
    last_used: float = 0.0


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class LlamaEngine:
    """Implements runner.engine.types.Engine."""

    def __init__(self, loaded: native.Loaded, *, model_name: str, load_seconds: float, buffers: dict | None = None,
                 settings: RunSettings | None = None):
        self._m = loaded
        self.model_name = model_name
        self.n_ctx = loaded.n_ctx_seq          # per sequence, as EngineStats reports it
        self.n_parallel = loaded.n_seq
        self.load_seconds = load_seconds
        self.buffers = dict(buffers or {})
        self._mem = lc.llama_get_memory(loaded.ctx)
        self._detok = native.Detokenizer(loaded.vocab)
        self._logprobs = native.Logprobs(loaded.ctx, loaded.n_vocab, self._detok)
        self._add_bos = bool(lc.llama_vocab_get_add_bos(loaded.vocab))
        bos, eos = lc.llama_vocab_bos(loaded.vocab), lc.llama_vocab_eos(loaded.vocab)
        self.chat_format = ChatFormat(native.chat_template(loaded.model),
                                      native.token_text(loaded.vocab, bos), native.token_text(loaded.vocab, eos))
        self._slots = [_Slot(seq=i) for i in range(self.n_parallel)]
        self._inbox: queue.Queue = queue.Queue()
        self._waiting: list[_Request] = []
        self._lock = threading.Lock()        # guards the counters read by stats()
        self._tokens_in = 0
        self._tokens_out = 0
        self._solo_tokens = 0
        self._solo_seconds = 0.0
        self._closing = False
        self._dead: str | None = None
        self._eog: tuple[int, ...] | None = None
        self._is_eog: dict[int, bool] = {}   # llama_vocab_is_eog of each token sampled so far (one ctypes call each)
        self._woken: list[GenerationHandle] = []   # pushed to in this step: woken once per event loop at its end
        self._now = 0.0                      # time.perf_counter() when this step's logits were ready
        self._step_out = 0                   # tokens sampled in this step (counted into _tokens_out once)
        # A step that evaluates prompt tokens can take seconds (a 512-token chunk of a 7B model on a laptop CPU):
        # cancelling one of its requests aborts it at llama.cpp's next graph node (CPU backend) instead of
        # making everyone wait for it; the step is then undone and run again without the cancelled request.
        self._step_handles: frozenset[GenerationHandle] = frozenset()
        self._abort_step = False
        self._abort_cb = lc.ggml_abort_callback(lambda _data: self._abort_step)
        self.aborted_steps = 0               # steps aborted that way (tests, diagnostics)
        self.step_clock = StepClock()        # the engine thread's Python time per step (runner.engine.steps)
        # embeddings: a second context, created on the first embed() (docs/engine.md, "Embeddings")
        self.declared_pooling = native.declared_pooling(loaded.model)    # embedding models declare one
        # prompt tokens a reused prefix leaves to evaluate for a request that must be reproducible (greedy or
        # seeded): 2 keep it bit-identical to a fresh evaluation without flash attention; with it, prefixes of 64
        # tokens and more differ either way (docs/engine.md, "Numerics"), so 1, as for every other request
        self._reproducible_tail = 1 if settings is not None and settings.flash_attn else 2
        base = replace(settings or RunSettings(), n_ubatch=loaded.n_ubatch)
        self._embedder = Embedder(loaded.model, pooling=self.declared_pooling or native.DEFAULT_POOLING,
                                  settings=embedding_settings(base, lc.llama_model_n_ctx_train(loaded.model)),
                                  threads=loaded.n_threads)
        self._embed_jobs: list[EmbedJob] = []
        self._thread = threading.Thread(target=self._run, name=f"llmrun-engine-{model_name}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------------ public API
    def tokenize(self, text: str) -> list[int]:
        return native.tokenize(self._m.vocab, text, add_special=False, parse_special=True)

    def prompt_tokens(self, text: str) -> list[int]:
        """The tokens a raw prompt is evaluated as (BOS added if the model wants one and the text lacks it)."""
        add = self._add_bos and not (self.chat_format.bos_token and text.startswith(self.chat_format.bos_token))
        return native.tokenize(self._m.vocab, text, add_special=add, parse_special=True)

    def complete(self, prompt: str, params: SamplingParams) -> GenerationHandle:
        self._validate(params)
        tokens = self.prompt_tokens(prompt)
        self._check_fits(len(tokens), limit=self._limit(params))
        return self._submit(tokens, params)

    def chat(self, messages: Sequence[ChatMessage], params: SamplingParams, *, tools: Tools | None = None,
             template_kwargs: Mapping[str, Any] | None = None) -> GenerationHandle:
        """A chat turn. With `tools`, the conversation is rendered the way the model's template family expects
        (runner.engine.tools), calls are constrained by a grammar and parsed out of the reply."""
        self._validate(params)
        turn = tool_formats.prepare(messages, params, tools, self.tool_format)
        messages, params, template_tools = turn.messages, turn.params, turn.template_tools

        def render(msgs: Sequence[ChatMessage]) -> list[int]:
            return self.prompt_tokens(self.chat_format.render(msgs, tools=template_tools, extra=template_kwargs))

        tokens, dropped = self.fit_chat(messages, params, render=render)
        notice = None
        if dropped:
            notice = (f"context full: left out the {dropped} oldest message{'s' if dropped > 1 else ''} "
                      f"to fit the {self._limit(params)}-token context")
        return self._submit(tokens, params, notice=notice, dropped=dropped, tool_format=turn.parser)

    @property
    def tool_format(self) -> tool_formats.ToolFormat:
        """How this model's chat template takes tools and writes calls."""
        return tool_formats.detect(self.chat_format.template, self.chat_format.takes_tools)

    def render_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        return self.prompt_tokens(self.chat_format.render(messages))

    def fit_chat(self, messages: Sequence[ChatMessage], params: SamplingParams,
                 render: Callable[[Sequence[ChatMessage]], list[int]] | None = None) -> tuple[list[int], int]:
        """The prompt tokens of the conversation, dropping the oldest turns (never the system prompt) until it
        leaves room for the answer. Returns (tokens, number of messages dropped). The cut is found by bisection
        over the places a kept conversation may start (a user or tool turn, or the last message): a few renders
        however long the conversation, not one per dropped turn."""
        if not messages:
            raise UsageError("a chat needs at least one message")
        limit = self._limit(params)
        tokens, k = fit_conversation(messages, render or self.render_chat, limit=limit,
                                     reserve=min(params.max_tokens or limit // 4, limit // 4))
        self._check_fits(len(tokens), what="the last message (with the system prompt)" if k else "the conversation",
                         limit=limit)
        return tokens, k

    def _limit(self, params: SamplingParams) -> int:
        """The context a request may use: the loaded one per sequence, or less when it asks (Ollama num_ctx)."""
        return min(self.n_ctx, params.n_ctx) if params.n_ctx else self.n_ctx

    def _validate(self, params: SamplingParams) -> None:
        validate_params(params)
        if params.n > self.n_parallel:
            raise UsageError(f"n={params.n} choices need {params.n} sequences decoding together; this engine has "
                             f"{self.n_parallel}", hint="ask for fewer choices, or serve with a larger --parallel",
                             field="n")
        if params.n_ctx and params.n_ctx > self.n_ctx:
            raise UsageError(f"a context of {params.n_ctx} tokens was asked for (num_ctx); the model is loaded "
                             f"with {self.n_ctx} tokens per sequence", hint="ask for at most that, or load the model "
                             "with a larger --ctx", field="num_ctx")
        bad = next((t for t, _ in params.logit_bias if not 0 <= t < self._m.n_vocab), None)
        if bad is not None:
            raise UsageError(f"logit_bias names token {bad}; this model's tokens are 0 to {self._m.n_vocab - 1}",
                             field="logit_bias")

    def _check_fits(self, n: int, what: str = "the prompt", limit: int | None = None) -> None:
        limit = limit or self.n_ctx
        if n >= limit:
            raise ContextOverflowError(
                f"{what} is {n} tokens; the context holds {limit} tokens per sequence"
                + (f" ({self._m.n_ctx} shared by {self.n_parallel} slots)" if self.n_parallel > 1
                   and limit == self.n_ctx else ""),
                hint="shorten it, or load the model with a larger --ctx (or fewer parallel slots)")

    def generate(self, tokens: Sequence[int], params: SamplingParams) -> GenerationHandle:
        """Submit already tokenized prompt tokens (benchmarks, tests)."""
        self._validate(params)
        self._check_fits(len(tokens), limit=self._limit(params))
        return self._submit(list(tokens), params)

    # ------------------------------------------------------------------------------------------ embeddings etc.
    @property
    def embedding_tokens(self) -> int:
        """The longest input embed() takes (tokens), and what one embedding decode holds in all."""
        return self._embedder.n_tokens

    def embed(self, inputs: Sequence[EmbedInput], *, truncate: bool = False) -> Embeddings:
        """One pooled vector per input (texts are tokenized with the model's BOS/EOS/CLS/SEP, special-token text
        is NOT parsed: a document is data). Inputs longer than `embedding_tokens` are cut when `truncate`, else
        ContextOverflowError. Blocks until the engine thread has decoded them, packed into as few decodes as fit."""
        if not inputs:
            raise UsageError("embeddings need at least one input")
        self._check_open()
        pooling = self._embedder.pooling
        if pooling not in native.POOLING_TYPES:
            raise UsageError(f"{self.model_name} declares {pooling} pooling: it cannot embed texts",
                             hint="a reranker (rank pooling) scores pairs of texts; serve an embedding model")
        limit = self._embedder.n_tokens
        tokens: list[list[int]] = []
        cut: list[int] = []
        for i, item in enumerate(inputs):
            if isinstance(item, str):
                toks = native.tokenize(self._m.vocab, item, add_special=True, parse_special=False)
            else:
                toks = list(item)
                native.check_tokens(toks, self._m.n_vocab, what=f"input[{i}]: token")
            if not toks:
                raise UsageError(f"input[{i}] is empty: there is nothing to embed")
            if len(toks) > limit:
                if not truncate:
                    raise ContextOverflowError(
                        f"input[{i}] is {len(toks)} tokens; this model embeds at most {limit} tokens per input",
                        hint="split the text into smaller chunks (or let the server truncate it)")
                toks = toks[:limit]
                cut.append(i)
            tokens.append(toks)
        job = EmbedJob(tokens, truncated=tuple(cut), pooling=cast(Pooling, pooling))
        self._inbox.put(job)
        return job.result(self._thread.is_alive)

    @property
    def embed_decodes(self) -> int:
        """Embedding decodes run so far (each holds many inputs)."""
        return self._embedder.decodes

    def tokenize_with(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        return native.tokenize(self._m.vocab, text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.token_pieces(tokens)).decode("utf-8", errors="replace")

    def token_pieces(self, tokens: Sequence[int]) -> list[bytes]:
        native.check_tokens(tokens, self._m.n_vocab)
        return [native.piece(self._m.vocab, t, special=True) for t in tokens]

    def apply_template(self, messages: Sequence[ChatMessage], *, tools: Tools | None = None) -> str:
        if not messages:
            raise UsageError("a chat needs at least one message")
        turn = tool_formats.prepare(messages, SamplingParams(), tools, self.tool_format)   # as chat() renders
        return self.chat_format.render(turn.messages, tools=turn.template_tools)

    def _check_open(self) -> None:
        if self._closing or self._m.ctx is None:
            raise EngineError("the engine is closed")
        if self._dead:
            raise EngineError(f"the engine stopped after an internal error: {self._dead}")

    def stats(self) -> EngineStats:
        with self._lock:
            busy = sum(1 for s in self._slots if s.req is not None)
            return EngineStats(model=self.model_name, n_ctx=self.n_ctx, n_parallel=self.n_parallel, busy_slots=busy,
                               queued=len(self._waiting) + self._inbox_requests(), tokens_in=self._tokens_in,
                               tokens_out=self._tokens_out, load_seconds=self.load_seconds, buffers=dict(self.buffers),
                               solo_decode_tokens=self._solo_tokens, solo_decode_seconds=self._solo_seconds)

    def _inbox_requests(self) -> int:
        """Requests in the inbox, not counting the wake-ups cancellations post there."""
        with self._inbox.mutex:
            return sum(1 for item in self._inbox.queue if item is not _WAKE)

    def health(self) -> LlmrunError | None:
        """None while serving; the internal error that stopped the engine thread otherwise."""
        return EngineError(f"the engine stopped after an internal error: {self._dead}") if self._dead else None

    def close(self) -> None:
        if self._m.ctx is None:
            return
        self._closing = True
        self._inbox.put(_WAKE)
        self._thread.join()
        self._m.free()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------------------------------ submission
    def _submit(self, tokens: list[int], params: SamplingParams, *, notice: str | None = None,
                dropped: int = 0, tool_format: tool_formats.ToolFormat | None = None) -> GenerationHandle:
        self._check_open()
        if self.declared_pooling is not None:   # BERT-family files have no output layer: sampling would crash
            raise UsageError(f"{self.model_name} is an embedding model ({self.declared_pooling} pooling): it cannot "
                             "generate text", hint="use it through /v1/embeddings or /api/embed")
        if params.ignore_eos and self._eog is None:
            self._eog = native.eog_tokens(self._m.vocab, self._m.n_vocab)
        special = self._special(tool_format.preserved) if tool_format is not None else frozenset()
        limit = self._limit(params)
        reqs: list[_Request] = []
        try:
            for i in range(params.n):
                smp = native.sampler(self._m.vocab, self._m.n_vocab, params, eog=self._eog or (), seed_offset=i,
                                     n_ctx=limit)
                handle = GenerationHandle(self._on_cancel, notice=notice, dropped_messages=dropped)
                out = Output(params.stop, tool_format.stream() if tool_format is not None else None, params.logprobs)
                reqs.append(_Request(handle=handle, prompt=tokens, params=params, sampler=smp, out=out, limit=limit,
                                     special=special))
        except BaseException:
            for r in reqs:
                if r.sampler is not None:
                    r.sampler.free()
            raise
        for r in reqs:
            r.handle.set_choices([q.handle for q in reqs])
        reqs[0].followers = reqs[1:]
        self._inbox.put(reqs[0])
        return reqs[0].handle

    def _special(self, texts: tuple[str, ...]) -> frozenset[int]:
        """The token ids of control tokens (`[TOOL_CALLS]`) that must show as text in a reply."""
        ids = set()
        for text in texts:
            toks = self.tokenize(text)
            if len(toks) == 1:
                ids.add(toks[0])
        return frozenset(ids)

    def _on_cancel(self, handle: GenerationHandle) -> None:
        if handle in self._step_handles:
            self._abort_step = True   # a prompt step running now stops at llama.cpp's next graph node
        self._inbox.put(_WAKE)  # the engine thread notices handle.cancelled at the start of its next step

    # ------------------------------------------------------------------------------------------ engine thread
    def _busy(self) -> list[tuple[_Slot, _Request]]:
        """The slots holding a request, each with its request."""
        return [(s, s.req) for s in self._slots if s.req is not None]

    def _run(self) -> None:
        batch = lc.llama_batch_init(max(self._m.n_batch, self.n_parallel), 0, 1)
        try:
            while True:
                idle = not self._busy() and not self._waiting and not self._embed_jobs
                t_turn = (0, 0) if idle else (time.perf_counter_ns(), time.thread_time_ns())
                self._take_inbox(block=idle)
                if self._closing:
                    break
                if idle:
                    t_turn = (time.perf_counter_ns(), time.thread_time_ns())
                self._reap_cancelled()
                self._assign()
                if self._embed_jobs:          # one embedding decode between generation steps
                    self._embedder.run_pass(self._embed_jobs)
                    self._embed_jobs = [j for j in self._embed_jobs if not j.done]
                    t_turn = (time.perf_counter_ns(), time.thread_time_ns())
                if self._busy():
                    self._step(batch, t_turn)
        except Exception as e:  # noqa: BLE001 - last resort of the thread: fail every request, never hang callers
            self._dead = f"{type(e).__name__}: {e}"
            raise
        finally:
            for slot, req in self._busy():
                self._finish(req, "cancelled" if self._closing else "error", slot=slot, clear=True,
                             error=None if self._closing else self._dead)
            for req in self._waiting + self._drain_inbox():
                self._finish(req, "cancelled" if self._closing else "error", error=self._dead)
            self._waiting.clear()
            gone = EngineError("the engine closed" if self._closing else
                               f"the engine stopped after an internal error: {self._dead}")
            for job in self._embed_jobs:
                job.fail(gone)
            self._embed_jobs.clear()
            self._embedder.close()
            lc.llama_batch_free(batch)

    def _drain_inbox(self) -> list[_Request]:
        out: list[_Request] = []
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return out
            if isinstance(item, EmbedJob):
                self._embed_jobs.append(item)
            elif item is not _WAKE:
                out.append(item)

    def _take_inbox(self, block: bool) -> None:
        if block:
            item = self._inbox.get()
            if isinstance(item, EmbedJob):
                self._embed_jobs.append(item)
            elif item is not _WAKE:
                self._waiting.append(item)
        self._waiting.extend(self._drain_inbox())

    def _reap_cancelled(self) -> None:
        for req in [r for r in self._waiting if r.handle.cancelled]:
            self._waiting.remove(req)
            self._finish(req, "cancelled")
        for slot, req in self._busy():
            if req.handle.cancelled:
                self._finish(req, "cancelled", slot=slot, clear=True)

    def _slot_of(self, req: _Request) -> _Slot | None:
        return next((s for s in self._slots if s.req is req), None)

    def _assign(self) -> None:
        while self._waiting:
            req = self._waiting[0]
            free = [s for s in self._slots if s.req is None]
            if len(free) < 1 + len(req.followers):      # the n choices of a request start together
                return
            self._waiting.pop(0)
            best = max(free, key=lambda s: (_common_prefix(s.tokens, req.prompt), -s.last_used))
            # Re-evaluate 2 prompt tokens when the output must be reproducible (greedy, or a seed) and that keeps a
            # reused prefix bit-identical to a fresh evaluation (no flash attention: llama.cpp's one-row matmul
            # rounds differently from its multi-row one); otherwise 1, as llama-server does, so the step holds
            # one token of this sequence like the decoding ones: one ubatch instead of two (with 7 decoding on the
            # demo model: 31-33 ms instead of 41-46; docs/engine.md, "Numerics").
            reproducible = req.params.temperature == 0 or req.params.seed is not None
            tail = self._reproducible_tail if reproducible else 1
            common = max(0, min(_common_prefix(best.tokens, req.prompt), len(req.prompt) - tail))
            if common < len(best.tokens) and not lc.llama_memory_seq_rm(self._mem, best.seq, common, -1):
                lc.llama_memory_seq_rm(self._mem, best.seq, -1, -1)
                common = 0
            with self._lock:
                best.tokens = best.tokens[:common]
                best.req = req
            req.cached_tokens = common
            req.pending = req.prompt[common:]
            others = sorted((s for s in free if s is not best), key=lambda s: s.last_used)
            for slot, follower in zip(others, req.followers):   # they get the prompt's cells when it is read
                lc.llama_memory_seq_rm(self._mem, slot.seq, -1, -1)
                with self._lock:
                    slot.tokens = []
                    slot.req = follower
                follower.cached_tokens = common

    def _step(self, batch, t_turn: tuple[int, int]) -> None:
        """One decode step; `t_turn`: (perf_counter_ns, thread_time_ns) at the start of the loop turn."""
        t0 = time.perf_counter()
        b = batch
        n = 0
        outputs: list[tuple[_Slot, _Request, int]] = []
        busy = self._busy()
        before = [(slot, req, len(slot.tokens), req.next_token, req.pending) for slot, req in busy]

        def put(slot: _Slot, token: int, logits: bool) -> None:
            nonlocal n
            b.token[n] = token
            b.pos[n] = len(slot.tokens)
            b.n_seq_id[n] = 1
            b.seq_id[n][0] = slot.seq
            b.logits[n] = logits
            slot.tokens.append(token)
            n += 1

        for slot, req in busy:
            if req.next_token is not None:
                put(slot, req.next_token, True)
                req.next_token = None
                outputs.append((slot, req, n - 1))
        budget = max(self._m.n_ubatch, n)
        prompt_tokens = 0
        for slot, req in sorted(busy, key=lambda sr: sr[1].handle.submitted_at):
            if not req.pending or n >= budget:
                continue
            chunk = req.pending[:budget - n]
            req.pending = req.pending[len(chunk):]
            for i, tok in enumerate(chunk):
                put(slot, tok, not req.pending and i == len(chunk) - 1)
            prompt_tokens += len(chunk)
            if not req.pending:
                outputs.append((slot, req, n - 1))
        if n == 0:                 # only choices waiting for a prompt another step reads
            return
        b.n_tokens = n
        abortable = prompt_tokens > 0
        if abortable:
            self._step_handles = frozenset(req.handle for _, req in busy)
            self._abort_step = any(req.handle.cancelled for _, req in busy)   # after the line above: no gap
            lc.llama_set_abort_callback(self._m.ctx, self._abort_cb, None)
        t_decode, c_decode = time.perf_counter_ns(), time.thread_time_ns()
        try:
            rc = compute.decode(self._m.ctx, b)      # on the process's one compute thread (compute.py)
        finally:
            t_decode, c_decode = time.perf_counter_ns() - t_decode, time.thread_time_ns() - c_decode
            if abortable:
                lc.llama_set_abort_callback(self._m.ctx, _NO_ABORT, None)
                self._step_handles = frozenset()
        if rc == 2 and abortable and self._abort_step:
            # aborted for a cancelled request: undo the step (llama.cpp keeps the cells of the ubatches it finished)
            # and let the next one reap the cancelled request and evaluate the rest again
            for slot, req, n_tokens, next_token, pending in before:
                lc.llama_memory_seq_rm(self._mem, slot.seq, n_tokens, -1)
                with self._lock:
                    slot.tokens = slot.tokens[:n_tokens]
                req.next_token, req.pending = next_token, pending
            self.aborted_steps += 1
            return
        if rc != 0:
            why = {1: "no room left in the KV cache", 2: "aborted"}.get(rc, f"llama_decode returned {rc}")
            for slot, req in busy:
                self._finish(req, "error", slot=slot, clear=True, error=f"llama.cpp could not decode: {why}")
            return
        self._now = time.perf_counter()
        self._step_out = 0
        try:
            for slot, req, idx in outputs:
                if req.followers:
                    self._fork(slot, req, idx)
                self._sample(slot, req, idx)
        finally:
            with self._lock:
                self._tokens_in += prompt_tokens
                self._tokens_out += self._step_out
            woken, self._woken = self._woken, []
            wake_all(woken)
        if n == 1 and prompt_tokens == 0:        # one sequence decoding alone: its speed, undiluted
            with self._lock:
                self._solo_tokens += 1
                self._solo_seconds += time.perf_counter() - t0
        if prompt_tokens == 0:
            self.step_clock.add(outputs=len(outputs), tokens=n, loop_ns=time.perf_counter_ns() - t_turn[0],
                                decode_ns=t_decode, python_cpu_ns=time.thread_time_ns() - t_turn[1] - c_decode)

    def _fork(self, slot: _Slot, req: _Request, idx: int) -> None:
        """The prompt of a request with n choices is read: the other choices' sequences get its KV cells
        (llama_memory_seq_cp; across streams llama.cpp copies the buffer before the next decode) and sample
        their first token from the same logits, each with its own chain and seed."""
        followers, req.followers = req.followers, []
        for f in followers:
            fslot = self._slot_of(f)
            if fslot is None or f.sampler is None:   # cancelled meanwhile
                continue
            lc.llama_memory_seq_cp(self._mem, slot.seq, fslot.seq, -1, -1)
            with self._lock:
                fslot.tokens = list(slot.tokens)
            self._sample(fslot, f, idx)

    def _sample(self, slot: _Slot, req: _Request, idx: int) -> None:
        assert req.sampler is not None
        tok = req.sampler.sample(self._m.ctx, idx, self._m.vocab)
        if tok is None:
            self._finish(req, "error", slot=slot, clear=True, error="no token satisfies the grammar (the response "
                         "format or the tools) together with the logit bias")
            return
        now = self._now
        if req.t_first is None:
            req.t_first = now
        req.t_last = now
        eog = self._is_eog.get(tok)
        if eog is None:
            eog = self._is_eog[tok] = bool(lc.llama_vocab_is_eog(self._m.vocab, tok))
        if eog:
            self._finish(req, "stop", slot=slot)
            return
        req.n_out += 1
        self._step_out += 1
        special = bool(req.special) and tok in req.special
        logprob = self._logprobs.at(idx, tok, req.params.top_logprobs, req.special) if req.params.logprobs else None
        delta, stopped = req.out.feed(self._detok.piece(tok, special), logprob)
        if req.handle.push(delta, wake=False):
            self._woken.append(req.handle)
        if stopped:
            self._finish(req, "stop", slot=slot, stop_string=True)
        elif (req.params.max_tokens is not None and req.n_out >= req.params.max_tokens) \
                or len(slot.tokens) >= req.limit:
            self._finish(req, "length", slot=slot)
        else:
            req.next_token = tok

    def _finish(self, req: _Request, reason: FinishReason, *, slot: _Slot | None = None, clear: bool = False,
                error: str | None = None, stop_string: bool = False) -> None:
        if req.sampler is None:    # finished already (a choice that ended with the request's first one)
            return
        if reason in ("stop", "length"):
            req.handle.push(req.out.end(stopped=stop_string))
            if reason == "stop" and req.out.tool_calls:
                reason = "tool_calls"
        if slot is not None:
            with self._lock:
                slot.req = None
                slot.last_used = time.perf_counter()
                if clear:  # cancelled or failed: free the sequence's KV cells now
                    lc.llama_memory_seq_rm(self._mem, slot.seq, -1, -1)
                    slot.tokens = []
        req.sampler.free()
        req.sampler = None
        followers, req.followers = req.followers, []
        for f in followers:        # choices that were waiting for this one's prompt end with it
            self._finish(f, "error" if reason == "error" else "cancelled", slot=self._slot_of(f), clear=True,
                         error=error)
        ttft = (req.t_first - req.handle.submitted_at) if req.t_first else 0.0
        span = (req.t_last - req.t_first) if req.t_first and req.t_last else 0.0
        tps = (req.n_out - 1) / span if req.n_out > 1 and span > 0 else 0.0
        logprobs = tuple(req.out.logprobs) if req.out.logprobs is not None else None
        req.handle.finish(completion(req.out.text, reason, prompt_tokens=len(req.prompt), completion_tokens=req.n_out,
                                     cached_tokens=req.cached_tokens, ttft=ttft, decode_tps=tps, error=error,
                                     notice=req.handle.notice, dropped_messages=req.handle.dropped_messages,
                                     tool_calls=req.out.tool_calls, logprobs=logprobs,
                                     stop_sequence=req.out.stop.matched if stop_string else None))


def default_threads() -> int:
    """Threads llama.cpp should use: usable physical cores (affinity and cgroup CPU quota respected), from the
    hardware probe (runner.hardware.types.CPU.threads)."""
    from runner.hardware import probe as hw

    try:
        return hw.probe(measure=False).cpu.threads
    except LlmrunError:
        import os

        return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def start_engine(model_path: str | Path, settings: RunSettings | None = None, *, model_name: str | None = None,
                n_parallel: int | None = None, threads: int | None = None, kv_unified: bool = False) -> LlamaEngine:
    """Load a GGUF with the settings a plan chose and start the engine thread (in this process: a model split over
    RPC workers is loaded by runner.cluster.isolated instead, which registers the workers first)."""
    settings = settings or RunSettings()
    path = Path(model_path).expanduser()
    n_par = n_parallel or settings.n_parallel or 1
    if n_par < 1:
        raise UsageError(f"n_parallel must be at least 1, not {n_par}")
    n_threads = threads or settings.n_threads or default_threads()
    t0 = time.perf_counter()
    loaded = native.load(path, settings, n_parallel=n_par, threads=n_threads, kv_unified=kv_unified)
    load_s = time.perf_counter() - t0
    return LlamaEngine(loaded, model_name=model_name or path.stem, load_seconds=load_s,
                       buffers=native.parse_buffer_lines(loaded.log_lines), settings=settings)
