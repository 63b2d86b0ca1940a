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
import os
import re
import threading
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
    Captures nest: on exit an enclosing capture gets the log back; after the outermost one llama.cpp is silenced
    (llama-cpp-python's own callback would print everything to the terminal). Every ctypes callback handed to
    llama.cpp stays referenced (module-level list): a collected callback would crash the process."""
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
    _ACTIVE.append(_callback)
    llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))
    try:
        yield capture
    finally:
        _ACTIVE.remove(_callback)
        # keep `_callback` itself referenced: a message a llama.cpp thread is printing right now may still reach it
        llama_cpp.llama_log_set(_ACTIVE[-1] if _ACTIVE else _silent_callback(), ctypes.c_void_p(0))


_KEEP_ALIVE: list = []
_ACTIVE: list = []
_SILENT: list = []
_STDERR_LOCK = threading.Lock()


@contextlib.contextmanager
def capture_stderr() -> Iterator[LogCapture]:
    """What is written to file descriptor 2 while the block runs (some llama.cpp code, the grammar parser among
    it, prints to C's stderr instead of its log callback). The descriptor is process-wide: captures take turns
    (a lock), and what other threads wrote in the meantime is in the capture too, for the caller to pass on
    (`pass_on`)."""
    import os
    import sys
    import tempfile

    capture = LogCapture()
    with _STDERR_LOCK, tempfile.TemporaryFile() as tmp:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield capture
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            capture.chunks.append(tmp.read().decode("utf-8", errors="replace"))


def pass_on(text: str) -> None:
    """Write `text` (what a capture caught that was not the caller's) to stderr after all."""
    import sys

    if text:
        sys.stderr.write(text)
        sys.stderr.flush()


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


# ---------------------------------------------------------------------------------------------------------------
# Measuring harness: load a model once, create one context per setting, record llama.cpp's buffers and the RSS.
# Run it in a child process (`python -m runner.engine.buffers MODEL CONTEXTS_JSON`) so each model's memory is
# measured from a clean process and given back to the OS afterwards.

def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _file_rss(path: str) -> int:
    """Bytes of `path`'s mapped pages resident in this process (the sum of Rss over its mappings in smaps).
    Clean file pages are the only ones the kernel may drop under memory pressure without swap; the accuracy
    check counts the ones it dropped back in (runner.plan.accuracy)."""
    real = os.path.realpath(path)
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 5)
            if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:   # a mapping's header line
                inside = len(head) == 6 and head[5].strip() == real
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1]) * 1024
    return total


def _reset_peak_rss() -> bool:
    """Linux resets VmHWM to the current RSS when 5 is written to clear_refs."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_contexts(model_path: str, contexts: list[dict], *, n_threads: int | None = None,
                     n_gpu_layers: int = 0, rpc_servers: tuple[str, ...] = ()) -> dict:
    """Load `model_path` once (mmap, CPU), then for each dict in `contexts` (keys: n_ctx, n_ubatch, n_batch,
    flash_attn, n_seq_max, type_k, type_v, swa_full, embeddings, decode_tokens) create a context, decode `decode_tokens` tokens (default
    1) in one batch, and record the logged buffers, VmRSS and the peak RSS (VmHWM, reset before each context).
    Sizes are bytes. `rpc_servers` are registered first (llama.cpp RPC workers, `runner.cluster`), so
    `n_gpu_layers` offloads to them as it would to GPUs."""
    import os
    import time

    import llama_cpp

    from runner.core.errors import EngineError

    llama_cpp.llama_backend_init()
    if rpc_servers:  # this runs in a child process (measure_in_subprocess): an unreachable worker aborts only it
        from runner.engine import ggml

        ggml.register_rpc_servers(tuple(rpc_servers))
    from runner.core.run_settings import kv_type
    result: dict = {"model": model_path, "rss_start": _status_kib("VmRSS") * 1024, "contexts": []}
    with capture_llama_logs() as cap:
        t0 = time.monotonic()
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        model = llama_cpp.llama_model_load_from_file(os.fsencode(model_path), mparams)
        if not model:
            raise EngineError(f"llama.cpp could not load {model_path}", hint=cap.text[-2000:])
        result["load_s"] = time.monotonic() - t0
        result["load_buffers"] = parse_buffers(cap.lines)
        result["rss_loaded"] = _status_kib("VmRSS") * 1024
        result["hwm_loaded"] = _status_kib("VmHWM") * 1024
        n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
        threads = n_threads or max(1, len(os.sched_getaffinity(0)))
        try:
            for spec in contexts:
                _reset_peak_rss()
                start = len(cap.chunks)
                cp = llama_cpp.llama_context_default_params()
                cp.n_ctx = int(spec["n_ctx"])
                cp.n_ubatch = int(spec.get("n_ubatch", 512))
                cp.n_batch = int(spec.get("n_batch", max(cp.n_ctx, cp.n_ubatch)))
                cp.n_seq_max = int(spec.get("n_seq_max", 1))
                cp.n_threads = cp.n_threads_batch = threads
                fa = spec.get("flash_attn", False)
                cp.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO if fa == "auto" else
                                      llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if fa else
                                      llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
                cp.type_k = kv_type(spec.get("type_k", "f16")).ggml_type
                cp.type_v = kv_type(spec.get("type_v", "f16")).ggml_type
                cp.swa_full = bool(spec.get("swa_full", True))
                cp.embeddings = bool(spec.get("embeddings", False))
                t1 = time.monotonic()
                ctx = llama_cpp.llama_init_from_model(model, cp)
                if not ctx:
                    raise EngineError(f"llama.cpp could not create a context {spec}",
                                      hint="".join(cap.chunks[start:])[-2000:])
                try:
                    n_dec = max(1, min(int(spec.get("decode_tokens", 1)), cp.n_ctx))
                    t2 = time.monotonic()
                    done = 0
                    while done < n_dec:       # llama_batch_get_one: positions follow on, last token's logits
                        n = min(cp.n_batch, n_dec - done)
                        ids = [(300 + 7 * (done + i)) % n_vocab for i in range(n)]
                        tokens = (llama_cpp.llama_token * n)(*ids)
                        rc = llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(tokens, n))
                        if rc != 0:
                            raise EngineError(f"llama_decode returned {rc} for {spec}")
                        done += n
                    t3 = time.monotonic()
                    entry = {"spec": spec, "buffers": parse_buffers("".join(cap.chunks[start:]).splitlines()),
                             "rss": _status_kib("VmRSS") * 1024, "hwm": _status_kib("VmHWM") * 1024,
                             "model_file_rss": _file_rss(model_path),
                             "ctx_s": t2 - t1, "decode_s": t3 - t2, "decoded": n_dec}
                finally:
                    llama_cpp.llama_free(ctx)
                result["contexts"].append(entry)
        finally:
            llama_cpp.llama_model_free(model)
    return result


def measure_in_subprocess(model_path: str, contexts: list[dict], *, timeout: float = 900, n_gpu_layers: int = 0,
                          rpc_servers: tuple[str, ...] = ()) -> dict:
    """measure_contexts in a fresh Python process (clean RSS baseline; memory returned to the OS after)."""
    import json
    import subprocess
    import sys

    from runner.core.errors import EngineError

    import os

    # glibc keeps freed blocks below its (dynamic) mmap threshold in the heap; a fixed 1 MiB threshold returns
    # every buffer of a freed context to the OS, so each context is measured as if in a fresh process.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576")
    options = {"n_gpu_layers": n_gpu_layers, "rpc_servers": list(rpc_servers)}
    proc = subprocess.run([sys.executable, "-m", "runner.engine.buffers", model_path, json.dumps(contexts),
                           json.dumps(options)], capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise EngineError(f"measuring {model_path} failed (exit {proc.returncode})", hint=proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    import json as _json
    import sys as _sys

    _opts = _json.loads(_sys.argv[3]) if len(_sys.argv) > 3 else {}
    _out = measure_contexts(_sys.argv[1], _json.loads(_sys.argv[2]), n_gpu_layers=_opts.get("n_gpu_layers", 0),
                            rpc_servers=tuple(_opts.get("rpc_servers", ())))
    print(_json.dumps(_out))
