"""The planner: which catalog model, quant and llama.cpp settings to run on a machine, and why not the others.

For each catalog entry the planner walks a ladder of configurations (runner.fit), best first, and keeps the
first that fits every device with the estimate's margin:

    full GPU offload → dense layers on GPU with MoE experts in RAM → partial offload (most layers that fit)
    → CPU only;   each at the model's training context (or exactly --ctx), then halving down to 2048,
                  each with an f16 KV cache, then q8_0 (which needs flash attention), then both again without
                  the CPU repack copy of the weights (when this CPU repacks them)

Multi-GPU splits are proportional to free VRAM. Unified memory (Apple) counts the GPU and the host against the
same RAM. Among the entries that fit, `prefer="quality"` takes the best placement class (full GPU, experts in
RAM, partial, CPU), then the bigger model, then the larger share of the wanted context, then the better
quant, among candidates predicted to decode at least USABLE_DECODE_TPS (when any does); `prefer="speed"` takes the fastest predicted decode among quants at
or above QUALITY_FLOOR_QUANT (when any fits). Every other configuration tried is kept with the one number that
ruled it out, or the reason it ranked lower.

Pure and fast: no llama_cpp, huggingface_hub or numpy import, no disk scan, no measurement.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Literal

from runner.core.errors import DoesNotFitError, UsageError
from runner.core.run_settings import RunSettings
from runner.core.units import format_size
from runner.hardware.types import HardwareProfile
from runner.model.catalog import Catalog, CatalogEntry, quant_rank
from runner.plan import speed as speedmod
from runner.plan.fit import MIN_AUTO_CTX, Candidate, EntryPlanner, Memo, capacities, capacity_total, check_fit, \
    contexts, device_name, expert_param_count, machine_memory, placements
from runner.plan.ruled_out import PLACEMENT_LABEL, PLACEMENTS, BelowQualityFloor, CannotEstimate, \
    NotEstimated, OverDownloadLimit, Placement, RankedLower, RuledOut, RuledOutKind, Slower, TooSlow, \
    TooSlowNotEstimated, WeightsTooBig

Prefer = Literal["quality", "speed"]

# Families planned when neither --model nor --family is given: the product's general-purpose chat families.
# Others (code models, the demo model, new families) are planned when asked for by --family/--model, or when
# --license open leaves only open-source families.
DEFAULT_FAMILIES = ("llama2", "grok1")
USABLE_DECODE_TPS = 3.0           # quality mode prefers candidates at least this fast, when any is
QUALITY_FLOOR_QUANT = "Q4_0"      # speed mode keeps to quants at least this good, when any fits
NEAR_FASTEST = 0.8                # when nothing is usable: the best quality within this share of the top speed
SIZE_FLOOR_SHARE = 0.98           # the catalog's download size (rounded for some) bounds the weights from below


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
class PlanResult:
    chosen: Candidate | None
    rejected: tuple[Candidate, ...]
    hardware: HardwareProfile
    preferences: Preferences
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, object]:
        hw = self.hardware
        return {
            "chosen": self.chosen.to_dict() if self.chosen else None,
            "rejected": [c.to_dict() for c in self.rejected],
            "hardware": {"name": hw.name, "ram_available_bytes": hw.ram_available_bytes,
                         "gpus": [{"index": g.index, "name": g.name, "free_bytes": g.free_bytes} for g in hw.gpus],
                         "unified_memory": hw.unified_memory, "memory_bandwidth_gbps": hw.memory_bandwidth_gbps},
            "preferences": asdict(self.preferences),
            "notes": list(self.notes),
        }


# ---------------------------------------------------------------------------------------------------------- select
def _ctx_share(c: Candidate) -> float:
    """Share of the wanted context (--ctx, else the training context) this candidate keeps."""
    wanted = c.entry.shape.n_ctx_train or c.n_ctx
    return min(1.0, c.n_ctx / wanted) if wanted else 1.0


def _placement_class(c: Candidate) -> int:
    """Higher is better: 0 full GPU offload ... -3 CPU only (-4: never placed)."""
    if c.placement is None:
        return -len(PLACEMENTS)
    # cluster: with RPC workers and no local GPU in use, full and partial "offload" both put layers in (remote)
    # CPU memory and run at CPU speed alike: one class, so the better quant wins over offloading everything
    if c.placement == "partial" and c.settings.rpc_servers and c.estimate is not None and \
            not any(d.device.startswith("GPU") for d in c.estimate.devices):
        return -PLACEMENTS.index("gpu")
    return -PLACEMENTS.index(c.placement)


QualityKey = tuple[int, float, float, int, bool, bool, bool, int]


def _decode_tps(c: Candidate) -> float:
    """Predicted decode tok/s; 0 without a prediction (a candidate that does not fit)."""
    return c.speed.decode_tps if c.speed is not None else 0.0


def _quality_key(c: Candidate) -> QualityKey:
    """Placement class, then model size, then context kept, then quant, then chat over base, f16 KV, layers."""
    return (_placement_class(c), c.entry.params_b, _ctx_share(c), quant_rank(c.entry.quant),
            c.entry.chat, c.settings.type_k == "f16", c.settings.repack, c.settings.n_gpu_layers)


def _speed_key(c: Candidate) -> tuple[float, QualityKey]:
    return round(_decode_tps(c), 1), _quality_key(c)


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
        # nothing is comfortable: the best quality among the near-fastest (≥ NEAR_FASTEST of the top speed),
        # keeping to the quality floor where possible
        floor = quant_rank(QUALITY_FLOOR_QUANT)
        pool = [c for c in fitting if quant_rank(c.entry.quant) >= floor] or fitting
        top_tps = max((c.speed.decode_tps for c in pool if c.speed), default=0.0)
        near = [c for c in pool if c.speed and c.speed.decode_tps >= NEAR_FASTEST * top_tps] or pool
        best = max(near, key=_quality_key)
        richest = max(fitting, key=_quality_key)
        notes.append(f"nothing that fits decodes at {USABLE_DECODE_TPS:g} tok/s or more here: chose among the "
                     f"fastest; the best quality that fits is {richest.name} at about "
                     f"{_decode_tps(richest):.1f} tok/s (--model {richest.name})")
        return best
    best = max(usable, key=_quality_key)
    better = [c for c in fitting if _quality_key(c) > _quality_key(best)]
    if better:
        top = max(better, key=_quality_key)
        notes.append(f"{top.name} also fits but would decode at about {_decode_tps(top):.1f} tok/s; "
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
            raise UsageError("no model under an OSI-approved licence matches these options",
                             hint="drop --license open, or choose an open family such as grok1")
    return entries


def _gb(n: int | float) -> str:
    return f"{n / 1e9:.1f} GB"


def _unestimated(entry: CatalogEntry, why: RuledOut, *, shortfall: float | None = None,
                 need_bytes: int | None = None) -> Candidate:
    """A candidate ruled out before any configuration of it was placed or estimated."""
    return Candidate(entry, RunSettings(), None, None, False, shortfall=shortfall, need_bytes=need_bytes,
                     ruled_out=why)


def _ruled_out_by_size(entry: CatalogEntry, hardware: HardwareProfile, prefs: Preferences) -> Candidate | None:
    """A rejection from the download size alone: over --max-download, or more than every device together holds."""
    if prefs.max_download_bytes is not None and entry.size_bytes > prefs.max_download_bytes:
        return _unestimated(entry, OverDownloadLimit(entry.size_bytes, prefs.max_download_bytes))
    floor = int(entry.size_bytes * SIZE_FLOOR_SHARE)
    cap = capacity_total(hardware)
    if floor > cap:
        return _unestimated(entry, WeightsTooBig(floor, cap, machine_memory(hardware)),
                            shortfall=floor / max(cap, 1), need_bytes=floor)
    return None


def decode_bound(entry: CatalogEntry, hardware: HardwareProfile, specs: dict[str, speedmod.DeviceSpec]) -> float:
    """An upper bound on decode tok/s for an entry on this machine, from its download size alone: every active
    weight that can sit on the GPUs is read at the fastest GPU's speed, the rest at the host's, no KV read."""
    shape = entry.shape
    n_params = float(shape.n_params or entry.params_b * 1e9)
    per_param = entry.size_bytes / n_params
    active = entry.size_bytes - shape.n_vocab * shape.n_embd * per_param      # one embedding row per token
    if shape.is_moe:
        experts = expert_param_count(shape) * per_param
        active -= experts * (1 - shape.n_expert_used / shape.n_expert)
    active = max(active, 1.0)
    gpus = [sp for name, sp in specs.items() if name != "CPU"]
    on_gpu = min(active, sum(g.free_bytes for g in hardware.gpus)) if gpus else 0.0
    host = specs["CPU"]
    t = (active - on_gpu) / (host.bandwidth_gbps * 1e9 * host.decode_efficiency)
    if on_gpu:
        fastest = max(gpus, key=lambda sp: sp.bandwidth_gbps * sp.decode_efficiency)
        t += on_gpu / (fastest.bandwidth_gbps * 1e9 * fastest.decode_efficiency)
    return 1.05 / t   # 5% slack: the catalog's rounded sizes


def _entry_rank(e: CatalogEntry) -> tuple[float, int, bool]:
    return (e.params_b, quant_rank(e.quant), e.chat)


def _allowed(entry: CatalogEntry, best: Candidate | None, hardware: HardwareProfile) -> list[Placement] | None:
    """Quality mode visits entries best first (size, then quant). Once a usable fit is found, a later entry can
    only rank above it with a strictly better placement, or with the same placement and more of the wanted
    context at the same size. The placements worth trying (None = all: no usable fit yet)."""
    if best is None or best.speed is None or best.speed.decode_tps < USABLE_DECODE_TPS:
        return None
    limit = -_placement_class(best)
    same_ok = entry.params_b == best.entry.params_b and _ctx_share(best) < 1.0
    return [p for p in placements(entry, hardware)
            if PLACEMENTS.index(p) < limit or (same_ok and PLACEMENTS.index(p) == limit)]


def _calibration(bench: speedmod.Bench, fingerprint: str, catalog: Catalog, hardware: HardwareProfile,
                 prefs: Preferences, specs: dict[str, speedmod.DeviceSpec], memo: Memo) -> float | None:
    """Median of measured / predicted decode speed over the bench results taken on this machine for catalog
    entries (predicted for the configuration the planner gives that entry, as `llmrun bench` runs it)."""
    ratios: list[float] = []
    for name in bench:
        rec = speedmod.bench_record(bench, (name,), fingerprint)
        if rec is None or name not in catalog:
            continue
        entry = catalog.get(name)
        try:
            fit = EntryPlanner(entry, hardware, n_ctx=None, n_parallel=prefs.n_parallel, specs=specs, memo=memo).first_fit()
        except UsageError:
            continue
        if fit is not None and fit.speed and fit.speed.decode_tps > 0:
            ratios.append(speedmod.calibration_ratio(rec, fit.speed.decode_tps))
    if not ratios:
        return None
    ratios.sort()
    return ratios[len(ratios) // 2]


def make_plan(hardware: HardwareProfile, prefs: Preferences, catalog: Catalog | None = None, *,
              exhaustive: bool = False) -> PlanResult:
    """Choose the best configuration that fits `hardware`, and explain every configuration not chosen.

    In quality mode, entries ranked below a choice that nothing later can beat are listed without an estimate
    ("not estimated") unless `exhaustive`; speed mode always estimates every entry."""
    if catalog is None:
        from runner.model.catalog import load_catalog

        catalog = load_catalog()
    notes: list[str] = []
    entries = sorted(_entries(catalog, prefs, notes), key=_entry_rank, reverse=True)
    specs = speedmod.device_specs(hardware)
    fingerprint = speedmod.hardware_fingerprint(hardware)
    bench = speedmod.load_bench()
    memo = Memo(hardware)
    calibration = _calibration(bench, fingerprint, catalog, hardware, prefs, specs, memo) if bench else None
    if calibration:
        notes.append(f"speeds calibrated by speeds measured on this machine (`llmrun bench`, real runs: "
                     f"× {calibration:.2f})")

    tried: list[Candidate] = []
    fitting: list[Candidate] = []
    best: Candidate | None = None
    skipped: list[CatalogEntry] = []
    slow: list[tuple[CatalogEntry, float]] = []
    kept: list[CatalogEntry] = []
    for entry in entries:  # what rules an entry out without a layout or an estimate
        ruled_out = _ruled_out_by_size(entry, hardware, prefs)
        if ruled_out is not None:
            tried.append(ruled_out)
        else:
            kept.append(entry)
    entries = kept
    if prefs.prefer == "quality" and not exhaustive:
        # entries that cannot reach USABLE_DECODE_TPS here go last, and only if nothing usable fits
        bounds = {e.name: decode_bound(e, hardware, specs) * (calibration or 1.0) for e in entries}
        slow = [(e, bounds[e.name]) for e in entries if bounds[e.name] < USABLE_DECODE_TPS]
        entries = [e for e in entries if bounds[e.name] >= USABLE_DECODE_TPS]
    queue = list(entries)
    while queue or (slow and best is None):
        if not queue:
            queue, slow = [e for e, _ in slow], []
        entry = queue.pop(0)
        allowed = _allowed(entry, best, hardware) if prefs.prefer == "quality" and not exhaustive else None
        if allowed is not None and not allowed:
            skipped.append(entry)
            continue
        try:
            planner = EntryPlanner(entry, hardware, n_ctx=prefs.n_ctx, n_parallel=prefs.n_parallel, specs=specs,
                                   memo=memo)
        except UsageError as e:  # the estimator has no tensor recipe for this quant
            tried.append(_unestimated(entry, CannotEstimate(e.message)))
            continue
        fit = planner.first_fit(allowed)
        if fit is None and allowed is not None and not planner.tried:
            skipped.append(entry)
            continue
        if fit is not None and fit.speed is not None and bench:
            record = speedmod.bench_record(bench, (entry.name, entry.local_file or ""), fingerprint)
            if record or calibration:
                fitted = replace(fit, speed=speedmod.apply_bench(fit.speed, record, calibration=calibration))
                planner.tried[planner.tried.index(fit)] = fitted
                fit = fitted
        tried.extend(planner.tried)
        if fit is not None:
            fitting.append(fit)
            if fit.speed and fit.speed.decode_tps >= USABLE_DECODE_TPS and (
                    best is None or _quality_key(fit) > _quality_key(best)):
                best = fit

    for entry, bound in slow:  # a usable candidate was found: these could not have been chosen
        tried.append(_unestimated(entry, TooSlowNotEstimated(bound, USABLE_DECODE_TPS)))
    chosen = _select(fitting, prefs, notes)
    if chosen is None:
        tried = _refine_smallest(tried, hardware, prefs, specs, memo)
    rejected = [_explain(c, chosen, prefs) for c in tried if c is not chosen]
    for entry in skipped:
        rejected.append(_unestimated(entry, NotEstimated(chosen.name if chosen is not None else None)))
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
    if not c.fits or chosen is None or c.placement is None:
        return c
    why: RuledOut
    if prefs.prefer == "speed" and chosen.speed and c.speed and c.speed.decode_tps < chosen.speed.decode_tps:
        why = Slower(chosen.name, c.placement, c.speed.decode_tps, chosen.speed.decode_tps)
    elif chosen.speed and c.speed and c.speed.decode_tps < USABLE_DECODE_TPS <= chosen.speed.decode_tps \
            and _quality_key(c) > _quality_key(chosen):
        why = TooSlow(chosen.name, c.placement, c.speed.decode_tps, USABLE_DECODE_TPS)
    elif prefs.prefer == "speed" and quant_rank(c.entry.quant) < quant_rank(QUALITY_FLOOR_QUANT):
        why = BelowQualityFloor(chosen.name, QUALITY_FLOOR_QUANT)
    else:
        why = RankedLower(chosen.name, c.placement, c.speed.decode_tps if c.speed else None)
    return replace(c, ruled_out=why)


def _chosen_notes(c: Candidate, hardware: HardwareProfile, prefs: Preferences) -> list[str]:
    notes: list[str] = []
    train = c.entry.shape.n_ctx_train
    if prefs.n_ctx is None and train and c.n_ctx < train:
        notes.append(f"context reduced to {c.n_ctx} tokens (trained for {train}) so that {c.name} fits")
    if prefs.n_ctx and train and prefs.n_ctx > train:
        notes.append(f"--ctx {prefs.n_ctx} is beyond {c.entry.model}'s training context ({train}); "
                     "quality degrades past it")
    if c.settings.type_k != "f16":
        notes.append(f"KV cache quantized to {c.settings.type_k} to fit" + (
            " (with flash attention)" if c.settings.flash_attn else
            f" (K only: llama.cpp runs {c.entry.shape.arch} without flash attention, which a quantized V needs)"))
    if not c.settings.repack:
        notes.append("weights are not repacked for this CPU (llama.cpp --no-repack) to fit: prompts run slower")
    layout_bytes = sum(d.weights for d in c.estimate.devices) if c.estimate is not None else 0
    if c.entry.weights is None and c.entry.size_bytes and layout_bytes and \
            abs(layout_bytes / c.entry.size_bytes - 1) > 0.05:
        notes.append(f"the estimate's tensor layout for {c.name} holds {_gb(layout_bytes)} of weights, the catalog "
                     f"lists a {_gb(c.entry.size_bytes)} download: the pulled file's header settles it")
    if hardware.disk_free_bytes is not None and c.entry.size_bytes > hardware.disk_free_bytes:
        notes.append(f"download {_gb(c.entry.size_bytes)} is more than the {_gb(hardware.disk_free_bytes)} "
                     "free disk (unless already pulled)")
    if c.estimate is not None:
        notes.extend(c.estimate.notes)
    notes.extend(hardware.notes)
    if not c.entry.size_exact:
        notes.append(f"{c.name}: size is the model card's rounded figure; the real size is checked at pull time")
    return notes


# ---------------------------------------------------------------------------------------------------------- refuse
def _refine_smallest(tried: list[Candidate], hardware: HardwareProfile, prefs: Preferences,
                     specs: dict[str, speedmod.DeviceSpec], memo: Memo) -> list[Candidate]:
    """Nothing fits: if the smallest requirement is a size-only lower bound, replace it by a real estimate of
    that entry's most frugal configuration, so the refusal names the full figure."""
    small = _smallest(tried)
    if small is None:
        return tried
    if small.estimate is not None:
        return tried
    try:
        planner = EntryPlanner(small.entry, hardware, n_ctx=prefs.n_ctx, n_parallel=prefs.n_parallel, specs=specs,
                               memo=memo)
    except UsageError:
        return tried
    kv, repack = planner.kv_rungs()[-1]
    c = planner.most_frugal(contexts(small.entry, prefs.n_ctx)[-1], kv, repack=repack)
    return [c if x is small else x for x in tried]


def _smallest(candidates: list[Candidate] | tuple[Candidate, ...]) -> Candidate | None:
    """The candidate that does not fit and needs the least memory in all (of those sized)."""
    return min((c for c in candidates if not c.fits and c.need_bytes), key=lambda c: c.need_bytes or 0,
               default=None)


def smallest_requirement(result: PlanResult) -> Candidate | None:
    """The rejected candidate that needs the least memory in all (what any machine would need at minimum)."""
    return _smallest(result.rejected)


def require_fit(result: PlanResult) -> Candidate:
    """The chosen candidate, or DoesNotFitError with the smallest requirement and the ways out."""
    if result.chosen is not None:
        return result.chosen
    hw = result.hardware
    have = f"{format_size(hw.ram_available_bytes)} RAM available"
    if hw.gpus:
        have += " and " + ", ".join(f"{format_size(g.free_bytes)} free on {device_name(g)}" for g in hw.gpus)
    else:
        have += " and no GPU"
    small = smallest_requirement(result)
    if small is None:
        reasons = sorted({c.reason for c in result.rejected}) or ["no candidate"]
        kinds = {c.ruled_out.kind for c in result.rejected if c.ruled_out is not None}
        hints = []
        if RuledOutKind.OVER_DOWNLOAD_LIMIT in kinds:
            hints.append("raise --max-download")
        if RuledOutKind.CANNOT_ESTIMATE in kinds:
            hints.append("the memory estimate does not cover this model yet")
        hints.append("choose another --model or --family")
        raise DoesNotFitError("nothing to plan: " + "; ".join(reasons[:3]), hint="; ".join(hints))
    ways = []
    if small.estimate is not None and (small.n_ctx > 2048 or result.preferences.n_ctx):
        ways.append("less context (--ctx 2048)")
    quants = [c.entry for c in result.rejected if c.entry.model == small.entry.model]
    if any(quant_rank(e.quant) < quant_rank(small.entry.quant) for e in quants):
        ways.append("a smaller quant")
    ways += ["more RAM or GPU memory",
             "more hosts (`llmrun worker` on each, then `llmrun plan --workers host:port,...`)"]
    if small.placement is not None:
        extras = "" if small.settings.repack else ", no repack"
        what = (f"{small.name} ({PLACEMENT_LABEL[small.placement]}, {small.n_ctx} context, "
                f"{small.settings.type_k} KV{extras}), needs")
    else:
        what = f"{small.name}, needs at least"
    need = small.need_bytes or 0   # sized: smallest_requirement only returns those
    raise DoesNotFitError(
        f"nothing fits {hw.name}: the smallest option, {what} {format_size(need)} "
        f"({_gb(need)}); {hw.name} has {have}",
        hint="ways out: " + "; ".join(ways))


__all__ = ["Preferences", "Candidate", "PlanResult", "RuledOut", "RuledOutKind", "make_plan", "require_fit",
           "check_fit", "capacities", "smallest_requirement", "DEFAULT_FAMILIES", "PLACEMENTS", "PLACEMENT_LABEL",
           "MIN_AUTO_CTX"]
