"""From what the user asked for (a GGUF path, a catalog name, or nothing) to a file to load and the settings to
load it with: probe → plan → pull, with the demo model when the hub is unreachable and nothing is cached.
Shared by `llmrun chat`, `llmrun run` and `llmrun serve`."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from runner.estimate import RunSettings
from runner.units import format_size

DEMO_NAME = "SmolLM2-135M-Instruct"
DEFAULT_PATH_CTX = 4096


@dataclass(frozen=True)
class Launch:
    path: Path
    name: str
    settings: RunSettings
    summary: str                  # one line, printed before loading
    notice: str | None = None     # e.g. the demo-model fallback, printed too
    estimate: object | None = None  # the plan's MemoryEstimate, to compare with llama.cpp's real buffers


def is_model_path(model: str) -> bool:
    p = Path(model).expanduser()
    return model.lower().endswith(".gguf") or p.exists() or "/" in model and p.suffix != ""


def _path_launch(path: Path, *, n_ctx: int | None, n_parallel: int, name: str | None = None,
                 notice: str | None = None) -> Launch:
    ctx = n_ctx or DEFAULT_PATH_CTX
    settings = RunSettings(n_ctx=ctx * n_parallel, n_parallel=n_parallel)
    name = name or path.stem
    summary = f"{name}: {path}, context {ctx} tokens" + (f" x {n_parallel} slots" if n_parallel > 1 else "") + ", CPU"
    return Launch(path=path, name=name, settings=settings, summary=summary, notice=notice)


def plan_summary(candidate) -> str:
    """One line: model, quant, context, placement, memory, predicted speed."""
    e, s = candidate.entry, candidate.settings
    parts = [f"plan: {e.name}", f"context {s.n_ctx // max(s.n_parallel, 1)}"]
    placement = getattr(candidate, "placement", None)
    if placement:
        parts.append(placement)
    need = getattr(candidate, "need_bytes", 0)
    if need:
        parts.append(f"needs {format_size(need)}")
    speed = getattr(candidate, "speed", None)
    tps = getattr(speed, "decode_tps", None) or getattr(speed, "decode_tokens_per_s", None)
    if tps:
        parts.append(f"~{tps:.1f} tok/s")
    return ", ".join(parts)


def resolve_model(model: str | None, *, hardware: Callable[[], object] | None = None, n_ctx: int | None = None,
                  n_parallel: int = 1, accept_license: bool = False, progress: bool = True) -> Launch:
    """What to load for `model` (a GGUF path, a catalog name, or None = the best that fits this machine).
    `hardware` returns the HardwareProfile to plan for (default: probe this machine)."""
    if model and is_model_path(model):
        return _path_launch(Path(model).expanduser(), n_ctx=n_ctx, n_parallel=n_parallel)

    from runner import fetch, plan

    if hardware is None:
        from runner import hardware as hw

        hardware = hw.probe
    prefs = plan.Preferences(model=model, n_ctx=n_ctx, n_parallel=n_parallel)
    candidate = plan.require_fit(plan.make_plan(hardware(), prefs))
    entry = candidate.entry
    settings = candidate.settings
    if n_parallel and settings.n_parallel != n_parallel:
        settings = replace(settings, n_parallel=n_parallel)
    if model is None and not _is_local(entry) and not fetch.hub_reachable():
        path = fetch.demo_model_path(progress=progress)
        return _path_launch(path, n_ctx=n_ctx, n_parallel=n_parallel, name=DEMO_NAME,
                            notice=f"hub unreachable: using the built-in demo model {DEMO_NAME} (the plan chose "
                                   f"{entry.name}: `llmrun pull {entry.name}` when the hub can be reached)")
    path = fetch.ensure_local(entry, accept_license=accept_license, progress=progress)
    return Launch(path=Path(path), name=entry.name, settings=settings, summary=plan_summary(candidate),
                  estimate=getattr(candidate, "estimate", None))


def _is_local(entry) -> bool:
    from runner import store

    return store.local_model(entry) is not None
