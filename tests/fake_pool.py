"""A FAKE loader for the model pool's policy tests (runner/app/pool.py): no llama.cpp, no plan. Each model
"needs" a given number of bytes (its estimate) and "holds" as many once loaded (or a different measured number),
loads in `load_s` seconds, can be held at the start of its load by an event, or made to fail. Engines are the
FakeEngine of tests/fake_engine.py. Everything the pool does is recorded (loads, closes, concurrent loads), so
tests can check "no double load" and "never over the budget". Real loading is tested with the demo model."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from fake_engine import FakeEngine
from runner.app.launch import Launch
from runner.app.models import ModelCard, ModelIndex, ModelRef, ServedFile, read_card
from runner.app.pool import ModelPool
from runner.app.pool_values import Budget, Prepared, Started
from runner.core.errors import EngineError
from runner.core.run_settings import RunSettings

MiB = 1024 ** 2


class RecordingEngine(FakeEngine):
    def __init__(self, loader: "FakeLoader", **kw):
        super().__init__(**kw)
        self.loader = loader

    def close(self) -> None:
        super().close()
        with self.loader.lock:
            self.loader.closes.append(self.model_name)
            self.loader.holding.pop(self.model_name, None)


@dataclass
class FakeLoader:
    need: dict[str, int]                          # model name -> bytes its estimate says (CPU)
    measured: dict[str, int] = field(default_factory=dict)   # model name -> bytes it really holds (default: need)
    embedding: dict[str, int] = field(default_factory=dict)  # model name -> bytes of its embedding context
    load_s: float = 0.0
    keep_alive_s: float = 300.0
    token_delay: float = 0.002
    n_parallel: int = 2
    n_ctx: int = 256
    fail: set[str] = field(default_factory=set)   # loads of these raise EngineError
    hold: dict[str, threading.Event] = field(default_factory=dict)  # loads of these wait for the event
    lock: threading.Lock = field(default_factory=threading.Lock)
    loads: list[str] = field(default_factory=list)
    closes: list[str] = field(default_factory=list)
    prepares: list[str] = field(default_factory=list)
    holding: dict[str, int] = field(default_factory=dict)    # what is loaded now (from load start to close)
    peak: int = 0                                            # most bytes ever held at once
    loading_now: dict[str, int] = field(default_factory=dict)
    double_loads: list[str] = field(default_factory=list)    # a model loaded while already loading or loaded

    def keep_alive(self, ref: ModelRef) -> float:
        return self.keep_alive_s

    def prepare(self, ref: ModelRef) -> Prepared:
        with self.lock:
            self.prepares.append(ref.name)
        launch = Launch(path=ref.path or Path(ref.name), name=ref.name, settings=RunSettings(), summary=ref.name)
        card = read_card(ref.path, ref.name) if ref.path is not None and ref.path.is_file() else \
            ModelCard(name=ref.name, path=str(ref.path))          # as the real loader: the file's own card
        embedding = {"CPU": self.embedding[ref.name]} if ref.name in self.embedding else {}
        return Prepared(ref, launch, card, {"CPU": self.need[ref.name]}, advice="a smaller fake",
                        embedding=embedding)

    def load(self, prepared: Prepared) -> Started:
        name = prepared.ref.name
        with self.lock:
            if name in self.holding or self.loading_now.get(name):
                self.double_loads.append(name)
            self.loading_now[name] = self.loading_now.get(name, 0) + 1
            self.loads.append(name)
        try:
            if name in self.hold:
                self.hold[name].wait(30)
            time.sleep(self.load_s)
            if name in self.fail:
                raise EngineError(f"llama.cpp could not load {name}.gguf")
            held = self.measured.get(name, self.need[name])
            with self.lock:
                self.holding[name] = held
                self.peak = max(self.peak, sum(self.holding.values()))
            engine = RecordingEngine(self, model_name=name, n_parallel=self.n_parallel, n_ctx=self.n_ctx,
                                     token_delay=self.token_delay)
            return Started(engine, {"CPU": held})
        finally:
            with self.lock:
                self.loading_now[name] -= 1


def fake_pool(tmp_path: Path, loader: FakeLoader, budget: int | None, *, process: int = 0, wait_s: float = 5.0,
              **kw) -> ModelPool:
    """A pool over `loader`'s models (each a small file in tmp_path), with `budget` bytes of RAM (None: none)."""
    files = []
    for name in loader.need:
        p = tmp_path / f"{name.replace(':', '-')}.gguf"
        p.write_bytes(b"not a real gguf")
        files.append(ServedFile(name, p))
    b = Budget({"CPU": budget}, {"CPU": process}, source="the test budget") if budget is not None else Budget.unlimited()
    return ModelPool(ModelIndex(files=files), loader, b, wait_s=wait_s, **kw)
