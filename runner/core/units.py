"""Byte sizes and durations: parse what users type, print what users read. Binary units (GiB) unless a decimal
unit is named; durations as Ollama takes them (seconds, or Go duration strings such as "5m")."""

from __future__ import annotations

import math
import re

from runner.core.errors import UsageError

KiB, MiB, GiB, TiB = 1024, 1024**2, 1024**3, 1024**4
_UNITS = {
    "": 1, "b": 1,
    "k": KiB, "kib": KiB, "kb": 1000,
    "m": MiB, "mib": MiB, "mb": 1000**2,
    "g": GiB, "gib": GiB, "gb": 1000**3,
    "t": TiB, "tib": TiB, "tb": 1000**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int | float, *, what: str = "size") -> int:
    """'24GiB', '24G', '64 GB', '512MiB', 1234 -> bytes. G/GiB are binary, GB is decimal."""
    if isinstance(text, bool):
        raise UsageError(f"{what}: expected a size such as 24GiB, got {text!r}")
    if isinstance(text, (int, float)):
        if text < 0:
            raise UsageError(f"{what}: a size cannot be negative ({text})")
        return int(text)
    m = _SIZE_RE.match(str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise UsageError(f"{what}: cannot read {text!r} as a size", hint="write it like 24GiB, 512MiB or 64GB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_size(n: int | float, *, decimals: int = 1) -> str:
    """Bytes -> '7.3 GiB' (binary units, as memory is sold and as llama.cpp logs it)."""
    n = float(n)
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, size in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size:
            return f"{sign}{n / size:.{decimals}f} {unit}"
    return f"{sign}{int(n)} B"


# ---------------------------------------------------------------------------------------------------- durations

FOREVER = math.inf                   # a duration that never ends (Ollama's negative keep_alive)
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_RE = re.compile(r"^([+-]?)((?:(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:ns|us|µs|ms|s|m|h))+)$")
_DURATION_PART_RE = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|ms|s|m|h)")
_NUMBER_RE = re.compile(r"^[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)$")


def parse_duration(value: str | int | float, *, what: str = "duration") -> float:
    """Seconds from what Ollama accepts for keep_alive: a number of seconds (10, 2.5) or a Go duration string
    ("5m", "1h30m", "300ms", "0"); a plain number in a string counts as seconds too. Any negative value means
    forever (FOREVER, math.inf)."""
    if isinstance(value, bool):
        raise UsageError(f"{what}: expected a duration such as 5m or 30s, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = str(value).strip()
        if _NUMBER_RE.match(text):
            seconds = float(text)
        else:
            m = _DURATION_RE.match(text)
            if not m:
                raise UsageError(f"{what}: cannot read {value!r} as a duration",
                                 hint='write it like "5m", "30s", "1h30m", a number of seconds, or -1 for forever')
            seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART_RE.findall(m.group(2)))
            if m.group(1) == "-":
                seconds = -seconds
    if math.isnan(seconds):
        raise UsageError(f"{what}: not a number")
    return FOREVER if seconds < 0 else seconds


def format_duration(seconds: float) -> str:
    """5.0 -> '5s', 300 -> '5m', 5400 -> '1h30m', FOREVER -> 'forever'."""
    if math.isinf(seconds):
        return "forever"
    if seconds < 60:
        return f"{seconds:g}s"
    whole = int(round(seconds))
    h, rest = divmod(whole, 3600)
    m, s = divmod(rest, 60)
    return (f"{h}h" if h else "") + (f"{m}m" if m else "") + (f"{s}s" if s else "")
