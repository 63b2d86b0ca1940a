"""Model management in Ollama's shapes: /api/pull (NDJSON progress, or one answer with `"stream": false`),
/api/delete, /api/copy. Thin adapters over runner.app.manage; the middleware refuses these routes on a server
exposed beyond localhost without an API key (runner.server.app)."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from runner.app.manage import PullWatch
from runner.core.errors import LlmrunError
from runner.server.common import state_of
from runner.server.errors import ApiError, from_llmrun
from runner.server.native import race_disconnect
from runner.store.fetch import PullProgress

log = logging.getLogger("llmrun.server")
router = APIRouter()
MANAGE_PATHS = frozenset({"/api/pull", "/api/delete", "/api/copy"})


class _Named(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    model: str | None = Field(default=None, min_length=1)
    name: str | None = Field(default=None, min_length=1)    # older clients send "name"

    def model_name(self) -> str:
        name = self.model or self.name
        if not name or not name.strip():
            raise ApiError(400, "model: this field is required (the model's name)", param="model")
        return name


class PullRequest(_Named):
    stream: bool = True
    insecure: bool | None = None
    username: str | None = None
    password: str | None = None
    accept_license: bool = False   # llmrun's own: accept the model's licence (remembered, as --accept-license)


class DeleteRequest(_Named):
    pass


class CopyRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    source: str = Field(min_length=1)
    destination: str = Field(min_length=1)


def _bad(param: str, why: str) -> ApiError:
    return ApiError(400, f"{param}: {why}", param=param, code="unsupported_parameter")


def _step(p: PullProgress) -> dict | None:
    """A pull step as Ollama's progress line (None: a step Ollama does not show)."""
    if p.stage == "download":
        line: dict = {"status": f"pulling {p.sha256[:12]}" if p.sha256 else f"pulling {p.file}"}
        if p.sha256:
            line["digest"] = f"sha256:{p.sha256}"
        return line | {"total": p.total, "completed": p.completed}
    if p.stage == "verify":
        return {"status": "verifying sha256 digest"}
    if p.stage == "join":
        return {"status": f"joining parts into {p.file}", "total": p.total, "completed": p.completed}
    return None       # "manifest": said once, first


def _line(obj: dict) -> bytes:
    return (json.dumps(obj) + "\n").encode()


def _error_text(e: LlmrunError) -> str:
    return from_llmrun(e).message


class PullStream(StreamingResponse):
    """The NDJSON progress of one client's pull; the client stops watching however the response ends (the last
    one to go stops the download: what arrived is kept for the next pull)."""

    def __init__(self, watch: PullWatch, content: AsyncIterator[bytes]):
        super().__init__(content, media_type="application/x-ndjson",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.watch = watch

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.watch.close()


async def _until_first_step(watch: PullWatch) -> list[PullProgress]:
    """The steps up to the first that is more than asking the hub (or to the end): what fails before any byte
    (not on the hub, no room on disk, unreachable) still gets its own HTTP status."""
    seen: list[PullProgress] = []
    while True:
        p = await watch.next()
        if p is None:
            return seen
        seen.append(p)
        if p.stage != "manifest":
            return seen


async def _progress(watch: PullWatch, seen: list[PullProgress]) -> AsyncIterator[bytes]:
    yield _line({"status": "pulling manifest"})
    for p in seen:
        if (line := _step(p)) is not None:
            yield _line(line)
    try:
        while (step := await watch.next()) is not None:
            if (line := _step(step)) is not None:
                yield _line(line)
    except LlmrunError as e:
        yield _line({"error": _error_text(e)})
        return
    except Exception as e:     # a bug: said on the stream, logged with its traceback
        log.exception("pull of %s failed", watch.entry.name)
        yield _line({"error": f"Internal error: {type(e).__name__}."})
        return
    yield _line({"status": "success"})


@router.post("/api/pull", tags=["ollama"])
async def pull(body: PullRequest, request: Request):
    name = body.model_name()
    if body.insecure:
        raise _bad("insecure", "llmrun pulls from the Hugging Face hub (HF_ENDPOINT) and checks every file's "
                               "sha256; there is no insecure mode")
    if body.username is not None or body.password is not None:
        raise _bad("username" if body.username is not None else "password",
                   "llmrun pulls with the server's own hub token (HF_TOKEN in its environment)")
    watch = await state_of(request).manager.pull(name, accept_license=body.accept_license)
    try:
        seen = await race_disconnect(_until_first_step(watch), request)
        if not body.stream:
            await race_disconnect(watch.wait(), request)
            watch.close()
            return {"status": "success"}
    except BaseException:
        watch.close()
        raise
    return PullStream(watch, _progress(watch, seen))


@router.delete("/api/delete", tags=["ollama"])
async def delete(body: DeleteRequest, request: Request):
    freed = await state_of(request).manager.delete(body.model_name())
    return {"status": "success", "freed_bytes": freed}


@router.post("/api/copy", tags=["ollama"])
async def copy(body: CopyRequest, request: Request):
    await state_of(request).manager.copy(body.source, body.destination)
    return {"status": "success"}
