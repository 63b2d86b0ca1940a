"""The values the model pool (runner.app.pool) trades in: the memory budget, what loading a model takes
(`Prepared`) and gives (`Started`), the loader it is given (`Loader`: runner.app.serving for real, a fake in the
policy's tests), and the snapshots it reports (`ModelStatus`, `Counters`)."""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from runner.app.launch import Launch
from runner.app.models import ModelCard, ModelRef
from runner.engine.types import Engine

@dataclass(frozen=True)
class Budget:
    """Bytes per device ("CPU", "GPU0", "RPC0", ...) the process may hold, and what it holds before any model.
    A device missing from a bounded budget has no room. `source` says where the limits come from."""

    limits: Mapping[str, int]
    process: Mapping[str, int] = field(default_factory=dict)
    source: str = "the budget"
    bounded: bool = True

    @classmethod
    def unlimited(cls) -> "Budget":
        return cls({}, source="no budget", bounded=False)

    def for_models(self, device: str) -> int:
        """Bytes the models may hold on `device` together."""
        return self.limits.get(device, 0) - self.process.get(device, 0)

    def never_fits(self, need: Mapping[str, int]) -> tuple[str, int] | None:
        """(device, room) of the first device where `need` is more than the models may hold even with nothing
        else loaded; None when it fits (or the budget is unbounded)."""
        if self.bounded:
            for dev, n in need.items():
                room = self.for_models(dev)
                if n > room:
                    return dev, room
        return None


@dataclass(frozen=True)
class Prepared:
    """What loading a model takes: the launch (file and settings), its card, and the bytes per device the loaded
    model will hold (the plan's estimate, without what the process holds anyway)."""

    ref: ModelRef
    launch: Launch
    card: ModelCard
    need: Mapping[str, int]
    advice: str = ""                  # the plan's ways out, should it never fit
    embedding: Mapping[str, int] = field(default_factory=dict)   # what the context that the first embedding
    #                                   request creates will hold (runner.plan.estimate.embedding_context)


@dataclass(frozen=True)
class Started:
    engine: Engine
    resident: Mapping[str, int]       # bytes per device the model holds, measured (llama.cpp's buffers)
    warnings: tuple[str, ...] = ()
    before_close: Callable[[], None] | None = None   # runs (in the closing thread) before the engine closes


class Loader(Protocol):
    """What the pool needs from the outside world (a fake in the policy's tests; runner.app.serving for real)."""

    def keep_alive(self, ref: ModelRef) -> float: ...        # seconds after the last request, when it did not say
    def prepare(self, ref: ModelRef) -> Prepared: ...        # plan (and pull); runs in a worker thread
    def load(self, prepared: Prepared) -> Started: ...       # runs in a worker thread


class State(enum.Enum):
    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"


@dataclass
class Counters:
    """Per model, since the server started."""

    loads: int = 0
    load_failures: int = 0
    unloads: int = 0
    evictions: int = 0                # unloads to make room for another model
    load_seconds: float = 0.0


@dataclass(frozen=True)
class ModelStatus:
    """A snapshot of one model in memory (or on its way in or out)."""

    name: str
    state: State
    card: ModelCard
    n_ctx: int                        # per sequence (0 while loading)
    n_parallel: int
    resident: Mapping[str, int]       # measured bytes per device (the estimate while loading)
    in_flight: int
    expires_at: float                 # unix time it will be unloaded if no request comes; math.inf: never
    pinned: bool
