"""Embeddings, as three thin adapters over `Engine.embed`: OpenAI's /v1/embeddings, Ollama's /api/embed and its
older /api/embeddings. Each normalises as its API specifies: OpenAI and /api/embed return unit vectors (L2),
/api/embeddings the model's raw pooled vector, as Ollama does. The engine call blocks while the engine thread
decodes, so it runs off the event loop."""

from __future__ import annotations

import asyncio
import base64
import functools
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Literal, Sequence

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from runner.app.pool_values import State
from runner.core.errors import EngineError, LlmrunError
from runner.engine.types import EmbedInput, Embeddings, Engine
from runner.server.common import keep_alive_of, state_of
from runner.server.errors import ApiError, from_llmrun

router = APIRouter()

MAX_INPUTS = 2048          # OpenAI's limit on inputs per request
# `Engine.embed` blocks its thread until the engine thread has decoded the inputs (up to seconds). Those waits get
# their own threads (created on demand, bounded by the admission gate in practice) so that they never occupy the
# event loop's default executor, which generation submissions and /metrics use.
_WAITS = ThreadPoolExecutor(max_workers=64, thread_name_prefix="llmrun-embed-wait")


def default_model(request: Request) -> str:
    """The model a request that names none means (llama-server's token routes have no `model`): the one model in
    memory; 400 when there is none or several."""
    state = state_of(request)
    state.require_started()
    loaded = [s.name for s in state.pool.status() if s.state is State.LOADED]
    if len(loaded) == 1:
        return loaded[0]
    which = f"{len(loaded)} are loaded ({', '.join(loaded)})" if loaded else "none is loaded"
    raise ApiError(400, f"model: name the model this request is for ({which}; /v1/models lists them)",
                   param="model", code="invalid_value")


@asynccontextmanager
async def engine_for(request: Request, model: str | None, *, admit: bool, keep_alive: float | None = None,
                     embeddings: bool = False) -> AsyncIterator[Engine]:
    """The engine of `model` (loaded on demand; the one in memory when None), held for the request: 503 while the
    start-up model loads, 404 for an unknown name. With `admit`, the request also takes a place at the model's
    admission gate (429 when full) until it ends."""
    state = state_of(request)
    lease = await state.acquire(model if model is not None else default_model(request), keep_alive,
                                embeddings=embeddings)
    try:
        if not admit:
            yield lease.engine
            return
        gate = state.gate(lease)
        try:
            gate.enter()
        except ApiError:
            state.metrics.busy()
            raise
        try:
            yield lease.engine
        finally:
            gate.leave()
    finally:
        lease.release()


async def embed(request: Request, model: str, inputs: Sequence[EmbedInput], *, truncate: bool,
                param: str, keep_alive: float | None = None) -> Embeddings:
    """`Engine.embed` off the event loop; an llmrun error becomes the route's 4xx/5xx naming `param`."""
    async with engine_for(request, model, admit=True, keep_alive=keep_alive, embeddings=True) as engine:
        try:
            result = await asyncio.get_running_loop().run_in_executor(
                _WAITS, functools.partial(engine.embed, inputs, truncate=truncate))
        except LlmrunError as e:
            raise from_llmrun(e, param=param) from e
    state_of(request).metrics.tokens(result.prompt_tokens, 0)
    return result


def unit_vectors(result: Embeddings) -> np.ndarray:
    """The vectors scaled to length 1 (a zero vector stays zero), as float32 rows."""
    v = _matrix(result)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return (v / np.maximum(norms, 1e-12)).astype(np.float32)


def _matrix(result: Embeddings) -> np.ndarray:
    v = np.asarray(result.vectors, dtype=np.float64)
    if not np.isfinite(v).all():
        raise from_llmrun(EngineError("the model produced an embedding with NaN or infinite values"))
    return v


def check_dimensions(dimensions: int | None, result_dims: int, *, api: str) -> None:
    """`dimensions` is honoured when it is the model's own size; shortening a vector is only meaningful for models
    trained for it (Matryoshka), which a GGUF does not record, so any other value is refused, not faked."""
    if dimensions is not None and dimensions != result_dims:
        raise ApiError(400, f"dimensions: this model's embeddings have {result_dims} dimensions and it cannot give "
                            f"{dimensions} (shortened embeddings need a model trained for them, and the GGUF does not "
                            f"say it was); leave dimensions out or set it to {result_dims}",
                       param="dimensions", code="unsupported_parameter" if api == "openai" else None)


# ------------------------------------------------------------------------------------------------- OpenAI

class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str = Field(min_length=1)
    input: str | list[str | int | list[int]]         # a text, texts, one token array, or token arrays
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(default=None, ge=1, le=2 ** 31 - 1)
    user: str | None = None


_KINDS = {str: "a string", int: "a token id", list: "a token array"}


def _openai_inputs(value: str | list[str | int | list[int]]) -> list[EmbedInput]:
    if isinstance(value, str):
        return _checked([value])
    if not value:
        raise ApiError(400, "input: give a string, a list of strings or token arrays (not an empty list)",
                       param="input", code="invalid_value")
    first = type(value[0])
    for i, item in enumerate(value):
        if type(item) is not first:
            raise ApiError(400, f"input[{i}]: a list holds only strings, only token ids (one token array) or only "
                                f"token arrays; input[0] is {_KINDS[first]} but input[{i}] is {_KINDS[type(item)]}",
                           param=f"input[{i}]", code="invalid_value")
    if first is int:
        return _checked([value])            # one token array
    return _checked(list(value))


def _checked(items: list[Any]) -> list[EmbedInput]:
    if len(items) > MAX_INPUTS:
        raise ApiError(400, f"input: at most {MAX_INPUTS} inputs per request, not {len(items)}", param="input",
                       code="invalid_value")
    for i, item in enumerate(items):
        if len(item) == 0:
            raise ApiError(400, f"input[{i}]: an input must not be empty", param=f"input[{i}]",
                           code="invalid_value")
    return items


@router.post("/v1/embeddings", tags=["openai"])
async def openai_embeddings(body: EmbeddingRequest, request: Request):
    inputs = _openai_inputs(body.input)
    result = await embed(request, body.model, inputs, truncate=False, param="input")
    check_dimensions(body.dimensions, result.dimensions, api="openai")
    vectors = unit_vectors(result)
    if body.encoding_format == "base64":
        data = [base64.b64encode(row.astype("<f4").tobytes()).decode() for row in vectors]
    else:
        data = [row.tolist() for row in vectors]
    return {"object": "list", "model": body.model,
            "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
            "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}}


# ------------------------------------------------------------------------------------------------- Ollama

class _OllamaBase(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)     # Ollama ignores what it does not use
    model: str = Field(min_length=1)
    options: dict[str, Any] | None = None
    keep_alive: float | int | str | None = None


class EmbedRequest(_OllamaBase):
    input: str | list[str] | None = None
    truncate: bool = True
    dimensions: int | None = Field(default=None, ge=1, le=2 ** 31 - 1)


class LegacyEmbeddingRequest(_OllamaBase):
    prompt: str | None = None


@router.post("/api/embed", tags=["ollama"])
async def ollama_embed(body: EmbedRequest, request: Request):
    t0 = time.perf_counter()
    keep_alive = keep_alive_of(body.keep_alive)
    items = [body.input] if isinstance(body.input, str) and body.input else list(body.input or [])
    if not items:   # Ollama answers an empty input by loading the model and returning no vectors
        async with engine_for(request, body.model, admit=False, keep_alive=keep_alive):
            return {"model": body.model, "embeddings": []}
    if len(items) > MAX_INPUTS:
        raise ApiError(400, f"input: at most {MAX_INPUTS} inputs per request, not {len(items)}", param="input")
    for i, s in enumerate(items):
        if not s:
            raise ApiError(400, f"input[{i}]: an input must not be empty", param=f"input[{i}]")
    result = await embed(request, body.model, list(items), truncate=body.truncate, param="input",
                         keep_alive=keep_alive)
    check_dimensions(body.dimensions, result.dimensions, api="ollama")
    total_ns = int((time.perf_counter() - t0) * 1e9)
    return JSONResponse({"model": body.model, "embeddings": unit_vectors(result).tolist(),
                         "total_duration": total_ns, "load_duration": 0, "prompt_eval_count": result.prompt_tokens},
                        headers=truncation_notice(result))


def truncation_notice(result: Embeddings) -> dict[str, str]:
    """Never truncate silently: name the inputs that were cut to the model's limit."""
    if not result.truncated:
        return {}
    which = ", ".join(f"input[{i}]" for i in result.truncated[:10]) + (" ..." if len(result.truncated) > 10 else "")
    return {"X-Llmrun-Notice": f"truncated to the model's embedding limit: {which}"}


@router.post("/api/embeddings", tags=["ollama"])
async def ollama_embeddings(body: LegacyEmbeddingRequest, request: Request):
    keep_alive = keep_alive_of(body.keep_alive)
    if not body.prompt:   # as Ollama: an empty prompt loads the model and returns an empty vector
        async with engine_for(request, body.model, admit=False, keep_alive=keep_alive):
            return {"embedding": []}
    result = await embed(request, body.model, [body.prompt], truncate=False, param="prompt", keep_alive=keep_alive)
    return {"embedding": _matrix(result)[0].tolist()}

