"""The planner: which catalog model, quant and llama.cpp settings to run on a machine, and why not the others.

For each catalog entry the planner walks a ladder of configurations, best first, and keeps the first that fits
every device with the estimate's margin:

    full GPU offload → dense layers on GPU with MoE experts in RAM → partial offload (most layers that fit)
    → CPU only;   each at the model's training context (or exactly --ctx), then halving down to 2048,
                  each with an f16 KV cache, then q8_0 (which needs flash attention)

Multi-GPU splits are proportional to free VRAM. Unified memory (Apple) counts the GPU and the host against the
same RAM. Among the entries that fit, `prefer="quality"` takes the best placement class (full GPU, experts in
RAM, partial, CPU), then the bigger model, then the larger share of the wanted context, then the better quant, among candidates predicted to decode at
least USABLE_DECODE_TPS (when any does); `prefer="speed"` takes the fastest predicted decode among quants at
or above QUALITY_FLOOR_QUANT (when any fits). Every other configuration tried is kept with the one number that
ruled it out, or the reason it ranked lower.

Pure and fast: no llama_cpp, huggingface_hub or numpy import, no disk scan, no measurement.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

from runner import speed as speedmod
from runner.catalog import Catalog, CatalogEntry, quant_rank
from runner.errors import DoesNotFitError, UsageError
from runner.estimate import RunSettings
from runner.hardware import HardwareProfile
from runner.units import GiB, format_size

Prefer = Literal["quality", "speed"]

# Families planned when neither --model nor --family is given: the product's general-purpose chat families.
# Others (code models, the demo model, new families) are planned when asked for by --family/--model, or when
# --license open leaves only open-source families.
DEFAULT_FAMILIES = ("llama2", "grok1")
MIN_AUTO_CTX = 2048               # context is never reduced below this without the user asking (--ctx)
USABLE_DECODE_TPS = 3.0           # quality mode prefers candidates at least this fast, when any is
QUALITY_FLOOR_QUANT = "Q4_0"      # speed mode keeps to quants at least this good, when any fits
KV_TYPES = ("f16", "q8_0")
NO_REPACK_PROMPT_FACTOR = 0.5     # CPU prompt speed without llama.cpp's repacked weight kernels

PLACEMENTS = ("gpu", "experts-in-ram", "partial", "cpu")   # best first
PLACEMENT_LABEL = {"gpu": "full GPU offload", "experts-in-ram": "dense layers on GPU, experts in RAM",
                   "partial": "partial GPU offload", "cpu": "CPU only"}


@dataclass(frozen=True)
class Preferences:
    model: str | None = None          # catalog name, with or without ":QUANT"
    family: str | None = None         # "llama2", "grok1", ... or "any"
    n_ctx: int | None = None          # context per sequence; None = the model's training context
    prefer: Prefer = "quality"
    max_download_bytes: int | None = None
    license_open: bool = False        # only OSI-approved licences
    n_parallel: int = 1

    def __post_init__(self) -> None:
        if self.prefer not in ("quality", "speed"):
            raise UsageError(f"--prefer must be quality or speed, not {self.prefer!r}")
        if self.n_ctx is not None and self.n_ctx < 1:
            raise UsageError(f"--ctx must be a positive number of tokens, not {self.n_ctx}")
        if self.n_parallel < 1:
            raise UsageError(f"--parallel must be at least 1, not {self.n_parallel}")
        if self.max_download_bytes is not None and self.max_download_bytes <= 0:
            raise UsageError("--max-download must be a positive size", hint="write it like 20GB")


@dataclass(frozen=True)
class Candidate:
    entry: CatalogEntry
    settings: RunSettings
    estimate: Any | None              # runner.estimate.MemoryEstimate; None when ruled out before estimating
    speed: speedmod.SpeedPrediction | None
    fits: bool
    reason: str                       # the one number that ruled it out, or why it ranked lower
    placement: str = "cpu"            # one of PLACEMENTS
    shortfall: float = 0.0            # worst need/capacity ratio over devices (>1 = does not fit); for ranking
    need_bytes: int = 0               # total bytes over all devices

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def n_ctx(self) -> int:
        """Context per sequence."""
        return self.settings.n_ctx // max(self.settings.n_parallel, 1)

    def to_dict(self) -> dict[str, Any]:
        s = self.settings
        d: dict[str, Any] = {
            "name": self.entry.name, "model": self.entry.model, "quant": self.entry.quant,
            "family": self.entry.family, "fits": self.fits, "reason": self.reason, "placement": self.placement,
            "n_ctx": self.n_ctx, "n_ctx_total": s.n_ctx, "n_parallel": s.n_parallel,
            "n_gpu_layers": s.n_gpu_layers, "n_layer": self.entry.shape.n_layer,
            "tensor_split": list(s.tensor_split), "type_k": s.type_k, "type_v": s.type_v,
            "flash_attn": s.flash_attn, "experts_on_cpu": s.experts_on_cpu,
            "download_bytes": self.entry.size_bytes, "download_exact": self.entry.size_exact,
            "license": self.entry.license,
            "license_osi_approved": self.entry.license_open,
            "need_bytes": self.need_bytes,
        }
        if self.estimate is not None:
            d["memory"] = {dev.device: _device_dict(dev) for dev in _devices(self.estimate)}
        if self.speed is not None:
            d["speed"] = {"decode_tps": round(self.speed.decode_tps, 2), "prompt_tps": round(self.speed.prompt_tps, 1),
                          "aggregate_decode_tps": round(self.speed.aggregate_decode_tps, 2),
                          "at_tokens": self.speed.at_tokens, "bottleneck": self.speed.bottleneck,
                          "basis": self.speed.basis}
        return d


@dataclass(frozen=True)
class PlanResult:
    chosen: Candidate | None
    rejected: tuple[Candidate, ...]
    hardware: HardwareProfile
    preferences: Preferences
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        hw = self.hardware
        return {
            "chosen": self.chosen.to_dict() if self.chosen else None,
            "rejected": [c.to_dict() for c in self.rejected],
            "hardware": {"name": hw.name, "ram_available_bytes": hw.ram_available_bytes,
                         "gpus": [{"index": g.index, "name": g.name, "free_bytes": g.free_bytes} for g in hw.gpus],
                         "unified_memory": hw.unified_memory, "memory_bandwidth_gbps": hw.memory_bandwidth_gbps},
            "preferences": {k: getattr(self.preferences, k) for k in self.preferences.__dataclass_fields__},
            "notes": list(self.notes),
        }


# ---------------------------------------------------------------------------------------------------------- memory
def _devices(est: Any) -> tuple:
    return tuple(est.devices)


def _device_dict(dev: Any) -> dict[str, int]:
    return {k: v for k, v in dev.as_dict().items() if k != "device"}


def capacities(hardware: HardwareProfile) -> dict[str, int]:
    """Bytes each device may use: host RAM available, each GPU's free VRAM."""
    caps = {"CPU": hardware.ram_available_bytes}
    for g in hardware.gpus:
        caps[f"GPU{g.index}"] = g.free_bytes
    return caps


def _device_label(name: str, hardware: HardwareProfile) -> tuple[str, str]:
    """("GPU0", "free") or ("RAM", "available") for messages."""
    if name == "CPU":
        return ("unified memory" if hardware.unified_memory else "RAM"), "available"
    return f"on {name}", "free"


def check_fit(est: Any, hardware: HardwareProfile) -> tuple[bool, str, float]:
    """(fits, the one number that rules it out, worst need/capacity ratio)."""
    caps = capacities(hardware)
    worst_ratio, worst = 0.0, ""
    totals = {dev.device: int(dev.total) for dev in _devices(est)}
    for name, need in totals.items():
        cap = caps.get(name, 0)
        ratio = need / cap if cap > 0 else (float("inf") if need > 0 else 0.0)
        if ratio > worst_ratio:
            label, verb = _device_label(name, hardware)
            worst_ratio, worst = ratio, f"needs {format_size(need)} {label}, {format_size(cap)} {verb}"
    if hardware.unified_memory:
        need = sum(totals.values())
        cap = hardware.ram_available_bytes
        ratio = need / cap if cap > 0 else float("inf")
        if ratio > worst_ratio:
            worst_ratio = ratio
            worst = f"needs {format_size(need)} of unified memory, {format_size(cap)} available"
    return worst_ratio <= 1.0, worst, worst_ratio


# ---------------------------------------------------------------------------------------------------------- ladder
def _contexts(entry: CatalogEntry, prefs: Preferences) -> list[int]:
    if prefs.n_ctx:
        return [prefs.n_ctx]
    ctx = entry.shape.n_ctx_train or 4096
    out = [ctx]
    while ctx // 2 >= MIN_AUTO_CTX:
        ctx //= 2
        out.append(ctx)
    return out


def _placements(entry: CatalogEntry, hardware: HardwareProfile) -> list[str]:
    if not hardware.gpus:
        return ["cpu"]
    out = ["gpu"]
    if entry.shape.is_moe and not hardware.unified_memory:
        out.append("experts-in-ram")
    out += ["partial", "cpu"]
    return out


def _tensor_split(hardware: HardwareProfile) -> tuple[float, ...]:
    if len(hardware.gpus) < 2:
        return ()
    free = [max(g.free_bytes, 0) for g in hardware.gpus]
    total = sum(free) or 1
    return tuple(round(f / total, 4) for f in free)


class _Memo:
    """Layouts and estimates shared across entries: a chat model and its base model have the same shape and
    quant, so they cost one estimate. Keyed by values, so it is only valid for one hardware profile."""

    def __init__(self, hardware: HardwareProfile):
        from runner import estimate as est

        self.est, self.hardware = est, hardware
        self.layouts: dict[tuple, Any] = {}
        self.estimates: dict[tuple, Any] = {}
        self.gpu_free = tuple(g.free_bytes for g in hardware.gpus)

    def layout(self, entry: CatalogEntry) -> Any:
        key = (entry.shape, entry.quant)
        if key not in self.layouts:
            self.layouts[key] = self.est.layout_from_recipe(entry.shape, entry.quant)
        return self.layouts[key]

    def estimate(self, entry: CatalogEntry, settings: RunSettings) -> Any:
        key = (entry.shape, entry.quant, settings)
        if key not in self.estimates:
            hw = self.hardware
            self.estimates[key] = self.est.estimate(
                entry.shape, self.layout(entry), settings, gpus=len(hw.gpus), gpu_free=self.gpu_free,
                cpu_flags=hw.cpu.flags, unified=hw.unified_memory)
        return self.estimates[key]


class _EntryPlanner:
    """Evaluates configurations of one catalog entry on one machine."""

    def __init__(self, entry: CatalogEntry, hardware: HardwareProfile, prefs: Preferences,
                 specs: dict[str, speedmod.DeviceSpec], memo: _Memo):
        self.entry, self.hardware, self.prefs, self.specs, self.memo = entry, hardware, prefs, specs, memo
        self.layout = memo.layout(entry)
        self.tried: list[Candidate] = []
        repackable = memo.est.repacked_types(hardware.cpu.flags)
        self.repacks = any(t.type_name in repackable for t in self.layout.tensors)

    def settings(self, placement: str, ctx: int, kv: str, ngl: int | None = None, repack: bool = True) -> RunSettings:
        n_layer = self.entry.shape.n_layer
        n_gpu_layers = {"gpu": n_layer + 1, "experts-in-ram": n_layer + 1, "cpu": 0}.get(placement, ngl or 0)
        if not self.hardware.gpus:
            n_gpu_layers = 0
        return RunSettings(
            n_ctx=ctx * self.prefs.n_parallel, n_parallel=self.prefs.n_parallel,
            type_k=kv, type_v=kv, flash_attn=kv != "f16",
            n_gpu_layers=n_gpu_layers,
            tensor_split=_tensor_split(self.hardware) if n_gpu_layers else (),
            experts_on_cpu=placement == "experts-in-ram",
            n_threads=self.hardware.cpu.threads,
            repack=repack,
        )

    def evaluate(self, placement: str, settings: RunSettings, *, record: bool = True) -> Candidate:
        memory = self.memo.estimate(self.entry, settings)
        fits, why, ratio = check_fit(memory, self.hardware)
        need = sum(int(d.total) for d in _devices(memory))
        pred = self.predict(memory, settings) if fits else None
        cand = Candidate(self.entry, settings, memory, pred, fits, "" if fits else why, placement, ratio, need)
        if record:
            self.tried.append(cand)
        return cand

    def predict(self, memory: Any, settings: RunSettings) -> speedmod.SpeedPrediction:
        shape = self.entry.shape
        weights = {d.device: int(d.weights) for d in _devices(memory)}
        kv = {d.device: int(d.kv_cache) for d in _devices(memory)}
        n_params = float(shape.n_params or self.entry.params_b * 1e9)
        total_w = sum(weights.values()) or 1
        bytes_per_param = total_w / n_params
        expert_params = 3 * shape.n_embd * shape.n_ff * shape.n_expert * shape.n_layer if shape.is_moe else 0
        ctx = settings.n_ctx // max(settings.n_parallel, 1)
        at = max(1, ctx // 2)
        flows = speedmod.traffic(
            weights=weights, kv_cache=kv, n_ctx=settings.n_ctx, at_tokens=at, n_params=n_params,
            token_embd_bytes=int(shape.n_vocab * shape.n_embd * bytes_per_param),
            expert_bytes=int(expert_params * bytes_per_param), n_expert=shape.n_expert,
            n_expert_used=shape.n_expert_used, experts_on_cpu=settings.experts_on_cpu)
        specs = self.specs
        if not settings.repack:  # without repacked kernels CPU matrix products run at about half speed
            cpu = specs["CPU"]
            specs = {**specs, "CPU": replace(cpu, tflops=cpu.tflops * NO_REPACK_PROMPT_FACTOR)}
        return speedmod.predict(flows, self.hardware, at_tokens=at, n_parallel=settings.n_parallel,
                                n_ubatch=settings.n_ubatch, specs=specs)

    def gpu_ok(self, memory: Any) -> bool:
        caps = capacities(self.hardware)
        return all(int(d.total) <= caps.get(d.device, 0) for d in _devices(memory) if d.device != "CPU")

    def _gpu_ratio(self, memory: Any) -> float:
        caps = capacities(self.hardware)
        return max((int(d.total) / max(caps.get(d.device, 0), 1) for d in _devices(memory) if d.device != "CPU"),
                   default=0.0)

    def max_layers(self, ctx: int, kv: str, repack: bool = True) -> Candidate:
        """Partial offload: the most layers (1..n_layer) whose GPU share fits, then checked against host RAM too.
        GPU use grows about linearly with the layer count: interpolate between one layer and all of them, then
        step to the exact boundary (two to four estimates instead of a bisection's seven). Records and returns
        that candidate, or the one-layer attempt when not even one layer fits on the GPUs."""
        n = self.entry.shape.n_layer
        one = self.evaluate("partial", self.settings("partial", ctx, kv, 1, repack), record=False)
        if not self.gpu_ok(one.estimate):
            self.tried.append(one)
            return one
        full = self.memo.estimate(self.entry, self.settings("partial", ctx, kv, n + 1, repack))
        r1, rf = self._gpu_ratio(one.estimate), self._gpu_ratio(full)
        guess = n if rf <= r1 else int(1 + (1.0 - r1) * n / (rf - r1))
        k = max(1, min(n, guess))
        cand = self.evaluate("partial", self.settings("partial", ctx, kv, k, repack), record=False)
        if self.gpu_ok(cand.estimate):
            while k < n:
                nxt = self.evaluate("partial", self.settings("partial", ctx, kv, k + 1, repack), record=False)
                if not self.gpu_ok(nxt.estimate):
                    break
                cand, k = nxt, k + 1
        else:
            while k > 1:
                k -= 1
                cand = self.evaluate("partial", self.settings("partial", ctx, kv, k, repack), record=False)
                if self.gpu_ok(cand.estimate):
                    break
            else:
                cand = one
        self.tried.append(cand)
        return cand

    def capacity_total(self) -> int:
        if self.hardware.unified_memory:
            return self.hardware.ram_available_bytes
        return sum(capacities(self.hardware).values())

    def possible(self, placement: str) -> bool:
        """Cheap lower bounds from the layout alone: can this placement fit at all?"""
        gpu_free = sum(g.free_bytes for g in self.hardware.gpus)
        on_host = sum(t.n_bytes for t in self.layout.tensors if t.name.startswith("token_embd"))
        if placement == "gpu":
            return self.layout.weights_bytes - on_host <= gpu_free
        if placement == "experts-in-ram":
            experts = sum(t.n_bytes for t in self.layout.tensors if "_exps" in t.name)
            return self.layout.weights_bytes - on_host - experts <= gpu_free
        return True

    def first_fit(self, allowed: list[str] | None = None) -> Candidate | None:
        """The first configuration of the ladder that fits; with `allowed`, only those placements (the ones
        that could still rank above the best fit so far)."""
        ctxs = _contexts(self.entry, self.prefs)
        placements = [p for p in _placements(self.entry, self.hardware)
                      if self.possible(p) and (allowed is None or p in allowed)]
        if self.layout.weights_bytes > self.capacity_total():
            # cannot fit anywhere: one estimate of the most frugal configuration gives the number to report
            c = self.evaluate("cpu", self.settings("cpu", ctxs[-1], KV_TYPES[-1], repack=not self.repacks))
            if self.hardware.gpus:
                where = "unified memory" if self.hardware.unified_memory else "RAM and VRAM together"
                self.tried[-1] = replace(c, reason=f"needs {format_size(c.need_bytes)} at least, "
                                                   f"{format_size(self.capacity_total())} in {where}")
            return None
        for placement in placements:
            for ctx in ctxs:
                for kv, repack in self.kv_rungs():
                    if placement == "partial":
                        c = self.max_layers(ctx, kv, repack)
                    else:
                        c = self.evaluate(placement, self.settings(placement, ctx, kv, repack=repack))
                    if c.fits:
                        return c
        return None

    def kv_rungs(self) -> list[tuple[str, bool]]:
        """(KV type, repack) in order: f16, q8_0, then q8_0 without the CPU repack copy of the weights (llama.cpp
        --no-repack), when this CPU would repack some of this model's weights."""
        rungs = [(kv, True) for kv in KV_TYPES]
        if self.repacks:
            rungs.append((KV_TYPES[-1], False))
        return rungs


# ---------------------------------------------------------------------------------------------------------- select
def _ctx_share(c: Candidate) -> float:
    """Share of the wanted context (--ctx, else the training context) this candidate keeps."""
    wanted = c.entry.shape.n_ctx_train or c.n_ctx
    return min(1.0, c.n_ctx / wanted) if wanted else 1.0


def _quality_key(c: Candidate) -> tuple:
    """Placement class, then model size, then context kept, then quant, then chat over base, f16 KV, layers."""
    return (-PLACEMENTS.index(c.placement), c.entry.params_b, _ctx_share(c), quant_rank(c.entry.quant),
            c.entry.chat, c.settings.type_k == "f16", c.settings.repack, c.settings.n_gpu_layers)


def _speed_key(c: Candidate) -> tuple:
    return (round(c.speed.decode_tps, 1) if c.speed else 0.0,) + _quality_key(c)


def _select(fitting: list[Candidate], prefs: Preferences, notes: list[str]) -> Candidate | None:
    if not fitting:
        return None
    if prefs.prefer == "speed":
        floor = quant_rank(QUALITY_FLOOR_QUANT)
        pool = [c for c in fitting if quant_rank(c.entry.quant) >= floor]
        if not pool:
            notes.append(f"no quant at or above {QUALITY_FLOOR_QUANT} fits; the fastest lower quant was chosen")
            pool = fitting
        return max(pool, key=_speed_key)
    usable = [c for c in fitting if c.speed and c.speed.decode_tps >= USABLE_DECODE_TPS]
    if not usable:
        best = max(fitting, key=_quality_key)
        notes.append(f"nothing that fits decodes at {USABLE_DECODE_TPS:g} tok/s or more here; "
                     f"{best.name} is the best quality that fits")
        return best
    best = max(usable, key=_quality_key)
    better = [c for c in fitting if _quality_key(c) > _quality_key(best)]
    if better:
        top = max(better, key=_quality_key)
        notes.append(f"{top.name} also fits but would decode at about {top.speed.decode_tps:.1f} tok/s; "
                     f"chose {best.name} (≥ {USABLE_DECODE_TPS:g} tok/s). Ask for it with --model {top.name}")
    return best


def _entries(catalog: Catalog, prefs: Preferences, notes: list[str]) -> list[CatalogEntry]:
    if prefs.model:
        model, sep, quant = prefs.model.partition(":")
        if sep and quant:
            entries = [catalog.get(prefs.model)]
        else:
            catalog.get(model)  # raises UnknownModelError with close matches
            entries = catalog.find(model=model)
    elif prefs.family and prefs.family.lower() != "any":
        entries = catalog.find(family=prefs.family)
        if not entries:
            raise UsageError(f"unknown family {prefs.family!r}",
                             hint="families in the catalog: " + ", ".join(catalog.families()) + ", or any")
    elif prefs.family or prefs.license_open:
        entries = list(catalog)
    else:
        entries = [e for e in catalog if e.family in DEFAULT_FAMILIES]
        others = sorted({e.family for e in catalog} - set(DEFAULT_FAMILIES))
        if others:
            notes.append("planned the families " + ", ".join(DEFAULT_FAMILIES) + "; --family "
                         + "|".join(others) + " (or any) plans others")
    if prefs.license_open:
        closed = sorted({e.license for e in entries if not e.license_open})
        entries = [e for e in entries if e.license_open]
        if closed:
            notes.append("--license open: left out models under " + ", ".join(closed)
                         + " (not OSI-approved open-source licences)")
        if not entries:
            raise DoesNotFitError("no model under an OSI-approved licence matches",
                                  hint="drop --license open, or choose an open family such as grok1")
    return entries


def _gb(n: int | float) -> str:
    return f"{n / 1e9:.1f} GB"


def _entry_rank(e: CatalogEntry) -> tuple:
    return (e.params_b, quant_rank(e.quant), e.chat)


def _allowed(entry: CatalogEntry, best: Candidate | None, hardware: HardwareProfile) -> list[str] | None:
    """Quality mode visits entries best first (size, then quant). Once a usable fit is found, a later entry can
    only rank above it with a strictly better placement, or with the same placement and more of the wanted
    context at the same size. The placements worth trying (None = all: no usable fit yet)."""
    if best is None or best.speed is None or best.speed.decode_tps < USABLE_DECODE_TPS:
        return None
    limit = PLACEMENTS.index(best.placement)
    same_ok = entry.params_b == best.entry.params_b and _ctx_share(best) < 1.0
    return [p for p in _placements(entry, hardware)
            if PLACEMENTS.index(p) < limit or (same_ok and PLACEMENTS.index(p) == limit)]


def make_plan(hardware: HardwareProfile, prefs: Preferences, catalog: Catalog | None = None, *,
              exhaustive: bool = False) -> PlanResult:
    """Choose the best configuration that fits `hardware`, and explain every configuration not chosen.

    In quality mode, entries ranked below a choice that nothing later can beat are listed without an estimate
    ("not estimated") unless `exhaustive`; speed mode always estimates every entry."""
    if catalog is None:
        from runner.catalog import load_catalog

        catalog = load_catalog()
    notes: list[str] = []
    entries = sorted(_entries(catalog, prefs, notes), key=_entry_rank, reverse=True)
    specs = speedmod.device_specs(hardware)
    fingerprint = speedmod.hardware_fingerprint(hardware)
    bench = speedmod.load_bench()

    memo = _Memo(hardware)
    tried: list[Candidate] = []
    fitting: list[Candidate] = []
    best: Candidate | None = None
    skipped: list[CatalogEntry] = []
    for entry in entries:
        if prefs.max_download_bytes is not None and entry.size_bytes > prefs.max_download_bytes:
            tried.append(Candidate(entry, RunSettings(), None, None, False,
                                   f"download {_gb(entry.size_bytes)} > --max-download {_gb(prefs.max_download_bytes)}",
                                   "cpu", float("inf"), 0))
            continue
        allowed = _allowed(entry, best, hardware) if prefs.prefer == "quality" and not exhaustive else None
        if allowed is not None and not allowed:
            skipped.append(entry)
            continue
        try:
            planner = _EntryPlanner(entry, hardware, prefs, specs, memo)
        except UsageError as e:  # the estimator has no tensor recipe for this quant
            tried.append(Candidate(entry, RunSettings(), None, None, False, f"cannot estimate: {e.message}",
                                   "cpu", float("inf"), 0))
            continue
        fit = planner.first_fit(allowed)
        if fit is None and allowed is not None and not planner.tried:
            skipped.append(entry)
            continue
        if fit is not None and bench:
            record = speedmod.bench_record(bench, (entry.name, entry.local_file or ""), fingerprint)
            if record:
                fitted = replace(fit, speed=speedmod.apply_bench(fit.speed, record))
                planner.tried[planner.tried.index(fit)] = fitted
                fit = fitted
        tried.extend(planner.tried)
        if fit is not None:
            fitting.append(fit)
            if fit.speed and fit.speed.decode_tps >= USABLE_DECODE_TPS and (
                    best is None or _quality_key(fit) > _quality_key(best)):
                best = fit

    chosen = _select(fitting, prefs, notes)
    rejected = [_explain(c, chosen, prefs) for c in tried if c is not chosen]
    for entry in skipped:
        rejected.append(Candidate(entry, RunSettings(), None, None, False,
                                  f"ranked below {chosen.name if chosen else 'the choice'}; not estimated (--all)",
                                  "cpu", 0.0, 0))
    if chosen is not None:
        notes.extend(_chosen_notes(chosen, hardware, prefs))
    if hardware.memory_bandwidth_gbps is None:
        notes.append(f"host memory bandwidth unknown: assumed {speedmod.DEFAULT_HOST_BANDWIDTH_GBPS:g} GB/s "
                     "(`llmrun probe` measures it once)")
    for name, spec in specs.items():
        if name != "CPU" and spec.source == "default":
            notes.append(f"{spec.label} is not in configs/gpus.toml: assumed {spec.bandwidth_gbps:g} GB/s")
    return PlanResult(chosen, tuple(rejected), hardware, prefs, tuple(dict.fromkeys(notes)))


def _explain(c: Candidate, chosen: Candidate | None, prefs: Preferences) -> Candidate:
    """A fitting candidate that was not chosen gets the reason it ranked lower."""
    if not c.fits or chosen is None:
        return c
    speed = f"{c.speed.decode_tps:.1f} tok/s" if c.speed else "?"
    if prefs.prefer == "speed" and chosen.speed and c.speed and c.speed.decode_tps < chosen.speed.decode_tps:
        why = f"fits ({PLACEMENT_LABEL[c.placement]}), slower: {speed}"
    elif chosen.speed and c.speed and c.speed.decode_tps < USABLE_DECODE_TPS <= chosen.speed.decode_tps \
            and _quality_key(c) > _quality_key(chosen):
        why = f"fits ({PLACEMENT_LABEL[c.placement]}), too slow: {speed} < {USABLE_DECODE_TPS:g} tok/s"
    elif prefs.prefer == "speed" and quant_rank(c.entry.quant) < quant_rank(QUALITY_FLOOR_QUANT):
        why = f"fits, below the {QUALITY_FLOOR_QUANT} quality floor"
    else:
        why = f"fits ({PLACEMENT_LABEL[c.placement]}, {speed}), ranked below {chosen.name}"
    return replace(c, reason=why)


def _chosen_notes(c: Candidate, hardware: HardwareProfile, prefs: Preferences) -> list[str]:
    notes = []
    train = c.entry.shape.n_ctx_train
    if prefs.n_ctx is None and train and c.n_ctx < train:
        notes.append(f"context reduced to {c.n_ctx} tokens (trained for {train}) so that {c.name} fits")
    if prefs.n_ctx and train and prefs.n_ctx > train:
        notes.append(f"--ctx {prefs.n_ctx} is beyond {c.entry.model}'s training context ({train}); "
                     "quality degrades past it")
    if c.settings.type_k != "f16":
        notes.append(f"KV cache quantized to {c.settings.type_k} (with flash attention) to fit")
    if not c.settings.repack:
        notes.append("weights are not repacked for this CPU (llama.cpp --no-repack) to fit: prompts run slower")
    layout_bytes = sum(d.weights for d in c.estimate.devices) if c.estimate is not None else 0
    if c.entry.size_bytes and layout_bytes and abs(layout_bytes / c.entry.size_bytes - 1) > 0.05:
        notes.append(f"the estimate's tensor layout for {c.name} holds {_gb(layout_bytes)} of weights, the catalog "
                     f"lists a {_gb(c.entry.size_bytes)} download: the pulled file's header settles it")
    if hardware.disk_free_bytes is not None and c.entry.size_bytes > hardware.disk_free_bytes:
        notes.append(f"download {_gb(c.entry.size_bytes)} is more than the {_gb(hardware.disk_free_bytes)} "
                     "free disk (unless already pulled)")
    if not c.entry.size_exact:
        notes.append(f"{c.name}: size is the model card's rounded figure; the real size is checked at pull time")
    return notes


# ---------------------------------------------------------------------------------------------------------- refuse
def smallest_requirement(result: PlanResult) -> Candidate | None:
    """The rejected candidate that needs the least memory in all (what any machine would need at minimum)."""
    estimated = [c for c in result.rejected if c.estimate is not None and not c.fits]
    return min(estimated, key=lambda c: c.need_bytes, default=None)


def require_fit(result: PlanResult) -> Candidate:
    """The chosen candidate, or DoesNotFitError with the smallest requirement and the ways out."""
    if result.chosen is not None:
        return result.chosen
    hw = result.hardware
    have = f"{format_size(hw.ram_available_bytes)} RAM available"
    if hw.gpus:
        have += " and " + ", ".join(f"{format_size(g.free_bytes)} free on GPU{g.index}" for g in hw.gpus)
    else:
        have += " and no GPU"
    small = smallest_requirement(result)
    if small is None:
        reasons = sorted({c.reason for c in result.rejected}) or ["no candidate"]
        raise DoesNotFitError("nothing to plan: " + "; ".join(reasons[:3]),
                              hint="raise --max-download, or choose another --model/--family")
    ways = []
    if small.n_ctx > 2048 or result.preferences.n_ctx:
        ways.append("less context (--ctx 2048)")
    quants = [c.entry for c in result.rejected if c.entry.model == small.entry.model]
    if any(quant_rank(e.quant) < quant_rank(small.entry.quant) for e in quants):
        ways.append("a smaller quant")
    ways += ["more RAM or GPU memory",
             "more hosts (`llmrun worker` on each, then `llmrun plan --workers host:port,...`)"]
    extras = "" if small.settings.repack else ", no repack"
    raise DoesNotFitError(
        f"nothing fits {hw.name}: the smallest option, {small.name} ({PLACEMENT_LABEL[small.placement]}, "
        f"{small.n_ctx} context, {small.settings.type_k} KV{extras}), needs {format_size(small.need_bytes)} "
        f"({_gb(small.need_bytes)}); {hw.name} has {have}",
        hint="ways out: " + "; ".join(ways))


__all__ = ["Preferences", "Candidate", "PlanResult", "make_plan", "require_fit", "check_fit", "capacities",
           "smallest_requirement", "DEFAULT_FAMILIES", "PLACEMENTS", "PLACEMENT_LABEL", "GiB"]
