"""From what the user asked for (a GGUF path, a catalog name, or nothing) to a file to load and the settings to
load it with: probe → plan → pull, with the demo model when the hub is unreachable and nothing is cached.
Shared by `llmrun chat`, `llmrun run` and `llmrun serve`; with RPC workers the plan spans them
(`launch_with_workers`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from runner.cluster.workers import split_over_workers
from runner.core.run_settings import RunSettings
from runner.core.units import format_size
from runner.hardware.types import HardwareProfile
from runner.core.shapes import ModelShape
from runner.model.catalog import CatalogEntry
from runner.model.layout import WeightsLayout
from runner.plan.estimate import MemoryEstimate
from runner.plan.fit import Candidate

DEMO_NAME = "SmolLM2-135M-Instruct"
DEFAULT_PATH_CTX = 4096


@dataclass(frozen=True)
class Launch:
    path: Path
    name: str
    settings: RunSettings
    summary: str                  # one line, printed before loading
    notice: str | None = None     # e.g. the demo-model fallback, printed too
    estimate: MemoryEstimate | None = None  # the plan's, to compare with llama.cpp's real buffers
    speed_keys: tuple[str, ...] = ()        # the names bench.json files this model's real speed under


def is_model_path(model: str) -> bool:
    """A GGUF on this disk (or a .gguf name that is no hub reference: a missing file, reported when loaded)."""
    from runner.app.planning import kind_of

    return kind_of(model) == "file"


def _path_launch(path: Path, *, n_ctx: int | None, n_parallel: int, name: str | None = None,
                 notice: str | None = None) -> Launch:
    ctx = n_ctx or DEFAULT_PATH_CTX
    # flash attention as llama-server's auto (llama.cpp turns it off itself for the architectures without it)
    settings = RunSettings(n_ctx=ctx * n_parallel, n_parallel=n_parallel, flash_attn=True)
    keys = (name, path.name) if name else (path.name,)      # as `llmrun bench` files them
    name = name or path.stem
    summary = f"{name}: {path}, context {ctx} tokens" + (f" x {n_parallel} slots" if n_parallel > 1 else "") + ", CPU"
    return Launch(path=path, name=name, settings=settings, summary=summary, notice=notice, speed_keys=keys)


def plan_summary(candidate: Candidate) -> str:
    """One line: model, quant, context, placement, memory, predicted speed."""
    parts = [f"plan: {candidate.entry.name}", f"context {candidate.n_ctx}"]
    if candidate.placement is not None:  # always, for a chosen candidate
        parts.append(candidate.placement)
    if candidate.need_bytes:
        parts.append(f"needs {format_size(candidate.need_bytes)}")
    if candidate.speed is not None and candidate.speed.decode_tps:
        parts.append(f"~{candidate.speed.decode_tps:.1f} tok/s")
    return ", ".join(parts)


def resolve_model(model: str | None, *, hardware: Callable[[], HardwareProfile] | None = None, n_ctx: int | None = None,
                  n_parallel: int = 1, accept_license: bool = False, progress: bool = True) -> Launch:
    """What to load for `model` (a GGUF path, a catalog name, a hub reference such as hf.co/ORG/REPO:QUANT, or
    None = the best that fits this machine). `hardware` returns the HardwareProfile to plan for (default: probe
    this machine). A hub reference is planned from its header, then pulled like a catalog model."""
    if model and is_model_path(model):
        return _path_launch(Path(model).expanduser(), n_ctx=n_ctx, n_parallel=n_parallel)

    from runner.app.planning import plan_model
    from runner.store import fetch
    from runner.plan import select as plan

    if hardware is None:
        from runner.hardware import probe as hw

        hardware = hw.probe
    from runner.app.planning import kind_of

    if model and kind_of(model) == "catalog":
        model = _catalog_name(model)
    prefs = plan.Preferences(model=model, n_ctx=n_ctx, n_parallel=n_parallel)
    profile = hardware()
    candidate = plan.require_fit(plan_model(model, profile, prefs).result)
    entry = candidate.entry
    settings = candidate.settings
    if n_parallel and settings.n_parallel != n_parallel:
        settings = replace(settings, n_parallel=n_parallel)
    if model is None and not _is_local(entry) and not fetch.hub_reachable():
        path = fetch.demo_model_path(progress=progress)
        return _path_launch(path, n_ctx=n_ctx, n_parallel=n_parallel, name=DEMO_NAME,
                            notice=f"hub unreachable: using the built-in demo model {DEMO_NAME} (the plan chose "
                                   f"{entry.name}: `llmrun pull {entry.name}` when the hub can be reached)")
    path = Path(fetch.ensure_local(entry, accept_license=accept_license, progress=progress))
    return Launch(path=path, name=entry.name, settings=settings, summary=plan_summary(candidate),
                  estimate=file_estimate(entry, path, settings, profile) or candidate.estimate,
                  speed_keys=tuple(k for k in (entry.name, entry.local_file) if k))


def file_layout(entry: CatalogEntry, path: Path) -> tuple[ModelShape, WeightsLayout] | None:
    """The model's shape and weights layout from the file's own header (its tensors as they are, so the estimate
    is byte-exact), now that the file is here; the plan's came from the quant recipe, which can differ from how a
    file was really quantized (SmolLM2-135M Q4_1: 92.1 MiB of weights, the recipe 109.0 MiB). llama.cpp shards
    count all together. None when a header cannot be read (the load then says what is wrong)."""
    from runner.core.errors import GGUFError
    from runner.model.gguf import read_header
    from runner.model.layout import layout_from_headers
    from runner.store import local as store

    try:
        first = read_header(path)
        headers = [first]
        count = first.metadata.get("split.count")
        if isinstance(count, int) and count > 1:       # llama.cpp shards: the layout spans them all
            local = store.local_model(entry)
            shards = sorted(p for p in (local.paths if local else ()) if p.suffix == ".gguf")
            if len(shards) != count:
                return None
            headers = [read_header(p) for p in shards]
    except (GGUFError, OSError):
        return None
    return first.shape or entry.shape, layout_from_headers(headers)


def file_estimate(entry: CatalogEntry, path: Path, settings: RunSettings,
                  hardware: HardwareProfile) -> MemoryEstimate | None:
    """The memory estimate for `settings` from the file's header (`file_layout`), on `hardware`."""
    from runner.plan.estimate import estimate
    from runner.plan.fit import local_gpus

    found = file_layout(entry, path)
    if found is None:
        return None
    gpus = local_gpus(hardware)
    return estimate(found[0], found[1], settings, gpus=len(gpus), gpu_free=tuple(g.free_bytes for g in gpus),
                    cpu_flags=hardware.cpu.flags, unified=hardware.unified_memory)


def launch_with_workers(model: str | None, profile: HardwareProfile, *, n_ctx: int | None = None,
                        n_parallel: int = 1, n_threads: int | None = None, accept_license: bool = False,
                        progress: bool = True) -> Launch:
    """`chat`/`serve --workers`: what to load and how. A catalog name (or none) is planned over `profile`
    (local devices + workers), so the plan's split and RPC servers are kept; a GGUF path gets every layer split
    over the devices in proportion to their free memory. The Launch's settings name the workers."""
    resolved = resolve_model(model, hardware=lambda: profile, n_ctx=n_ctx, n_parallel=n_parallel,
                             accept_license=accept_license, progress=progress)
    settings = resolved.settings
    if not settings.rpc_servers:
        settings = split_over_workers(settings, profile)
    if n_threads:
        settings = replace(settings, n_threads=n_threads)
    return replace(resolved, settings=settings,
                   summary=resolved.summary.removesuffix(", CPU") +
                   f", split over {len(settings.rpc_servers)} RPC worker(s)")


def _catalog_name(model: str) -> str:
    """What to plan for a name, resolved as the server resolves it (runner.app.models): a local model exactly
    (`smollm2-135m` -> its best local quant, `NAME:latest`, a file's stem); otherwise the catalog name as given,
    so that for a model with no quant named the planner picks the quant that fits (then pulled)."""
    from runner.app.models import ModelIndex
    from runner.model.catalog import load_catalog

    ref = ModelIndex(catalog=load_catalog(), pull=True).resolve(model)
    if ref.path is not None and ref.entry is not None:
        return ref.entry.name
    return model.strip().removesuffix(":latest")


def _is_local(entry: CatalogEntry) -> bool:
    from runner.store import local as store

    return store.local_model(entry) is not None
