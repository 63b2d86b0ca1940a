"""What `llmrun serve` feeds the model pool (runner.app.pool): the memory budget, the per-model settings file, and
the real loader — plan each model for the budget, pull it when allowed, load it with llama.cpp, and measure
what it holds.

The budget (bytes per device the process may hold): RAM available from the probe less RAM_MARGIN, or
`--max-memory`; each GPU's free VRAM, or `--max-vram` (the estimate keeps its own margin per GPU). The process's
own memory before any model (its RSS with llama.cpp imported) counts against it.

What a model holds:
- before it loads (`Prepared.need`): the plan's estimate, per device, of what must fit (`needed`: the file pages
  the kernel may drop under pressure left out), without the process's own overhead;
- once loaded (`Started.resident`): llama.cpp's own buffer sizes from its load log, per device, plus the
  model's share of the overhead the estimate counts (vocabulary tables; the CUDA context per GPU), less those
  droppable file pages. When llama.cpp logged no buffers, the estimate stands in.
- the second context a model's first embedding request creates (`Prepared.embedding`, by
  runner.plan.estimate.embedding_context): added when that request comes (the pool makes room first), so an
  embedding request never overdraws the budget, and models that never embed do not pay for it.

A model that would leave such droppable pages in the process (weights repacked for this CPU, or partly
offloaded) is loaded without mmap, so that the server's RSS is what the budget counts.

The settings file (`--config models.toml`), one table per model name (any name the server resolves, or a new
name with `path`):

    [models."smollm2-135m"]      # a catalog model: context and slots override the plan's
    ctx = 8192                   # context per request, tokens
    parallel = 2                 # requests decoded at once (the KV cache holds ctx x parallel)
    keep_alive = "30m"           # how long it stays loaded after its last request ("-1": forever, 0: unload)

    [models.notes]               # a GGUF file served under a name of its own
    path = "~/models/notes.Q4_K_M.gguf"
    ctx = 2048
"""

from __future__ import annotations

import dataclasses
import logging
import tomllib
from collections.abc import Mapping, Sequence
from typing import Any
from dataclasses import dataclass, field
from pathlib import Path

from runner.app.launch import DEFAULT_PATH_CTX, Launch, plan_summary
from runner.app.models import ModelIndex, ModelRef, ServedFile, read_card
from runner.app.pool import DEFAULT_KEEP_ALIVE_S
from runner.app.pool_values import Budget, Prepared, Started
from runner.core.errors import ConfigError, DoesNotFitError, LicenseNotAcceptedError, UsageError
from runner.core.run_settings import RunSettings
from runner.core.shapes import ModelShape
from runner.core.units import FOREVER, GiB, MiB, format_size, parse_duration
from runner.engine.types import Engine
from runner.hardware.types import HardwareProfile
from runner.model.layout import WeightsLayout
from runner.plan.estimate import HOST_OVERHEAD_BYTES, MemoryEstimate
from runner.plan.graph import NO_FLASH_ATTN_ARCHS

log = logging.getLogger("llmrun.server")

RAM_MARGIN_SHARE = 0.05          # of total RAM, kept free for the rest of the machine
RAM_MARGIN_MIN = 256 * MiB
RAM_MARGIN_MAX = 2 * GiB
MIN_CTX, MAX_CTX = 128, 1 << 20
MAX_PARALLEL = 256


# ------------------------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class ModelSettings:
    """Per-model choices; None leaves it to the server's defaults (and, for the context, to the plan)."""

    ctx: int | None = None              # context per request, tokens
    parallel: int | None = None         # slots
    keep_alive: float | None = None     # seconds after the last request (math.inf: forever)

    def over(self, base: "ModelSettings") -> "ModelSettings":
        """These settings, with `base`'s where these say nothing."""
        return ModelSettings(*(a if a is not None else b for a, b in
                               zip(dataclasses.astuple(self), dataclasses.astuple(base))))


@dataclass(frozen=True)
class ModelsConfig:
    """The parsed `--config` file."""

    models: Mapping[str, ModelSettings] = field(default_factory=dict)   # by the name written in the file
    files: tuple[ServedFile, ...] = ()                                  # tables with a `path`
    source: str = ""


_KEYS = {"ctx", "parallel", "keep_alive", "path"}


def read_models_config(path: Path) -> ModelsConfig:
    """Parse and check a models.toml; ConfigError naming the table and key of any mistake."""
    where = str(path)
    try:
        data = tomllib.loads(path.expanduser().read_text())
    except OSError as e:
        raise ConfigError(f"cannot read --config {where}: {e.strerror or e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where} is not valid TOML: {e}") from e
    extra = set(data) - {"models"}
    if extra:
        raise ConfigError(f"{where}: unknown top-level key(s) {', '.join(sorted(extra))}",
                          hint='put each model in a [models."NAME"] table (docs/server.md)')
    tables = data.get("models", {})
    if not isinstance(tables, dict):
        raise ConfigError(f"{where}: `models` must be a table of [models.\"NAME\"] tables")
    models: dict[str, ModelSettings] = {}
    files: list[ServedFile] = []
    for name, t in tables.items():
        at = f'{where} [models."{name}"]'
        if not isinstance(t, dict):
            raise ConfigError(f"{at} must be a table", hint='e.g. [models."smollm2-135m"] ctx = 4096')
        unknown = set(t) - _KEYS
        if unknown:
            raise ConfigError(f"{at}: unknown key(s) {', '.join(sorted(unknown))}",
                              hint="known keys: " + ", ".join(sorted(_KEYS)))
        models[name] = ModelSettings(
            ctx=_int(t, "ctx", at, MIN_CTX, MAX_CTX), parallel=_int(t, "parallel", at, 1, MAX_PARALLEL),
            keep_alive=_keep_alive(t, at))
        if "path" in t:
            if not isinstance(t["path"], str) or not t["path"]:
                raise ConfigError(f"{at}: path must be the path of a GGUF file, as a string")
            p = Path(t["path"]).expanduser()
            if not p.is_absolute():
                p = path.expanduser().parent / p
            if not p.is_file():
                raise ConfigError(f"{at}: path {t['path']!r}: no such file ({p})")
            files.append(ServedFile(name, p, merge=False))
    return ModelsConfig(models, tuple(files), where)


def _int(t: dict, key: str, at: str, lo: int, hi: int) -> int | None:
    if key not in t:
        return None
    v = t[key]
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ConfigError(f"{at}: {key} must be an integer from {lo} to {hi}, not {v!r}")
    return v


def _keep_alive(t: dict, at: str) -> float | None:
    if "keep_alive" not in t:
        return None
    try:
        return parse_duration(t["keep_alive"], what=f"{at} keep_alive")
    except UsageError as e:
        raise ConfigError(e.message, hint=e.hint) from e


# -------------------------------------------------------------------------------------------------- budget
def ram_margin(profile: HardwareProfile) -> int:
    return int(min(RAM_MARGIN_MAX, max(RAM_MARGIN_MIN, RAM_MARGIN_SHARE * profile.ram_total_bytes)))


def budget_from(profile: HardwareProfile, *, max_memory: int | None = None, max_vram: Sequence[int] = (),
                process_bytes: int = 0) -> Budget:
    """The budget on `profile`: RAM available less a margin (or `max_memory`), each GPU's free VRAM (or
    `max_vram`: one size for every GPU, or one per GPU in order), each RPC worker's free memory."""
    from runner.plan.fit import device_name

    if max_memory is not None:
        limits = {"CPU": max_memory}
        source = f"--max-memory {format_size(max_memory)}"
    else:
        margin = ram_margin(profile)
        limits = {"CPU": max(0, profile.ram_available_bytes - margin)}
        source = f"{format_size(profile.ram_available_bytes)} RAM available less {format_size(margin)}"
    local = [g for g in profile.gpus if g.vendor != "rpc"]
    if max_vram and len(max_vram) not in (1, len(local)):
        raise UsageError(f"--max-vram names {len(max_vram)} sizes for {len(local)} GPU(s)",
                         hint="give one size for every GPU, or one per GPU in order: 20GiB,10GiB")
    for i, g in enumerate(local):
        limits[device_name(g)] = max_vram[0 if len(max_vram) == 1 else i] if max_vram else g.free_bytes
    for g in profile.gpus:
        if g.vendor == "rpc":
            limits[device_name(g)] = g.free_bytes
    if max_vram:
        source += ", --max-vram"
    return Budget(limits, {"CPU": process_bytes}, source)


def plan_profile(profile: HardwareProfile, budget: Budget) -> HardwareProfile:
    """The machine as the planner should see it: the budget's room for one model (alone), with the estimate's
    own process overhead counted in it as the estimate counts it."""
    from runner.plan.fit import device_name

    gpus = tuple(dataclasses.replace(g, free_bytes=budget.for_models(device_name(g))) for g in profile.gpus)
    ram = max(0, budget.for_models("CPU")) + HOST_OVERHEAD_BYTES
    return dataclasses.replace(profile, name="the memory budget", ram_available_bytes=ram,
                               ram_total_bytes=max(ram, profile.ram_total_bytes), gpus=gpus)


# ------------------------------------------------------------------------------------------------ accounting
def need_of(estimate: MemoryEstimate) -> dict[str, int]:
    """Bytes per device a model will hold by the estimate, without the process's own overhead."""
    return {d.device: max(0, d.needed - (HOST_OVERHEAD_BYTES if d.device == "CPU" else 0))
            for d in estimate.devices}


def resident_of(buffers: Mapping[str, int], estimate: MemoryEstimate | None) -> dict[str, int]:
    """Bytes per device a loaded model holds: llama.cpp's buffers, plus its overhead, less droppable file pages.
    Without buffers, the estimate (or nothing known: an empty dict)."""
    from runner.engine.report import actual_terms

    if not buffers:
        return need_of(estimate) if estimate is not None else {}
    committed = {d.device: (d.compute_committed, d.compute) for d in estimate.devices
                 if d.compute_committed is not None and d.compute} if estimate is not None else {}
    out: dict[str, int] = {}
    for (device, term), n in actual_terms(dict(buffers)).items():
        if term == "compute" and device in committed:
            # the host compute buffer is malloc'd: only the pages a graph touches become resident, the share the
            # estimate calls committed (with flash attention the demo's logits phase, 96 of its 98 MiB, is not)
            part, whole = committed[device]
            n = round(n * min(1.0, part / whole))
        out[device] = out.get(device, 0) + n
    if estimate is not None:
        for d in estimate.devices:
            extra = d.overhead - (HOST_OVERHEAD_BYTES if d.device == "CPU" else 0) - d.reclaimable
            out[d.device] = max(0, out.get(d.device, 0) + extra)
    return out


# --------------------------------------------------------------------------------------------------- loader
def _never(_question: str) -> bool:
    return False


class PlannedLoader:
    """The pool's loader for real: plans each model for the budget (catalog models by the planner, other GGUF
    files CPU-only with an estimate from their header), pulls when the index allows, loads with llama.cpp."""

    def __init__(self, index: ModelIndex, profile: HardwareProfile, budget: Budget, *,
                 defaults: ModelSettings = ModelSettings(parallel=4, keep_alive=DEFAULT_KEEP_ALIVE_S),
                 config: ModelsConfig = ModelsConfig(), threads: int | None = None):
        self.index, self.profile, self.budget = index, profile, budget
        self.defaults, self.config, self.threads = defaults, config, threads
        self.planned_for = plan_profile(profile, budget)
        self.preferred: dict[str, ModelSettings] = {}   # between the file's settings and the defaults

    def settings(self, ref: ModelRef) -> ModelSettings:
        """The settings for `ref`: its table in --config (matched by any of its names, or its catalog model's
        name), over what the server prefers for it, over the server's defaults."""
        names = {n.lower() for n in ref.names}
        if ref.entry is not None:
            names |= {ref.entry.name.lower(), ref.entry.model.lower()}
        own = next((s for n, s in self.config.models.items() if n.lower() in names), ModelSettings())
        return own.over(self.preferred.get(ref.name, ModelSettings())).over(self.defaults)

    def keep_forever(self, ref: ModelRef) -> None:
        """The model `llmrun serve --model` named stays loaded (unless evicted for room), as a one-model server
        always kept it, unless its settings or a request say otherwise."""
        self.preferred[ref.name] = ModelSettings(keep_alive=FOREVER)

    def keep_alive(self, ref: ModelRef) -> float:
        seconds = self.settings(ref).keep_alive
        return DEFAULT_KEEP_ALIVE_S if seconds is None else seconds

    def prepare(self, ref: ModelRef) -> Prepared:
        s = self.settings(ref)
        parallel = s.parallel or 1
        path = ref.path
        if ref.entry is not None:
            from runner.app.launch import file_layout
            from runner.model.layout import layout_from_recipe

            path = self._ensure_local(ref)
            launch = self._plan(ref, path, s.ctx, parallel)
            # the file is here: its header gives the byte-exact estimate (the plan's came from the quant recipe)
            shape, layout = file_layout(ref.entry, path) or (
                ref.entry.shape, ref.entry.weights or layout_from_recipe(ref.entry.shape, ref.entry.quant))
            launch = dataclasses.replace(launch, estimate=self._estimate(shape, layout, launch.settings))
        else:
            from runner.model.gguf import read_header
            from runner.model.layout import layout_from_header

            assert path is not None, "an index ref without a file is an engine handed over, never prepared"
            header = read_header(path, require_shape=True)
            assert header.shape is not None
            shape, layout = header.shape, layout_from_header(header)
            launch = self._path_launch(ref, path, s.ctx, parallel, shape, layout)
        launch = self._without_droppable_pages(launch, shape, layout)
        assert launch.estimate is not None
        embedding = self._embedding_context(shape, layout, launch.settings)
        return Prepared(ref, launch, read_card(path, ref.name), need_of(launch.estimate), embedding=embedding,
                        advice="less context (ctx in --config, or --ctx), a smaller quant, or a larger budget "
                               "(--max-memory / --max-vram)")

    def _ensure_local(self, ref: ModelRef) -> Path:
        from runner.store import fetch

        assert ref.entry is not None
        try:
            return fetch.ensure_local(ref.entry, progress=False, ask=_never)
        except LicenseNotAcceptedError as e:
            raise LicenseNotAcceptedError(
                e.message, hint=f"accept it once with `llmrun pull {ref.entry.name} --accept-license`") from e

    def _plan(self, ref: ModelRef, path: Path, ctx: int | None, parallel: int) -> Launch:
        from runner.model.catalog import Catalog
        from runner.plan import select as plan

        assert ref.entry is not None
        # a hub file is planned from its own header (its entry carries the tensors), a catalog model from the catalog
        catalog = Catalog([ref.entry]) if ref.entry.weights is not None else None
        result = plan.make_plan(self.planned_for, plan.Preferences(model=ref.entry.name, n_ctx=ctx,
                                                                  n_parallel=parallel), catalog)
        try:
            candidate = plan.require_fit(result)
        except DoesNotFitError as e:
            raise DoesNotFitError(f"{ref.name} can never fit the memory budget ({self.budget.source}), even "
                                  f"alone: {e.message}", hint=e.hint) from e
        settings = candidate.settings
        if self.threads:
            settings = dataclasses.replace(settings, n_threads=self.threads)
        return Launch(path=path, name=ref.name, settings=settings, summary=plan_summary(candidate),
                      estimate=candidate.estimate,
                      speed_keys=tuple(k for k in (ref.entry.name, ref.entry.local_file) if k))

    def _path_launch(self, ref: ModelRef, path: Path, ctx: int | None, parallel: int, shape: ModelShape,
                     layout: WeightsLayout) -> Launch:
        """A GGUF that is not in the catalog: CPU only (as `llmrun serve --model PATH` always ran it), its
        estimate from the file's own header."""
        from runner.cluster.workers import split_over_workers

        n_ctx = ctx or DEFAULT_PATH_CTX
        settings = split_over_workers(RunSettings(n_ctx=n_ctx * parallel, n_parallel=parallel,
                                                  n_threads=self.threads,
                                                  flash_attn=shape.arch not in NO_FLASH_ATTN_ARCHS), self.profile)
        summary = f"{ref.name}: {path}, context {n_ctx} tokens" + (f" x {parallel} slots" if parallel > 1 else "")
        return Launch(path=path, name=ref.name, settings=settings, summary=summary,
                      estimate=self._estimate(shape, layout, settings), speed_keys=(path.name,))

    def _without_droppable_pages(self, launch: Launch, shape: ModelShape, layout: WeightsLayout) -> Launch:
        """Loaded with mmap, a model whose weights llama.cpp repacks for this CPU (or partly offloads) keeps the
        file pages it read once at load in the process's RSS, though nothing reads them again (the estimate's
        `reclaimable`): the kernel may drop them, but RSS then overstates the budget by that much (3.4 GiB for a
        7B Q4_0 on AVX2). Loaded without mmap, those pages are never the process's: RSS is what the budget
        counts, the same bytes (`needed`), and loading is no slower."""
        if launch.estimate is None or not any(d.reclaimable for d in launch.estimate.devices):
            return launch
        settings = dataclasses.replace(launch.settings, use_mmap=False)
        return dataclasses.replace(launch, settings=settings, estimate=self._estimate(shape, layout, settings))

    def _hardware(self) -> dict[str, Any]:
        """The estimate's keyword arguments for this machine: GPUs and their free memory, CPU flags, unified RAM."""
        from runner.plan.fit import local_gpus

        gpus = local_gpus(self.profile)
        return {"gpus": len(gpus), "gpu_free": tuple(g.free_bytes for g in gpus), "cpu_flags": self.profile.cpu.flags,
                "unified": self.profile.unified_memory}

    def _estimate(self, shape: ModelShape, layout: WeightsLayout, settings: RunSettings) -> MemoryEstimate:
        from runner.plan.estimate import estimate

        return estimate(shape, layout, settings, **self._hardware())

    def _embedding_context(self, shape: ModelShape, layout: WeightsLayout,
                           settings: RunSettings) -> dict[str, int]:
        from runner.plan.estimate import embedding_context

        return embedding_context(shape, layout, settings, **self._hardware())

    def load(self, prepared: Prepared) -> Started:
        from runner.app.load import load

        log.info("loading %s", prepared.launch.summary)
        loaded = load(prepared.launch, model_name=prepared.ref.name, n_parallel=prepared.launch.settings.n_parallel,
                      threads=self.threads)
        return Started(loaded.engine, resident_of(loaded.engine.buffers, prepared.launch.estimate),
                       loaded.warnings, before_close=lambda: self.record_speed(loaded.engine, prepared.launch))

    def record_speed(self, engine: Engine, launch: Launch) -> None:
        """The decode speed the model really reached while it was loaded, for the planner (bench.json)."""
        from runner.app.bench import record_run

        record_run(engine, launch, source="serve", threads=self.threads)
