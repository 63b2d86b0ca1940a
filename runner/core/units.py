"""Byte sizes: parse what users type, print what users read. Binary units (GiB) unless a decimal unit is named."""

from __future__ import annotations

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
