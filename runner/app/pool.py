"""The models a server holds: loaded on demand by name, shared by concurrent requests, kept alive for a while,
evicted least recently used first to make room, and never loaded past the memory budget.

    pool = ModelPool(index, loader, budget)       index: runner.app.models.ModelIndex (names)
    lease = await pool.acquire("smollm2-135m")    loads it if needed (or waits for the load under way)
    ... lease.engine.chat(...) ...
    lease.release()                               exactly once (idempotent); starts the keep-alive clock

The policy, for a model that is not loaded:
- `loader.prepare` (a worker thread) plans it: the file, its settings, and the bytes per device the load will
  hold (the plan's estimate);
- if that is more than the budget on some device even with nothing else loaded: DoesNotFitError (HTTP 507),
  with the numbers and the plan's advice;
- otherwise it is checked against what the others hold: loaded models by their MEASURED buffers
  (`Started.resident`), loads under way by their estimate, plus the process's own memory. If it does not fit,
  idle models (no request in flight) that hold memory on the short devices are unloaded, least recently used
  first, and only when unloading them makes it fit. Busy models are never unloaded: the load waits for them up
  to `wait_s`, then fails with CapacityError (HTTP 503 + Retry-After);
- `loader.load` runs in a worker thread of its own (never on the event loop, never on an engine's thread);
  concurrent requests for the model wait for that one load.
- The first embedding request to a model (`acquire(..., embeddings=True)`) makes room the same way for the
  second context it creates (`Prepared.embedding`), before the engine creates it, and adds it to what the model
  holds until it unloads.

Keep-alive (Ollama's semantics): each request sets how long the model stays loaded after its last request ends
(the loader's per-model default when the request does not say; 0 = unload right away; FOREVER = never expire).
An engine handed over already loaded (`adopt`) is pinned: it is never unloaded before the pool closes.

Deleting a model's files (`retired`): refused (ConflictError, HTTP 409) while requests use the model or it
loads, never waited for; an idle loaded model is unloaded first, and loads of it are refused until the files
are gone.

The pool lives on one asyncio event loop: its state changes only there, so it needs no locks.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import replace

from runner.app.models import ModelCard, ModelIndex, ModelRef, ServedFile
from runner.app.pool_values import Budget, Counters, Loader, ModelStatus, Prepared, Started, State
from runner.app.threads import in_thread
from runner.core.errors import CapacityError, ConflictError, DoesNotFitError, EngineError, ModelNotLocalError, \
    ServerError
from runner.core.units import FOREVER, format_duration, format_size
from runner.engine.types import Engine

log = logging.getLogger("llmrun.server")
DEFAULT_KEEP_ALIVE_S = 300.0
DEFAULT_WAIT_S = 60.0


# --------------------------------------------------------------------------------------------------- the pool
class Model:
    """One load of one model, owned by the pool (mutable; compared by identity)."""

    def __init__(self, ref: ModelRef, *, pinned: bool = False):
        self.ref = ref
        self.state = State.LOADING
        self.pinned = pinned
        self.prepared: Prepared | None = None
        self.engine: Engine | None = None
        self.before_close: Callable[[], None] | None = None
        self.card = ModelCard(name=ref.name)
        self.resident: Mapping[str, int] = {}
        self.reserved: Mapping[str, int] = {}     # the estimate, held while loading
        self.embedding_held = False               # its embedding context is counted in `resident`
        self._embedding_lock: asyncio.Lock | None = None
        self.in_flight = 0
        self.waiting = 0                          # requests waiting for this load: not evictable before they run
        self.last_used = 0.0
        self.keep_alive = FOREVER
        self.expires_at = math.inf                # monotonic clock; inf while busy or kept forever
        self._loaded: asyncio.Future[None] | None = None
        self._unloaded: asyncio.Future[None] | None = None

    # the futures are made on first use, on the pool's loop (a pinned model is made before the loop runs)
    @property
    def loaded(self) -> asyncio.Future[None]:
        """Done when the load finished: its result, or its error for every request that waited for it."""
        if self._loaded is None:
            self._loaded = asyncio.get_running_loop().create_future()
            self._loaded.add_done_callback(_consume)
        return self._loaded

    @property
    def unloaded(self) -> asyncio.Future[None]:
        """Done when the model left memory (or its load failed)."""
        if self._unloaded is None:
            self._unloaded = asyncio.get_running_loop().create_future()
        return self._unloaded

    @property
    def embedding_lock(self) -> asyncio.Lock:
        if self._embedding_lock is None:
            self._embedding_lock = asyncio.Lock()
        return self._embedding_lock

    @property
    def name(self) -> str:
        return self.ref.name

    @property
    def holds(self) -> Mapping[str, int]:
        return self.reserved if self.state is State.LOADING else self.resident


class Lease:
    """A model held for one request: it is not unloaded until `release()` (idempotent, call it however the
    request ends). `waited_s` is how long acquiring took (a load, or waiting for one)."""

    def __init__(self, pool: "ModelPool", model: Model, waited_s: float):
        self._pool, self.model, self.waited_s = pool, model, waited_s
        self._released = False

    @property
    def engine(self) -> Engine:
        assert self.model.engine is not None  # a lease is only handed out for a loaded model
        return self.model.engine

    @property
    def card(self) -> ModelCard:
        return self.model.card

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._pool._release(self.model)


class ModelPool:
    def __init__(self, index: ModelIndex, loader: Loader, budget: Budget, *,
                 wait_s: float = DEFAULT_WAIT_S, retry_after_s: int = 5, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time):
        self.index, self.loader, self.budget = index, loader, budget
        self.wait_s, self.retry_after_s = wait_s, retry_after_s
        self.clock, self.wall = clock, wall
        self.models: dict[str, Model] = {}
        self.counters: dict[str, Counters] = {}
        self._prepared: dict[str, Prepared] = {}
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._reaper: asyncio.Task[None] | None = None
        self._closing = False
        self._retired: set[str] = set()           # models whose files are being deleted

    # ----------------------------------------------------------------------------------------------- public
    def resolve(self, name: str) -> ModelRef:
        """The model `name` means (UnknownModelError / ModelNotLocalError otherwise): nothing is loaded."""
        return self.index.resolve(name)

    async def cards(self) -> list[ModelCard]:
        """Every model served, loaded or not: the loaded ones' cards, the others' read from their files (in a
        worker thread, with the store's rescan: file headers and stats are disk work); each copy of a model
        (/api/copy) as a card of its own."""
        loaded = {name: m.card for name, m in self.models.items() if m.state is not State.LOADING}

        def read() -> list[ModelCard]:
            out = []
            for ref in self.index.listing():
                try:
                    card = loaded[ref.name] if ref.name in loaded else self.index.card(ref)
                except (OSError, ModelNotLocalError) as e:    # the file went away since the scan
                    log.warning("model %s: %s", ref.name, e)
                    continue
                out += [card, *(replace(card, name=copy) for copy in ref.copies)]
            return out

        return await asyncio.to_thread(read)

    def card(self, name: str) -> ModelCard:
        """The card of the model `name` names, without loading it."""
        ref = self.resolve(name)
        m = self.models.get(ref.name)
        return m.card if m is not None and m.state is not State.LOADING else self.index.card(ref)

    def engine(self, name: str) -> Engine | None:
        """The engine of the model `name` names when it is loaded (None otherwise); nothing is loaded."""
        m = self.models.get(self.resolve(name).name)
        return m.engine if m is not None and m.state is State.LOADED else None

    async def acquire(self, name: str, keep_alive: float | None = None, *, embeddings: bool = False) -> Lease:
        """A lease on the model `name` names, loading it first when needed. Raises what resolving or loading
        raises: UnknownModelError / ModelNotLocalError (404), DoesNotFitError (507), CapacityError (503), the
        engine's errors. `keep_alive`: seconds to keep it after this request (None: the loader's default).
        `embeddings`: the request embeds, so the model's embedding context is made room for first."""
        ref = self.resolve(name)
        if ref.name in self._retired:
            raise ConflictError(f"{ref.name} is being deleted", hint="pull it again once it is gone to use it")
        t0 = self.clock()
        while True:
            m = self.models.get(ref.name)
            if m is None:
                m = self._start_load(ref)
            if m.state is State.LOADED:
                break
            m.waiting += 1
            try:
                await asyncio.shield(m.loaded if m.state is State.LOADING else m.unloaded)
            finally:
                m.waiting -= 1
        m.in_flight += 1
        m.last_used = self.clock()
        m.keep_alive = FOREVER if m.pinned else (self.loader.keep_alive(ref) if keep_alive is None else keep_alive)
        m.expires_at = math.inf
        lease = Lease(self, m, self.clock() - t0)
        if embeddings and not m.embedding_held:
            try:
                await self._hold_embedding(m)
            except BaseException:
                lease.release()
                raise
        lease.waited_s = self.clock() - t0
        return lease

    async def _hold_embedding(self, m: Model) -> None:
        """Room for the embedding context beside what `m` holds (evicting idle models), then count it in."""
        async with m.embedding_lock:
            extra = m.prepared.embedding if m.prepared is not None else {}
            if m.embedding_held or not extra:
                m.embedding_held = True
                return
            need = {d: m.resident.get(d, 0) + extra.get(d, 0) for d in dict.fromkeys([*m.resident, *extra])}
            short = self.budget.never_fits(need)
            if short is not None:
                dev, room = short
                raise DoesNotFitError(
                    f"{m.name} cannot embed within the budget: its embedding context needs "
                    f"{format_size(extra.get(dev, 0))} {_where(dev)} beside the model's "
                    f"{format_size(m.resident.get(dev, 0))}, and the models may hold {format_size(max(room, 0))}"
                    f" there ({self.budget.source})",
                    hint="a larger budget (--max-memory / --max-vram), or less context for this model")
            await self._make_room(m, need, reserve=False)
            m.resident, m.embedding_held = need, True       # no await since the room was found
            log.info("%s: embedding context held, %s (%s)", m.name, _bytes(extra), self._usage())

    async def unload(self, name: str) -> bool:
        """Unload `name` now (Ollama's empty request with keep_alive 0); a busy model goes when its last request
        ends. False when it was not loaded (or is pinned)."""
        ref = self.resolve(name)
        m = self.models.get(ref.name)
        if m is None or m.pinned:
            return False
        if m.state is State.LOADING:
            try:
                await asyncio.shield(m.loaded)
            except Exception:
                return False
        if m.state is State.LOADED:
            if m.in_flight:
                m.keep_alive = 0.0
                return True
            self._begin_unload(m, "requested")
        await asyncio.shield(m.unloaded)
        return True

    @asynccontextmanager
    async def retired(self, name: str) -> AsyncIterator[ModelRef]:
        """Hold the model `name` names out of service while its files are deleted (see the module docstring):
        ConflictError when requests use it, it is loading, or it was handed over loaded."""
        ref = self.resolve(name)
        m = self.models.get(ref.name)
        if ref.name in self._retired:
            raise ConflictError(f"{ref.name} is already being deleted")
        if m is not None and m.pinned:
            raise ConflictError(f"{ref.name} was handed to this server loaded; it stays until the server stops")
        if m is not None and (m.in_flight or m.waiting or m.state is State.LOADING):
            doing = f"{m.in_flight + m.waiting} request(s) are using it" if m.in_flight or m.waiting else "it is loading"
            raise ConflictError(f"{ref.name} is in use: {doing}; it was not deleted",
                                hint="delete it again when they have finished (GET /api/ps shows what is loaded)")
        self._retired.add(ref.name)
        try:
            if m is not None:
                if m.state is State.LOADED:
                    self._begin_unload(m, "deleted")
                await asyncio.shield(m.unloaded)
            self._prepared.pop(ref.name, None)
            yield ref
        finally:
            self._retired.discard(ref.name)
            self._prepared.pop(ref.name, None)
            self._notify()

    def adopt(self, engine: Engine, card: ModelCard) -> None:
        """Serve an engine loaded elsewhere under its card's name, pinned (never unloaded before close)."""
        self.index.add(ServedFile(card.name, None))
        m = Model(ModelRef(card.name, None), pinned=True)
        m.state, m.engine, m.card = State.LOADED, engine, card
        self.models[card.name] = m

    def status(self) -> list[ModelStatus]:
        now, wall = self.clock(), self.wall()
        out = []
        for m in self.models.values():
            if m.pinned or math.isinf(m.keep_alive):
                expires = math.inf
            elif m.in_flight or m.state is State.LOADING:
                expires = wall + m.keep_alive
            else:
                expires = wall + max(0.0, m.expires_at - now)
            eng = m.engine
            out.append(ModelStatus(m.name, m.state, m.card, eng.n_ctx if eng else 0, eng.n_parallel if eng else 0,
                                   dict(m.holds), m.in_flight, expires, m.pinned))
        return out

    def used(self, besides: Model | None = None) -> dict[str, int]:
        """Bytes per device held now: the process's own, loaded models (measured), loads under way (estimated);
        all but `besides`."""
        used = dict(self.budget.process)
        for m in self.models.values():
            if m is not besides:
                for dev, n in m.holds.items():
                    used[dev] = used.get(dev, 0) + n
        return used

    async def start(self) -> None:
        """Start the keep-alive clock (call on the loop that serves; again after `aclose` to serve again)."""
        self._closing = False
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap(), name="llmrun-keep-alive")

    async def aclose(self, *, close_engines: bool = True) -> None:
        """Stop: refuse new loads, wait for the loads under way, unload every model. Pinned engines are closed
        (unless `close_engines` is False) but stay listed, as they were handed over."""
        self._closing = True
        self._notify()
        if self._reaper is not None:
            self._reaper.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)
        closing = []
        for m in list(self.models.values()):
            if m.pinned:
                if close_engines and m.engine is not None:
                    closing.append(in_thread(f"llmrun-close {m.name}", m.engine.close))
                continue
            if m.state is State.LOADED:
                self._begin_unload(m, "shutdown")
            if m.state is State.UNLOADING:
                closing.append(asyncio.shield(m.unloaded))
        await asyncio.gather(*closing, return_exceptions=True)

    # ---------------------------------------------------------------------------------------------- loading
    def _start_load(self, ref: ModelRef) -> Model:
        if self._closing:
            raise ServerError("the server is shutting down")
        m = Model(ref)
        self.models[ref.name] = m
        self._spawn(self._load(m))
        return m

    async def _load(self, m: Model) -> None:
        counters = self.counters.setdefault(m.name, Counters())
        try:
            prepared = self._prepared.get(m.name)
            if prepared is None:
                prepared = await in_thread(f"llmrun-plan {m.name}", self.loader.prepare, m.ref)
                self._prepared[m.name] = prepared
            m.prepared, m.card = prepared, prepared.card
            self._check_ever_fits(prepared)
            await self._make_room(m, prepared.need)
            t0 = self.clock()
            started = await in_thread(f"llmrun-load {m.name}", self.loader.load, prepared)
            seconds = self.clock() - t0
        except BaseException as e:
            counters.load_failures += 1
            if self.models.get(m.name) is m:
                del self.models[m.name]
            if isinstance(e, Exception):
                m.loaded.set_exception(e)
            else:
                m.loaded.cancel()
            m.unloaded.set_result(None)
            self._notify()
            if not isinstance(e, Exception):
                raise
            return
        m.engine, m.resident, m.reserved = started.engine, dict(started.resident or prepared.need), {}
        m.before_close = started.before_close
        m.state, m.last_used = State.LOADED, self.clock()
        counters.loads += 1
        counters.load_seconds += seconds
        for w in started.warnings:
            log.warning("%s: %s", m.name, w)
        log.info("loaded %s in %.2fs: %s (%s)", m.name, seconds, _bytes(m.resident), self._usage())
        m.loaded.set_result(None)
        self._notify()

    def _check_ever_fits(self, p: Prepared) -> None:
        short = self.budget.never_fits(p.need)
        if short is not None:
            dev, room = short
            raise DoesNotFitError(
                f"{p.ref.name} can never fit: it needs {format_size(p.need[dev])} {_where(dev)}, and the models may "
                f"hold {format_size(max(room, 0))} there ({self.budget.source}) even with nothing else loaded",
                hint=p.advice or "less context (ctx in --config), a smaller quant, or a larger budget "
                                 "(--max-memory / --max-vram)")

    def _shortfall(self, need: Mapping[str, int], besides: Model) -> dict[str, int]:
        """Bytes missing per device for `need` beside every other model (empty: it fits now)."""
        if not self.budget.bounded:
            return {}
        used = self.used(besides)
        short = {}
        for dev, n in need.items():
            missing = n - (self.budget.limits.get(dev, 0) - used.get(dev, 0))
            if missing > 0:
                short[dev] = missing
        return short

    def _victims(self, short: Mapping[str, int]) -> list[Model] | None:
        """Idle models to unload, least recently used first, that make up `short` together; None if they can't."""
        idle = sorted((m for m in self.models.values() if m.state is State.LOADED and not m.in_flight
                       and not m.waiting and not m.pinned and any(m.resident.get(d, 0) > 0 for d in short)),
                      key=lambda m: m.last_used)
        left, chosen = dict(short), []
        for m in idle:
            if all(v <= 0 for v in left.values()):
                break
            chosen.append(m)
            for dev in left:
                left[dev] -= m.resident.get(dev, 0)
        return chosen if all(v <= 0 for v in left.values()) else None

    async def _make_room(self, m: Model, need: Mapping[str, int], *, reserve: bool = True) -> None:
        """Until `need` fits beside every other model: evict idle ones, or wait for busy ones up to wait_s. With
        `reserve`, `need` becomes `m.reserved` the moment it fits (a load); otherwise the caller takes it as it
        returns, with no await in between."""
        deadline = self.clock() + self.wait_s
        while True:
            if self._closing:
                raise ServerError("the server is shutting down")
            short = self._shortfall(need, m)
            if not short:
                if reserve:
                    m.reserved = dict(need)   # taken at once: no await between the check and the reservation
                return
            victims = self._victims(short)
            if victims:
                for v in victims:
                    log.info("evicting %s (idle since %.1fs) to make room for %s", v.name,
                             self.clock() - v.last_used, m.name)
                    self._begin_unload(v, "evicted")
                await asyncio.gather(*(asyncio.shield(v.unloaded) for v in victims))
                continue
            remaining = deadline - self.clock()
            if remaining <= 0:
                busy = sorted(x.name for x in self.models.values() if x is not m and (x.in_flight or
                                                                                   x.state is State.LOADING))
                raise CapacityError(
                    f"no room for {m.name} now: it needs {_bytes(short)} more than is free in the budget, and the "
                    f"models holding it are busy ({', '.join(busy) or 'loading'}); waited {self.wait_s:g}s",
                    retry_after_s=self.retry_after_s, hint="retry shortly, or give the server more memory")
            await self._wait_for_change(remaining)

    # -------------------------------------------------------------------------------------- release, unload
    def _release(self, m: Model) -> None:
        m.in_flight -= 1
        m.last_used = self.clock()
        if m.in_flight == 0 and m.state is State.LOADED and not m.pinned:
            if m.keep_alive <= 0:
                self._begin_unload(m, "expired")
            else:
                m.expires_at = m.last_used + m.keep_alive
        self._notify()

    def _begin_unload(self, m: Model, reason: str) -> None:
        m.state = State.UNLOADING
        counters = self.counters.setdefault(m.name, Counters())
        counters.unloads += 1
        if reason == "evicted":
            counters.evictions += 1
        self._spawn(self._unload(m, reason))

    async def _unload(self, m: Model, reason: str) -> None:
        engine = m.engine
        t0 = self.clock()
        try:
            if engine is not None:
                await in_thread(f"llmrun-unload {m.name}", _close, engine, m.before_close)
        except Exception as e:   # a failed close still frees the model's place: the engine is gone either way
            log.error("closing %s failed: %s", m.name, e)
        finally:
            if self.models.get(m.name) is m:
                del self.models[m.name]
            m.engine = None
            m.unloaded.set_result(None)
            log.info("unloaded %s in %.2fs (%s; %s)", m.name, self.clock() - t0, reason, self._usage())
            self._notify()

    async def _reap(self) -> None:
        while not self._closing:
            now, next_due = self.clock(), math.inf
            for m in list(self.models.values()):
                if m.state is State.LOADED and not m.in_flight and not m.pinned and math.isfinite(m.expires_at):
                    if m.expires_at <= now:
                        self._begin_unload(m, f"keep_alive {format_duration(m.keep_alive)} expired")
                    else:
                        next_due = min(next_due, m.expires_at)
            await self._wait_for_change(next_due - now if math.isfinite(next_due) else None)

    # -------------------------------------------------------------------------------------------- plumbing
    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_for_change(self, timeout: float | None) -> None:
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            pass

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _usage(self) -> str:
        if not self.budget.bounded:
            return f"{len(self.models)} model(s) loaded"
        used = self.used()
        return "budget: " + ", ".join(f"{_where(d)} {format_size(used.get(d, 0))} of {format_size(n)}"
                                      for d, n in self.budget.limits.items())


class _NothingToLoad:
    """The loader of a pool that only serves engines handed to it (pinned: never unloaded, never reloaded)."""

    def keep_alive(self, ref: ModelRef) -> float:
        return FOREVER

    def prepare(self, ref: ModelRef) -> Prepared:
        raise EngineError(f"{ref.name} cannot be loaded here: this server serves only the engine it was given")

    def load(self, prepared: Prepared) -> Started:
        raise EngineError(f"{prepared.ref.name} cannot be loaded here")


def pool_of_engine(engine: Engine, card: ModelCard) -> ModelPool:
    """A pool serving one engine already loaded (no budget, nothing else to load)."""
    pool = ModelPool(ModelIndex(), _NothingToLoad(), Budget.unlimited())
    pool.adopt(engine, card)
    return pool


# ------------------------------------------------------------------------------------------------ helpers
def _consume(f: asyncio.Future[None]) -> None:
    """Mark a load's failure as seen (every waiter gets it; nobody may be waiting)."""
    if not f.cancelled():
        f.exception()


def _close(engine: Engine, before: Callable[[], None] | None) -> None:
    """Close `engine`, after `before` (what the loader wants done with it first), whatever `before` does."""
    try:
        if before is not None:
            before()
    finally:
        engine.close()


def _where(device: str) -> str:
    return "RAM" if device == "CPU" else f"on {device}"


def _bytes(per_device: Mapping[str, int]) -> str:
    return ", ".join(f"{format_size(n)} {_where(d)}" for d, n in per_device.items() if n) or "nothing"
