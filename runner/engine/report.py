"""llama.cpp's real buffer sizes (parsed from its load log) next to the plan's estimate, term by term, with a
warning where they differ by more than 5%."""

from __future__ import annotations

import re
from dataclasses import dataclass

TOLERANCE = 0.05
MIN_BYTES = 1 << 20       # differences under 1 MiB are rounding, not news
_TERMS = {"model": "weights", "KV": "kv_cache", "K": "kv_cache", "V": "kv_cache", "compute": "compute",
          "output": "output", "RS": "kv_cache"}


def _device(buffer_name: str) -> str:
    """llama.cpp buffer name -> the estimate's device name (CPU, GPU0.., RPC0..)."""
    if buffer_name.startswith("CPU") or buffer_name.endswith("_Host"):
        return "CPU"
    m = re.match(r"(CUDA|ROCm|Vulkan|Metal|SYCL)(\d*)", buffer_name)
    if m:
        return f"GPU{m.group(2) or 0}"
    m = re.match(r"RPC(\d*)", buffer_name)
    if m:
        return f"RPC{m.group(1) or 0}"
    return buffer_name


def actual_terms(buffers: dict[str, int]) -> dict[tuple[str, str], int]:
    """{"CPU_REPACK model": n, "CPU KV": n, ...} -> {("CPU", "repack"): n, ("CPU", "kv_cache"): n, ...}."""
    out: dict[tuple[str, str], int] = {}
    # cluster: llama.cpp names a worker's buffers "RPC<device on that worker>[host:port]" (every one-device worker
    # is "RPC0[...]"); number them in the order the log lists them, which is llama.cpp's device order
    rpc_devices: dict[str, str] = {}
    for key, n in buffers.items():
        name, _, kind = key.rpartition(" ")
        term = "repack" if name == "CPU_REPACK" else _TERMS.get(kind)
        if term is None:
            continue
        dev = rpc_devices.setdefault(name, f"RPC{len(rpc_devices)}") if re.match(r"RPC\d*\[", name) else _device(name)
        k = (dev, term)
        out[k] = out.get(k, 0) + n
    return out


@dataclass(frozen=True)
class BufferRow:
    device: str
    term: str
    estimated: int
    actual: int

    @property
    def off(self) -> float:
        """Relative difference, actual vs estimated (inf when nothing was estimated)."""
        if self.estimated == 0:
            return 0.0 if self.actual == 0 else float("inf")
        return (self.actual - self.estimated) / self.estimated

    @property
    def warn(self) -> bool:
        return abs(self.actual - self.estimated) > MIN_BYTES and abs(self.off) > TOLERANCE


def compare(buffers: dict[str, int], estimate) -> list[BufferRow]:
    """Rows for every (device, term) either side has; `estimate` is a runner.estimate.MemoryEstimate."""
    actual = actual_terms(buffers)
    est: dict[tuple[str, str], int] = {}
    for d in estimate.devices:
        for term in ("weights", "repack", "kv_cache", "compute", "output"):
            if getattr(d, term):
                est[(d.device, term)] = getattr(d, term)
    keys = sorted(set(actual) | set(est))
    return [BufferRow(dev, term, est.get((dev, term), 0), actual.get((dev, term), 0)) for dev, term in keys]


def warnings(rows: list[BufferRow]) -> list[str]:
    from runner.core.units import format_size

    return [f"{r.device} {r.term}: llama.cpp allocated {format_size(r.actual)}, the plan estimated "
            f"{format_size(r.estimated)} ({r.off:+.0%})" for r in rows if r.warn]
