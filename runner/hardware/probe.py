"""Hardware probe: CPU, RAM (honouring cgroup limits), NVIDIA GPUs through NVML, disk.

The result is a frozen `HardwareProfile`, which can also be loaded from a TOML profile so every later step can
plan for a machine you don't have (`runner.hardware.profiles`). Sources of /proc, cgroup
files and NVML are injected (`ProbeSources`) so tests run without hardware.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from runner.core import dirs
from runner.core.files import atomic_write_json
from runner.core.errors import HardwareError
from runner.core.units import GiB, format_size
from runner.hardware.types import CPU, GPU, HardwareProfile


# ---------------------------------------------------------------------------------------------------------------
# What the probe reads from the world. Tests build fakes of these.

def _read_text(path: str) -> str | None:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return None


def _affinity() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def _load_per_cpu() -> float | None:
    """The 1-minute load average per usable CPU (None where the OS has none)."""
    try:
        one_minute = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    return one_minute / (_affinity() or os.cpu_count() or 1)


def _physical_cores() -> int | None:
    import psutil

    return psutil.cpu_count(logical=False)


def _virtual_memory() -> tuple[int, int] | None:
    import psutil

    vm = psutil.virtual_memory()
    return int(vm.total), int(vm.available)


def nearest_existing(path: Path) -> Path:
    """`path`, or its nearest parent that exists (the cache dir may not have been created yet)."""
    path = Path(path).expanduser().absolute()
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor or "/")


def _disk_free(path: Path) -> int | None:
    try:
        return shutil.disk_usage(nearest_existing(path)).free
    except OSError:
        return None


def _sysctl(name: str) -> str | None:
    try:
        out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _load_nvml() -> Any:
    import pynvml  # nvidia-ml-py; ImportError when it is missing

    return pynvml


def measure_memory_bandwidth(size_bytes: int = 256 * 1024**2, repeats: int = 5) -> float:
    """Host memory bandwidth in GB/s (decimal): the best of `repeats` numpy copies of a `size_bytes` array, counting
    bytes read plus bytes written (STREAM's "copy" convention). On the CI CPU this gives ≈26 GB/s, the rate at
    which llama.cpp's decode streams weights there (7B Q4_0: 7.3 tok/s × 3.5 GiB). Under a second, once per CPU
    model (the result is cached by `cached_memory_bandwidth`)."""
    import numpy as np

    n = max(1, size_bytes // 8)
    src = np.ones(n, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # touch every page once so page faults are not timed
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return round(2 * n * 8 / best / 1e9, 1)


@dataclass(frozen=True)
class ProbeSources:
    """Everything `probe()` reads from the world; tests replace single fields with fakes."""

    read_text: Callable[[str], str | None] = _read_text       # a text file's content, None if missing
    affinity: Callable[[], int | None] = _affinity            # CPUs this process may run on
    cpu_count: Callable[[], int | None] = os.cpu_count        # logical CPUs
    physical_cores: Callable[[], int | None] = _physical_cores  # fallback when /proc/cpuinfo has no topology
    virtual_memory: Callable[[], tuple[int, int] | None] = _virtual_memory  # (total, available) off Linux
    system: Callable[[], str] = platform.system
    machine: Callable[[], str] = platform.machine
    disk_free: Callable[[Path], int | None] = _disk_free
    nvml: Callable[[], Any] = _load_nvml                      # returns a pynvml-like module
    sysctl: Callable[[str], str | None] = _sysctl             # macOS
    measure_bandwidth: Callable[[], float] = measure_memory_bandwidth
    env: Callable[[str], str | None] = os.environ.get          # CUDA_VISIBLE_DEVICES
    load: Callable[[], float | None] = _load_per_cpu          # how busy the machine is now (bandwidth cache)


# ---------------------------------------------------------------------------------------------------------------
# Parsers (pure functions of file contents)

# CPU features llama.cpp picks kernels by; the names are /proc/cpuinfo's, with ARM's mapped to llama.cpp's.
X86_FLAGS = frozenset({
    "avx", "avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512vbmi", "avx_vnni",
    "f16c", "fma", "amx_tile", "amx_int8", "amx_bf16", "sse3", "ssse3",
})
_ARM_FLAG_MAP = {"asimd": ("neon", "asimd"), "neon": ("neon",), "sve": ("sve",), "sve2": ("sve2",),
                 "asimddp": ("dotprod",), "i8mm": ("i8mm",), "fphp": ("fp16",), "asimdhp": ("fp16",)}


def parse_cpuinfo(text: str) -> tuple[str | None, int | None, int, frozenset[str]]:
    """/proc/cpuinfo -> (model name, physical cores or None, logical cores, llama.cpp-relevant flags)."""
    model = None
    cores: set[tuple[str, str]] = set()
    logical = 0
    raw_flags: set[str] = set()
    physical_id = core_id = None
    for line in text.splitlines() + [""]:
        key, _, value = line.partition(":")
        key, value = key.strip().lower(), value.strip()
        if not key:  # a blank line ends one processor's block
            if physical_id is not None and core_id is not None:
                cores.add((physical_id, core_id))
            physical_id = core_id = None
        elif key == "processor":
            logical += 1
        elif key in ("model name", "hardware", "model") and value and (model is None or key == "model name"):
            if key != "model" or not value.isdigit():  # x86 has a numeric "model" field
                model = value
        elif key == "physical id":
            physical_id = value
        elif key == "core id":
            core_id = value
        elif key in ("flags", "features"):
            raw_flags.update(value.split())
    flags = set(raw_flags & X86_FLAGS)
    if "pni" in raw_flags:
        flags.add("sse3")
    for name, mapped in _ARM_FLAG_MAP.items():
        if name in raw_flags:
            flags.update(mapped)
    return model, (len(cores) or None), logical, frozenset(flags)


def parse_meminfo(text: str) -> tuple[int | None, int | None]:
    """/proc/meminfo -> (MemTotal, MemAvailable) in bytes."""
    values = {}
    for line in text.splitlines():
        m = re.match(r"^(\w+):\s+(\d+)\s*(kB)?", line)
        if m:
            values[m.group(1)] = int(m.group(2)) * (1024 if m.group(3) else 1)
    total = values.get("MemTotal")
    available = values.get("MemAvailable")
    if available is None and total is not None:  # kernels before 3.14
        available = values.get("MemFree", 0) + values.get("Cached", 0) + values.get("Buffers", 0)
    return total, available


@dataclass(frozen=True)
class _CgroupMount:
    root: str
    mount_point: str
    controllers: frozenset[str]
    v2: bool


def _unescape(field: str) -> str:
    """mountinfo writes spaces and other odd characters in paths as octal escapes (\\040)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _parse_mountinfo(text: str) -> list[_CgroupMount]:
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        lf, rf = left.split(), right.split()
        if not sep or len(lf) < 5 or len(rf) < 1 or rf[0] not in ("cgroup", "cgroup2"):
            continue
        controllers = frozenset(rf[2].split(",")) if len(rf) > 2 else frozenset()
        mounts.append(_CgroupMount(_unescape(lf[3]), _unescape(lf[4]), controllers, rf[0] == "cgroup2"))
    return mounts


def cgroup_dirs(controller: str, cgroup_text: str | None, mountinfo_text: str | None) -> list[str]:
    """Directories holding this process's `controller` files (v1) or unified files (v2): its own cgroup first,
    then each ancestor up to the mount point (a parent's limit binds the child too). Falls back to the usual
    /sys/fs/cgroup locations when /proc/self/cgroup or mountinfo cannot be read."""
    member: dict[str, str] = {}
    for line in (cgroup_text or "").splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            member[""] = parts[2]
        for c in parts[1].split(","):
            if c:
                member[c] = parts[2]
    cg_dirs: list[str] = []
    for m in _parse_mountinfo(mountinfo_text or ""):
        if m.v2:
            path = member.get("")
        elif controller in m.controllers:
            path = member.get(controller)
        else:
            continue
        if path is None:
            continue
        root = m.root.rstrip("/")
        if not root:  # the usual case: the mount shows the whole hierarchy
            rel = path
        elif path == root or path.startswith(root + "/"):
            rel = path[len(root):]
        else:  # a namespaced mount (docker without cgroupns): the process's cgroup is the mount itself
            rel = ""
        current = m.mount_point.rstrip("/") + "/" + rel.strip("/") if rel.strip("/") else m.mount_point
        while True:
            if current not in cg_dirs:
                cg_dirs.append(current)
            if current.rstrip("/") == m.mount_point.rstrip("/") or "/" not in current.strip("/"):
                break
            current = current.rsplit("/", 1)[0] or "/"
    for fallback in ("/sys/fs/cgroup", f"/sys/fs/cgroup/{controller}"):
        if fallback not in cg_dirs:
            cg_dirs.append(fallback)
    return cg_dirs


_UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a huge page-aligned number (9223372036854771712)


def _int_or_none(text: str | None) -> int | None:
    if text is None:
        return None
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        return None


def _stat_value(text: str | None, key: str) -> int:
    for line in (text or "").splitlines():
        k, _, v = line.partition(" ")
        if k == key:
            return _int_or_none(v) or 0
    return 0


def cgroup_memory(src: ProbeSources) -> tuple[int | None, int | None]:
    """(limit, available inside the limit) in bytes from cgroup v2 memory.max/memory.current or v1
    memory.limit_in_bytes/memory.usage_in_bytes; reclaimable page cache (inactive_file) counts as available.
    (None, None) when no limit applies."""
    cg_dirs = cgroup_dirs("memory", src.read_text("/proc/self/cgroup"), src.read_text("/proc/self/mountinfo"))
    limit = available = None
    for d in cg_dirs:
        for max_name, cur_name, inactive_key in (("memory.max", "memory.current", "inactive_file"),
                                                 ("memory.limit_in_bytes", "memory.usage_in_bytes",
                                                  "total_inactive_file")):
            raw = src.read_text(f"{d}/{max_name}")
            lim = _int_or_none(raw)  # "max" (v2 unlimited) -> None
            if lim is None or lim <= 0 or lim >= _UNLIMITED:
                continue
            used = _int_or_none(src.read_text(f"{d}/{cur_name}")) or 0
            used -= min(used, _stat_value(src.read_text(f"{d}/memory.stat"), inactive_key))
            avail = max(0, lim - used)
            limit = lim if limit is None else min(limit, lim)
            available = avail if available is None else min(available, avail)
    return limit, available


def cgroup_cpu_quota(src: ProbeSources) -> float | None:
    """The CPU quota in cores (cgroup v2 cpu.max "200000 100000" = 2.0; v1 cfs_quota_us / cfs_period_us), None
    when unlimited ("max", -1) or absent."""
    cg_dirs = cgroup_dirs("cpu", src.read_text("/proc/self/cgroup"), src.read_text("/proc/self/mountinfo"))
    quota = None
    for d in cg_dirs:
        candidates = []
        v2 = src.read_text(f"{d}/cpu.max")
        if v2:
            parts = v2.split()
            if len(parts) >= 1 and parts[0] != "max":
                candidates.append((_int_or_none(parts[0]), _int_or_none(parts[1]) if len(parts) > 1 else 100000))
        q1 = _int_or_none(src.read_text(f"{d}/cpu.cfs_quota_us"))
        if q1 is not None:
            candidates.append((q1, _int_or_none(src.read_text(f"{d}/cpu.cfs_period_us")) or 100000))
        for q, period in candidates:
            if q is not None and q > 0 and period and period > 0:
                cores = q / period
                quota = cores if quota is None else min(quota, cores)
    return quota


# ---------------------------------------------------------------------------------------------------------------
# NVML (the one place pynvml errors are met)

_NVML_REASONS = {
    12: "the NVIDIA driver library libnvidia-ml is not installed",
    9: "the NVIDIA driver is not loaded",
    4: "no permission to query the GPU through NVML",
}


def nvidia_gpus(src: ProbeSources) -> tuple[tuple[GPU, ...], str | None, tuple[str, ...]]:
    """(GPUs, reason when there are none, notes) from NVML, honouring CUDA_VISIBLE_DEVICES as llama.cpp's CUDA
    backend will. Never raises for a missing library, driver or NVML error; a GPU NVML cannot read is skipped
    with a note."""
    try:
        nvml = src.nvml()
    except ImportError:
        return (), "nvidia-ml-py is not installed", ()
    error = getattr(nvml, "NVMLError", None)
    if not (isinstance(error, type) and issubclass(error, BaseException)):
        return (), "the NVML module has no NVMLError class", ()

    def reason(e: BaseException) -> str:
        code = getattr(e, "value", None)
        return _NVML_REASONS.get(code, f"NVML: {e}") if isinstance(code, int) else f"NVML: {e}"

    def text(value: Any) -> str:
        return value.decode(errors="replace") if isinstance(value, bytes) else str(value)

    try:
        nvml.nvmlInit()
    except error as e:
        return (), reason(e), ()
    found: list[tuple[GPU, str | None]] = []  # (GPU, UUID) in NVML's (PCI bus) order
    notes: list[str] = []
    last_error = None
    try:
        driver = text(nvml.nvmlSystemGetDriverVersion())
        count = int(nvml.nvmlDeviceGetCount())
        for i in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(i)
                mem = nvml.nvmlDeviceGetMemoryInfo(handle)
                name = text(nvml.nvmlDeviceGetName(handle))
            except error as e:
                last_error = reason(e)
                notes.append(f"GPU {i} skipped: {last_error}")
                continue
            try:
                major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
                cc: tuple[int, int] | None = (int(major), int(minor))
            except error:
                cc = None
            try:
                uuid: str | None = text(nvml.nvmlDeviceGetUUID(handle))
            except (error, AttributeError):
                uuid = None
            found.append((GPU(index=len(found), name=name, total_bytes=int(mem.total), free_bytes=int(mem.free),
                              compute_capability=cc, driver=driver), uuid))
    except error as e:
        return (), reason(e), ()
    finally:
        try:
            nvml.nvmlShutdown()
        except error:
            pass
    if not found:
        return (), last_error or "NVML reports no devices", ()
    visible = src.env("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return tuple(g for g, _ in found), None, tuple(notes)
    chosen = cuda_visible(found, visible)
    if not chosen:
        return (), f"CUDA_VISIBLE_DEVICES={visible!r} hides all {len(found)} GPUs", tuple(notes)
    if len(chosen) < len(found):
        notes.append(f"CUDA_VISIBLE_DEVICES={visible!r}: using {len(chosen)} of {len(found)} GPUs")
    return chosen, None, tuple(notes)


def cuda_visible(found: list[tuple[GPU, str | None]], visible: str) -> tuple[GPU, ...]:
    """The GPUs CUDA_VISIBLE_DEVICES leaves, renumbered from 0. Entries are indices (in PCI bus order, as with
    CUDA_DEVICE_ORDER=PCI_BUS_ID) or UUID prefixes ("GPU-8f3a"); like CUDA, the list ends at the first entry
    that names no device or one already named."""
    chosen: list[GPU] = []
    for token in (t.strip() for t in visible.split(",")):
        if token.lstrip("-").isdigit():
            i = int(token)
            match = [found[i][0]] if 0 <= i < len(found) else []
        else:
            match = [g for g, uuid in found if token and uuid and uuid.startswith(token)]
        if len(match) != 1 or match[0] in chosen:
            break
        chosen.append(match[0])
    return tuple(dataclasses.replace(g, index=i) for i, g in enumerate(chosen))


# ---------------------------------------------------------------------------------------------------------------
# The probe

def _probe_linux_cpu(src: ProbeSources) -> CPU:
    model, physical, logical, flags = parse_cpuinfo(src.read_text("/proc/cpuinfo") or "")
    logical = logical or src.cpu_count() or 1
    if physical is None:
        physical = src.physical_cores() or logical
    quota = cgroup_cpu_quota(src)
    usable: float = min(src.affinity() or logical, logical)
    if quota is not None:
        usable = min(usable, quota)
    return CPU(model=model or platform.processor() or "unknown CPU", arch=src.machine(), physical_cores=physical,
               logical_cores=logical, usable_cores=usable, flags=flags, quota_cores=quota)


def _probe_macos(src: ProbeSources) -> tuple[CPU, int, int, tuple[GPU, ...], bool]:
    arch = src.machine()
    model = src.sysctl("machdep.cpu.brand_string") or "Apple CPU"
    logical = _int_or_none(src.sysctl("hw.logicalcpu")) or src.cpu_count() or 1
    physical = _int_or_none(src.sysctl("hw.physicalcpu")) or logical
    flags: set[str] = set()
    if arch == "arm64":
        flags.add("neon")
        for key, flag in (("hw.optional.arm.FEAT_DotProd", "dotprod"), ("hw.optional.arm.FEAT_I8MM", "i8mm"),
                          ("hw.optional.arm.FEAT_FP16", "fp16")):
            if src.sysctl(key) == "1":
                flags.add(flag)
    else:
        for key, flag in (("hw.optional.avx1_0", "avx"), ("hw.optional.avx2_0", "avx2"), ("hw.optional.fma", "fma"),
                          ("hw.optional.f16c", "f16c"), ("hw.optional.avx512f", "avx512f")):
            if src.sysctl(key) == "1":
                flags.add(flag)
    vm = src.virtual_memory()
    total = _int_or_none(src.sysctl("hw.memsize")) or (vm[0] if vm else 0)
    available = vm[1] if vm else total
    cpu = CPU(model=model, arch=arch, physical_cores=physical, logical_cores=logical,
              usable_cores=min(src.affinity() or logical, logical), flags=frozenset(flags))
    gpus: tuple[GPU, ...] = ()
    unified = arch == "arm64"
    if unified:
        gpus = (apple_gpu(model, total),)
    return cpu, total, available, gpus, unified


def apple_gpu(model: str, ram_total: int) -> GPU:
    """Apple Silicon's GPU shares RAM; Metal lets it use its recommended working set: about 2/3 of RAM up to
    36 GiB, 3/4 above (what llama.cpp's Metal backend reports as free)."""
    share = 0.75 if ram_total > 36 * GiB else 2 / 3
    size = int(ram_total * share)
    return GPU(index=0, name=f"{model} GPU", total_bytes=size, free_bytes=size, vendor="apple")


def probe(sources: ProbeSources | None = None, *, measure: bool = True, remeasure: bool = False) -> HardwareProfile:
    """This machine's HardwareProfile. The memory bandwidth comes from the cache in
    `dirs.home()/hardware-cache.json`, measured once when absent; `measure=False` never measures (instant),
    `remeasure=True` measures again and keeps the best value (a busy machine measures low)."""
    src = sources or ProbeSources()
    notes: list[str] = []
    limit = host_total = None
    if src.system() == "Darwin":
        cpu, total, available, gpus, unified = _probe_macos(src)
    else:
        cpu = _probe_linux_cpu(src)
        mem_total, mem_available = parse_meminfo(src.read_text("/proc/meminfo") or "")
        if mem_total is None:
            vm = src.virtual_memory()
            mem_total, mem_available = vm if vm else (0, 0)
        total = mem_total
        available = total if mem_available is None else min(mem_available, total)
        host_total = total
        cg_limit, cg_available = cgroup_memory(src)
        if cg_limit is not None and cg_limit < total:
            limit = cg_limit
            notes.append(f"memory limited by cgroup to {format_size(cg_limit)} (host has {format_size(total)})")
            total = cg_limit
            available = min(available, cg_available if cg_available is not None else cg_limit)
        if cpu.quota_cores is not None and cpu.quota_cores < cpu.logical_cores:
            notes.append(f"CPU quota: {cpu.quota_cores:g} cores of {cpu.logical_cores}")
        unified = False
        gpus, reason, gpu_notes = nvidia_gpus(src)
        if reason:
            notes.append(f"no NVIDIA GPU found ({reason})")
        notes.extend(gpu_notes)
    if src.system() == "Darwin" and not unified:
        notes.append("no NVIDIA GPU found (macOS has no NVIDIA driver)")
    if not total:
        raise HardwareError("cannot tell how much RAM this machine has (/proc/meminfo and psutil gave nothing)",
                            hint="plan for a profile instead: --hardware NAME or --ram SIZE")
    bandwidth = cached_memory_bandwidth(cpu.model, src.measure_bandwidth if measure or remeasure else None,
                                        refresh=remeasure, load=src.load)
    return HardwareProfile(
        name="this machine", cpu=cpu, ram_total_bytes=int(total), ram_available_bytes=int(available), gpus=gpus,
        disk_free_bytes=src.disk_free(dirs.hf_cache_dir()), unified_memory=unified,
        memory_bandwidth_gbps=bandwidth, notes=tuple(notes), source="probe", ram_limit_bytes=limit,
        host_ram_total_bytes=host_total,
    )


def _bandwidth_cache_path() -> Path:
    return dirs.home() / "hardware-cache.json"


# Load per CPU (1-minute average) at or above which a bandwidth measurement is taken as made on a busy machine,
# and below which the machine is quiet enough to measure again.
BUSY_LOAD = 0.5
QUIET_LOAD = 0.25


def cached_memory_bandwidth(cpu_model: str, measure: Callable[[], float] | None, *, refresh: bool = False,
                            load: Callable[[], float | None] = lambda: None) -> float | None:
    """The bandwidth cached for this CPU model. `measure` given: measured and cached when absent, when `refresh`,
    and, opportunistically, when the cached figure was measured on a busy machine (or nobody knows: an older
    cache) and the machine is quiet now. A measurement never replaces a higher figure: other work on the machine
    only lowers it. The cache remembers the load each figure was measured under (`load_per_cpu`)."""
    path = _bandwidth_cache_path()
    try:
        cache = json.loads(path.read_text())
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    entry = cache.get(cpu_model)
    cached = None
    measured_load = None
    if isinstance(entry, dict):
        value = entry.get("memory_bandwidth_gbps")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            cached = float(value)
        if isinstance(entry.get("load_per_cpu"), (int, float)):
            measured_load = float(entry["load_per_cpu"])
    if measure is None:
        return cached
    now = load()
    if cached is not None and not refresh:
        measured_busy = measured_load is None or measured_load >= BUSY_LOAD
        if not (measured_busy and now is not None and now < QUIET_LOAD):
            return cached
    value = max(float(measure()), cached or 0.0)
    record: dict[str, object] = {"memory_bandwidth_gbps": value,
                                 "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if now is not None:
        record["load_per_cpu"] = round(now, 3)
    cache[cpu_model] = record
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, cache)
    except OSError:
        pass  # a read-only home only costs a re-measurement next time
    return value
