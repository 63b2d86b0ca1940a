"""llama.cpp's own account of what it allocated: capture its log and read the buffer-size lines.

llama.cpp prints one line per backend buffer when it loads a model and creates a context, e.g.

    load_tensors:   CPU_Mapped model buffer size =  3543.08 MiB
    load_tensors:   CPU_REPACK model buffer size =  3544.31 MiB
    llama_context:  CPU  output buffer size =     0.12 MiB
    llama_kv_cache:        CPU KV buffer size =  2048.00 MiB
    sched_reserve:        CPU compute buffer size =   320.01 MiB

`parse_buffers` turns such lines into {"CPU_Mapped model": bytes, "CPU KV": bytes, ...}; the key is the buffer
name followed by its kind (model, KV, compute, output, RS), exactly as printed (CUDA0, RPC0[host:port], ...).
Lines of the same key are summed (llama.cpp may print one KV line per cache, e.g. SWA and non-SWA).

`capture_llama_logs()` routes llama.cpp's log into a list while active. llama_cpp is imported only inside it, so
this module is cheap to import.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator

_BUFFER_RE = re.compile(
    r"(?P<name>[A-Za-z0-9_]+(?:\[[^\]]*\])?(?:_[A-Za-z0-9_]+)?)\s+"
    r"(?P<kind>model|KV|compute|output|RS|K|V)\s+buffer size\s*=\s*(?P<value>[0-9.]+)\s*(?P<unit>MiB|KiB|GiB|B)\b"
)
_UNIT = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


def parse_buffers(lines: Iterable[str]) -> dict[str, int]:
    """Buffer-size log lines -> {"<buffer name> <kind>": bytes}. Other lines are ignored. Values are printed with
    two decimals in MiB, so each is exact to about ±5 KiB."""
    out: dict[str, int] = {}
    for line in lines:
        for m in _BUFFER_RE.finditer(line):
            key = f"{m.group('name')} {m.group('kind')}"
            out[key] = out.get(key, 0) + round(float(m.group("value")) * _UNIT[m.group("unit")])
    return out


class LogCapture:
    """The text llama.cpp logged while a capture was active. `lines` joins continuation pieces into lines."""

    def __init__(self) -> None:
        self.chunks: list[str] = []

    @property
    def text(self) -> str:
        return "".join(self.chunks)

    @property
    def lines(self) -> list[str]:
        return self.text.splitlines()

    def buffers(self) -> dict[str, int]:
        return parse_buffers(self.lines)


@contextlib.contextmanager
def capture_llama_logs(*, echo: bool = False) -> Iterator[LogCapture]:
    """Route llama.cpp's log (all levels) into a LogCapture while the block runs; optionally echo to stderr.
    On exit llama.cpp's log is silenced again (llama-cpp-python's default when verbose=False is to print it,
    which a caller that captures does not want). The ctypes callback is kept referenced for as long as
    llama.cpp may call it (module-level list), since a collected callback would crash the process."""
    import ctypes
    import sys

    import llama_cpp

    capture = LogCapture()

    @llama_cpp.llama_log_callback
    def _callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        piece = text.decode("utf-8", errors="replace") if text else ""
        capture.chunks.append(piece)
        if echo:
            sys.stderr.write(piece)

    _KEEP_ALIVE.append(_callback)
    llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))
    try:
        yield capture
    finally:
        llama_cpp.llama_log_set(_silent_callback(), ctypes.c_void_p(0))
        _KEEP_ALIVE.remove(_callback)


_KEEP_ALIVE: list = []
_SILENT: list = []


def _silent_callback():
    """A callback that drops every message (created once, kept alive forever)."""
    if not _SILENT:
        import ctypes

        import llama_cpp

        @llama_cpp.llama_log_callback
        def _drop(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            return None

        _SILENT.append(_drop)
    return _SILENT[0]
