"""Configurations of one catalog entry on one machine: whether a configuration fits each device (with the
estimate's margins), and the ladder of configurations the planner walks for an entry, best first:

    full GPU offload → dense layers on GPU with MoE experts in RAM → partial offload (most layers that fit)
    → CPU only;   each at the wanted context, then halving down to MIN_AUTO_CTX (unless the context is fixed),
                  each with an f16 KV cache, then q8_0 (which needs flash attention), then both again without
                  the CPU repack copy of the weights (when this CPU repacks them)

`runner.plan` chooses among the entries; this module knows nothing of preferences beyond context and
parallel sequences. No llama_cpp, numpy or huggingface_hub import.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

from runner.core.run_settings import RunSettings
from runner.core.shapes import ModelShape
from runner.hardware.types import GPU, HardwareProfile
from runner.model.catalog import CatalogEntry
from runner.model.layout import WeightsLayout, layout_from_recipe
from runner.plan import speed as speedmod
from runner.plan.estimate import MemoryEstimate, estimate, layer_devices, repacked_types
from runner.plan.graph import NO_FLASH_ATTN_ARCHS
from runner.plan.ruled_out import PLACEMENT_LABEL, PLACEMENTS, MachineTooSmall, Memory, Placement, RuledOut, \
    TooBig, TooBigForUnifiedMemory

MIN_AUTO_CTX = 2048               # context is never reduced below this without the user asking (--ctx)
KV_TYPES = ("f16", "q8_0")
NO_REPACK_PROMPT_FACTOR = 0.5     # CPU prompt speed without llama.cpp's repacked weight kernels


@dataclass(frozen=True)
class Candidate:
    """One configuration of one catalog entry, and what became of it. Entries ruled out before any estimate
    (too big a download, too slow, ranked below the choice) have no placement, estimate or speed."""

    entry: CatalogEntry
    settings: RunSettings
    estimate: MemoryEstimate | None   # None when ruled out before estimating
    speed: speedmod.SpeedPrediction | None  # predicted when it fits
    fits: bool
    placement: Placement | None = None  # None when never placed (ruled out before estimating)
    shortfall: float | None = None    # worst need/capacity ratio over devices (>1 = does not fit), for ranking;
                                      # None when it was never sized
    need_bytes: int | None = None     # total bytes over all devices (for a download too big for the machine,
                                      # that lower bound); None when it was never sized
    ruled_out: RuledOut | None = None  # why it was not chosen; None for the choice (and before the choice)

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def n_ctx(self) -> int:
        """Context per sequence."""
        return self.settings.n_ctx // max(self.settings.n_parallel, 1)

    @property
    def reason(self) -> str:
        """Why it was not chosen, in one line ("" for the choice)."""
        return self.ruled_out.reason if self.ruled_out is not None else ""

    def to_dict(self) -> dict[str, object]:
        s = self.settings
        d: dict[str, object] = {
            "name": self.entry.name, "model": self.entry.model, "quant": self.entry.quant,
            "family": self.entry.family, "fits": self.fits, "reason": self.reason,
            # candidates never placed have always been listed as "cpu" here (`ruled_out` says what they are)
            "placement": self.placement if self.placement is not None else "cpu",
            "n_ctx": self.n_ctx, "n_ctx_total": s.n_ctx, "n_parallel": s.n_parallel,
            "n_gpu_layers": s.n_gpu_layers, "n_layer": self.entry.shape.n_layer,
            "tensor_split": list(s.tensor_split), "type_k": s.type_k, "type_v": s.type_v,
            "flash_attn": s.flash_attn, "experts_on_cpu": s.experts_on_cpu,
            "download_bytes": self.entry.size_bytes, "download_exact": self.entry.size_exact,
            "license": self.entry.license,
            "license_osi_approved": self.entry.license_open,
            "need_bytes": self.need_bytes or 0,
            "ruled_out": self.ruled_out.to_dict() if self.ruled_out is not None else None,
        }
        if self.estimate is not None:
            d["memory"] = {dev.device: dev.sizes() for dev in self.estimate.devices}
            d["approximate"] = list(self.estimate.approximate)   # terms not measured for this architecture
        if self.speed is not None:
            d["speed"] = {"decode_tps": round(self.speed.decode_tps, 2), "prompt_tps": round(self.speed.prompt_tps, 1),
                          "aggregate_decode_tps": round(self.speed.aggregate_decode_tps, 2),
                          "at_tokens": self.speed.at_tokens, "bottleneck": self.speed.bottleneck,
                          "basis": self.speed.basis}
        return d


# ---------------------------------------------------------------------------------------------------------- memory
def expert_param_count(shape: ModelShape) -> int:
    """Parameters in the routed experts' gate, up and down matrices (0 for a dense model)."""
    if not shape.is_moe:
        return 0
    return 3 * shape.n_embd * shape.expert_ff * shape.n_expert * (shape.n_layer - shape.n_layer_dense_lead)


def capacity_total(hardware: HardwareProfile) -> int:
    """Bytes all devices together may use (the shared RAM on unified memory)."""
    if hardware.unified_memory:
        return hardware.ram_available_bytes
    return sum(capacities(hardware).values())


def machine_memory(hardware: HardwareProfile) -> Memory:
    """What `capacity_total` counts, as a refusal names it."""
    if hardware.unified_memory:
        return Memory.UNIFIED
    return Memory.RAM_AND_VRAM if hardware.gpus else Memory.RAM


def device_name(g: GPU) -> str:
    """The estimate's name for a GPU entry: "GPU<i>", or "RPC<i>" for an RPC worker's device (cluster)."""
    return f"{'RPC' if g.vendor == 'rpc' else 'GPU'}{g.index}"


def local_gpus(hardware: HardwareProfile) -> tuple[GPU, ...]:
    """The GPUs in this host (RPC workers' devices left out)."""
    return tuple(g for g in hardware.gpus if g.vendor != "rpc")


def rpc_servers(hardware: HardwareProfile) -> tuple[str, ...]:
    """The RPC workers whose devices are in the profile (runner.cluster.profile_with_workers), in order."""
    return tuple(dict.fromkeys(g.endpoint for g in hardware.gpus if g.vendor == "rpc" and g.endpoint))


def capacities(hardware: HardwareProfile) -> dict[str, int]:
    """Bytes each device may use: host RAM available, each GPU's free VRAM, each RPC worker's free memory."""
    caps = {"CPU": hardware.ram_available_bytes}
    for g in hardware.gpus:
        caps[device_name(g)] = g.free_bytes
    return caps


class MemoryCheck(NamedTuple):
    short: TooBig | TooBigForUnifiedMemory | None  # what does not fit (the worst device); None when all fits
    shortfall: float                  # worst need/capacity ratio over devices (>1 = does not fit)

    @property
    def fits(self) -> bool:
        return self.short is None


def check_memory(est: MemoryEstimate, hardware: HardwareProfile) -> MemoryCheck:
    """Whether an estimate fits every device (and, on unified memory, the shared RAM), and if not, the one that
    is worst over its capacity."""
    caps = capacities(hardware)
    worst_ratio = 0.0
    short: TooBig | TooBigForUnifiedMemory | None = None
    # `needed` = total less host file pages read once at load (behind a repacked copy): the kernel drops those
    # under pressure, so they show in peak RSS but never cause an out-of-memory
    total_need = 0
    for dev in est.devices:
        need = dev.needed
        total_need += need
        cap = caps.get(dev.device, 0)
        ratio = need / cap if cap > 0 else (float("inf") if need > 0 else 0.0)
        if ratio > worst_ratio:
            worst_ratio = ratio
            short = TooBig(dev.device, need, cap, hardware.unified_memory) if ratio > 1.0 else None
    if hardware.unified_memory:
        cap = hardware.ram_available_bytes
        ratio = total_need / cap if cap > 0 else float("inf")
        if ratio > worst_ratio:
            worst_ratio = ratio
            short = TooBigForUnifiedMemory(total_need, cap) if ratio > 1.0 else None
    return MemoryCheck(short, worst_ratio)


def check_fit(est: MemoryEstimate, hardware: HardwareProfile) -> tuple[bool, str, float]:
    """(fits, the one number that rules it out or "", worst need/capacity ratio): `check_memory` as text."""
    check = check_memory(est, hardware)
    return check.fits, check.short.reason if check.short is not None else "", check.shortfall


# ---------------------------------------------------------------------------------------------------------- ladder
def contexts(entry: CatalogEntry, n_ctx: int | None) -> list[int]:
    """Contexts to try: exactly `n_ctx` when given, else the training context halved down to MIN_AUTO_CTX."""
    if n_ctx:
        return [n_ctx]
    ctx = entry.shape.n_ctx_train or 4096
    out = [ctx]
    while ctx // 2 >= MIN_AUTO_CTX:
        ctx //= 2
        out.append(ctx)
    return out


def placements(entry: CatalogEntry, hardware: HardwareProfile) -> list[Placement]:
    if not hardware.gpus:
        return ["cpu"]
    out: list[Placement] = ["gpu"]
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


class LayoutFacts(NamedTuple):
    """What the ladder needs of an entry's tensor layout before any estimate."""

    weights: int                      # all weight bytes
    embd_bytes: int                   # token embedding bytes (always in host memory)
    expert_bytes: int                 # MoE expert tensor bytes
    repacks: bool                     # whether this CPU repacks any of its tensors


class Memo:
    """Layouts and estimates shared across entries: a chat model and its base model have the same shape and
    quant, so they cost one estimate. Keyed by values, so it is only valid for one hardware profile."""

    def __init__(self, hardware: HardwareProfile):
        self.hardware = hardware
        self.layouts: dict[object, WeightsLayout] = {}
        self.facts: dict[object, LayoutFacts] = {}
        self.estimates: dict[tuple[object, RunSettings], MemoryEstimate] = {}
        self.gpus = len(local_gpus(hardware))
        self.gpu_free = tuple(g.free_bytes for g in local_gpus(hardware))  # RPC devices: settings.rpc_servers
        self.repackable = repacked_types(hardware.cpu.flags)

    @staticmethod
    def key(entry: CatalogEntry) -> object:
        """Entries with the same shape and quant share a recipe layout; one with its own tensors (a header's)
        is its own."""
        return (entry.shape, entry.quant) if entry.weights is None else ("file", entry.name)

    def layout(self, entry: CatalogEntry) -> WeightsLayout:
        key = self.key(entry)
        layout = self.layouts.get(key)
        if layout is None:
            layout = entry.weights if entry.weights is not None else layout_from_recipe(entry.shape, entry.quant)
            self.layouts[key] = layout
        return layout

    def layout_facts(self, entry: CatalogEntry) -> LayoutFacts:
        key = self.key(entry)
        facts = self.facts.get(key)
        if facts is None:
            layout = self.layout(entry)
            facts = self.facts[key] = LayoutFacts(
                layout.weights_bytes,
                sum(t.n_bytes for t in layout.tensors if t.name.startswith("token_embd")),
                sum(t.n_bytes for t in layout.tensors if "_exps" in t.name),
                any(t.type_name in self.repackable for t in layout.tensors))
        return facts

    def estimate(self, entry: CatalogEntry, settings: RunSettings) -> MemoryEstimate:
        key = (self.key(entry), settings)
        memory = self.estimates.get(key)
        if memory is None:
            hw = self.hardware
            memory = self.estimates[key] = estimate(
                entry.shape, self.layout(entry), settings, gpus=self.gpus, gpu_free=self.gpu_free,
                cpu_flags=hw.cpu.flags, unified=hw.unified_memory)
        return memory


class EntryPlanner:
    """Evaluates configurations of one catalog entry on one machine."""

    def __init__(self, entry: CatalogEntry, hardware: HardwareProfile, *, n_ctx: int | None, n_parallel: int,
                 specs: dict[str, speedmod.DeviceSpec], memo: Memo):
        self.entry, self.hardware, self.specs, self.memo = entry, hardware, specs, memo
        self.n_ctx, self.n_parallel = n_ctx, n_parallel
        self.layout = memo.layout(entry)
        self.tried: list[Candidate] = []
        self.weights, self.embd_bytes, self.expert_bytes, self.repacks = memo.layout_facts(entry)
        self.caps = capacities(hardware)

    def settings(self, placement: Placement, ctx: int, kv: str, ngl: int | None = None,
                 repack: bool = True) -> RunSettings:
        n_layer = self.entry.shape.n_layer
        if placement in ("gpu", "experts-in-ram"):
            n_gpu_layers = n_layer + 1
        elif placement == "cpu":
            n_gpu_layers = 0
        else:
            n_gpu_layers = ngl or 0
        if not self.hardware.gpus:
            n_gpu_layers = 0
        # a quantized V cache needs flash attention; architectures llama.cpp runs without it quantize K only.
        # Flash attention wherever llama.cpp runs it, as llama-server's default (auto) does: decode steps of many
        # sequences are faster with it (docs/benchmarks.md, "Optimisation log") and the compute buffer smaller
        no_fa = self.entry.shape.arch in NO_FLASH_ATTN_ARCHS
        type_v = "f16" if no_fa else kv
        return RunSettings(
            n_ctx=ctx * self.n_parallel, n_parallel=self.n_parallel,
            type_k=kv, type_v=type_v, flash_attn=not no_fa,
            n_gpu_layers=n_gpu_layers,
            tensor_split=_tensor_split(self.hardware) if n_gpu_layers else (),
            experts_on_cpu=placement == "experts-in-ram",
            n_threads=self.hardware.cpu.threads,
            repack=repack,
            rpc_servers=rpc_servers(self.hardware) if n_gpu_layers else (),  # cluster: workers join the split
        )

    def evaluate(self, placement: Placement, settings: RunSettings, *, record: bool = True) -> Candidate:
        cand, _ = self._evaluate(placement, settings)
        if record:
            self.tried.append(cand)
        return cand

    def _evaluate(self, placement: Placement, settings: RunSettings) -> tuple[Candidate, MemoryEstimate]:
        memory = self.memo.estimate(self.entry, settings)
        check = check_memory(memory, self.hardware)
        pred = self.predict(memory, settings) if check.fits else None
        cand = Candidate(self.entry, settings, memory, pred, check.fits, placement=placement,
                         shortfall=check.shortfall, need_bytes=memory.total, ruled_out=check.short)
        return cand, memory

    def predict(self, memory: MemoryEstimate, settings: RunSettings) -> speedmod.SpeedPrediction:
        shape = self.entry.shape
        weights = {d.device: d.weights for d in memory.devices}
        kv = {d.device: d.kv_cache for d in memory.devices}
        n_params = float(shape.n_params or self.entry.params_b * 1e9)
        total_w = sum(weights.values()) or 1
        bytes_per_param = total_w / n_params
        expert_params = expert_param_count(shape)
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
        # cluster: every token crosses the network to and from each RPC worker that holds layers
        network_s = 0.0
        if settings.rpc_servers:
            _, out_dev, _ = layer_devices(shape.n_layer, settings, self.memo.gpus, self.memo.gpu_free)
            network_s = speedmod.network_seconds(
                self.hardware, {d.device: d.n_layers for d in memory.devices if d.device.startswith("RPC")},
                n_embd=shape.n_embd, n_vocab=shape.n_vocab, output_device=out_dev, n_parallel=settings.n_parallel)
        return speedmod.predict(flows, self.hardware, at_tokens=at, n_parallel=settings.n_parallel,
                                n_ubatch=settings.n_ubatch, specs=specs, network_s=network_s)

    def gpu_ok(self, memory: MemoryEstimate) -> bool:
        caps = self.caps
        return all(d.total <= caps.get(d.device, 0) for d in memory.devices if d.device != "CPU")

    def _gpu_ratio(self, memory: MemoryEstimate) -> float:
        caps = self.caps
        return max((d.total / max(caps.get(d.device, 0), 1) for d in memory.devices if d.device != "CPU"),
                   default=0.0)

    def max_layers(self, ctx: int, kv: str, repack: bool = True) -> Candidate:
        """Partial offload: the most layers (1..n_layer) whose GPU share fits, then checked against host RAM too.
        GPU use grows about linearly with the layer count: interpolate between one layer and all of them, then
        step to the exact boundary (two to four estimates instead of a bisection's seven). Records and returns
        that candidate, or the one-layer attempt when not even one layer fits on the GPUs."""
        n = self.entry.shape.n_layer
        one, one_mem = self._evaluate("partial", self.settings("partial", ctx, kv, 1, repack))
        if not self.gpu_ok(one_mem):
            self.tried.append(one)
            return one
        full = self.memo.estimate(self.entry, self.settings("partial", ctx, kv, n + 1, repack))
        r1, rf = self._gpu_ratio(one_mem), self._gpu_ratio(full)
        guess = n if rf <= r1 else int(1 + (1.0 - r1) * n / (rf - r1))
        k = max(1, min(n, guess))
        cand, mem = self._evaluate("partial", self.settings("partial", ctx, kv, k, repack))
        if self.gpu_ok(mem):
            while k < n:
                nxt, mem = self._evaluate("partial", self.settings("partial", ctx, kv, k + 1, repack))
                if not self.gpu_ok(mem):
                    break
                cand, k = nxt, k + 1
        else:
            while k > 1:
                k -= 1
                cand, mem = self._evaluate("partial", self.settings("partial", ctx, kv, k, repack))
                if self.gpu_ok(mem):
                    break
            else:
                cand = one
        self.tried.append(cand)
        return cand

    def possible(self, placement: Placement) -> bool:
        """Cheap lower bounds from the layout alone: can this placement fit at all?"""
        gpu_free = sum(g.free_bytes for g in self.hardware.gpus)
        if placement == "gpu":
            return self.weights - self.embd_bytes <= gpu_free
        if placement == "experts-in-ram":
            return self.weights - self.embd_bytes - self.expert_bytes <= gpu_free
        return True

    def first_fit(self, allowed: list[Placement] | None = None) -> Candidate | None:
        """The first configuration of the ladder that fits; with `allowed`, only those placements (the ones
        that could still rank above the best fit so far)."""
        ctxs = contexts(self.entry, self.n_ctx)
        ladder = [p for p in placements(self.entry, self.hardware) if allowed is None or p in allowed]
        if self.weights > capacity_total(self.hardware):
            # cannot fit anywhere: one estimate of the most frugal configuration gives the number to report
            self.tried.append(self.most_frugal(ctxs[-1], KV_TYPES[-1], repack=not self.repacks))
            return None
        for placement in ladder:
            if not self.possible(placement):
                # ruled out by the weights alone: one estimate of its most frugal form gives the number
                kv, repack = self.kv_rungs()[-1]
                self.evaluate(placement, self.settings(placement, ctxs[-1], kv, 1, repack))
                continue
            for ctx in ctxs:
                for kv, repack in self.kv_rungs():
                    if placement == "partial":
                        c = self.max_layers(ctx, kv, repack)
                    else:
                        c = self.evaluate(placement, self.settings(placement, ctx, kv, repack=repack))
                    if c.fits:
                        return c
        return None

    def most_frugal(self, ctx: int, kv: str, *, repack: bool) -> Candidate:
        """The CPU-only configuration at this context and KV type, ruled out as what the entry needs at least
        (not recorded)."""
        c, memory = self._evaluate("cpu", self.settings("cpu", ctx, kv, repack=repack))
        return replace(c, ruled_out=MachineTooSmall(memory.total, capacity_total(self.hardware),
                                                    machine_memory(self.hardware)))

    def kv_rungs(self) -> list[tuple[str, bool]]:
        """(KV type, repack) in order: f16, q8_0, then both again without the CPU repack copy of the weights
        (llama.cpp --no-repack) when this CPU would repack some of this model's weights."""
        rungs = [(kv, True) for kv in KV_TYPES]
        if self.repacks:
            rungs += [(kv, False) for kv in KV_TYPES]
        return rungs


__all__ = ["Candidate", "EntryPlanner", "Memo", "MemoryCheck", "LayoutFacts", "check_memory", "check_fit",
           "capacities", "capacity_total", "machine_memory", "device_name", "local_gpus", "rpc_servers", "contexts",
           "placements", "Placement", "PLACEMENTS", "PLACEMENT_LABEL", "MIN_AUTO_CTX", "KV_TYPES"]
