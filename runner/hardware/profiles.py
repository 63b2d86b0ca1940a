"""Hardware profiles: a `HardwareProfile` as a TOML file, so every step can plan for a machine you don't have.

    name = "rtx4090-24gb"
    description = "Desktop: one GeForce RTX 4090 24 GB, 64 GB DDR5"
    memory_bandwidth_gbps = 60.0
    unified_memory = false            # optional

    [cpu]
    model = "AMD Ryzen 9 7950X 16-Core Processor"
    arch = "x86_64"
    cores = 16                        # physical cores
    threads = 32                      # logical cores
    usable_cores = 32                 # optional: affinity / cgroup quota (default: threads)
    flags = ["avx", "avx2", "avx512f", "f16c", "fma"]

    [ram]
    total = "64 GiB"                  # a size string or a number of bytes
    available = "58 GiB"              # optional (default: total)

    [[gpus]]                          # one table per GPU; none for a CPU-only machine
    name = "NVIDIA GeForce RTX 4090"
    total = "24564 MiB"
    free = "24176 MiB"
    compute_capability = "8.9"
    driver = "550.54.14"              # optional
    vendor = "nvidia"                 # optional: "apple" for unified memory

    [disk]
    free = "1.2 TiB"                  # at the model cache directory (optional)

The profiles shipped with llmrun live in `dirs.configs_dir()/hardware/NAME.toml`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
from pathlib import Path
from typing import Any

from runner.core import dirs
from runner.core.files import atomic_write_text
from runner.core.errors import ConfigError, UsageError
from runner.core.units import format_size, parse_size
from runner.hardware.types import CPU, GPU, HardwareProfile


def profiles_dir() -> Path:
    return dirs.configs_dir() / "hardware"


def list_profiles() -> list[str]:
    """Names of the shipped hardware profiles, sorted."""
    d = profiles_dir()
    return sorted(p.stem for p in d.glob("*.toml")) if d.is_dir() else []


def load_profile(name_or_path: str | os.PathLike) -> HardwareProfile:
    """A shipped profile by name (`rtx4090-24gb`) or a TOML file by path."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    looks_like_path = text.endswith(".toml") or os.sep in text or "/" in text
    if not looks_like_path:
        candidate = profiles_dir() / f"{text}.toml"
        if candidate.is_file():
            path = candidate
        else:
            names = list_profiles()
            close = difflib.get_close_matches(text, names, n=3, cutoff=0.5)
            msg = f"unknown hardware profile {text!r}"
            if close:
                msg += "; did you mean: " + ", ".join(close) + "?"
            raise UsageError(msg, hint="profiles: " + (", ".join(names) or "(none found in " + str(profiles_dir())
                                                                     + ")") + "; or give the path of a TOML file")
    if not path.is_file():
        raise UsageError(f"hardware profile file {str(path)!r} does not exist",
                         hint="give a profile name (`llmrun probe --list-profiles`) or the path of a TOML file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read hardware profile {path}: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"hardware profile {path} is not valid TOML: {e}") from e
    data.pop("source", None)  # where it came from is this file
    return profile_from_dict(data, source=str(path), default_name=path.stem)


# ---------------------------------------------------------------------------------------------------------------

def profile_to_dict(profile: HardwareProfile) -> dict[str, Any]:
    """The TOML/JSON form (sizes in bytes). `profile_from_dict(profile_to_dict(p))` gives `p` back."""
    cpu = profile.cpu
    out: dict[str, Any] = {
        "name": profile.name,
        "description": profile.description,
        "source": profile.source,
        "unified_memory": profile.unified_memory,
        "cpu": {
            "model": cpu.model, "arch": cpu.arch, "cores": cpu.physical_cores, "threads": cpu.logical_cores,
            "usable_cores": cpu.usable_cores, "flags": sorted(cpu.flags),
        },
        "ram": {"total": profile.ram_total_bytes, "available": profile.ram_available_bytes},
        "gpus": [],
    }
    if cpu.quota_cores is not None:
        out["cpu"]["quota_cores"] = cpu.quota_cores
    if profile.ram_limit_bytes is not None:
        out["ram"]["cgroup_limit"] = profile.ram_limit_bytes
    if profile.host_ram_total_bytes is not None:
        out["ram"]["host_total"] = profile.host_ram_total_bytes
    if profile.memory_bandwidth_gbps is not None:
        out["memory_bandwidth_gbps"] = profile.memory_bandwidth_gbps
    for g in profile.gpus:
        entry: dict[str, Any] = {"index": g.index, "name": g.name, "vendor": g.vendor, "total": g.total_bytes,
                                 "free": g.free_bytes}
        if g.compute_capability is not None:
            entry["compute_capability"] = f"{g.compute_capability[0]}.{g.compute_capability[1]}"
        if g.driver is not None:
            entry["driver"] = g.driver
        out["gpus"].append(entry)
    if profile.disk_free_bytes is not None:
        out["disk"] = {"free": profile.disk_free_bytes}
    out["notes"] = list(profile.notes)
    return out


class _Reader:
    """Reads typed values out of a profile dict; every problem is a ConfigError naming the key."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"hardware profile {self.source}: {key}: {problem}",
                           hint="see configs/hardware/*.toml for the format")

    def table(self, data: dict, key: str, *, required: bool = True) -> dict:
        value = data.get(key.rsplit(".", 1)[-1])
        if value is None and not required:
            return {}
        if not isinstance(value, dict):
            raise self.fail(key, "missing table" if value is None else f"expected a table, got {value!r}")
        return value

    def get(self, data: dict, key: str, kinds: tuple[type, ...], what: str, default: Any = ..., *, path: str = ""):
        full = f"{path}.{key}" if path else key
        if key not in data:
            if default is ...:
                raise self.fail(full, f"missing (expected {what})")
            return default
        value = data[key]
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            raise self.fail(full, f"expected {what}, got {value!r}")
        return value

    def size(self, data: dict, key: str, default: int | None = None, *, path: str = "") -> int:
        """A required size, or `default` when the key is absent and a default is given."""
        if key not in data and default is not None:
            return default
        return self._size(data, key, path)

    def optional_size(self, data: dict, key: str, *, path: str = "") -> int | None:
        return self._size(data, key, path) if key in data else None

    def _size(self, data: dict, key: str, path: str) -> int:
        full = f"{path}.{key}" if path else key
        value = self.get(data, key, (int, float, str), "a size such as \"24 GiB\" or a number of bytes", path=path)
        try:
            n = parse_size(value, what=full)
        except UsageError as e:
            raise self.fail(full, f"cannot read {value!r} as a size (write it like \"24 GiB\" or 25769803776)") \
                from e
        return n

    def positive(self, data: dict, key: str, default: Any = ..., *, path: str = "", number=int):
        kinds = (int,) if number is int else (int, float)
        value = self.get(data, key, kinds, "a positive number", default, path=path)
        if value is not default and value <= 0:
            raise self.fail(f"{path}.{key}" if path else key, f"expected a positive number, got {value!r}")
        return value


def profile_from_dict(data: dict, *, source: str = "profile", default_name: str = "profile") -> HardwareProfile:
    """A HardwareProfile from its TOML/JSON form; a ConfigError names any missing or malformed key."""

    r = _Reader(source)
    if not isinstance(data, dict):
        raise r.fail("(top level)", "expected a table")
    cpu_t = r.table(data, "cpu")
    threads = r.positive(cpu_t, "threads", path="cpu")
    cores = r.positive(cpu_t, "cores", threads, path="cpu")
    flags = r.get(cpu_t, "flags", (list,), "a list of flag names", [], path="cpu")
    if not all(isinstance(f, str) for f in flags):
        raise r.fail("cpu.flags", f"expected a list of strings, got {flags!r}")
    quota = r.positive(cpu_t, "quota_cores", None, path="cpu", number=float)
    cpu = CPU(
        model=r.get(cpu_t, "model", (str,), "the CPU's model name", path="cpu"),
        arch=r.get(cpu_t, "arch", (str,), "an architecture such as x86_64 or arm64", "x86_64", path="cpu"),
        physical_cores=cores, logical_cores=threads,
        usable_cores=r.positive(cpu_t, "usable_cores", threads, path="cpu", number=float),
        flags=frozenset(f.lower() for f in flags), quota_cores=quota,
    )
    ram_t = r.table(data, "ram")
    total = r.size(ram_t, "total", path="ram")
    available = r.size(ram_t, "available", total, path="ram")
    if available > total:
        raise r.fail("ram.available", f"{format_size(available)} is more than ram.total ({format_size(total)})")
    gpus_raw = data.get("gpus", [])
    if not isinstance(gpus_raw, list) or not all(isinstance(g, dict) for g in gpus_raw):
        raise r.fail("gpus", "expected an array of tables ([[gpus]])")
    gpus = []
    for i, g in enumerate(gpus_raw):
        p = f"gpus[{i}]"
        g_total = r.size(g, "total", path=p)
        g_free = r.size(g, "free", g_total, path=p)
        if g_free > g_total:
            raise r.fail(f"{p}.free", f"{format_size(g_free)} is more than {p}.total ({format_size(g_total)})")
        cc_raw = r.get(g, "compute_capability", (str, int, float), "a version such as \"8.9\"", None, path=p)
        cc = None
        if cc_raw is not None:
            parts = str(cc_raw).split(".")
            if len(parts) != 2 or not all(x.isdigit() for x in parts):
                raise r.fail(f"{p}.compute_capability", f"expected a version such as \"8.9\", got {cc_raw!r}")
            cc = (int(parts[0]), int(parts[1]))
        vendor = r.get(g, "vendor", (str,), "\"nvidia\" or \"apple\"", "nvidia", path=p)
        if vendor not in ("nvidia", "apple"):
            raise r.fail(f"{p}.vendor", f"expected \"nvidia\" or \"apple\", got {vendor!r}")
        gpus.append(GPU(index=i, name=r.get(g, "name", (str,), "the GPU's name", path=p), total_bytes=g_total,
                        free_bytes=g_free, compute_capability=cc,
                        driver=r.get(g, "driver", (str,), "a driver version string", None, path=p), vendor=vendor))
    disk_t = r.table(data, "disk", required=False)
    bandwidth = r.positive(data, "memory_bandwidth_gbps", None, number=float)
    notes = r.get(data, "notes", (list,), "a list of strings", [])
    unified = r.get(data, "unified_memory", (bool,), "true or false", any(g.vendor == "apple" for g in gpus))
    return HardwareProfile(
        name=r.get(data, "name", (str,), "the profile's name", default_name),
        cpu=cpu, ram_total_bytes=total, ram_available_bytes=available, gpus=tuple(gpus),
        disk_free_bytes=r.optional_size(disk_t, "free", path="disk"), unified_memory=unified,
        memory_bandwidth_gbps=float(bandwidth) if bandwidth is not None else None,
        notes=tuple(str(n) for n in notes), source=r.get(data, "source", (str,), "a string", source),
        ram_limit_bytes=r.optional_size(ram_t, "cgroup_limit", path="ram"),
        host_ram_total_bytes=r.optional_size(ram_t, "host_total", path="ram"),
        description=r.get(data, "description", (str,), "a string", ""),
    )


def save_profile(profile: HardwareProfile, path: str | os.PathLike) -> Path:
    """Write `profile` as TOML, atomically. Returns the path written."""
    import tomli_w

    data = profile_to_dict(profile)
    data.pop("source", None)
    path = Path(path).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, tomli_w.dumps(data))
    except OSError as e:
        raise UsageError(f"cannot write hardware profile {path}: {e.strerror or e}",
                         hint="choose a writable path for --save") from e
    return path


def with_overrides(profile: HardwareProfile, gpus: list[int] | None = None, ram: int | None = None) -> HardwareProfile:
    """`gpus` (free bytes per GPU) replaces the GPU list with generic NVIDIA GPUs of that size; `ram` sets both
    total and available RAM."""

    changes: dict[str, Any] = {}
    notes = list(profile.notes)
    if gpus is not None:
        changes["gpus"] = tuple(GPU(index=i, name="NVIDIA GPU (override)", total_bytes=int(b), free_bytes=int(b))
                                for i, b in enumerate(gpus))
        changes["unified_memory"] = False
        notes = [n for n in notes if not n.startswith("no NVIDIA GPU found")]
        notes.append("GPUs overridden: " + ", ".join(format_size(b) for b in gpus))
    if ram is not None:
        changes["ram_total_bytes"] = changes["ram_available_bytes"] = int(ram)
        changes["ram_limit_bytes"] = None
        notes.append(f"RAM overridden: {format_size(ram)}")
    changes["notes"] = tuple(notes)
    return dataclasses.replace(profile, **changes)
