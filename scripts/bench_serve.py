#!/usr/bin/env python3
"""Serving benchmark: `llmrun serve` beside llama.cpp's own `llama-server` (the anchor) and llama-cpp-python's
`python -m llama_cpp.server`, in one run, on the same model, threads, slots and context per slot.

For 1, 4, 8 and 16 concurrent streaming chat clients it reports, per server: aggregate tok/s, time to first token
p50/p95, inter-token latency p50/p95 and the ratio to llama-server; plus llama-bench's tg/pp on the same build as
the ceiling (no server). Levels alternate between the servers (each level runs on every server back to back,
rotating which goes first), repeated for --rounds rounds; all servers stay up for the whole run. scripts/bench_stats.py
defines every number. Output: a markdown table on stdout and, with --json FILE, everything as JSON.

- llama-server and llama-bench come from scripts/build_llama_server.sh (the llama.cpp that the pinned
  llama-cpp-python vendors; about 8 minutes once, cached); without them that server is skipped with a note.
- llama_cpp.server needs packages llmrun does not: `pip install sse-starlette starlette-context pydantic-settings`
  (into the venv, for the benchmark only); without them it is skipped with a note.
- `--soak`: 1,000 streaming requests at 16 concurrent against llmrun: 5xx count and server RSS growth after warm-up.
- `--write-docs` puts the table into docs/benchmarks.md (a marked block under "## Serving").

    python scripts/bench_serve.py [--model PATH] [--threads 2] [--tokens 64] [--rounds 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_stats as stats  # noqa: E402  (scripts/bench_stats.py, beside this file)

DEMO = Path.home() / ".cache" / "llmrun" / "test-cache" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["Write a long story about a lighthouse keeper.", "Explain how rain forms, in detail.",
           "Describe a journey across the desert.", "Tell me about the history of bread."]
# the same sampling on every server (each has its own defaults otherwise: llmrun and llama_cpp.server apply a
# repeat penalty of 1.1, llama-server none)
SAMPLING = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repeat_penalty": 1.0}
LLAMA_CPP_SERVER_NEEDS = {"sse_starlette": "sse-starlette", "starlette_context": "starlette-context",
                          "pydantic_settings": "pydantic-settings"}
DOCS_BEGIN, DOCS_END = "<!-- bench_serve: begin -->", "<!-- bench_serve: end -->"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_llama_bin(explicit: str | None) -> Path | None:
    """The folder holding llama-server and llama-bench: --llama-bin, $LLMRUN_LLAMA_BIN, or the cached build of
    scripts/build_llama_server.sh (asked with --check, which never builds)."""
    if explicit or os.environ.get("LLMRUN_LLAMA_BIN"):
        d = Path(explicit or os.environ["LLMRUN_LLAMA_BIN"]).expanduser()
        if not (d / "llama-server").is_file():
            raise SystemExit(f"no llama-server in {d} (build it with scripts/build_llama_server.sh)")
        return d
    r = subprocess.run(["bash", str(REPO / "scripts" / "build_llama_server.sh"), "--check"], capture_output=True,
                       text=True, cwd=REPO)
    return Path(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 and r.stdout.strip() else None


@dataclass(frozen=True)
class Server:
    name: str
    cmd: list[str]
    port: int
    ready_path: str           # answers 200 once the model is loaded


def servers_to_run(args, model: Path, bin_dir: Path | None, notes: list[str]) -> list[Server]:
    py, t, ctx, par = sys.executable, str(args.threads), args.ctx, args.parallel
    wanted = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = set(wanted) - {"llmrun", "llama-server", "llama_cpp.server"}
    if unknown:
        raise SystemExit(f"--servers: unknown {', '.join(sorted(unknown))} (choose from llmrun, llama-server, "
                         "llama_cpp.server)")
    out = []
    if "llama-server" in wanted:
        if bin_dir is None:
            notes.append("llama-server skipped: not built (run scripts/build_llama_server.sh, about 8 minutes once)")
        else:
            p = free_port()
            # -ngl 0: on the CPU, like `llmrun serve` with a GGUF path; -np/-c: the same slots and context per slot
            out.append(Server("llama-server", [str(bin_dir / "llama-server"), "-m", str(model), "--alias", "bench",
                                               "--host", "127.0.0.1", "--port", str(p), "-np", str(par), "-c",
                                               str(par * ctx), "-t", t, "-tb", t, "-ngl", "0",
                                               *shlex.split(args.llama_server_args)], p, "/health"))
    if "llmrun" in wanted:
        p = free_port()
        out.append(Server("llmrun", [py, "-m", "runner", "serve", "--model", str(model), "--name", "bench", "--port",
                                     str(p), "--threads", t, "--parallel", str(par), "--ctx", str(ctx), "--queue",
                                     "256", "--log-level", "warning"], p, "/health"))
    if "llama_cpp.server" in wanted:
        missing = [pkg for mod, pkg in LLAMA_CPP_SERVER_NEEDS.items() if find_spec(mod) is None]
        if missing:
            notes.append(f"llama_cpp.server skipped: it needs `pip install {' '.join(missing)}` (not llmrun "
                         "dependencies; install them into the venv for the benchmark only)")
        else:
            p = free_port()
            # one sequence at a time (it has no continuous batching), the same context per request
            out.append(Server("llama_cpp.server", [py, "-m", "llama_cpp.server", "--model", str(model),
                                                   "--model_alias", "bench", "--port", str(p), "--n_threads", t,
                                                   "--n_threads_batch", t, "--n_ctx", str(ctx),
                                                   "--interrupt_requests", "False", "--verbose", "False"],
                              p, "/v1/models"))
    return out


def start(server: Server, log_dir: Path, timeout: float = 180) -> subprocess.Popen:
    with open(log_dir / f"{server.name}.log", "wb") as log:     # the server keeps its own copy of the handle
        proc = subprocess.Popen(server.cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            if httpx.get(f"http://127.0.0.1:{server.port}{server.ready_path}", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    tail = (log_dir / f"{server.name}.log").read_text(errors="replace")[-2000:]
    raise SystemExit(f"{server.name} did not start: {shlex.join(server.cmd)}\n{tail}")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def one_stream(client: httpx.AsyncClient, base: str, prompt: str, max_tokens: int,
                     seed: int) -> stats.RequestResult:
    """One streamed chat request; every line is time-stamped as it arrives."""
    body = {"model": "bench", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "seed": seed, "stream": True, "stream_options": {"include_usage": True}, **SAMPLING}
    trace = stats.StreamTrace(t0=time.perf_counter())
    try:
        async with client.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")[:200]
                return trace.result(r.status_code, time.perf_counter(), error=text)
            async for line in r.aiter_lines():
                trace.feed(line, time.perf_counter())
    except httpx.HTTPError as e:
        return trace.result(599, time.perf_counter(), error=repr(e))
    return trace.result(200, time.perf_counter())


async def run_load(base: str, clients: int, requests_per_client: int, max_tokens: int,
                   seed0: int = 0) -> tuple[list[stats.RequestResult], float]:
    """`clients` concurrent clients, each sending `requests_per_client` requests one after another: (results,
    wall seconds)."""
    results: list[stats.RequestResult] = []
    # a fresh connection per request: llama-server (cpp-httplib) closes some kept-alive connections after a
    # request, and a POST sent on one as it closes fails with "Server disconnected without sending a response"
    # (httpx does not retry; the OpenAI client would). The same for every server; localhost connects in ~0.1 ms.
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def worker(w: int) -> None:
            for k in range(requests_per_client):
                results.append(await one_stream(client, base, PROMPTS[(w + k) % len(PROMPTS)], max_tokens,
                                                seed=seed0 + 1000 * w + k))
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(clients)))
        wall = time.perf_counter() - t0
    return results, wall


def llama_bench(bin_dir: Path, model: Path, threads: int, pp: int, tg: int, reps: int) -> dict[str, Any]:
    cmd = [str(bin_dir / "llama-bench"), "-m", str(model), "-p", str(pp), "-n", str(tg), "-t", str(threads),
           "-r", str(reps), "-ngl", "0", "-o", "json"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"llama-bench failed ({shlex.join(cmd)}):\n{r.stderr[-2000:]}")
    return {**stats.parse_llama_bench(r.stdout), "cmd": shlex.join(cmd)}


def bench(args, model: Path, bin_dir: Path | None) -> dict[str, Any]:
    levels = [int(x) for x in args.clients.split(",")]
    if max(levels) > args.parallel:
        print(f"note: {max(levels)} clients on {args.parallel} slots: the rest wait in each server's queue",
              file=sys.stderr)
    notes: list[str] = []
    servers = servers_to_run(args, model, bin_dir, notes)
    for n in notes:
        print("note:", n, file=sys.stderr)
    if not servers:
        raise SystemExit("no server to benchmark")
    ceiling = []
    if bin_dir is not None and args.bench_reps > 0:
        ceiling.append(llama_bench(bin_dir, model, args.threads, args.bench_pp, args.tokens, args.bench_reps))
    load_before = os.getloadavg()[0]
    raw: dict[str, dict[int, list]] = {s.name: {c: [] for c in levels} for s in servers}
    log_dir = Path(tempfile.mkdtemp(prefix="bench_serve."))
    procs = []
    try:
        for s in servers:
            procs.append(start(s, log_dir))
        for s in servers:
            asyncio.run(run_load(f"http://127.0.0.1:{s.port}", 1, 1, 8))          # warm-up
        for rnd in range(args.rounds):
            for i, c in enumerate(levels):
                k = (rnd * len(levels) + i) % len(servers)
                for s in servers[k:] + servers[:k]:
                    per_client = max(1, args.requests // c)
                    results, wall = asyncio.run(run_load(f"http://127.0.0.1:{s.port}", c, per_client, args.tokens,
                                                         seed0=100_000 * rnd))
                    raw[s.name][c].append((results, wall))
                    row = stats.summarize(results, wall)
                    print(f"round {rnd + 1} {s.name:16s} clients={c:2d} {row['tok_s']:7.1f} tok/s  TTFT p50 "
                          f"{row['ttft_p50']:.3f} p95 {row['ttft_p95']:.3f} s  ITL p50 {1000 * row['itl_p50']:.1f} "
                          f"p95 {1000 * row['itl_p95']:.1f} ms  ({row['requests']} req, {row['errors']} errors, "
                          f"load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
    finally:
        for p in procs:
            stop(p)
    if bin_dir is not None and args.bench_reps > 0:
        ceiling.append(llama_bench(bin_dir, model, args.threads, args.bench_pp, args.tokens, args.bench_reps))
    combined = {name: {c: stats.combine_rounds(rs) for c, rs in by.items()} for name, by in raw.items()}
    env = {"model": model.name, "threads": args.threads, "tokens": args.tokens, "ctx": args.ctx,
           "parallel": args.parallel, "requests": args.requests, "rounds": args.rounds, "levels": levels,
           "cpu": _cpu_name(), "cores": psutil.cpu_count(logical=True),
           "load_before": load_before, "load_after": os.getloadavg()[0], "sampling": SAMPLING,
           "commands": {s.name: shlex.join(s.cmd) for s in servers}, "notes": notes,
           "llama_server_args": args.llama_server_args,
           "llama_server_version": _version(bin_dir), "llmrun_commit": _git_commit()}
    return {"env": env, "servers": [s.name for s in servers], "levels": stats.with_ratios(combined),
            "llama_bench": ceiling}


def _version(bin_dir: Path | None) -> str | None:
    """'0.5.0-dev, commit 0c1e570' from llama-server --version."""
    if bin_dir is None:
        return None
    r = subprocess.run([str(bin_dir / "llama-server"), "--version"], capture_output=True, text=True)
    m = re.search(r"version: (\S+).*?commit (\w+)", r.stdout + r.stderr, re.S)
    return f"{m.group(1)}, commit {m.group(2)}" if m else None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    return r.stdout.strip() or None


def soak(args, model: Path) -> dict:
    port = free_port()
    cmd = [sys.executable, "-m", "runner", "serve", "--model", str(model), "--name", "bench", "--port",
           str(port), "--threads", str(args.threads), "--parallel", "16", "--ctx", "512", "--queue", "64",
           "--log-level", "warning"]
    proc = start(Server("llmrun", cmd, port, "/health"), Path(tempfile.mkdtemp(prefix="bench_soak.")))
    base = f"http://127.0.0.1:{port}"
    rss = lambda: psutil.Process(proc.pid).memory_info().rss  # noqa: E731
    statuses: dict[int, int] = {}
    try:
        async def go():
            counter = iter(range(args.soak_requests))
            samples = {}
            async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=32)) as client:
                async def worker(w):
                    for i in counter:
                        r = await one_stream(client, base, PROMPTS[i % len(PROMPTS)], args.soak_tokens, i)
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
    warm = samples.get("warm", samples["end"])
    growth = (samples["end"] - warm) / warm
    fivexx = sum(n for s, n in statuses.items() if s >= 500)
    m = re.search(r'llmrun_time_to_first_token_seconds_count (\d+)', metrics)
    out = {"requests": sum(statuses.values()), "statuses": statuses, "5xx": fivexx, "rss_warm_mib":
           warm / 2 ** 20, "rss_end_mib": samples["end"] / 2 ** 20, "rss_growth_pct": 100 * growth,
           "wall_s": wall, "ttft_observed": int(m.group(1)) if m else None}
    print(json.dumps(out, indent=2), file=sys.stderr)
    return out


def decode_scaling(args, model: Path, batches=(1, 8)) -> dict:
    """Time llama_decode per engine step with 1 and 8 sequences decoding (the engine's own continuous batching,
    no HTTP): shows whether decode on this machine is compute-bound (time grows with the batch) or
    memory-bound (batching is nearly free)."""
    import threading

    import llama_cpp as lc

    sys.path.insert(0, str(REPO))
    from runner.core.run_settings import RunSettings
    from runner.engine.batching import start_engine
    from runner.engine.types import ChatMessage, SamplingParams

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
        engine = start_engine(model, RunSettings(n_ctx=1024 * max(batches), n_parallel=max(batches)),
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
                out[str(b)] = 1000 * statistics.median(pure) if pure else float("nan")
        finally:
            engine.close()
    finally:
        lc.llama_decode = real
    print("llama_decode ms per decode step (median):", {k: round(v, 1) for k, v in out.items()}, file=sys.stderr)
    return out


def markdown(result: dict[str, Any]) -> str:
    env = result["env"]
    levels = {name: {int(c): s for c, s in by.items()} for name, by in result.get("levels", {}).items()}
    lines = []
    if levels:
        version = env.get("llama_server_version")
        lines += [f"`python scripts/bench_serve.py --threads {env['threads']} --tokens {env['tokens']} --requests "
                  f"{env['requests']} --rounds {env['rounds']} --parallel {env['parallel']} --ctx {env['ctx']} "
                  f"--clients {','.join(map(str, env['levels']))}"
                  f"{' --llama-server-args ' + shlex.quote(env['llama_server_args']) if env.get('llama_server_args') else ''}"
                  f"` (llmrun {env.get('llmrun_commit') or '?'}"
                  f"{'; llama-server ' + version if version else ''})"
                  f" — {env['model']}, {env['threads']} threads and {env['parallel']} slots × {env['ctx']} tokens "
                  f"on every server, streaming chat requests of up to {env['tokens']} tokens, {env['requests']} "
                  f"requests per level and round, {env['cpu']}, {env['cores']} logical cores, load average "
                  f"{env['load_before']:.2f} before and {env['load_after']:.2f} after.", ""]
        lines += stats.markdown_table(levels, result["servers"])
        own = {c: s["server_decode_ms_p50"] for c, s in sorted(levels.get(stats.ANCHOR, {}).items())
               if s.get("server_decode_ms_p50") is not None}
        if own:
            lines += ["", "llama-server's own decode time per token (its `timings.predicted_per_token_ms`, median "
                          "over requests): " + ", ".join(f"{v:.1f} ms at {c} client{'s' if c > 1 else ''}"
                                                         for c, v in own.items()) + "."]
    if result.get("llama_bench"):
        lines += ["", stats.ceiling_line(result["llama_bench"], env["threads"])]
    if levels:
        lines += [line for note in env.get("notes", []) for line in ("", f"Note: {note}.")]
    scaling = env.get("decode_ms") if levels else None
    if scaling:
        b = sorted(scaling, key=int)
        lines += ["", "Decode scaling (`--decode-scaling`, the engine alone, median of steps that decode one token "
                      "per sequence): llama_decode takes "
                      + ", ".join(f"{scaling[k]:.1f} ms per step with {k} sequence{'s' if int(k) > 1 else ''}"
                                  for k in b) + "."]
    s = result.get("soak")
    if s:
        lines += ["", f"Soak (`--soak`): {s['requests']} streaming requests at 16 concurrent against llmrun "
                      f"(`--parallel 16`), statuses {s['statuses']}, **{s['5xx']} 5xx**; server RSS "
                      f"{s['rss_warm_mib']:.0f} MiB after warm-up, {s['rss_end_mib']:.0f} MiB at the end "
                      f"(**{s['rss_growth_pct']:+.1f}%**), {s['wall_s']:.0f} s."]
    return "\n".join(lines).strip() + "\n"


def write_docs(block: str, path: Path = REPO / "docs" / "benchmarks.md") -> None:
    """Put `block` between the bench_serve markers in docs/benchmarks.md (replacing what was there), or, the
    first time, right under the "## Serving" heading (creating the heading when missing); the rest of the
    document is kept."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    marked = f"{DOCS_BEGIN}\n{block.rstrip()}\n{DOCS_END}"
    if DOCS_BEGIN in text and DOCS_END in text:
        head, rest = text.split(DOCS_BEGIN, 1)
        text = head + marked + rest.split(DOCS_END, 1)[1]
    elif re.search(r"^## Serving\n", text, re.M):
        text = re.sub(r"^## Serving\n", lambda m: m.group(0) + "\n" + marked + "\n", text, count=1, flags=re.M)
    else:
        text = text.rstrip("\n") + "\n\n## Serving\n\n" + marked + "\n"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEMO))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64, help="max tokens per request (also llama-bench's tg)")
    ap.add_argument("--ctx", type=int, default=1024, help="context per slot")
    ap.add_argument("--parallel", type=int, default=16, help="slots (llmrun --parallel, llama-server -np)")
    ap.add_argument("--clients", default="1,4,8,16")
    ap.add_argument("--requests", type=int, default=32, help="requests per level and round (at least 1/client)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--servers", default="llmrun,llama-server,llama_cpp.server")
    ap.add_argument("--llama-bin", metavar="DIR", help="folder with llama-server and llama-bench (default: the "
                    "cached build of scripts/build_llama_server.sh)")
    ap.add_argument("--llama-server-args", default="", metavar="ARGS",
                    help="extra llama-server arguments, e.g. '-fa off' (recorded in the JSON)")
    ap.add_argument("--bench-pp", type=int, default=64, help="llama-bench prompt tokens (pp)")
    ap.add_argument("--bench-reps", type=int, default=3, help="llama-bench repetitions; 0 skips llama-bench")
    ap.add_argument("--soak", action="store_true")
    ap.add_argument("--soak-only", action="store_true")
    ap.add_argument("--soak-requests", type=int, default=1000)
    ap.add_argument("--soak-tokens", type=int, default=16)
    ap.add_argument("--soak-warmup", type=int, default=200)
    ap.add_argument("--soak-result", metavar="FILE", help="include a soak result saved earlier (JSON) in the output")
    ap.add_argument("--decode-scaling", action="store_true", help="also time llama_decode at 1 and 8 sequences")
    ap.add_argument("--json", "--save", dest="json_out", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--from-saved", metavar="FILE", help="only render a --json file as markdown")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    if args.from_saved:
        result = json.loads(Path(args.from_saved).read_text())
    else:
        model = Path(args.model).expanduser()
        if not model.is_file():
            raise SystemExit(f"no model file {model} (the demo model: run `make test` once, or "
                             "`python -c 'from runner.store import fetch; print(fetch.demo_model_path())'`)")
        result = {"soak": None}
        if not args.soak_only:
            result.update(bench(args, model, find_llama_bin(args.llama_bin)))
            if args.decode_scaling:
                result["env"]["decode_ms"] = decode_scaling(args, model)
        if args.soak or args.soak_only:
            result["soak"] = soak(args, model)
        elif args.soak_result:
            saved = json.loads(Path(args.soak_result).read_text())
            result["soak"] = saved.get("soak", saved)      # a --json file or a bare soak result
        result.setdefault("env", {"threads": args.threads})
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    print(md)
    if args.write_docs:
        write_docs(md)


if __name__ == "__main__":
    main()
