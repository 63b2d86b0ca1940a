#!/usr/bin/env python3
"""Embedding throughput: `llmrun serve` beside llama.cpp's own `llama-server --embedding` (the anchor), in one
run, on the same model, threads and ubatch, both over HTTP /v1/embeddings.

For each server it reports inputs/s at batch 1 (one input per request, requests one after another) and at batch
64 (64 inputs per request), the median of --rounds rounds (the servers alternate within each round, rotating
which goes first), and how closely the two servers' vectors agree (cosine of the same input: both mean-pool the
demo model's last hidden states and normalise). Output: a markdown table on stdout and, with --json FILE,
everything as JSON. It does not write docs/benchmarks.md: numbers for the docs are measured on a quiet machine.

- llama-server comes from scripts/build_llama_server.sh (the llama.cpp that the pinned llama-cpp-python vendors;
  cached); without it only llmrun is measured, with a note.
- The demo model declares no pooling type: llmrun mean-pools such models (docs/engine.md, "Embeddings"), and
  llama-server is started with `--pooling mean` to do the same.

    python scripts/bench_embed.py [--model PATH] [--threads 2] [--rounds 3] [--batch1 32] [--batch64 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import (DEMO, Server, _cpu_name, _git_commit, _version, find_llama_bin, free_port,  # noqa: E402
                         start, stop)

WORDS = ("river", "mountain", "library", "engine", "garden", "market", "planet", "signal", "harbor", "forest",
         "winter", "bridge", "window", "letter", "silver", "thunder")


def inputs(n: int, offset: int = 0) -> list[str]:
    """Distinct short sentences (about 10 tokens each on the demo model)."""
    return [f"The {WORDS[(i + offset) % 16]} near the {WORDS[(3 * i + offset + 5) % 16]} is number {i + offset}."
            for i in range(n)]


UBATCH = 512     # tokens per decode on both servers (llmrun's default n_ubatch, which bounds its embedding decode)


def servers_to_run(args, model: Path, bin_dir: Path | None, notes: list[str]) -> list[Server]:
    t, ub = str(args.threads), str(UBATCH)
    out = []
    if bin_dir is None:
        notes.append("llama-server skipped: not built (run scripts/build_llama_server.sh)")
    else:
        p = free_port()
        # --embedding with mean pooling (the model declares none); 64 slots so a 64-input request is batched
        # across slots as llmrun batches it across sequences; -b = -ub: one ubatch per decode, as embeddings need
        out.append(Server("llama-server", [str(bin_dir / "llama-server"), "-m", str(model), "--alias", "bench",
                                           "--host", "127.0.0.1", "--port", str(p), "--embedding", "--pooling", "mean",
                                           "-np", "64", "-c", str(64 * args.ctx_per_slot), "-b", ub, "-ub", ub,
                                           "-t", t, "-tb", t, "-ngl", "0"], p, "/health"))
    p = free_port()
    out.append(Server("llmrun", [sys.executable, "-m", "runner", "serve", "--model", str(model), "--name", "bench",
                                 "--port", str(p), "--threads", t, "--parallel", "1", "--ctx", str(UBATCH),
                                 "--log-level", "warning"], p, "/health"))
    return out


def embed(client: httpx.Client, base: str, texts: list[str]) -> list[list[float]]:
    r = client.post(f"{base}/v1/embeddings", json={"model": "bench", "input": texts, "encoding_format": "float"})
    if r.status_code != 200:
        raise SystemExit(f"{base}: {r.status_code} {r.text[:300]}")
    return [d["embedding"] for d in sorted(r.json()["data"], key=lambda d: d["index"])]


def measure(base: str, batch: int, requests: int, offset: int) -> float:
    """inputs/s for `requests` requests of `batch` inputs each, one after another."""
    with httpx.Client(timeout=600) as client:
        t0 = time.perf_counter()
        for k in range(requests):
            embed(client, base, inputs(batch, offset + k * batch))
        return batch * requests / (time.perf_counter() - t0)


def bench(args, model: Path, bin_dir: Path | None) -> dict[str, Any]:
    notes: list[str] = []
    servers = servers_to_run(args, model, bin_dir, notes)
    for n in notes:
        print("note:", n, file=sys.stderr)
    plan = {1: args.batch1, 64: args.batch64}
    raw: dict[str, dict[int, list[float]]] = {s.name: {b: [] for b in plan} for s in servers}
    log_dir = Path(tempfile.mkdtemp(prefix="bench_embed."))
    procs = []
    agreement = None
    load_before = os.getloadavg()[0]
    try:
        for s in servers:
            procs.append(start(s, log_dir))
        bases = {s.name: f"http://127.0.0.1:{s.port}" for s in servers}
        with httpx.Client(timeout=600) as client:
            vecs = {name: np.array(embed(client, base, inputs(8))) for name, base in bases.items()}   # warm-up
        if len(vecs) == 2:
            a, b = vecs.values()
            agreement = float(np.min(np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))
        for rnd in range(args.rounds):
            for i, (batch, requests) in enumerate(plan.items()):
                k = (rnd * len(plan) + i) % len(servers)
                for s in servers[k:] + servers[:k]:
                    rate = measure(bases[s.name], batch, requests, offset=10_000 * rnd)
                    raw[s.name][batch].append(rate)
                    print(f"round {rnd + 1} {s.name:12s} batch {batch:2d}: {rate:8.1f} inputs/s "
                          f"(load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
    finally:
        for p in procs:
            stop(p)
    table = {name: {b: statistics.median(v) for b, v in by.items()} for name, by in raw.items()}
    env = {"model": model.name, "threads": args.threads, "ubatch": UBATCH, "rounds": args.rounds,
           "requests": plan, "cpu": _cpu_name(), "load_before": load_before, "load_after": os.getloadavg()[0],
           "commands": {s.name: " ".join(s.cmd) for s in servers}, "notes": notes,
           "llama_server_version": _version(bin_dir), "llmrun_commit": _git_commit()}
    return {"env": env, "inputs_per_s": table, "rounds": raw, "min_cosine_between_servers": agreement}


def markdown(result: dict[str, Any]) -> str:
    t = result["inputs_per_s"]
    ref = t.get("llama-server")
    lines = ["| server | batch 1 (inputs/s) | batch 64 (inputs/s) | vs llama-server (1 / 64) |", "|---|---|---|---|"]
    for name, row in t.items():
        ratio = f"{row[1] / ref[1]:.2f} / {row[64] / ref[64]:.2f}" if ref else "—"
        lines.append(f"| {name} | {row[1]:.1f} | {row[64]:.1f} | {ratio} |")
    env = result["env"]
    lines.append("")
    lines.append(f"{env['model']}, {env['threads']} threads, ubatch {env['ubatch']}, median of {env['rounds']} rounds; "
                 f"{env['cpu']}; load {env['load_before']:.1f} → {env['load_after']:.1f}; llama-server "
                 f"{env['llama_server_version']}; llmrun {env['llmrun_commit']}.")
    if result["min_cosine_between_servers"] is not None:
        lines.append(f"The two servers' vectors for the same inputs: cosine ≥ {result['min_cosine_between_servers']:.6f}.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=DEMO)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx-per-slot", type=int, default=128, help="llama-server's context per slot (64 slots)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch1", type=int, default=32, help="requests of 1 input per round")
    ap.add_argument("--batch64", type=int, default=4, help="requests of 64 inputs per round")
    ap.add_argument("--llama-bin", help="folder with llama-server (default: the cached build)")
    ap.add_argument("--json", type=Path, help="write everything as JSON here")
    args = ap.parse_args()
    if not args.model.is_file():
        raise SystemExit(f"no model at {args.model} (the demo model is fetched by the tests, or give --model)")
    result = bench(args, args.model, find_llama_bin(args.llama_bin))
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
