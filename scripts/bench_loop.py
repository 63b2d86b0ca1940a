#!/usr/bin/env python3
"""Event-loop latency under load: while CLIENTS clients each stream chats whose long history (121 messages)
overflows the context, so that the engine drops old turns, GET /health is probed every 50 ms. Every probe's
latency is the time the event loop took to get to it: p50/p95/p99/max.

    python scripts/bench_loop.py [--model PATH] [--seconds 20] [--clients 8] [--ctx 512] [--runs 2]

It starts `llmrun serve --parallel CLIENTS --ctx CTX` itself (the demo model by default). tests/test_server_loop.py
runs `measure` with a shorter load and generous bounds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
DEMO = Path.home() / ".cache" / "llmrun" / "test-cache" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def long_history(n: int = 121, seed: int = 0) -> list[dict]:
    """A system prompt and n-1 alternating user/assistant turns (the last one the user's), far over 512 tokens."""
    msgs = [{"role": "system", "content": "You are a helpful assistant."}]
    for i in range(n - 1):
        role = "user" if i % 2 == 0 else "assistant"
        msgs.append({"role": role, "content": f"Turn {i} of conversation {seed}: tell me about rivers, mountains and "
                                              f"the weather in town number {i}."})
    if msgs[-1]["role"] != "user":
        msgs.append({"role": "user", "content": "And finally, what is the capital of France?"})
    return msgs


def _client(base: str, stop: threading.Event, seed: int, tokens: int, done: list[int], errors: list[str]) -> None:
    body = {"model": "demo", "messages": long_history(seed=seed), "stream": True, "max_tokens": tokens,
            "temperature": 0.7, "seed": seed}
    with httpx.Client(timeout=120) as http:
        while not stop.is_set():
            try:
                with http.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
                    if r.status_code != 200:
                        errors.append(f"{r.status_code}: {r.read()[:200]!r}")
                        continue
                    if "left out" not in r.headers.get("x-llmrun-notice", ""):
                        errors.append("no notice of dropped turns: the history did not overflow the context")
                    for _ in r.iter_lines():
                        pass
                done.append(1)
            except httpx.HTTPError as e:
                errors.append(repr(e))


def measure(base: str, *, seconds: float = 20.0, clients: int = 8, probe_every: float = 0.05,
            tokens: int = 32) -> dict:
    """Load `base` with `clients` streaming chats for `seconds` while probing /health every `probe_every` s."""
    stop = threading.Event()
    done: list[int] = []
    errors: list[str] = []
    threads = [threading.Thread(target=_client, args=(base, stop, i, tokens, done, errors), daemon=True)
               for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(1.0)                      # every client has submitted at least once
    lat: list[float] = []
    with httpx.Client(timeout=30) as http:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.perf_counter()
            r = http.get(f"{base}/health")
            lat.append(time.perf_counter() - t0)
            if r.status_code != 200:
                errors.append(f"/health {r.status_code}")
            time.sleep(max(0.0, probe_every - lat[-1]))
    stop.set()
    for t in threads:
        t.join(timeout=120)
    lat.sort()

    def q(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000

    return {"probes": len(lat), "p50_ms": q(0.50), "p95_ms": q(0.95), "p99_ms": q(0.99), "max_ms": lat[-1] * 1000,
            "chats": len(done), "errors": errors[:5], "n_errors": len(errors)}


def serve(model: Path, clients: int, ctx: int, threads: int):
    proc = subprocess.Popen([sys.executable, "-m", "runner", "serve", "--model", str(model), "--name", "demo",
                             "--port", "0", "--parallel", str(clients), "--ctx", str(ctx), "--threads", str(threads),
                             "--log-level", "warning"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    while True:
        line = proc.stderr.readline()
        if not line:
            raise SystemExit("server exited")
        m = re.search(r"on http://127\.0\.0\.1:(\d+)", line)
        if m:
            break
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    base = f"http://127.0.0.1:{m.group(1)}"
    while httpx.get(f"{base}/health").status_code != 200:
        time.sleep(0.1)
    return proc, base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=DEMO)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()
    for run in range(args.runs):
        proc, base = serve(args.model, args.clients, args.ctx, args.threads)
        try:
            print(json.dumps({"run": run + 1, **measure(base, seconds=args.seconds, clients=args.clients)}))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)


if __name__ == "__main__":
    main()
