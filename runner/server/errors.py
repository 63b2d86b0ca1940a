"""Errors at the HTTP edge: one table from llmrun's error classes to HTTP statuses, and the two body shapes
clients expect: OpenAI `{"error": {"message", "type", "param", "code"}}`, Ollama `{"error": "..."}` (every
route under /api/) and Anthropic `{"type": "error", "error": {"type", "message"}}` (/v1/messages...)."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from runner.core import errors as E

log = logging.getLogger("llmrun.server")

# (class, HTTP status, OpenAI error type, OpenAI error code); the first class that matches wins.
STATUS_TABLE: tuple[tuple[type[E.LlmrunError], int, str, str | None], ...] = (
    (E.ContextOverflowError, 400, "invalid_request_error", "context_length_exceeded"),
    (E.UsageError, 400, "invalid_request_error", None),
    (E.UnknownModelError, 404, "invalid_request_error", "model_not_found"),
    (E.ModelNotLocalError, 404, "invalid_request_error", "model_not_found"),
    (E.DoesNotFitError, 507, "server_error", "insufficient_memory"),
    (E.ConflictError, 409, "invalid_request_error", "conflict"),    # in use, being pulled or deleted, has copies
    (E.LicenseNotAcceptedError, 403, "invalid_request_error", "license_not_accepted"),  # pull: accept it first
    (E.RemoteNotFoundError, 404, "invalid_request_error", "model_not_found"),   # a hub reference to nothing
    (E.HubAuthError, 403, "invalid_request_error", "hub_access_denied"),        # gated or private: HF_TOKEN
    (E.DiskSpaceError, 507, "server_error", "insufficient_storage"),                  # pull: no room on disk
    (E.FetchError, 502, "server_error", "pull_failed"),                               # pull: the hub failed
    (E.EngineError, 500, "server_error", "engine_error"),
    (E.ClusterError, 503, "server_error", "workers_unavailable"),  # cluster: an RPC worker is down
    (E.CapacityError, 503, "server_error", "model_busy"),           # no room now: the loaded models are busy
    (E.ServerError, 503, "server_error", "unavailable"),
    (E.LlmrunError, 500, "server_error", None),
)


class ApiError(Exception):
    """An HTTP answer decided at the edge (429 queue full, 401, 413, 404 unknown model...)."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}


def from_llmrun(e: E.LlmrunError, *, param: str | None = None) -> ApiError:
    """The one place an llmrun error becomes an HTTP status."""
    if param is None and isinstance(e, E.UsageError):
        param = e.field                   # the request field the engine found at fault, if it knows
    for cls, status, type_, code in STATUS_TABLE:
        if isinstance(e, cls):
            message = e.message + (f" (hint: {e.hint})" if e.hint else "")
            if status >= 500:
                log.error("request failed: %s", message)
            headers = {"Retry-After": str(e.retry_after_s)} if isinstance(e, E.CapacityError) else None
            return ApiError(status, message, type=type_, param=param, code=code, headers=headers)
    raise AssertionError("STATUS_TABLE ends with LlmrunError")  # pragma: no cover


def rename_fields(e: ApiError, pattern: str, replacement: str) -> ApiError:
    """`e` with the fields it names rewritten (re.sub on its param and message): an adapter whose API names a
    field otherwise than the engine does (`tools[0].function.name` is `tools[0].name` in the Responses API)."""
    if e.param is None or not re.search(pattern, e.param):
        return e
    return ApiError(e.status, re.sub(pattern, replacement, e.message), type=e.type,
                    param=re.sub(pattern, replacement, e.param), code=e.code, headers=e.headers)


def is_ollama_path(path: str) -> bool:
    return path.startswith("/api/")


def is_anthropic_path(path: str) -> bool:
    return path == "/v1/messages" or path.startswith("/v1/messages/")


# Anthropic's error types by HTTP status (https://docs.anthropic.com/en/api/errors); other 4xx are
# invalid_request_error, other 5xx api_error
_ANTHROPIC_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                    413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}


def anthropic_error(e: ApiError) -> dict[str, Any]:
    kind = _ANTHROPIC_TYPES.get(e.status, "api_error" if e.status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": e.message}}


def body(e: ApiError, path: str) -> bytes:
    if is_ollama_path(path):
        return json.dumps({"error": e.message}).encode()
    if is_anthropic_path(path):
        return json.dumps(anthropic_error(e)).encode()
    return json.dumps({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}).encode()


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "bytes"}   # union members pydantic puts in loc


def validation_error(errors: list[dict]) -> ApiError:
    """FastAPI/pydantic validation errors -> 400 naming the first bad field as `messages[0].role` etc."""
    if not errors:
        return ApiError(400, "invalid request")
    err = errors[0]
    loc = [p for p in err.get("loc", ()) if p != "body"]
    if err.get("type") == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "")
        return ApiError(400, f"The request body is not valid JSON ({detail}).".replace(" ()", ""), code="invalid_json")
    # pydantic puts the model/union member name in loc for unions and tagged unions: keep field-like parts only
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        elif isinstance(p, str) and not (p[:1].isupper() or "[" in p or p in _TYPE_TAGS):
            parts.append(("." if parts else "") + p)
    param = "".join(parts) or None
    msg = err.get("msg", "invalid value")
    if err.get("type") == "extra_forbidden":
        msg = "unrecognized request argument (not supported by this server)"
    elif err.get("type") == "missing":
        msg = "this field is required" if param else "the request body is empty; send a JSON object"
    elif err.get("type") == "model_attributes_type" and not param:
        msg = "the request body must be a JSON object"
    text = f"{param}: {msg}" if param else msg
    return ApiError(400, text, param=param, code="invalid_value")


# A JSON escape of a UTF-16 surrogate (\ud800-\udfff). Only such an escape can put one in a request: raw UTF-8
# cannot encode surrogates (a body that tries is not valid JSON).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def lone_surrogate(body: bytes) -> ApiError | None:
    """A 400 naming the first text field of a JSON body that holds a lone surrogate ("\\ud800" escaped alone: valid
    JSON, not valid Unicode, and nothing downstream can encode it), or None. Paired surrogates are one character
    once parsed and pass. A body that is not JSON is left to the request validation."""
    if not _SURROGATE_ESCAPE.search(body):
        return None
    try:
        found = _find_surrogate(json.loads(body), "")
    except (ValueError, RecursionError):    # not JSON, or nested deeper than Python recurses
        return None
    if found is None:
        return None
    path, index, char = found
    path = path.encode("utf-8", "backslashreplace").decode()   # a key may hold the surrogate itself
    field = path or "the request body"
    return ApiError(400, f"{field}: the text holds a lone UTF-16 surrogate (\\u{ord(char):04x} at character "
                         f"{index}), which is not valid Unicode; send valid UTF-8 text (a surrogate must be paired, "
                         "as in \\ud83d\\ude00)", param=path or None, code="invalid_value")


def _find_surrogate(value: object, path: str) -> tuple[str, int, str] | None:
    if isinstance(value, str):
        for i, c in enumerate(value):
            if "\ud800" <= c <= "\udfff":
                return path, i, c
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            found = _find_surrogate(key, where) or _find_surrogate(item, where)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _find_surrogate(item, f"{path}[{i}]")
            if found is not None:
                return found
    return None
