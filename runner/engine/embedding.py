"""Embeddings on the engine thread: a job per `Engine.embed` call, and the Embedder that packs the inputs of the
waiting jobs into decodes of a second llama.cpp context (created on first use) and reads one pooled vector per
sequence. Why a second context rather than the generation one: docs/engine.md, "Embeddings"."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import llama_cpp as lc

from runner.core.errors import EngineError, LlmrunError
from runner.core.run_settings import RunSettings
from runner.engine import compute, native
from runner.engine.types import Embeddings, Pooling


@dataclass(eq=False)
class EmbedJob:
    """One `embed` call: its inputs as tokens (each at most the embedding context's size), filled in by the
    engine thread; the caller waits on `result()`."""

    inputs: list[list[int]]
    truncated: tuple[int, ...] = ()
    vectors: list[tuple[float, ...] | None] = field(default_factory=list)
    placed: int = 0                       # inputs handed to a decode so far (in order)
    decodes: int = 0
    pooling: Pooling = "mean"
    error: LlmrunError | None = None
    _done: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.vectors = [None] * len(self.inputs)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def unplaced(self) -> bool:
        return self.placed < len(self.inputs) and self.error is None

    def fail(self, error: LlmrunError) -> None:
        if not self._done.is_set():
            self.error = error
            self._done.set()

    def finish_if_complete(self) -> None:
        if all(v is not None for v in self.vectors):
            self._done.set()

    def result(self, engine_alive: Callable[[], bool]) -> Embeddings:
        """Wait for the engine thread; an engine thread that ended without finishing the job fails it."""
        while not self._done.wait(0.5):
            if not engine_alive():
                self.fail(EngineError("the engine stopped before the embeddings were computed"))
        if self.error is not None:
            raise self.error
        return Embeddings(vectors=tuple(v for v in self.vectors if v is not None),
                          prompt_tokens=sum(len(t) for t in self.inputs), pooling=self.pooling,
                          decodes=self.decodes, truncated=self.truncated)


class Embedder:
    """The embedding context of a loaded model and the decode that fills it. Used only from the engine thread."""

    def __init__(self, model: object, *, pooling: str, settings: RunSettings, threads: int):
        """`settings`: the embedding context's own (runner.core.run_settings.embedding_settings)."""
        self._model = model
        self.pooling = pooling
        self.n_tokens = settings.n_ctx
        self.n_seq = settings.n_parallel
        self._threads = threads
        self._settings = settings
        self._ctx: native.EmbeddingContext | None = None
        self._batch: Any = None          # the llama_batch, made with the context
        self.decodes = 0                  # every embedding decode so far (tests and stats)

    def _context(self) -> native.EmbeddingContext:
        if self._ctx is None:
            self._ctx = native.create_embedding_context(self._model, pooling=self.pooling, threads=self._threads,
                                                        settings=self._settings)
            self._batch = lc.llama_batch_init(self.n_tokens, 0, 1)
        return self._ctx

    def run_pass(self, jobs: list[EmbedJob]) -> None:
        """ONE llama_decode holding as many waiting inputs as fit (in job order, one sequence each), then every
        placed input's pooled vector. Jobs whose inputs are all done are finished."""
        try:
            ectx = self._context()
        except LlmrunError as e:
            for job in jobs:
                job.fail(e)
            return
        b = self._batch
        n = 0
        placed: list[tuple[EmbedJob, int, int]] = []      # (job, input index, sequence)
        for job in jobs:
            while job.unplaced and len(placed) < ectx.n_seq:
                tokens = job.inputs[job.placed]
                if n + len(tokens) > ectx.n_tokens:
                    break
                seq = len(placed)
                for pos, tok in enumerate(tokens):
                    b.token[n] = tok
                    b.pos[n] = pos
                    b.n_seq_id[n] = 1
                    b.seq_id[n][0] = seq
                    b.logits[n] = True            # pooled embeddings need every token as an output
                    n += 1
                placed.append((job, job.placed, seq))
                job.placed += 1
            if job.unplaced:                      # the next input does not fit: it opens the next decode
                break
        if not placed:
            return
        b.n_tokens = n
        lc.llama_memory_clear(lc.llama_get_memory(ectx.ctx), True)
        rc = compute.decode(ectx.ctx, b)
        self.decodes += 1
        involved = list(dict.fromkeys(job for job, _, _ in placed))
        for job in involved:
            job.decodes += 1
        if rc != 0:
            err = EngineError(f"llama.cpp could not decode the embedding batch (llama_decode returned {rc})")
            for job in involved:
                job.fail(err)
            return
        for job, index, seq in placed:
            job.vectors[index] = native.pooled_embedding(ectx.ctx, seq, ectx.n_embd)
        for job in involved:
            job.finish_if_complete()

    def close(self) -> None:
        if self._batch is not None:
            lc.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            self._ctx.free()
            self._ctx = None
