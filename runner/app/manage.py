"""Model management for a running server (Ollama's /api/pull, /api/delete, /api/copy), over its pool and the one
name resolver:

- pull: the same verified, resumable fetch as `llmrun pull` (runner.store.fetch: disk preflight, sha256,
  resume, atomic landing), on a worker thread, its progress handed to every client watching. One download per
  model however many clients ask for it. When the last watcher goes away the download stops at its next chunk:
  what arrived stays on disk and the next pull resumes it. A licence that must be accepted is refused before
  anything is downloaded (LicenseNotAcceptedError, saying how to accept it) unless the request accepts it.
- delete: a pulled model's files (runner.store.local.remove, partial downloads included) once the pool has taken
  it out of service (runner.app.pool: refused while requests use it); a copy: only that name. Files the server
  was given (--model PATH, --config) are not llmrun's to delete.
- copy: another name for a model this machine has (runner.store.aliases), resolved by every llmrun process.

After each, the index rescans, so every route sees the change at once.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from dataclasses import dataclass, field

from runner.app.models import LATEST, ModelIndex, ModelRef
from runner.app.pool import ModelPool
from runner.app.threads import in_thread
from runner.core.errors import ConflictError, LicenseNotAcceptedError, ModelNotLocalError, PullCancelledError, \
    ServerError, UnknownModelError, UsageError
from runner.model.catalog import CatalogEntry
from runner.store import aliases
from runner.store.fetch import PullProgress
from runner.store.local import LocalModel

log = logging.getLogger("llmrun.server")
PROGRESS_EVERY_S = 0.25        # a file's byte count goes to watchers at most this often (its first and last always)
COPY_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:-]{0,199}$")


def _never(_question: str) -> bool:
    return False


def license_hint(entry: CatalogEntry, link: str | None) -> str:
    return (f"read {link or 'the licence'}, then accept it once: `llmrun pull {entry.name} --accept-license` on "
            'the server, or send "accept_license": true with this pull')


# ---------------------------------------------------------------------------------------------------- pulls
@dataclass
class PullJob:
    """One download of one model, watched by one or more clients."""

    entry: CatalogEntry
    accept_license: bool
    watchers: set["PullWatch"] = field(default_factory=set)
    latest: dict[tuple[str, str | None], PullProgress] = field(default_factory=dict)  # for a watcher joining late
    cancel: threading.Event = field(default_factory=threading.Event)
    result: LocalModel | None = None
    error: BaseException | None = None
    finished: asyncio.Event = field(default_factory=asyncio.Event)


class PullWatch:
    """One client's view of a pull: `next()` gives its steps as they happen, then None when it has succeeded
    (or raises its error). `close()` (always, however the client ends) stops watching; the last watcher to go
    stops the download."""

    def __init__(self, manager: "ModelManager", job: PullJob):
        self.manager, self.job = manager, job
        self.queue: asyncio.Queue[PullProgress | None] = asyncio.Queue()
        for p in job.latest.values():
            self.queue.put_nowait(p)
        job.watchers.add(self)
        if job.finished.is_set():
            self.queue.put_nowait(None)

    @property
    def entry(self) -> CatalogEntry:
        return self.job.entry

    async def next(self) -> PullProgress | None:
        item = await self.queue.get()
        if item is None:
            self.queue.put_nowait(None)      # the end stays the end
            if self.job.error is not None:
                raise self.job.error
        return item

    async def wait(self) -> LocalModel:
        """Wait for the end of the pull: what is on disk, or the pull's error."""
        while await self.next() is not None:
            pass
        assert self.job.result is not None
        return self.job.result

    def close(self) -> None:
        self.manager._unwatch(self)


class ModelManager:
    def __init__(self, pool: ModelPool):
        self.pool = pool
        self.pulls: dict[str, PullJob] = {}          # by catalog name: the downloads under way
        self._deleting: set[str] = set()
        self._stopping = False

    @property
    def index(self) -> ModelIndex:
        return self.pool.index

    async def pull(self, name: str, *, accept_license: bool = False) -> PullWatch:
        """Start pulling the model `name` names (or join its pull under way) and watch it. Raises at once what
        can be known before downloading: UnknownModelError, UsageError (nothing to pull),
        LicenseNotAcceptedError, ConflictError (being deleted)."""
        entry = await in_thread("llmrun-pull-name", self._pullable, name, accept_license)
        if self._stopping:
            raise ServerError("the server is shutting down")
        if entry.name in self._deleting:
            raise ConflictError(f"{entry.name} is being deleted", hint="pull it again once the delete has finished")
        job = self.pulls.get(entry.name)
        if job is None:
            job = self._start(PullJob(entry, accept_license))
        job.cancel.clear()        # a watcher is back before the download noticed the last one leave
        return PullWatch(self, job)

    def _pullable(self, name: str, accept_license: bool) -> CatalogEntry:
        """The entry a pull of `name` fetches, its licence accepted (a name may need the hub to resolve: a worker
        thread runs this)."""
        from runner.store import licenses

        entry = self.index.pull_entry(name)
        if not accept_license and not licenses.is_accepted(entry):
            terms = licenses.terms(entry)
            raise LicenseNotAcceptedError(
                f"{entry.name} is under the {terms.name}, which must be accepted before the first download; nothing "
                "was downloaded", hint=license_hint(entry, terms.link))
        return entry

    def _start(self, job: PullJob) -> PullJob:
        self.pulls[job.entry.name] = job
        loop = asyncio.get_running_loop()
        sent: dict[str | None, float] = {}

        def report(p: PullProgress) -> None:        # on the pulling thread
            if job.cancel.is_set():
                raise PullCancelledError(f"the pull of {job.entry.name} was stopped: no client is watching it "
                                         "(what was downloaded is kept; the next pull resumes it)")
            if p.stage in ("download", "join") and p.completed not in (0, p.total):
                now = time.monotonic()
                if now - sent.get(p.file, 0.0) < PROGRESS_EVERY_S:
                    return
                sent[p.file] = now
            loop.call_soon_threadsafe(self._publish, job, p)

        def work() -> LocalModel:
            from runner.store import fetch

            try:
                return fetch.pull(job.entry, accept_license=job.accept_license, progress=False, ask=_never,
                                  on_progress=report)
            finally:
                self.index.refresh()

        log.info("pulling %s", job.entry.name)
        future = in_thread(f"llmrun-pull {job.entry.name}", work)
        future.add_done_callback(lambda f: self._finish(job, f))
        return job

    def _publish(self, job: PullJob, p: PullProgress) -> None:
        job.latest[(p.stage, p.file)] = p
        for w in job.watchers:
            w.queue.put_nowait(p)

    def _finish(self, job: PullJob, future: asyncio.Future[LocalModel]) -> None:
        if self.pulls.get(job.entry.name) is job:
            del self.pulls[job.entry.name]
        error = future.exception()
        if isinstance(error, PullCancelledError) and job.watchers and not self._stopping:
            # a client came back just as the download stopped: start again for it (it resumes)
            again = self._start(PullJob(job.entry, job.accept_license, watchers=job.watchers))
            for w in again.watchers:
                w.job = again
            return
        if error is None:
            job.result = future.result()
            log.info("pulled %s", job.entry.name)
        else:
            job.error = error
            log.log(logging.INFO if isinstance(error, PullCancelledError) else logging.ERROR,
                    "pull of %s ended: %s", job.entry.name, error)
        job.finished.set()
        for w in job.watchers:
            w.queue.put_nowait(None)

    def stop(self) -> None:
        """The server is stopping: every download stops at its next chunk (what arrived is kept)."""
        self._stopping = True
        for job in self.pulls.values():
            job.cancel.set()

    def _unwatch(self, watch: PullWatch) -> None:
        job = watch.job
        job.watchers.discard(watch)
        if not job.watchers and not job.finished.is_set():
            job.cancel.set()

    # --------------------------------------------------------------------------------------------- delete
    async def delete(self, name: str) -> int:
        """Delete the model (or the copy) `name` names; the bytes freed (0 for a copy)."""
        index = self.index
        copy = index.copy_name(name)
        try:
            ref: ModelRef | None = index.resolve(name)
        except (UnknownModelError, ModelNotLocalError):
            if copy is None:
                raise
            ref = None
        if copy is not None and (ref is None or copy in ref.copies):
            await in_thread("llmrun-delete", aliases.remove, copy)
            index.refresh()
            log.info("deleted the copy %s", copy)
            return 0
        assert ref is not None
        entry = ref.entry
        if entry is not None and ref.path is None:     # a --pull server resolves catalog names not pulled yet
            raise ModelNotLocalError(f"{entry.name} is not on this machine; there is nothing to delete",
                                     hint="GET /api/tags lists the models here")
        if entry is None or ref.path is None:
            what = (f"the file {ref.path}, served because the server was given it (--model or --config)"
                    if ref.path is not None else "an engine handed to the server loaded")
            raise UsageError(f"{ref.name} is {what}; llmrun deletes only models it pulled",
                             hint="stop serving it instead (drop it from --model / --config)")
        if ref.copies:
            raise ConflictError(f"{ref.name} has copies: {', '.join(ref.copies)}; it was not deleted",
                                hint="delete the copies first (DELETE /api/delete with each name)")
        if entry.name in self.pulls:
            raise ConflictError(f"{entry.name} is being pulled; it was not deleted",
                                hint="delete it when the pull has finished")
        self._deleting.add(entry.name)
        try:
            async with self.pool.retired(ref.name):
                from runner.store import local as store

                named = index.files_at(ref.path)   # served by its path too (`llmrun serve --model PATH`)
                freed = await in_thread("llmrun-delete", store.remove, entry)
                index.drop(named)
        finally:
            self._deleting.discard(entry.name)
            await in_thread("llmrun-rescan", index.refresh)
        log.info("deleted %s (%d bytes freed)", entry.name, freed)
        return freed

    # ----------------------------------------------------------------------------------------------- copy
    async def copy(self, source: str, destination: str) -> str:
        """Make `destination` another name for the model `source` names; the name as stored."""
        index = self.index
        dest = destination.strip()
        if dest.lower().endswith(LATEST):
            dest = dest[:-len(LATEST)]
        if not COPY_NAME_RE.match(dest) or dest.lower().endswith(".gguf") or dest.endswith(":") \
                or dest.count(":") > 1:
            raise UsageError(f"destination: {destination!r} is not a model name",
                             hint="letters, digits and . _ - / and one :, starting with a letter or digit, at most "
                                  "200 characters, not ending in .gguf (e.g. my-model or team/notes:v2)")
        ref = index.resolve(source)
        if ref.path is None and ref.entry is not None:     # a catalog model a --pull server would pull first
            raise ModelNotLocalError(f"{source!r} is not on this machine; there is nothing to copy",
                                     hint=f"pull it first (POST /api/pull {{\"model\": \"{ref.entry.name}\"}})")
        owner = index.owner(dest)
        if owner is not None:
            raise ConflictError(f"destination: {dest!r} already names the model {owner.name}",
                                hint="choose a name no model has (GET /api/tags lists them)")
        if index.catalog_entry(dest) is not None:     # a copy named like a hub reference is fine: names served here win
            raise ConflictError(f"destination: {dest!r} is a catalog model's name",
                                hint="choose another name, so that pulling that model stays possible")
        target = ref.entry.name if ref.entry is not None else ref.name
        await in_thread("llmrun-copy", aliases.add, dest, target)
        index.refresh()
        log.info("copied %s to %s", target, dest)
        return dest
