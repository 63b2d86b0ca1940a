"""The chat page at `/`: plain files shipped inside the package (runner/server/ui/: HTML, CSS, JavaScript
modules, an icon), no build step, nothing fetched from elsewhere. Served with a strict Content-Security-Policy
(scripts and styles from this server only, no inline script, Trusted Types so no string can become HTML) and
revalidated by ETag, so a browser never keeps a stale page after an upgrade. The page and its files are open
without the API key (like /health); everything they call is not."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib import resources

from fastapi import APIRouter, Request
from starlette.responses import Response

from runner.server.errors import ApiError

router = APIRouter()

PAGE = "index.html"
ASSETS = {                       # what /ui/ serves, and as what
    "app.js": "text/javascript; charset=utf-8",
    "api.js": "text/javascript; charset=utf-8",
    "markdown.js": "text/javascript; charset=utf-8",
    "store.js": "text/javascript; charset=utf-8",
    "panel.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",
}
OPEN_PATHS = frozenset({"/", *(f"/ui/{name}" for name in ASSETS)})   # reachable without the API key

CSP = "; ".join([
    "default-src 'none'", "script-src 'self'", "style-src 'self'", "img-src 'self'", "connect-src 'self'",
    "base-uri 'none'", "form-action 'none'", "frame-ancestors 'none'",
    "require-trusted-types-for 'script'", "trusted-types 'none'",
])
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY"}


@dataclass(frozen=True)
class Asset:
    body: bytes
    media_type: str
    etag: str


@cache
def asset(name: str) -> Asset:
    """A file of the page, read once from the installed package."""
    body = (resources.files("runner.server") / "ui" / name).read_bytes()
    media_type = "text/html; charset=utf-8" if name == PAGE else ASSETS[name]
    return Asset(body, media_type, '"' + hashlib.sha256(body).hexdigest()[:20] + '"')


def _fresh(request: Request, etag: str) -> bool:
    """The browser's copy is current (If-None-Match names this ETag, weak or strong, or is *)."""
    header = request.headers.get("if-none-match")
    if not header:
        return False
    tags = {t.strip().removeprefix("W/") for t in header.split(",")}
    return "*" in tags or etag in tags


def _respond(request: Request, name: str) -> Response:
    a = asset(name)
    headers = {"ETag": a.etag, "Cache-Control": "no-cache", **SECURITY_HEADERS}
    if _fresh(request, a.etag):
        return Response(status_code=304, headers=headers)
    return Response(a.body, media_type=a.media_type, headers=headers)


@router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
async def page(request: Request) -> Response:
    return _respond(request, PAGE)


@router.api_route("/ui/{name}", methods=["GET", "HEAD"], include_in_schema=False)
async def ui_file(name: str, request: Request) -> Response:
    if name not in ASSETS:
        raise ApiError(404, f"No file /ui/{name}; the page's files are {', '.join(sorted(ASSETS))}.",
                       code="not_found")
    return _respond(request, name)
