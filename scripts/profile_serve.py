#!/usr/bin/env python3
"""Where a streamed request's time goes inside `llmrun serve`, beside llama-server at the same load.

It starts `llmrun serve` with timers wrapped around the engine thread's work (nothing in llmrun changes; the
wrappers live in this script's child process), then for each client level sends streamed chat requests and
reports:

- per decode step of the engine thread: the time inside `llama_decode` and the Python time around it (building
  the batch, sampling, detokenizing, stop strings/tool parsing, handing deltas to the event loop, and the loop
  between steps), by batch composition (tokens in the step, of them prompt tokens);
- per generated token: the CPU seconds of each thread of the server process (/proc/PID/task/TID/stat): the
  engine thread (also one of llama.cpp's compute threads), llama.cpp's other compute threads, the event loop
  (uvicorn, the middleware, JSON, SSE framing) and the rest;
- with `--llama-server`: the same levels against llama-server with the same model, threads, slots and context,
  its own per-token decode time from its `timings`, and the CPU per token of its threads;
- with `--py-spy SECONDS`: a py-spy sample (`--idle` off) of llmrun during the busiest level, summarized by the
  functions that hold most samples on each thread.

    python scripts/profile_serve.py [--model PATH] [--threads 2] [--parallel 8] [--ctx 1024] [--clients 1,8]
                                    [--requests 16] [--tokens 64] [--llama-server] [--py-spy 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))


# ------------------------------------------------------------------------------------------------ the child

def child(out: Path, argv: list[str]) -> None:
    """Run `llmrun <argv>` with timers around the engine thread's work; write them to `out` at exit."""
    import atexit

    sys.path.insert(0, str(REPO))
    import llama_cpp as lc

    from runner.engine import batching, generation, native

    now = time.perf_counter_ns
    steps: list[list[float]] = []      # per step: wall start, step ns, decode ns, tokens, outputs, sub-timers...
    acc: dict[str, int] = defaultdict(int)
    calls: Counter[str] = Counter()
    info: dict[str, Any] = {"pid": os.getpid()}
    last_end = [0]

    def timed(name: str, fn):
        def wrapper(*a, **k):
            t = now()
            try:
                return fn(*a, **k)
            finally:
                acc[name] += now() - t
                calls[name] += 1
        return wrapper

    real_decode = lc.llama_decode

    def decode(ctx, batch):
        t = now()
        try:
            return real_decode(ctx, batch)
        finally:
            acc["decode"] += now() - t
            acc["n_tokens"] += batch.n_tokens
            acc["n_out"] += sum(1 for i in range(batch.n_tokens) if batch.logits[i])

    lc.llama_decode = decode
    real_step = batching.LlamaEngine._step

    def step(self, batch, *rest):
        t = now()
        gap = t - last_end[0] if last_end[0] else 0
        acc.clear()
        try:
            return real_step(self, batch, *rest)
        finally:
            end = now()
            last_end[0] = end
            if acc.get("n_tokens"):
                steps.append([time.time(), end - t, acc["decode"], acc["n_tokens"], acc["n_out"], gap,
                              acc["sample"], acc["piece"], acc["feed"], acc["push"]])

    batching.LlamaEngine._step = step
    real_run = batching.LlamaEngine._run

    def run(self):
        info["engine_tid"] = threading.get_native_id()
        out.with_suffix(".tid").write_text(str(info["engine_tid"]))
        return real_run(self)

    batching.LlamaEngine._run = run
    native.Sampler.sample = timed("sample", native.Sampler.sample)
    native.Detokenizer.piece = timed("piece", native.Detokenizer.piece)
    generation.Output.feed = timed("feed", generation.Output.feed)
    generation.GenerationHandle.push = timed("push", generation.GenerationHandle.push)

    def dump() -> None:
        out.write_text(json.dumps({"info": info, "steps": steps}))

    atexit.register(dump)
    if os.environ.get("PROFILE_UVICORN"):       # e.g. "asyncio,h11": A/B of uvicorn's event loop and HTTP parser
        import uvicorn

        loop_impl, http_impl = os.environ["PROFILE_UVICORN"].split(",")
        real_init = uvicorn.Config.__init__

        def init(self, *a, **k):
            real_init(self, *a, **{**k, "loop": loop_impl, "http": http_impl})

        uvicorn.Config.__init__ = init
    from runner.cli import main as cli_main

    sys.argv = ["llmrun", *argv]
    cli_main()


# ------------------------------------------------------------------------------------------------ the parent

def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of every thread of `pid`."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def cpu_per_token(before: dict[int, float], after: dict[int, float], tokens: int, pid: int,
                  engine_tid: int | None) -> dict[str, float]:
    """ms of CPU per generated token: main thread (event loop), engine thread, the busiest other thread (llama.cpp's
    OpenMP worker with 2 threads), all others."""
    delta = {t: after.get(t, 0.0) - before.get(t, 0.0) for t in after}
    main = delta.pop(pid, 0.0)
    engine = delta.pop(engine_tid, 0.0) if engine_tid else 0.0
    others = sorted(delta.values(), reverse=True)
    worker = others[0] if others else 0.0
    rest = sum(others[1:])
    k = 1000 / max(tokens, 1)
    return {"main": main * k, "engine": engine * k, "worker": worker * k, "rest": rest * k,
            "total": (main + engine + worker + rest) * k}


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def step_summary(steps: list[list[float]], t0: float, t1: float) -> dict[str, Any]:
    """The engine's steps between wall times t0 and t1, by composition (tokens, outputs)."""
    sel = [s for s in steps if t0 <= s[0] <= t1]
    by: dict[tuple[int, int], list[list[float]]] = defaultdict(list)
    for s in sel:
        by[(int(s[3]), int(s[4]))].append(s)
    rows = []
    for (n, o), ss in sorted(by.items(), key=lambda kv: -len(kv[1]))[:8]:
        rows.append({"tokens": n, "outputs": o, "steps": len(ss),
                     "step_ms": med([s[1] / 1e6 for s in ss]), "decode_ms": med([s[2] / 1e6 for s in ss]),
                     "python_us": med([(s[1] - s[2]) / 1e3 for s in ss]),
                     "gap_us": med([s[5] / 1e3 for s in ss[1:]]),
                     "sample_us_per_out": med([s[6] / 1e3 / max(o, 1) for s in ss]),
                     "piece_us_per_out": med([s[7] / 1e3 / max(o, 1) for s in ss]),
                     "feed_us_per_out": med([s[8] / 1e3 / max(o, 1) for s in ss]),
                     "push_us_per_out": med([s[9] / 1e3 / max(o, 1) for s in ss])})
    total = sum(s[1] for s in sel) / 1e9
    decode = sum(s[2] for s in sel) / 1e9
    gaps = sum(s[5] for s in sel[1:]) / 1e9
    return {"steps": len(sel), "step_s": total, "decode_s": decode, "python_in_step_s": total - decode,
            "between_steps_s": gaps, "by_composition": rows}


def run_level(base: str, clients: int, requests: int, tokens: int, seed: int):
    import bench_serve

    return asyncio.run(bench_serve.run_load(base, clients, max(1, requests // clients), tokens, seed0=seed))


def py_spy_summary(raw: str, top: int = 12) -> dict[str, list[tuple[str, float]]]:
    """Collapsed stacks ("thread;frame;frame count") → per thread, the share of samples in which each function
    appears (inclusive), highest first."""
    per: dict[str, Counter[str]] = defaultdict(Counter)
    totals: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = stack.split(";")
        thread = frames[0]
        totals[thread] += int(n)
        for f in set(frames[1:]):
            per[thread][f] += int(n)
    return {t: [(f, round(100 * c / totals[t], 1)) for f, c in per[t].most_common(top)]
            for t in sorted(totals, key=lambda t: -totals[t])[:4]}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(Path(sys.argv[2]), sys.argv[4:])
        return
    import httpx

    import bench_serve

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(bench_serve.DEMO))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--clients", default="1,8")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--llama-server", action="store_true")
    ap.add_argument("--llama-server-args", default="")
    ap.add_argument("--py-spy", type=float, default=0, metavar="SECONDS")
    ap.add_argument("--serve-args", default="", help="extra `llmrun serve` arguments")
    ap.add_argument("--env", action="append", default=[], metavar="K=V", help="environment of the llmrun server")
    ap.add_argument("--json", dest="json_out")
    a = ap.parse_args()
    model = Path(a.model).expanduser()
    levels = [int(c) for c in a.clients.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="profile_serve."))
    out = tmp / "steps.json"
    port = bench_serve.free_port()
    serve = ["serve", "--model", str(model), "--name", "bench", "--port", str(port), "--threads", str(a.threads),
             "--parallel", str(a.parallel), "--ctx", str(a.ctx), "--queue", "256", "--log-level", "warning",
             *shlex.split(a.serve_args)]
    env = {**os.environ, "PYTHONPATH": str(REPO), **dict(kv.split("=", 1) for kv in a.env)}
    servers = []
    proc = subprocess.Popen([sys.executable, __file__, "--child", str(out), "--", *serve], env=env, cwd=REPO,
                            stdout=open(tmp / "llmrun.log", "wb"), stderr=subprocess.STDOUT)
    servers.append(("llmrun", proc, port))
    if a.llama_server:
        bin_dir = bench_serve.find_llama_bin(None)
        if bin_dir is None:
            raise SystemExit("llama-server is not built: scripts/build_llama_server.sh")
        lport = bench_serve.free_port()
        lproc = subprocess.Popen([str(bin_dir / "llama-server"), "-m", str(model), "--alias", "bench", "--host",
                                  "127.0.0.1", "--port", str(lport), "-np", str(a.parallel), "-c",
                                  str(a.parallel * a.ctx), "-t", str(a.threads), "-tb", str(a.threads), "-ngl", "0",
                                  *shlex.split(a.llama_server_args)],
                                 stdout=open(tmp / "llama-server.log", "wb"), stderr=subprocess.STDOUT)
        servers.append(("llama-server", lproc, lport))
    report: dict[str, Any] = {"env": {"model": model.name, "threads": a.threads, "parallel": a.parallel,
                                      "ctx": a.ctx, "tokens": a.tokens, "requests": a.requests,
                                      "load_before": os.getloadavg()[0], "serve_args": a.serve_args,
                                      "env": a.env}, "levels": []}
    try:
        for name, p, pt in servers:
            deadline = time.monotonic() + 120
            while True:
                if p.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"{name} did not start; see {tmp}")
                try:
                    if httpx.get(f"http://127.0.0.1:{pt}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            run_level(f"http://127.0.0.1:{pt}", 1, 2, 8, 0)     # warm-up
        engine_tid = None
        for rnd in range(a.rounds):
            for c in levels:
                order = servers if (rnd + levels.index(c)) % 2 == 0 else servers[::-1]
                for name, p, pt in order:
                    spy = None
                    if name == "llmrun" and a.py_spy and c == max(levels) and rnd == 0:
                        spy = subprocess.Popen(["py-spy", "record", "-p", str(p.pid), "-d", str(a.py_spy), "-r",
                                                "200", "-f", "raw", "-o", str(tmp / "spy.txt"), "--threads",
                                                "--nonblocking"], stdout=subprocess.DEVNULL,
                                               stderr=subprocess.DEVNULL)
                    before, t0 = thread_cpu(p.pid), time.time()
                    results, wall = run_level(f"http://127.0.0.1:{pt}", c, a.requests, a.tokens, 1000 * rnd)
                    after, t1 = thread_cpu(p.pid), time.time()
                    if spy is not None:
                        spy.wait()
                    import bench_stats

                    row = bench_stats.summarize(results, wall)
                    tokens = sum(r.tokens for r in results if r.ok)
                    level: dict[str, Any] = {"server": name, "clients": c, "round": rnd + 1, "tok_s": row["tok_s"],
                                             "ttft_p50": row["ttft_p50"], "ttft_p95": row["ttft_p95"],
                                             "itl_p50_ms": 1000 * row["itl_p50"], "errors": row["errors"],
                                             "load": os.getloadavg()[0]}
                    if name == "llmrun":
                        if engine_tid is None:
                            engine_tid = _engine_tid(out, p)
                        level["cpu_ms_per_token"] = cpu_per_token(before, after, tokens, p.pid, engine_tid)
                        level["t"] = (t0, t1)
                    else:
                        level["cpu_ms_per_token"] = cpu_per_token(before, after, tokens, p.pid, None)
                        decode = [r.server_decode_ms for r in results if r.ok and r.server_decode_ms is not None]
                        level["server_decode_ms_p50"] = med(decode)
                    report["levels"].append(level)
                    cpu = level["cpu_ms_per_token"]
                    print(f"round {rnd + 1} {name:12s} clients={c:2d} {row['tok_s']:6.1f} tok/s TTFT p50 "
                          f"{row['ttft_p50']:.3f} p95 {row['ttft_p95']:.3f}  CPU ms/token: main {cpu['main']:.2f} "
                          f"engine {cpu['engine']:.2f} worker {cpu['worker']:.2f} rest {cpu['rest']:.2f}  "
                          f"(load {level['load']:.1f})", file=sys.stderr, flush=True)
    finally:
        for name, p, _ in servers:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
    data = json.loads(out.read_text()) if out.exists() else {"steps": []}
    for level in report["levels"]:
        if level["server"] == "llmrun":
            level["engine"] = step_summary(data["steps"], *level.pop("t"))
    if (tmp / "spy.txt").exists():
        report["py_spy"] = py_spy_summary((tmp / "spy.txt").read_text())
    report["env"]["load_after"] = os.getloadavg()[0]
    text = json.dumps(report, indent=1)
    if a.json_out:
        Path(a.json_out).write_text(text + "\n")
    print(text)


def _engine_tid(out: Path, p: subprocess.Popen) -> int | None:
    """The engine thread's id, as the child wrote it when the thread started."""
    f = out.with_suffix(".tid")
    return int(f.read_text()) if f.exists() else None


if __name__ == "__main__":
    main()
