"""`GET /llmrun/status`: what the launcher knows, as JSON for the chat page's panel: the machine (the hardware
probe, made once in a background thread at startup), and each loaded model with its context, slots and
llama.cpp's real buffer sizes per device (`runner.engine.report.actual_terms`) next to that device's memory.

`status()` is a plain function of a snapshot of the model pool (taken on the event loop) and the probe's result;
`models` lists every model in memory, `loading` those on their way in or out."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable

from fastapi import APIRouter, Request

from runner import __version__
from runner.app.pool_values import State
from runner.core.errors import LlmrunError
from runner.engine.report import actual_terms
from runner.engine.types import Engine, EngineStats
from runner.hardware.types import HardwareProfile
from runner.server.common import AppState, state_of
from runner.server.config import ModelCard

router = APIRouter()

TERMS = ("weights", "repack", "kv_cache", "compute", "output")   # the order the page stacks them in


def default_probe() -> HardwareProfile:
    """This machine, without measuring memory bandwidth (a cached value is used when there is one)."""
    from runner.hardware.probe import probe

    return probe(measure=False)


class MachineProbe:
    """The hardware probe, run once in a background thread (it reads /proc, cgroups and NVML: milliseconds to
    a second, never on the event loop). `start()` may be called any number of times; `result()` awaits it."""

    def __init__(self, probe: Callable[[], HardwareProfile]):
        self._probe = probe
        self._lock = threading.Lock()
        self._future: Future[HardwareProfile] | None = None

    def start(self) -> Future[HardwareProfile]:
        with self._lock:
            if self._future is None:
                future: Future[HardwareProfile] = Future()
                self._future = future
                threading.Thread(target=self._run, args=(future,), name="llmrun-probe", daemon=True).start()
            return self._future

    def _run(self, future: Future[HardwareProfile]) -> None:
        try:
            future.set_result(self._probe())
        except (LlmrunError, OSError, ValueError) as e:
            future.set_exception(e)

    async def result(self) -> tuple[HardwareProfile | None, str | None]:
        """(profile, None), or (None, why the probe failed)."""
        try:
            return await asyncio.wrap_future(self.start()), None
        except LlmrunError as e:
            return None, e.message
        except (OSError, ValueError) as e:
            return None, f"the hardware probe failed: {e}"


def machine_json(hw: HardwareProfile) -> dict:
    cpu = hw.cpu
    return {
        "name": hw.name, "cpu": cpu.model, "arch": cpu.arch, "physical_cores": cpu.physical_cores,
        "logical_cores": cpu.logical_cores, "usable_cores": cpu.usable_cores, "threads": cpu.threads,
        "ram_total_bytes": hw.ram_total_bytes, "ram_available_bytes": hw.ram_available_bytes,
        "unified_memory": hw.unified_memory, "disk_free_bytes": hw.disk_free_bytes,
        "memory_bandwidth_gbps": hw.memory_bandwidth_gbps,
        "gpus": [{"index": g.index, "name": g.name, "vendor": g.vendor, "total_bytes": g.total_bytes,
                  "free_bytes": g.free_bytes} for g in hw.gpus],
        "notes": list(hw.notes),
    }


def _capacity(device: str, hw: HardwareProfile | None) -> int | None:
    """The memory of a device as llama.cpp names it in `report.actual_terms` (CPU, GPU0.., RPC0..)."""
    if hw is None:
        return None
    if device == "CPU":
        return hw.ram_total_bytes
    if device.startswith("GPU") and device[3:].isdigit():
        i = int(device[3:])      # llama.cpp numbers the devices it sees in order, as the probe lists them
        return hw.gpus[i].total_bytes if i < len(hw.gpus) else None
    return None                  # an RPC worker's device: its memory is not this machine's


def memory_json(buffers: dict[str, int], hw: HardwareProfile | None) -> list[dict]:
    """llama.cpp's real buffers, per device: each term's bytes, their sum, and the device's memory."""
    per_device: dict[str, dict[str, int]] = {}
    for (device, term), n in actual_terms(buffers).items():
        per_device.setdefault(device, {})[term] = n
    order = sorted(per_device, key=lambda d: (d != "CPU", d))
    return [{"device": d, "capacity_bytes": _capacity(d, hw), "total_bytes": sum(per_device[d].values()),
             "terms": {t: per_device[d][t] for t in TERMS if t in per_device[d]}} for d in order]


def model_json(engine: Engine, card: ModelCard, stats: EngineStats, hw: HardwareProfile | None) -> dict:
    trained = card.extra.get(f"{card.family}.context_length") if card.family else None
    return {
        "name": card.name, "family": card.family, "parameter_size": card.parameter_size,
        "quantization": card.quantization, "size_bytes": card.size_bytes,
        "trained_context": trained if isinstance(trained, int) else None,
        "context_per_slot": engine.n_ctx, "slots": engine.n_parallel,
        "busy_slots": stats.busy_slots, "queued": stats.queued, "load_seconds": stats.load_seconds,
        "memory": memory_json(dict(engine.buffers), hw),
    }


@dataclass(frozen=True)
class Snapshot:
    """The server as the event loop sees it at one moment (taken there: the pool changes only on the loop)."""

    loaded: tuple[tuple[Engine, ModelCard], ...]     # the models in memory
    loading: tuple[str, ...]                          # models being loaded (or unloaded) now
    starting: bool                                    # the model `llmrun serve --model` named is loading
    load_error: str | None


def snapshot(state: AppState) -> Snapshot:
    loaded, moving = [], []
    for m in state.pool.models.values():
        if m.state is State.LOADED and m.engine is not None:
            loaded.append((m.engine, m.card))
        else:
            moving.append(m.name)
    return Snapshot(tuple(loaded), tuple(moving), state.starting, state.load_error)


def status(snap: Snapshot, hw: HardwareProfile | None, machine_error: str | None) -> dict:
    """The whole answer. Runs in a worker thread: `engine.stats()` is a child process's round trip in a cluster."""
    models = [model_json(engine, card, engine.stats(), hw) for engine, card in snap.loaded]
    outage = next((e for e in (engine.health() for engine, _ in snap.loaded) if e is not None), None)
    if snap.load_error:
        server_state, error = "error", snap.load_error
    elif snap.starting:
        server_state, error = "loading", None
    elif outage is not None:
        server_state, error = "unavailable", outage.message
    else:
        server_state, error = "ready", None     # models load on demand: the server can serve
    return {"version": __version__, "state": server_state, "error": error,
            "machine": machine_json(hw) if hw is not None else None, "machine_error": machine_error,
            "models": models, "loading": list(snap.loading)}


@router.get("/llmrun/status", tags=["server"])
async def get_status(request: Request) -> dict:
    """The machine, the models in memory (context, slots, llama.cpp's buffers per device) and those loading."""
    hw, machine_error = await request.app.state.machine.result()
    return await asyncio.to_thread(status, snapshot(state_of(request)), hw, machine_error)
