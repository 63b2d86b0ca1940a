#!/usr/bin/env python3
"""Serving benchmark: `llmrun serve` vs `python -m llama_cpp.server` (llama-cpp-python's own server) on the same
model and threads, in one run. For 1, 4, 8, 16 concurrent streaming clients: aggregate decode tok/s and time to
first token p50/p95. `--soak`: 1,000 requests at 16 concurrency against llmrun: 5xx count and server RSS growth
after warm-up. `--write-docs` puts the tables in docs/benchmarks.md under "## Serving".

llama_cpp.server needs extra packages (pip install sse-starlette starlette-context pydantic-settings); they are
not llmrun dependencies. Usage:
    python scripts/bench_serve.py [--model PATH] [--threads 2] [--tokens 64] [--soak] [--write-docs]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent
DEMO = Path.home() / ".cache" / "llmrun" / "test-cache" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["Write a long story about a lighthouse keeper.", "Explain how rain forms, in detail.",
           "Describe a journey across the desert.", "Tell me about the history of bread."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int, env: dict | None = None, timeout: float = 120) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
                            env={**os.environ, **(env or {})})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {' '.join(cmd)}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"server did not start: {' '.join(cmd)}")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class Result:
    status: int
    ttft: float | None
    tokens: int
    seconds: float


async def one_stream(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int,
                     seed: int) -> Result:
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0.8, "seed": seed, "stream": True}
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return Result(r.status_code, None, 0, time.perf_counter() - t0)
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line.strip() == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if obj.get("choices") and obj["choices"][0].get("delta", {}).get("content"):
                tokens += 1         # both servers send one token per content chunk
                if ttft is None:
                    ttft = time.perf_counter() - t0
    return Result(200, ttft, tokens, time.perf_counter() - t0)


async def run_load(base: str, model: str, clients: int, requests_per_client: int, max_tokens: int):
    url = f"{base}/v1/chat/completions"
    results: list[Result] = []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def worker(w: int):
            for k in range(requests_per_client):
                results.append(await one_stream(client, url, model, PROMPTS[(w + k) % len(PROMPTS)], max_tokens,
                                                seed=1000 * w + k))
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(clients)))
        wall = time.perf_counter() - t0
    return results, wall


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def summarize(results: list[Result], wall: float) -> dict:
    ok = [r for r in results if r.status == 200]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    tokens = sum(r.tokens for r in ok)
    return {"requests": len(results), "errors": len(results) - len(ok), "tokens": tokens,
            "tok_s": tokens / wall if wall else 0.0, "ttft_p50": pct(ttfts, 0.5), "ttft_p95": pct(ttfts, 0.95),
            "wall_s": wall}


def bench(args) -> tuple[list[dict], dict]:
    model = Path(args.model)
    levels = [int(x) for x in args.clients.split(",")]
    py = sys.executable
    rows = []
    load_before = os.getloadavg()[0]
    port_l, port_b = free_port(), free_port()
    llmrun_cmd = [py, "-m", "runner", "serve", "--model", str(model), "--name", "bench", "--port", str(port_l),
                  "--threads", str(args.threads), "--parallel", str(max(levels)), "--ctx", str(args.ctx),
                  "--queue", "256", "--log-level", "warning"]
    baseline_cmd = [py, "-m", "llama_cpp.server", "--model", str(model), "--model_alias", "bench", "--port",
                    str(port_b), "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
                    "--n_ctx", str(args.ctx), "--interrupt_requests", "False", "--verbose", "False"]
    # both servers up at once (an idle one uses no CPU); each level runs on both back to back, alternating which
    # goes first, so a change in background load hits both alike
    servers = [("llama_cpp.server", start(baseline_cmd, port_b, env={"PYTHONPATH": str(REPO)}), port_b),
               ("llmrun serve", start(llmrun_cmd, port_l, env={"PYTHONPATH": str(REPO)}), port_l)]
    try:
        for _, _, port in servers:
            asyncio.run(run_load(f"http://127.0.0.1:{port}", "bench", 1, 1, 8))          # warm-up
        for i, c in enumerate(levels):
            order = servers if i % 2 == 0 else servers[::-1]
            for name, _, port in order:
                per_client = max(1, args.requests // c)
                results, wall = asyncio.run(run_load(f"http://127.0.0.1:{port}", "bench", c, per_client, args.tokens))
                row = {"server": name, "clients": c, **summarize(results, wall), "load": os.getloadavg()[0]}
                rows.append(row)
                print(f"{name:18s} clients={c:2d}  {row['tok_s']:7.1f} tok/s  TTFT p50 {row['ttft_p50']:.3f}s "
                      f"p95 {row['ttft_p95']:.3f}s  ({row['requests']} req, {row['errors']} errors, load "
                      f"{row['load']:.1f})", flush=True)
    finally:
        for _, proc, _ in servers:
            stop(proc)
    env = {"model": model.name, "threads": args.threads, "tokens": args.tokens, "ctx": args.ctx,
           "parallel": max(levels), "cpu": platform.processor() or platform.machine(),
           "cores": psutil.cpu_count(logical=True), "load_before": load_before,
           "load_after": os.getloadavg()[0], "requests": args.requests}
    return rows, env


def soak(args) -> dict:
    port = free_port()
    cmd = [sys.executable, "-m", "runner", "serve", "--model", str(args.model), "--name", "bench", "--port",
           str(port), "--threads", str(args.threads), "--parallel", "16", "--ctx", "512", "--queue", "64",
           "--log-level", "warning"]
    proc = start(cmd, port, env={"PYTHONPATH": str(REPO)})
    base = f"http://127.0.0.1:{port}"
    rss = lambda: psutil.Process(proc.pid).memory_info().rss  # noqa: E731
    statuses: dict[int, int] = {}
    try:
        async def go():
            url = f"{base}/v1/chat/completions"
            counter = iter(range(args.soak_requests))
            samples = {}
            async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=32)) as client:
                async def worker(w):
                    for i in counter:
                        r = await one_stream(client, url, "bench", PROMPTS[i % len(PROMPTS)], args.soak_tokens, i)
                        statuses[r.status] = statuses.get(r.status, 0) + 1
                        if i == args.soak_warmup:
                            samples["warm"] = rss()
                await asyncio.gather(*(worker(w) for w in range(16)))
            samples["end"] = rss()
            return samples
        t0 = time.perf_counter()
        samples = asyncio.run(go())
        wall = time.perf_counter() - t0
        metrics = httpx.get(f"{base}/metrics").text
    finally:
        stop(proc)
    growth = (samples["end"] - samples["warm"]) / samples["warm"]
    fivexx = sum(n for s, n in statuses.items() if s >= 500)
    m = re.search(r'llmrun_time_to_first_token_seconds_count (\d+)', metrics)
    out = {"requests": sum(statuses.values()), "statuses": statuses, "5xx": fivexx, "rss_warm_mib":
           samples["warm"] / 2 ** 20, "rss_end_mib": samples["end"] / 2 ** 20, "rss_growth_pct": 100 * growth,
           "wall_s": wall, "ttft_observed": int(m.group(1)) if m else None}
    print(json.dumps(out, indent=2))
    return out


def decode_scaling(args, batches=(1, 8)) -> dict:
    """Time llama_decode per engine step with 1 and 8 sequences decoding (the engine's own continuous batching,
    no HTTP): shows whether decode on this machine is compute-bound (time grows with the batch) or
    memory-bound (batching is nearly free)."""
    import threading

    import llama_cpp as lc

    from runner.engine.batching import start_engine
    from runner.engine.types import ChatMessage, SamplingParams
    from runner.core.run_settings import RunSettings

    steps: list[tuple[int, float]] = []      # (tokens in the batch, seconds)
    real = lc.llama_decode

    def timed(ctx, batch):
        t = time.perf_counter()
        try:
            return real(ctx, batch)
        finally:
            steps.append((batch.n_tokens, time.perf_counter() - t))

    lc.llama_decode = timed
    out = {}
    try:
        engine = start_engine(args.model, RunSettings(n_ctx=1024 * max(batches), n_parallel=max(batches)),
                             n_parallel=max(batches), threads=args.threads)
        try:
            def one(i):
                engine.chat([ChatMessage("user", PROMPTS[i % len(PROMPTS)])],
                            SamplingParams(max_tokens=64, seed=i)).result()
            one(0)
            for b in batches:
                steps.clear()
                ts = [threading.Thread(target=one, args=(i,)) for i in range(b)]
                for t in ts:
                    t.start()
                for t in ts:
                    t.join()
                pure = [dt for n, dt in steps if n == b]       # steps decoding exactly one token per sequence
                out[b] = 1000 * statistics.median(pure) if pure else float("nan")
        finally:
            engine.close()
    finally:
        lc.llama_decode = real
    print("llama_decode ms per decode step (median):", {k: round(v, 1) for k, v in out.items()}, flush=True)
    return out


def markdown(rows: list[dict], env: dict, soak_result: dict | None) -> str:
    by = {(r["server"], r["clients"]): r for r in rows}
    levels = sorted({r["clients"] for r in rows})
    lines = ["## Serving", "",
             f"`python scripts/bench_serve.py` — {env['model']}, {env['threads']} threads, streaming chat requests of "
             f"up to {env['tokens']} tokens (temperature 0.8, one token per streamed chunk counted), "
             f"{env['requests']} requests per level, {env['cores']} logical cores, 1-minute load average "
             f"{env['load_before']:.2f} before and {env['load_after']:.2f} after the run (other work on the machine). "
             f"`llmrun serve --parallel {env['parallel']} --ctx {env['ctx']}` vs `python -m llama_cpp.server "
             f"--n_ctx {env['ctx']} --interrupt_requests False` (llama-cpp-python 0.3.36; its server needs "
             "`pip install sse-starlette starlette-context pydantic-settings`, installed into the venv only for "
             "this benchmark). Both servers are up during the whole run; each level runs on both back to back, "
             "alternating which goes first.", "",
             "| clients | llama_cpp.server tok/s | llmrun tok/s | ratio | TTFT p50 / p95 llama_cpp.server (s) | "
             "TTFT p50 / p95 llmrun (s) | errors |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for c in levels:
        b, l = by.get(("llama_cpp.server", c)), by.get(("llmrun serve", c))
        if not (b and l):
            continue
        ratio = l["tok_s"] / b["tok_s"] if b["tok_s"] else float("nan")
        lines.append(f"| {c} | {b['tok_s']:.1f} | {l['tok_s']:.1f} | {ratio:.2f}x | {b['ttft_p50']:.3f} / "
                     f"{b['ttft_p95']:.3f} | {l['ttft_p50']:.3f} / {l['ttft_p95']:.3f} | "
                     f"{b['errors']} / {l['errors']} |")
    scaling = env.get("decode_ms")
    if scaling:
        b = sorted(scaling, key=int)
        lines += ["", f"Decode scaling on this machine (`--decode-scaling`, the engine alone, median of steps that decode "
                      "one token per sequence): llama_decode takes "
                      + ", ".join(f"{scaling[k]:.0f} ms per step with {k} sequence{'s' if int(k) > 1 else ''}"
                                  for k in b)
                      + f" ({scaling[b[-1]] / scaling[b[0]]:.1f}x the time for {b[-1]}x the tokens)."]
    if soak_result:
        s = soak_result
        lines += ["", f"Soak (`--soak`): {s['requests']} streaming requests at 16 concurrency against llmrun "
                      f"(`--parallel 16`), statuses {s['statuses']}, **{s['5xx']} 5xx**; server RSS "
                      f"{s['rss_warm_mib']:.0f} MiB after warm-up, {s['rss_end_mib']:.0f} MiB at the end "
                      f"(**{s['rss_growth_pct']:+.1f}%**), {s['wall_s']:.0f} s."]
    return "\n".join(lines) + "\n"


def write_docs(section: str) -> None:
    path = REPO / "docs" / "benchmarks.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    pattern = re.compile(r"^## Serving\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(section + "\n", text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEMO))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--clients", default="1,4,8,16")
    ap.add_argument("--requests", type=int, default=32, help="requests per concurrency level (at least 1/client)")
    ap.add_argument("--soak", action="store_true")
    ap.add_argument("--soak-only", action="store_true")
    ap.add_argument("--soak-requests", type=int, default=1000)
    ap.add_argument("--soak-tokens", type=int, default=16)
    ap.add_argument("--soak-warmup", type=int, default=200)
    ap.add_argument("--soak-result", metavar="FILE", help="include a soak result saved earlier (JSON) in the docs")
    ap.add_argument("--save", metavar="FILE", help="also save the raw results as JSON")
    ap.add_argument("--decode-scaling", action="store_true", help="also time llama_decode at 1 and 8 sequences")
    ap.add_argument("--from-saved", metavar="FILE", help="only render a --save file as markdown")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    if args.from_saved:
        saved = json.loads(Path(args.from_saved).read_text())
        md = markdown(saved["rows"], saved["env"], saved["soak"])
        print(md)
        if args.write_docs:
            write_docs(md)
        return
    rows, env = ([], None) if args.soak_only else bench(args)
    if env is not None and args.decode_scaling:
        env["decode_ms"] = {str(k): v for k, v in decode_scaling(args).items()}
    soak_result = soak(args) if (args.soak or args.soak_only) else None
    if soak_result is None and args.soak_result:
        soak_result = json.loads(Path(args.soak_result).read_text())
    if args.save:
        Path(args.save).write_text(json.dumps({"rows": rows, "env": env, "soak": soak_result}, indent=2))
    if env is not None:
        md = markdown(rows, env, soak_result)
        print(md)
        if args.write_docs:
            write_docs(md)


if __name__ == "__main__":
    main()
