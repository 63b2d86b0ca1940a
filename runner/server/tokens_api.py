"""llama-server's token utilities, in its request and response shapes (tools/server in llama.cpp): /tokenize,
/detokenize and /apply-template, for clients that count tokens or want to see the prompt a chat becomes. Thin
adapters over the engine's tokenizer and chat template, run off the event loop (an engine in a child process
answers over a socket). `model` is optional, as llama-server has it: without it the request is for the one model in
memory (400 when there are several or none)."""

from __future__ import annotations

import asyncio
from typing import Callable, TypeVar

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from runner.core.errors import LlmrunError
from runner.engine.types import Engine
from runner.server.embeddings_api import engine_for
from runner.server.errors import ApiError, from_llmrun
from runner.server.openai_api import Message, _messages

router = APIRouter()
T = TypeVar("T")

MAX_TOKENS = 1 << 20       # token ids per /detokenize or mixed /tokenize request (the body limit bounds it too)


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = Field(default=None, min_length=1)


class TokenizeRequest(_Base):
    content: str | list[str | int] | None = None
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False


class DetokenizeRequest(_Base):
    tokens: list[int] | None = Field(default=None, max_length=MAX_TOKENS)


class ApplyTemplateRequest(BaseModel):
    """An OpenAI chat request; only `messages` matters (llama-server takes the whole chat body)."""

    model_config = ConfigDict(extra="allow", strict=True)
    model: str | None = Field(default=None, min_length=1)
    messages: list[Message] = Field(min_length=1)


async def _call(request: Request, model: str | None, fn: Callable[[Engine], T], *, param: str) -> T:
    async with engine_for(request, model, admit=False) as engine:
        try:
            return await asyncio.to_thread(fn, engine)
        except LlmrunError as e:
            error = from_llmrun(e, param=param)
            if not error.message.startswith(param):
                error = ApiError(error.status, f"{param}: {error.message}", type=error.type, param=param,
                                 code=error.code)
            raise error from e


def _tokenizer(text: str, add_special: bool, parse_special: bool) -> Callable[[Engine], list[int]]:
    return lambda e: e.tokenize_with(text, add_special=add_special, parse_special=parse_special)


def _piece_json(piece: bytes) -> str | list[int]:
    """llama-server's `piece`: the text when the bytes are valid UTF-8, else the byte values."""
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError:
        return list(piece)


@router.post("/tokenize", tags=["llama.cpp"])
async def tokenize(body: TokenizeRequest, request: Request):
    parts = [body.content] if isinstance(body.content, str) else body.content or []
    tokens: list[int] = []
    for i, part in enumerate(parts):     # llama-server's "mixed" content: texts and token ids, in order
        if isinstance(part, str):
            tokens += await _call(request, body.model, _tokenizer(part, body.add_special and i == 0,
                                                                  body.parse_special), param="content")
        else:
            tokens.append(part)
    if not parts:
        async with engine_for(request, body.model, admit=False):   # still 503 while loading, 404 for another name
            return {"tokens": []}
    if len(tokens) > MAX_TOKENS:
        raise ApiError(400, f"content: at most {MAX_TOKENS} tokens", param="content")
    if not body.with_pieces:
        return {"tokens": tokens}
    pieces = await _call(request, body.model, lambda e: e.token_pieces(tokens), param="content")
    return {"tokens": [{"id": t, "piece": _piece_json(p)} for t, p in zip(tokens, pieces)]}


@router.post("/detokenize", tags=["llama.cpp"])
async def detokenize(body: DetokenizeRequest, request: Request):
    content = await _call(request, body.model, lambda e: e.detokenize(body.tokens or []), param="tokens")
    return {"content": content}


@router.post("/apply-template", tags=["llama.cpp"])
async def apply_template(body: ApplyTemplateRequest, request: Request):
    messages = _messages(body.messages)
    prompt = await _call(request, body.model, lambda e: e.apply_template(messages), param="messages")
    return {"prompt": prompt}
