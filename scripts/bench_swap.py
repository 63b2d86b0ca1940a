#!/usr/bin/env python3
"""Model swap benchmark: `llmrun serve` with two models and a --max-memory that holds only one, requests
alternating between them, so every request swaps: unload the idle model, load the other, first token.

Reports, per case: the time to swap (from sending the request to its first streamed chunk, which the server sends
once the first token exists), the server's own unload and load times (from its log, and
llmrun_model_load_seconds_total / loads), the time to first token of the same request without a swap, and the server process's peak memory sampled every 10 ms from
/proc (VmRSS, and its anonymous and file-backed parts) against the budget and against what the server accounted
(the largest llmrun_memory_used_bytes seen).

Cases: the demo model (SmolLM2-135M Q4_1) registered under two names, and a 7B-shaped synthetic
(`llmrun synth llama-2-7b:Q4_0`: real tensor shapes, sparse zero data) registered under two names.

    python scripts/bench_swap.py [--swaps 10] [--big-swaps 3] [--no-big] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
DEMO = Path.home() / ".cache" / "llmrun" / "test-cache" / "SmolLM2-135M-Instruct.Q4_1.gguf"
MiB = 1024 ** 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_memory(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


class Sampler(threading.Thread):
    def __init__(self, pid: int, base: str):
        super().__init__(daemon=True)
        self.pid, self.base = pid, base
        self.peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                for k, v in proc_memory(self.pid).items():
                    self.peak[k] = max(self.peak[k], v)
            except (OSError, ValueError):
                return
            time.sleep(0.01)


WORDS = ["Apples", "Rivers", "Copper", "Winter", "Lanterns", "Granite", "Violins", "Harbors", "Meadows", "Comets",
         "Bridges", "Pepper", "Glaciers", "Orchids", "Tunnels", "Canyons", "Falcons", "Marble", "Deserts", "Islands"]
_count = [0]


def first_chunk_s(base: str, model: str, max_tokens: int = 4) -> float:
    """Seconds to the first streamed chunk of a raw completion whose first word differs from every other
    request's, so no request reuses another's KV prefix (every one evaluates its whole prompt)."""
    word = WORDS[_count[0] % len(WORDS)] + (f" {_count[0] // len(WORDS)}" if _count[0] >= len(WORDS) else "")
    _count[0] += 1
    t0 = time.perf_counter()
    first = None
    with httpx.stream("POST", f"{base}/v1/completions", timeout=600, json={
            "model": model, "prompt": f"{word} are interesting because", "max_tokens": max_tokens,
            "stream": True}) as r:
        if r.status_code != 200:
            raise SystemExit(f"{model}: HTTP {r.status_code}: {r.read().decode()}")
        for line in r.iter_lines():
            if line.startswith("data: ") and first is None:
                first = time.perf_counter() - t0
    return first if first is not None else float("nan")


def metric_values(base: str, name: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics").text
    return {m.group(1): float(m.group(2)) for m in re.finditer(rf'^{name}{{model="([^"]+)"}} ([0-9.e+]+)$', text, re.M)}


def used_bytes(base: str) -> int:
    m = re.search(r'^llmrun_memory_used_bytes{device="CPU"} (\d+)$', httpx.get(f"{base}/metrics").text, re.M)
    return int(m.group(1)) if m else 0


def case(label: str, path: Path, *, ctx: int, budget: int, swaps: int, threads: int) -> dict:
    home = Path(tempfile.mkdtemp(prefix="llmrun-swap-"))
    config = home / "models.toml"
    config.write_text(f'[models.a]\npath = "{path}"\n\n[models.b]\npath = "{path}"\n')
    port = free_port()
    env = {**os.environ, "LLMRUN_HOME": str(home), "HF_HUB_CACHE": str(home / "hf"), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "runner", "serve", "--config", str(config), "--port", str(port),
                             "--ctx", str(ctx), "--parallel", "1", "--threads", str(threads),
                             "--max-memory", f"{budget // MiB}MiB", "--log-level", "info"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    log: list[str] = []
    threading.Thread(target=lambda: log.extend(proc.stderr or ()), daemon=True).start()
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("server did not start: " + "".join(log))
            time.sleep(0.2)
        sampler = Sampler(proc.pid, base)
        sampler.start()
        first_chunk_s(base, "a")                                   # first load, not a swap
        warm = [first_chunk_s(base, "a") for _ in range(3)]        # loaded: no swap
        used_peak = used_bytes(base)
        swap_s = []
        for i in range(swaps):
            model = "b" if i % 2 == 0 else "a"
            swap_s.append(first_chunk_s(base, model))
            loaded = [m["name"] for m in httpx.get(f"{base}/api/ps").json()["models"]]
            assert loaded == [model], f"expected only {model} in memory, /api/ps says {loaded}"
            used_peak = max(used_peak, used_bytes(base))
        sampler.stop.set()
        sampler.join()
        loads = metric_values(base, "llmrun_model_loads_total")
        seconds = metric_values(base, "llmrun_model_load_seconds_total")
        load_mean = sum(seconds.values()) / max(sum(loads.values()), 1)
        evictions = sum(metric_values(base, "llmrun_model_evictions_total").values())
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    unloads = [float(m.group(1)) for m in map(re.compile(r"^unloaded \S+ in ([0-9.]+)s \(evicted").search, log) if m]
    return {"label": label, "budget": budget, "swaps": swaps, "evictions": int(evictions),
            "unload_mean": statistics.mean(unloads) if unloads else float("nan"),
            "swap_median": statistics.median(swap_s), "swap_min": min(swap_s), "swap_max": max(swap_s),
            "load_mean": load_mean, "warm_ttft": statistics.median(warm), "used_peak": used_peak, **sampler.peak}


def table(rows: list[dict]) -> str:
    head = ("| model (x2 names) | budget | swaps | time to swap: median (min–max) | unload | load | first token, "
            "no swap | peak RSS | peak RSS anon / file | peak accounted |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['label']} | {r['budget'] / MiB:.0f} MiB | {r['swaps']} ({r['evictions']} evictions) | "
                     f"{r['swap_median']:.2f} s ({r['swap_min']:.2f}–{r['swap_max']:.2f}) | {r['unload_mean']:.2f} s | "
                     f"{r['load_mean']:.2f} s | "
                     f"{r['warm_ttft']:.2f} s | {r['VmRSS'] / MiB:.0f} MiB | "
                     f"{r['RssAnon'] / MiB:.0f} / {r['RssFile'] / MiB:.0f} MiB | {r['used_peak'] / MiB:.0f} MiB |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--swaps", type=int, default=10)
    ap.add_argument("--big-swaps", type=int, default=3)
    ap.add_argument("--no-big", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    rows = [case("SmolLM2-135M Q4_1, ctx 1024", DEMO, ctx=1024, budget=350 * MiB, swaps=args.swaps,
                 threads=args.threads)]
    print(table(rows), flush=True)
    if not args.no_big:
        from runner.model.catalog import load_catalog
        from runner.model.synth import ensure_synth

        entry = load_catalog().get("llama-2-7b")
        big = ensure_synth(entry.shape, "Q4_0", name=entry.model)
        rows.append(case("llama-2-7b Q4_0 synthetic, ctx 512", big, ctx=512, budget=6 * 1024 * MiB,
                         swaps=args.big_swaps, threads=args.threads))
    print(table(rows))
    print(f"\n{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
