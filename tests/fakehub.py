"""A fake Hugging Face hub for tests: a small threaded HTTP server on 127.0.0.1 (free port) that implements what
huggingface_hub 2.x calls to download files:

  GET  /api/models/{repo}/revision/{rev}[?blobs=true]   model info; with blobs: siblings' size and LFS sha256/size
  HEAD /{repo}/resolve/{rev}/{file}                     ETag ("sha256" for LFS), X-Repo-Commit, X-Linked-Etag,
                                                        X-Linked-Size, Content-Length, Accept-Ranges
  GET  /{repo}/resolve/{rev}/{file}                     the bytes; `Range: bytes=N-[M]` answers 206 + Content-Range

Errors carry the hub's X-Error-Code header (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo) so the client
raises its own typed errors. Tests can require a token, drop a connection after N bytes, and read every request.
Tests can also stall a file: send its first N bytes, then wait for an event before the rest (a slow hub).
The server stops when the test's `with` block ends (and by itself after `lifetime` seconds at most).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from runner.model.catalog import CatalogEntry, ModelFile, OpennessCard
from runner.core.shapes import ModelShape


@dataclass
class FakeRepo:
    repo_id: str
    files: dict[str, bytes]
    commit: str
    token: str | None = None          # required for file downloads (a gated repo) when set
    gated: bool = False
    private: bool = False             # the token is also required for model info (the hub then says RepoNotFound)
    card: dict | None = None          # the model card's metadata (cardData: license, license_name, ...)

    def sha256(self, name: str) -> str:
        return hashlib.sha256(self.files[name]).hexdigest()


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    sent: int = 0                     # body bytes the server sent back (a dropped response: what left before)


@dataclass
class FakeHub:
    repos: dict[str, FakeRepo] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    drop_after: dict[str, int] = field(default_factory=dict)  # file name -> bytes sent before the next GET drops
    ignore_range: set[str] = field(default_factory=set)       # file names served whole (200) despite a Range
    stall: dict[str, tuple[int, threading.Event]] = field(default_factory=dict)  # file -> (bytes, go): the next
                                                              # GET sends that many bytes, then waits for `go`
    lifetime: float = 120.0

    def add_repo(self, repo_id: str, files: dict[str, bytes], *, commit: str | None = None,
                 token: str | None = None, gated: bool = False, private: bool = False,
                 card: dict | None = None) -> FakeRepo:
        commit = commit or hashlib.sha1(repo_id.encode()).hexdigest()
        repo = FakeRepo(repo_id, dict(files), commit, token, gated, private, card)
        self.repos[repo_id] = repo
        return repo

    def file_gets(self) -> list[Request]:
        """Every GET of a file's bytes (any file), in order."""
        return [r for r in self.requests if r.method == "GET" and "/resolve/" in r.path]

    def gets(self, name: str) -> list[Request]:
        """The GET requests for one file's bytes, in order."""
        return [r for r in self.requests if r.method == "GET" and "/resolve/" in r.path and r.path.endswith(name)]

    # ------------------------------------------------------------------------------------------- server life
    def __enter__(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        self._timer = threading.Timer(self.lifetime, self._server.shutdown)
        self._timer.daemon = True
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"


_API_RE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")
_RESOLVE_RE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_RANGE_RE = re.compile(r"^bytes=(\d+)-(\d*)$")


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._handle(head=True)

    def do_GET(self) -> None:
        self._handle(head=False)

    # -------------------------------------------------------------------------------------------------- routing
    def _handle(self, head: bool) -> None:
        parts = urlsplit(self.path)
        path = parts.path
        self._req = Request(self.command, path, {k.lower(): v for k, v in self.headers.items()})
        self.hub.requests.append(self._req)
        m = _API_RE.match(path)
        if m:
            return self._model_info(m.group("repo"), unquote(m.group("rev") or "main"), "blobs=true" in parts.query,
                                    head)
        m = _RESOLVE_RE.match(path)
        if m:
            return self._resolve(m.group("repo"), unquote(m.group("rev")), unquote(m.group("file")), head)
        self._error(404, "RepoNotFound", "not found", head)

    def _repo(self, repo_id: str, rev: str, head: bool) -> FakeRepo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository {repo_id} not found", head)
            return None
        if rev not in ("main", repo.commit):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head, commit=None)
            return None
        return repo

    def _model_info(self, repo_id: str, rev: str, blobs: bool, head: bool) -> None:
        repo = self._repo(repo_id, rev, head)
        if repo is None:
            return
        if repo.private and self.headers.get("Authorization") != f"Bearer {repo.token}":
            return self._error(401, "RepoNotFound", "Repository not found", head)
        siblings = []
        for name, data in repo.files.items():
            s: dict = {"rfilename": name}
            if blobs:
                s.update(size=len(data), blobId=hashlib.sha1(data).hexdigest(),
                         lfs={"size": len(data), "sha256": repo.sha256(name), "pointerSize": 134})
            siblings.append(s)
        info: dict = {"id": repo_id, "modelId": repo_id, "sha": repo.commit, "private": False,
                      "gated": "manual" if repo.gated else False, "siblings": siblings,
                      "lastModified": "2025-06-01T12:00:00.000Z"}
        if repo.card is not None:
            info["cardData"] = repo.card
        body = json.dumps(info).encode()
        self._send(200, body, {"Content-Type": "application/json"}, head)

    def _resolve(self, repo_id: str, rev: str, name: str, head: bool) -> None:
        repo = self._repo(repo_id, rev, head)
        if repo is None:
            return
        if repo.token is not None and self.headers.get("Authorization") != f"Bearer {repo.token}":
            if repo.gated:
                return self._error(403, "GatedRepo", "Access to this model is restricted", head,
                                   commit=repo.commit)
            return self._error(401, None, "Invalid username or password.", head, commit=repo.commit)
        if name not in repo.files:
            return self._error(404, "EntryNotFound", f"{name} does not exist", head, commit=repo.commit)
        data = repo.files[name]
        sha = repo.sha256(name)
        headers = {"ETag": f'"{sha}"', "X-Repo-Commit": repo.commit, "X-Linked-Etag": f'"{sha}"',
                   "X-Linked-Size": str(len(data)), "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        status, start, end = 200, 0, len(data) - 1
        rng = self.headers.get("Range")
        if rng and not head and name not in self.hub.ignore_range:
            m = _RANGE_RE.match(rng.strip())
            if not m or int(m.group(1)) >= len(data):
                return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"}, head)
            start = int(m.group(1))
            end = min(int(m.group(2)), len(data) - 1) if m.group(2) else len(data) - 1
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        body = data[start:end + 1]
        if not head and name in self.hub.drop_after:
            cut = self.hub.drop_after.pop(name)
            return self._send_and_drop(status, body, headers, cut)
        if not head and name in self.hub.stall:
            cut, go = self.hub.stall.pop(name)
            return self._send_stalled(status, body, headers, cut, go)
        self._send(status, body, headers, head)

    # -------------------------------------------------------------------------------------------------- output
    def _error(self, status: int, code: str | None, message: str, head: bool, commit: str | None = None) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        if commit:
            headers["X-Repo-Commit"] = commit
        self._send(status, json.dumps({"error": message}).encode(), headers, head)

    def _send(self, status: int, body: bytes, headers: dict[str, str], head: bool) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)
            self._req.sent = len(body)
        self.wfile.flush()

    def _send_stalled(self, status: int, body: bytes, headers: dict[str, str], cut: int,
                      go: threading.Event) -> None:
        """Send `cut` bytes, wait for `go` (a slow hub), then the rest; a client gone meanwhile is no error."""
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body[:cut])
            self.wfile.flush()
            go.wait(30)
            self.wfile.write(body[cut:])
            self.wfile.flush()
        except OSError:
            self.close_connection = True

    def _send_and_drop(self, status: int, body: bytes, headers: dict[str, str], cut: int) -> None:
        """Announce the whole body, send `cut` bytes, then drop the connection (a network failure mid-file)."""
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:cut])
        self._req.sent = cut
        self.wfile.flush()
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def make_gguf(path: Path, n_floats: int, *, seed: int = 0, arch: str = "llama") -> bytes:
    """A small valid GGUF (one F32 tensor of `n_floats` values) written with gguf.GGUFWriter; returns its bytes."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.random.default_rng(seed).standard_normal(n_floats).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path).read_bytes()


# ------------------------------------------------------------------------------------ catalog entries for tests

APACHE = OpennessCard(model="test", license="Apache-2.0", license_name="Apache License 2.0", spdx="Apache-2.0",
                      license_url="https://www.apache.org/licenses/LICENSE-2.0", osi_approved=True,
                      commercial_use=True, restrictions=(), training_data_disclosed=False,
                      training_code_published=False, publisher="test", released=datetime.date(2024, 1, 1))
LLAMA2 = OpennessCard(model="llama-2-7b-chat", license="llama2", license_name="Llama 2 Community License Agreement",
                      spdx=None, license_url="https://ai.meta.com/llama/license/", osi_approved=False,
                      commercial_use=True,
                      restrictions=("a separate licence above 700 million monthly active users",
                                    "outputs may not be used to improve other large language models"),
                      training_data_disclosed=False, training_code_published=False, publisher="Meta",
                      released=datetime.date(2023, 7, 18))
SHAPE = ModelShape(arch="llama", n_layer=1, n_embd=8, n_head=1, n_head_kv=1, n_ff=8, n_vocab=8, n_ctx_train=64)


def entry(name: str, repo: str, files: dict[str, bytes], *, layout: str = "single", revision: str | None = None,
          with_sha: bool = True, local_file: str | None = None, card: OpennessCard = APACHE,
          sha_override: dict[str, str] | None = None) -> CatalogEntry:
    sha_override = sha_override or {}
    mfiles = tuple(ModelFile(n, len(d), sha_override.get(n) or (hashlib.sha256(d).hexdigest() if with_sha else None))
                   for n, d in files.items())
    e = CatalogEntry(name=name, model=name.split(":")[0], quant=name.split(":")[-1], family="test", params_b=0.001,
                     shape=SHAPE, source="hf", repo=repo, revision=revision, files=mfiles, layout=layout,
                     size_bytes=sum(len(d) for d in files.values()), size_exact=True, chat=True, license=card.license,
                     local_file=local_file, card=card)
    return e


def use_hub(hub: FakeHub, monkeypatch, tmp_path: Path) -> None:
    """Point llmrun (and the hub client) at `hub`, with a private hub cache and no token or offline mode."""
    import huggingface_hub.constants as hfc

    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hfc, "HF_HUB_OFFLINE", False)


_LICENSES_TOML = """
schema = 1
[licenses."Apache-2.0"]
name = "Apache License 2.0"
spdx = "Apache-2.0"
url = "https://www.apache.org/licenses/LICENSE-2.0"
osi_approved = true
commercial_use = true
[licenses.llama2]
name = "Llama 2 Community License Agreement"
url = "https://ai.meta.com/llama/license/"
osi_approved = false
commercial_use = true
restrictions = ["A separate licence is needed above 700 million monthly active users."]
"""


def write_catalog(configs: Path, models: list[tuple[str, FakeRepo, str, str]]) -> Path:
    """A models.toml (the real catalog format) for a fresh `llmrun` process: (model, repo, quant, licence) each,
    the repo holding one file `MODEL.QUANT.gguf`."""
    out = [_LICENSES_TOML]
    for model, repo, quant, lic in models:
        data = repo.files[f"{model}.{quant}.gguf"]
        out.append(f"""
[models.{model}]
family = "test"
params_b = 0.001
shape = {{ arch = "llama", n_layer = 1, n_embd = 8, n_head = 1, n_head_kv = 1, n_ff = 8, n_vocab = 8, n_ctx_train = 64 }}
chat = true
source = "hf"
repo = "{repo.repo_id}"
revision = "{repo.commit}"
file_pattern = "{model}.{{quant}}.gguf"
[models.{model}.card]
license = "{lic}"
publisher = "test"
released = 2024-01-01
training_data_disclosed = false
training_code_published = false
[models.{model}.quants]
{quant} = {{ size = {len(data)}, sha256 = "{hashlib.sha256(data).hexdigest()}" }}
""")
    configs.mkdir(parents=True, exist_ok=True)
    path = configs / "models.toml"
    path.write_text("".join(out))
    return path
