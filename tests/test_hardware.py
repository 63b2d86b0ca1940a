"""The hardware probe with fake /proc, cgroup, NVML and sysctl inputs (injected through ProbeSources), one real probe
of this machine, the bandwidth cache, and the TOML profiles."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import pytest

from runner.hardware import probe as hw, profiles
from runner.core import dirs
from runner.core.errors import ConfigError, UsageError
from runner.hardware.types import GPU
from runner.hardware.probe import ProbeSources
from runner.core.units import GiB, MiB

CPUINFO_2S = "".join(
    f"processor\t: {cpu}\nvendor_id\t: GenuineIntel\nmodel\t\t: 85\n"
    f"model name\t: Intel(R) Xeon(R) Gold 6248R CPU @ 3.00GHz\nphysical id\t: {cpu // 4}\ncore id\t\t: {cpu % 4 // 2}\n"
    "flags\t\t: fpu sse pni ssse3 fma avx avx2 f16c avx512f avx512bw avx512vl avx512_vnni aes\n\n"
    for cpu in range(8)
)  # 2 sockets x 2 cores x 2 threads
CPUINFO_ARM = "".join(
    f"processor\t: {i}\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes asimdhp asimddp sve i8mm\n"
    "CPU implementer\t: 0x41\nCPU part\t: 0xd40\n\n" for i in range(4)
)
MEMINFO_64G = "MemTotal:       67108864 kB\nMemFree:        50000000 kB\nMemAvailable:   60817408 kB\n"
V2_CGROUP = "0::/\n"
V2_MOUNTS = "35 24 0:30 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"


def no_nvml():
    raise ImportError("No module named 'pynvml'")


def fake(files: dict[str, str], *, affinity=None, cpu_count=None, system="Linux", machine="x86_64", nvml=no_nvml,
         sysctl=None, vm=None, physical=None, bandwidth=25.0, disk=100 * GiB, env=None, load=None) -> ProbeSources:
    """Fake sources. `bandwidth`: what measuring gives (a number, or a list of numbers given in turn); `load`: the
    load per CPU now (a number, or a list in turn; None: unknown)."""
    calls = []
    bandwidths = list(bandwidth) if isinstance(bandwidth, list) else None
    loads = list(load) if isinstance(load, list) else None

    def measure():
        calls.append(1)
        return bandwidths.pop(0) if bandwidths is not None else bandwidth

    def load_now():
        return loads.pop(0) if loads is not None else load

    src = ProbeSources(read_text=files.get, affinity=lambda: affinity, cpu_count=lambda: cpu_count,
                       physical_cores=lambda: physical, virtual_memory=lambda: vm, system=lambda: system,
                       machine=lambda: machine, disk_free=lambda path: disk, nvml=nvml,
                       sysctl=(sysctl or {}).get, measure_bandwidth=measure, env=(env or {}).get, load=load_now)
    object.__setattr__(src, "_measure_calls", calls)
    return src


# --- CPU -------------------------------------------------------------------------------------------------------

def test_cpuinfo_two_sockets():
    model, physical, logical, flags = hw.parse_cpuinfo(CPUINFO_2S)
    assert model == "Intel(R) Xeon(R) Gold 6248R CPU @ 3.00GHz"
    assert (physical, logical) == (4, 8)
    assert flags == {"sse3", "ssse3", "fma", "avx", "avx2", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"}


def test_cpuinfo_arm_features():
    model, physical, logical, flags = hw.parse_cpuinfo(CPUINFO_ARM)
    assert model is None and physical is None and logical == 4
    assert flags == {"neon", "asimd", "fp16", "dotprod", "sve", "i8mm"}


def test_arm_probe_falls_back_to_psutil_cores():
    p = hw.probe(fake({"/proc/cpuinfo": CPUINFO_ARM, "/proc/meminfo": MEMINFO_64G}, machine="aarch64", physical=4),
                 measure=False)
    assert (p.cpu.physical_cores, p.cpu.logical_cores, p.cpu.arch) == (4, 4, "aarch64")
    assert "neon" in p.cpu.flags


def test_affinity_limits_usable_cores():
    p = hw.probe(fake({"/proc/cpuinfo": CPUINFO_2S, "/proc/meminfo": MEMINFO_64G}, affinity=3), measure=False)
    assert p.cpu.usable_cores == 3
    assert p.cpu.threads == 3
    assert p.cpu.quota_cores is None


@pytest.mark.parametrize("cpu_max, expected", [("max 100000\n", None), ("200000 100000\n", 2.0),
                                               ("150000 100000", 1.5), ("50000 100000", 0.5)])
def test_cgroup_v2_cpu_quota(cpu_max, expected):
    files = {"/proc/cpuinfo": CPUINFO_2S, "/proc/meminfo": MEMINFO_64G, "/proc/self/cgroup": V2_CGROUP,
             "/proc/self/mountinfo": V2_MOUNTS, "/sys/fs/cgroup/cpu.max": cpu_max}
    p = hw.probe(fake(files, affinity=8), measure=False)
    assert p.cpu.quota_cores == expected
    assert p.cpu.usable_cores == (expected if expected is not None else 8)
    assert p.cpu.threads == max(1, int(min(4, expected or 8)))
    if expected:
        assert any("CPU quota" in n for n in p.notes)


def test_cgroup_v1_cpu_quota_and_unlimited():
    mounts = "40 31 0:36 /docker/abc /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
    base = {"/proc/cpuinfo": CPUINFO_2S, "/proc/meminfo": MEMINFO_64G,
            "/proc/self/cgroup": "3:cpu,cpuacct:/docker/abc\n", "/proc/self/mountinfo": mounts}
    limited = {**base, "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "300000\n",
               "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n"}
    assert hw.probe(fake(limited, affinity=8), measure=False).cpu.usable_cores == 3.0
    unlimited = {**base, "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
                 "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n"}
    p = hw.probe(fake(unlimited, affinity=8), measure=False)
    assert p.cpu.quota_cores is None and p.cpu.usable_cores == 8


# --- memory ----------------------------------------------------------------------------------------------------

def test_meminfo_without_cgroup():
    p = hw.probe(fake({"/proc/cpuinfo": CPUINFO_2S, "/proc/meminfo": MEMINFO_64G}), measure=False)
    assert p.ram_total_bytes == 64 * GiB
    assert p.ram_available_bytes == 58 * GiB
    assert p.ram_limit_bytes is None


def test_cgroup_v2_memory_limit_8g_on_64g_host():
    files = {"/proc/cpuinfo": CPUINFO_2S, "/proc/meminfo": MEMINFO_64G, "/proc/self/cgroup": V2_CGROUP,
             "/proc/self/mountinfo": V2_MOUNTS, "/sys/fs/cgroup/memory.max": f"{8 * GiB}\n",
             "/sys/fs/cgroup/memory.current": f"{3 * GiB}\n",
             "/sys/fs/cgroup/memory.stat": f"anon 1000\nfile 5000\ninactive_file {1 * GiB}\nactive_file 5\n"}
    p = hw.probe(fake(files), measure=False)
    assert p.ram_total_bytes == 8 * GiB
    assert p.ram_available_bytes == 6 * GiB  # 8 - (3 - 1 reclaimable)
    assert p.ram_limit_bytes == 8 * GiB and p.host_ram_total_bytes == 64 * GiB
    assert any("limited by cgroup to 8.0 GiB" in n for n in p.notes)


def test_cgroup_v2_max_means_no_limit():
    files = {"/proc/meminfo": MEMINFO_64G, "/proc/self/cgroup": V2_CGROUP, "/proc/self/mountinfo": V2_MOUNTS,
             "/sys/fs/cgroup/memory.max": "max\n", "/sys/fs/cgroup/memory.current": f"{3 * GiB}\n"}
    p = hw.probe(fake(files, cpu_count=2), measure=False)
    assert p.ram_total_bytes == 64 * GiB and p.ram_limit_bytes is None


def test_cgroup_v2_limit_on_an_ancestor():
    cgroup = "0::/user.slice/user-1000.slice/session-3.scope\n"
    mounts = "35 24 0:30 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    files = {"/proc/meminfo": MEMINFO_64G, "/proc/self/cgroup": cgroup, "/proc/self/mountinfo": mounts,
             "/sys/fs/cgroup/user.slice/user-1000.slice/session-3.scope/memory.max": "max\n",
             "/sys/fs/cgroup/user.slice/memory.max": f"{16 * GiB}\n",
             "/sys/fs/cgroup/user.slice/memory.current": f"{10 * GiB}\n"}
    assert hw.cgroup_dirs("memory", cgroup, mounts)[:4] == [
        "/sys/fs/cgroup/user.slice/user-1000.slice/session-3.scope", "/sys/fs/cgroup/user.slice/user-1000.slice",
        "/sys/fs/cgroup/user.slice", "/sys/fs/cgroup"]
    p = hw.probe(fake(files, cpu_count=2), measure=False)
    assert p.ram_total_bytes == 16 * GiB and p.ram_available_bytes == 6 * GiB


def test_cgroup_v1_memory_limit_and_huge_unlimited():
    mounts = ("31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"
              "35 31 0:32 /docker/abc /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n")
    base = {"/proc/meminfo": MEMINFO_64G, "/proc/self/cgroup": "4:memory:/docker/abc\n1:name=systemd:/\n",
            "/proc/self/mountinfo": mounts}
    limited = {**base, "/sys/fs/cgroup/memory/memory.limit_in_bytes": f"{8 * GiB}\n",
               "/sys/fs/cgroup/memory/memory.usage_in_bytes": f"{3 * GiB}\n",
               "/sys/fs/cgroup/memory/memory.stat": f"cache 10\ntotal_inactive_file {512 * MiB}\n"}
    p = hw.probe(fake(limited, cpu_count=2), measure=False)
    assert p.ram_total_bytes == 8 * GiB
    assert p.ram_available_bytes == 8 * GiB - 3 * GiB + 512 * MiB
    unlimited = {**base, "/sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n",
                 "/sys/fs/cgroup/memory/memory.usage_in_bytes": f"{3 * GiB}\n"}
    p = hw.probe(fake(unlimited, cpu_count=2), measure=False)
    assert p.ram_total_bytes == 64 * GiB and p.ram_limit_bytes is None


def test_limit_above_host_ram_is_ignored():
    files = {"/proc/meminfo": MEMINFO_64G, "/proc/self/cgroup": V2_CGROUP, "/proc/self/mountinfo": V2_MOUNTS,
             "/sys/fs/cgroup/memory.max": f"{128 * GiB}\n"}
    p = hw.probe(fake(files, cpu_count=2), measure=False)
    assert p.ram_total_bytes == 64 * GiB and p.ram_limit_bytes is None


# --- NVML ------------------------------------------------------------------------------------------------------

class FakeNVMLError(Exception):
    def __init__(self, value):
        super().__init__(value)
        self.value = value

    def __str__(self):
        return {12: "NVML Shared Library Not Found", 9: "Driver Not Loaded", 999: "Unknown Error"}.get(self.value,
                                                                                                       "err")


class FakeNVML:
    """A pynvml-shaped module: two GPUs, names as bytes (older pynvml) and str."""

    NVMLError = FakeNVMLError

    def __init__(self, *, init_error=None, fail_on_memory=False, devices=None, cc_error=False, bad_device=None):
        self.bad_device = bad_device
        self.init_error = init_error
        self.fail_on_memory = fail_on_memory
        self.cc_error = cc_error
        self.devices = devices if devices is not None else [
            (b"NVIDIA GeForce RTX 4090", 24564 * MiB, 24164 * MiB, (8, 9)),
            ("NVIDIA GeForce RTX 3090", 24576 * MiB, 20000 * MiB, (8, 6)),
        ]
        self.shutdown = 0

    def nvmlInit(self):
        if self.init_error:
            raise FakeNVMLError(self.init_error)

    def nvmlShutdown(self):
        self.shutdown += 1

    def nvmlSystemGetDriverVersion(self):
        return b"550.54.14"

    def nvmlDeviceGetCount(self):
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, h):
        return self.devices[h][0]

    def nvmlDeviceGetUUID(self, h):
        return f"GPU-{h}a{h}b-0000"

    def nvmlDeviceGetMemoryInfo(self, h):
        if self.fail_on_memory or h == self.bad_device:
            raise FakeNVMLError(999)

        class Mem:
            total, free = self.devices[h][1], self.devices[h][2]
        return Mem()

    def nvmlDeviceGetCudaComputeCapability(self, h):
        if self.cc_error:
            raise FakeNVMLError(999)
        return self.devices[h][3]


def _gpu_probe(nvml, env=None):
    return hw.probe(fake({"/proc/meminfo": MEMINFO_64G}, cpu_count=2, nvml=lambda: nvml, env=env), measure=False)


def test_nvml_two_gpus():
    nvml = FakeNVML()
    p = _gpu_probe(nvml)
    assert p.gpus == (
        GPU(0, "NVIDIA GeForce RTX 4090", 24564 * MiB, 24164 * MiB, (8, 9), "550.54.14"),
        GPU(1, "NVIDIA GeForce RTX 3090", 24576 * MiB, 20000 * MiB, (8, 6), "550.54.14"),
    )
    assert not any("no NVIDIA" in n for n in p.notes)
    assert nvml.shutdown == 1


def test_nvml_compute_capability_error_is_tolerated():
    p = _gpu_probe(FakeNVML(cc_error=True))
    assert len(p.gpus) == 2 and p.gpus[0].compute_capability is None


@pytest.mark.parametrize("nvml, reason", [
    (FakeNVML(init_error=12), "no NVIDIA GPU found (the NVIDIA driver library libnvidia-ml is not installed)"),
    (FakeNVML(init_error=9), "no NVIDIA GPU found (the NVIDIA driver is not loaded)"),
    (FakeNVML(init_error=999), "no NVIDIA GPU found (NVML: Unknown Error)"),
    (FakeNVML(fail_on_memory=True), "no NVIDIA GPU found (NVML: Unknown Error)"),
    (FakeNVML(devices=[]), "no NVIDIA GPU found (NVML reports no devices)"),
])
def test_nvml_failures_give_a_cpu_only_profile(nvml, reason):
    p = _gpu_probe(nvml)
    assert p.gpus == ()
    assert reason in p.notes


def test_nvml_skips_a_broken_gpu():
    p = _gpu_probe(FakeNVML(bad_device=0))
    assert [(g.index, g.name) for g in p.gpus] == [(0, "NVIDIA GeForce RTX 3090")]
    assert "GPU 0 skipped: NVML: Unknown Error" in p.notes


@pytest.mark.parametrize("visible, names", [
    ("1", ["NVIDIA GeForce RTX 3090"]),
    ("1,0", ["NVIDIA GeForce RTX 3090", "NVIDIA GeForce RTX 4090"]),
    ("0,7,1", ["NVIDIA GeForce RTX 4090"]),       # CUDA stops at the first invalid entry
    ("0,0", ["NVIDIA GeForce RTX 4090"]),          # and at a repeated one
    ("GPU-1a1b", ["NVIDIA GeForce RTX 3090"]),     # a UUID prefix
    (" 0 , 1 ", ["NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 3090"]),
])
def test_cuda_visible_devices(visible, names):
    p = _gpu_probe(FakeNVML(), env={"CUDA_VISIBLE_DEVICES": visible})
    assert [g.name for g in p.gpus] == names
    assert [g.index for g in p.gpus] == list(range(len(names)))
    if len(names) < 2:
        assert any("using 1 of 2 GPUs" in n for n in p.notes)


@pytest.mark.parametrize("visible", ["", "-1", "NoDevFiles"])
def test_cuda_visible_devices_hiding_all(visible):
    p = _gpu_probe(FakeNVML(), env={"CUDA_VISIBLE_DEVICES": visible})
    assert p.gpus == ()
    assert f"no NVIDIA GPU found (CUDA_VISIBLE_DEVICES={visible!r} hides all 2 GPUs)" in p.notes


def test_no_pynvml():
    p = hw.probe(fake({"/proc/meminfo": MEMINFO_64G}, cpu_count=2), measure=False)
    assert p.gpus == () and "no NVIDIA GPU found (nvidia-ml-py is not installed)" in p.notes


# --- macOS -----------------------------------------------------------------------------------------------------

def test_macos_apple_silicon_unified_memory():
    sysctl = {"machdep.cpu.brand_string": "Apple M2 Max", "hw.memsize": str(96 * GiB), "hw.physicalcpu": "12",
              "hw.logicalcpu": "12", "hw.optional.arm.FEAT_DotProd": "1", "hw.optional.arm.FEAT_I8MM": "0"}
    p = hw.probe(fake({}, system="Darwin", machine="arm64", sysctl=sysctl, vm=(96 * GiB, 70 * GiB)), measure=False)
    assert p.unified_memory
    assert (p.cpu.model, p.cpu.physical_cores, p.cpu.arch) == ("Apple M2 Max", 12, "arm64")
    assert p.cpu.flags == {"neon", "dotprod"}
    assert p.ram_total_bytes == 96 * GiB and p.ram_available_bytes == 70 * GiB
    assert len(p.gpus) == 1 and p.gpus[0].vendor == "apple"
    assert p.gpus[0].total_bytes == 72 * GiB  # 75% of 96 GiB
    assert hw.apple_gpu("Apple M1", 16 * GiB).total_bytes == int(16 * GiB * 2 / 3)


def test_macos_intel_has_no_gpu():
    sysctl = {"machdep.cpu.brand_string": "Intel(R) Core(TM) i9-9880H", "hw.memsize": str(32 * GiB),
              "hw.physicalcpu": "8", "hw.logicalcpu": "16", "hw.optional.avx2_0": "1"}
    p = hw.probe(fake({}, system="Darwin", machine="x86_64", sysctl=sysctl, vm=(32 * GiB, 20 * GiB)), measure=False)
    assert not p.unified_memory and p.gpus == ()
    assert "avx2" in p.cpu.flags
    assert any(n.startswith("no NVIDIA GPU found") for n in p.notes)


# --- disk and bandwidth ----------------------------------------------------------------------------------------

def test_disk_free_at_cache_dir_nearest_parent(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "not" / "yet" / "there"))
    seen = []
    src = fake({"/proc/meminfo": MEMINFO_64G}, cpu_count=2)
    object.__setattr__(src, "disk_free", lambda path: seen.append(path) or 42)
    assert hw.probe(src, measure=False).disk_free_bytes == 42
    assert seen == [tmp_path / "not" / "yet" / "there"]
    assert hw.nearest_existing(tmp_path / "not" / "yet" / "there") == tmp_path
    assert hw.ProbeSources().disk_free(tmp_path / "missing") > 0


def test_bandwidth_is_measured_once_and_cached():
    src = fake({"/proc/cpuinfo": CPUINFO_2S, "/proc/meminfo": MEMINFO_64G}, bandwidth=26.5)
    assert hw.probe(src, measure=False).memory_bandwidth_gbps is None
    assert src._measure_calls == []
    assert hw.probe(src).memory_bandwidth_gbps == 26.5
    assert hw.probe(src).memory_bandwidth_gbps == 26.5
    assert hw.probe(src, measure=False).memory_bandwidth_gbps == 26.5
    assert len(src._measure_calls) == 1
    cache = json.loads((dirs.home() / "hardware-cache.json").read_text())
    assert cache["Intel(R) Xeon(R) Gold 6248R CPU @ 3.00GHz"]["memory_bandwidth_gbps"] == 26.5


def test_unwritable_home_only_costs_a_remeasurement(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("LLMRUN_HOME", str(tmp_path / "file" / "home"))  # cannot be created: not a directory
    src = fake({"/proc/cpuinfo": CPUINFO_2S, "/proc/meminfo": MEMINFO_64G}, bandwidth=26.5)
    assert hw.probe(src).memory_bandwidth_gbps == 26.5
    assert hw.probe(src).memory_bandwidth_gbps == 26.5
    assert len(src._measure_calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_corrupt_bandwidth_cache_is_remeasured():
    dirs.home().mkdir(parents=True, exist_ok=True)
    (dirs.home() / "hardware-cache.json").write_text("{not json")
    src = fake({"/proc/cpuinfo": CPUINFO_2S, "/proc/meminfo": MEMINFO_64G}, bandwidth=30.0)
    assert hw.probe(src).memory_bandwidth_gbps == 30.0


def _cached(model: str = "Intel(R) Xeon(R) Gold 6248R CPU @ 3.00GHz") -> dict:
    return json.loads((dirs.home() / "hardware-cache.json").read_text())[model]


def test_a_figure_measured_on_a_busy_machine_is_measured_again_once_it_is_quiet():
    """Issue 12: 13.8 GB/s measured while the machine was busy was kept for good (20-22 GB/s quietly), and
    decided the plan from then on."""
    files = {"/proc/cpuinfo": CPUINFO_2S, "/proc/meminfo": MEMINFO_64G}
    busy = fake(files, bandwidth=13.8, load=2.0)
    assert hw.probe(busy).memory_bandwidth_gbps == 13.8
    assert _cached()["load_per_cpu"] == 2.0
    assert hw.probe(busy).memory_bandwidth_gbps == 13.8 and len(busy._measure_calls) == 1   # still busy: kept
    quiet = fake(files, bandwidth=21.5, load=0.1)
    assert hw.probe(quiet, measure=False).memory_bandwidth_gbps == 13.8 and quiet._measure_calls == []  # plan
    assert hw.probe(quiet).memory_bandwidth_gbps == 21.5                    # quiet now: measured again
    assert _cached() | {"measured_at": None} == {"memory_bandwidth_gbps": 21.5, "load_per_cpu": 0.1,
                                                 "measured_at": None}
    assert hw.probe(quiet).memory_bandwidth_gbps == 21.5 and len(quiet._measure_calls) == 1  # a quiet figure stays


def test_a_lower_figure_never_replaces_a_higher_one():
    files = {"/proc/cpuinfo": CPUINFO_2S, "/proc/meminfo": MEMINFO_64G}
    assert hw.probe(fake(files, bandwidth=21.5, load=0.1)).memory_bandwidth_gbps == 21.5
    assert hw.probe(fake(files, bandwidth=13.8, load=2.0), remeasure=True).memory_bandwidth_gbps == 21.5
    assert _cached()["memory_bandwidth_gbps"] == 21.5
    busy_then = fake(files, bandwidth=[14.0, 12.0], load=[3.0, 0.1])
    hw.cached_memory_bandwidth("other cpu", busy_then.measure_bandwidth, load=busy_then.load)      # 14.0, busy
    assert hw.cached_memory_bandwidth("other cpu", busy_then.measure_bandwidth, load=busy_then.load) == 14.0


def test_an_older_cache_without_the_load_is_measured_again_when_quiet():
    dirs.home().mkdir(parents=True, exist_ok=True)
    (dirs.home() / "hardware-cache.json").write_text(json.dumps(
        {"Intel(R) Xeon(R) Gold 6248R CPU @ 3.00GHz": {"memory_bandwidth_gbps": 13.8}}))
    files = {"/proc/cpuinfo": CPUINFO_2S, "/proc/meminfo": MEMINFO_64G}
    assert hw.probe(fake(files, bandwidth=22.0, load=None)).memory_bandwidth_gbps == 13.8   # load unknown: kept
    assert hw.probe(fake(files, bandwidth=22.0, load=0.05)).memory_bandwidth_gbps == 22.0


def test_measure_memory_bandwidth_for_real():
    gbps = hw.measure_memory_bandwidth(size_bytes=64 * MiB, repeats=2)
    assert 0.5 < gbps < 5000


# --- this machine ----------------------------------------------------------------------------------------------

def test_real_probe_of_this_machine():
    p = hw.probe(measure=False)
    assert p.cpu.physical_cores >= 1 and p.cpu.logical_cores >= p.cpu.physical_cores
    assert 1 <= p.cpu.threads <= p.cpu.logical_cores
    assert p.ram_total_bytes > 0 and 0 < p.ram_available_bytes <= p.ram_total_bytes
    assert p.disk_free_bytes is not None and p.disk_free_bytes > 0
    if not p.gpus:
        assert any(n.startswith("no NVIDIA GPU found (") for n in p.notes)
    if platform.machine() in ("x86_64", "AMD64"):
        assert "avx2" in p.cpu.flags


# --- profiles --------------------------------------------------------------------------------------------------

SHIPPED = ["laptop-16gb", "rtx3060-12gb", "rtx4090-24gb", "2x-rtx3090", "a100-80gb", "3x-a100-80gb",
           "8x-h100-80gb", "m2-max-96gb", "workstation-256gb", "cluster-host-64gb", "ci-2core-24gb"]


def test_all_shipped_profiles_load():
    assert set(SHIPPED) <= set(profiles.list_profiles())
    for name in profiles.list_profiles():
        p = profiles.load_profile(name)
        assert p.name == name and p.description and p.memory_bandwidth_gbps
        assert p.cpu.physical_cores >= 1 and p.ram_total_bytes >= p.ram_available_bytes > 0
        for g in p.gpus:
            assert 0 < g.free_bytes < g.total_bytes or g.vendor == "apple"
            assert g.vendor == "apple" or (g.name.startswith("NVIDIA ") and g.compute_capability)


def test_profile_details():
    p = profiles.load_profile("rtx4090-24gb")
    assert p.gpus[0].name == "NVIDIA GeForce RTX 4090"
    assert p.gpus[0].total_bytes == 24564 * MiB
    assert 23.5 * GiB < p.gpus[0].free_bytes < 23.7 * GiB
    assert p.gpus[0].compute_capability == (8, 9)
    assert len(profiles.load_profile("8x-h100-80gb").gpus) == 8
    assert profiles.load_profile("8x-h100-80gb").ram_total_bytes > 1.9 * 1024 * GiB
    assert len(profiles.load_profile("2x-rtx3090").gpus) == 2
    mac = profiles.load_profile("m2-max-96gb")
    assert mac.unified_memory and mac.gpus[0].vendor == "apple"
    assert profiles.load_profile("laptop-16gb").gpus == () and profiles.load_profile("laptop-16gb").cpu.physical_cores == 8
    assert profiles.load_profile("workstation-256gb").gpus == ()


def test_round_trip_and_save(tmp_path):
    names = ("2x-rtx3090", "m2-max-96gb", "ci-2core-24gb")
    for name in names:
        p = profiles.load_profile(name)
        assert profiles.profile_from_dict(profiles.profile_to_dict(p), source=p.source) == p
        path = profiles.save_profile(p, tmp_path / "sub" / f"{name}.toml")
        again = profiles.load_profile(str(path))
        assert again.source == str(path)
        assert profiles.profile_to_dict(again) | {"source": ""} == profiles.profile_to_dict(p) | {"source": ""}
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == sorted(f"{n}.toml" for n in names)  # no temp


def test_save_to_an_unwritable_place_is_a_usage_error(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(UsageError, match="cannot write hardware profile") as e:
        profiles.save_profile(profiles.load_profile("laptop-16gb"), tmp_path / "file" / "p.toml")
    assert "--save" in e.value.hint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_probe_result_round_trips():
    p = hw.probe(fake({"/proc/cpuinfo": CPUINFO_2S, "/proc/meminfo": MEMINFO_64G}, nvml=lambda: FakeNVML()),
                 measure=False)
    assert profiles.profile_from_dict(profiles.profile_to_dict(p)) == p


def test_unknown_profile_lists_names():
    with pytest.raises(UsageError) as e:
        profiles.load_profile("rtx4090")
    assert "did you mean: rtx4090-24gb" in e.value.message
    assert "laptop-16gb" in e.value.hint and "m2-max-96gb" in e.value.hint
    with pytest.raises(UsageError, match="does not exist"):
        profiles.load_profile("/nonexistent/machine.toml")


BASE = """
name = "t"
[cpu]
model = "x"
cores = 4
threads = 8
[ram]
total = "16 GiB"
"""


@pytest.mark.parametrize("text, key", [
    ("name = 't'\n[ram]\ntotal = 1\n", "cpu: missing table"),
    (BASE.replace('cores = 4', 'cores = "four"'), "cpu.cores: expected a positive number"),
    (BASE.replace('cores = 4', 'cores = 0'), "cpu.cores: expected a positive number"),
    (BASE.replace('threads = 8', ''), "cpu.threads: missing"),
    (BASE.replace('"16 GiB"', '"lots"'), "ram.total: cannot read 'lots' as a size"),
    (BASE + 'available = "32 GiB"\n', "ram.available: 32.0 GiB is more than ram.total"),
    (BASE + '[[gpus]]\nname = "g"\ntotal = "8 GiB"\ncompute_capability = "eight"\n', "gpus[0].compute_capability"),
    (BASE + '[[gpus]]\nname = "g"\n', "gpus[0].total: missing"),
    (BASE + '[[gpus]]\nname = "g"\ntotal = "8 GiB"\nfree = "9 GiB"\n', "gpus[0].free"),
    (BASE + '[[gpus]]\nname = "g"\ntotal = "8 GiB"\nvendor = "amd"\n', "gpus[0].vendor"),
    ("gpus = 3\n" + BASE, "gpus: expected an array of tables"),
    (BASE.replace('name = "t"', 'name = "t"\nmemory_bandwidth_gbps = -1'), "memory_bandwidth_gbps"),
    (BASE + "[disk\n", "not valid TOML"),
])
def test_malformed_profiles_name_the_key(tmp_path, text, key):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        profiles.load_profile(str(path))
    assert key in e.value.message
    assert str(path) in e.value.message


def test_minimal_profile_defaults(tmp_path):
    path = tmp_path / "mini.toml"
    path.write_text(BASE)
    p = profiles.load_profile(str(path))
    assert p.ram_available_bytes == 16 * GiB and p.gpus == () and p.cpu.usable_cores == 8 and p.cpu.threads == 4
    assert p.source == str(path) and p.disk_free_bytes is None and p.memory_bandwidth_gbps is None


def test_configs_dir_env(tmp_path, monkeypatch):
    (tmp_path / "hardware").mkdir()
    (tmp_path / "hardware" / "mine.toml").write_text(BASE)
    monkeypatch.setenv("LLMRUN_CONFIGS", str(tmp_path))
    assert profiles.list_profiles() == ["mine"]
    assert profiles.load_profile("mine").name == "t"


def test_overrides():
    p = profiles.load_profile("m2-max-96gb")
    o = profiles.with_overrides(p, gpus=[24 * GiB, 12 * GiB], ram=64 * GiB)
    assert [g.name for g in o.gpus] == ["NVIDIA GPU (override)"] * 2
    assert [g.free_bytes for g in o.gpus] == [24 * GiB, 12 * GiB] and [g.index for g in o.gpus] == [0, 1]
    assert not o.unified_memory
    assert o.ram_total_bytes == o.ram_available_bytes == 64 * GiB
    assert o.cpu == p.cpu
    assert profiles.with_overrides(p, ram=8 * GiB).gpus == p.gpus
    laptop = profiles.load_profile("laptop-16gb")
    cpu_only = hw.probe(fake({"/proc/meminfo": MEMINFO_64G}, cpu_count=2), measure=False)
    assert any("no NVIDIA" in n for n in cpu_only.notes)
    assert not any("no NVIDIA" in n for n in profiles.with_overrides(cpu_only, gpus=[8 * GiB]).notes)
    assert profiles.with_overrides(laptop).ram_total_bytes == laptop.ram_total_bytes


def test_resolve_hardware_from_the_cli_helpers():
    from runner.cli.common import resolve_hardware

    p = resolve_hardware("rtx4090-24gb", ("10GiB",), "32GiB")
    assert p.gpus[0].free_bytes == 10 * GiB and p.ram_total_bytes == 32 * GiB
    with pytest.raises(UsageError, match="--gpu"):
        resolve_hardware("rtx4090-24gb", ("lots",), None)


def test_shipped_profile_files_are_where_settings_say():
    assert (Path(dirs.configs_dir()) / "hardware" / "rtx4090-24gb.toml").is_file()


def test_cgroup_dirs_namespaced_and_escaped_mounts():
    mounts = r"35 31 0:32 /docker/abc /sys/fs/cgroup/my\040memory rw - cgroup cgroup rw,memory" + "\n"
    assert hw.cgroup_dirs("memory", "4:memory:/\n", mounts)[0] == "/sys/fs/cgroup/my memory"
    assert hw.cgroup_dirs("memory", "4:memory:/docker/abc/inner\n", mounts)[:2] == [
        "/sys/fs/cgroup/my memory/inner", "/sys/fs/cgroup/my memory"]
    assert hw.cgroup_dirs("memory", None, None) == ["/sys/fs/cgroup", "/sys/fs/cgroup/memory"]


def test_no_ram_information_is_a_hardware_error():
    from runner.core.errors import HardwareError

    with pytest.raises(HardwareError, match="cannot tell how much RAM") as e:
        hw.probe(fake({}, cpu_count=2), measure=False)
    assert "--hardware" in e.value.hint


def test_remeasure_keeps_the_best_value():
    src = fake({"/proc/cpuinfo": CPUINFO_2S, "/proc/meminfo": MEMINFO_64G}, bandwidth=10.0)
    assert hw.probe(src).memory_bandwidth_gbps == 10.0
    object.__setattr__(src, "measure_bandwidth", lambda: 26.0)
    assert hw.probe(src).memory_bandwidth_gbps == 10.0  # cached: not measured again
    assert hw.probe(src, remeasure=True).memory_bandwidth_gbps == 26.0
    object.__setattr__(src, "measure_bandwidth", lambda: 12.0)  # a busy machine measures low
    assert hw.probe(src, remeasure=True).memory_bandwidth_gbps == 26.0
    assert hw.probe(src, measure=False).memory_bandwidth_gbps == 26.0
