"""What a machine has, as the probe reads it or a profile describes it: frozen values every later stage plans
with."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class CPU:
    model: str
    arch: str                          # "x86_64", "aarch64", "arm64"
    physical_cores: int
    logical_cores: int
    usable_cores: float                # logical cores allowed by affinity and cgroup CPU quota
    flags: frozenset[str] = frozenset()  # subset that matters to llama.cpp: avx, avx2, avx512f, f16c, fma, neon, ...
    quota_cores: float | None = None   # the cgroup CPU quota in cores, None when there is none

    @property
    def threads(self) -> int:
        """Threads llama.cpp should use: physical cores, capped by the usable (quota) cores, at least 1."""
        return max(1, min(self.physical_cores, int(self.usable_cores)))


@dataclass(frozen=True)
class GPU:
    index: int
    name: str
    total_bytes: int
    free_bytes: int
    compute_capability: tuple[int, int] | None = None
    driver: str | None = None
    vendor: str = "nvidia"             # "nvidia", "apple" (unified memory) or "rpc" (a llama.cpp RPC worker's device)
    endpoint: str | None = None        # rpc: the worker's "host:port"
    link_gbps: float | None = None     # rpc: network speed to the worker, Gb/s (planner's per-token hop cost)
    link_rtt_s: float | None = None    # rpc: network round trip to the worker, seconds


@dataclass(frozen=True)
class HardwareProfile:
    name: str                          # "this machine" or the profile's name
    cpu: CPU
    ram_total_bytes: int               # after cgroup limits
    ram_available_bytes: int           # after cgroup limits
    gpus: tuple[GPU, ...] = ()
    disk_free_bytes: int | None = None  # at the model cache directory
    unified_memory: bool = False       # Apple Silicon: GPU and CPU share RAM
    memory_bandwidth_gbps: float | None = None  # host RAM bandwidth if known (measured or from the profile)
    notes: tuple[str, ...] = field(default=(), compare=False)  # e.g. "no NVIDIA GPU found (NVML: driver not loaded)"
    source: str = "probe"              # "probe", or the profile file it came from
    ram_limit_bytes: int | None = None  # the cgroup memory limit when one is below the host's RAM
    host_ram_total_bytes: int | None = None  # the host's RAM before cgroup limits (probe only)
    description: str = ""              # a profile's one-line description
