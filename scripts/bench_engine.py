#!/usr/bin/env python
"""Engine overhead and batching gain, measured in one run on the same model (default: the demo model).

1. Single-stream decode: LlamaEngine (queue, engine thread, batch building, per-sequence sampler chain, incremental
   detokenizing, stop handling, streaming) vs a plain llama-cpp-python loop on the low-level API (decode one token,
   greedy sample, repeat) on the same context settings. Runs are interleaved (engine, plain, engine, ...) so a
   machine shared with other work affects both alike; medians over the repeats. Target: engine within 3%.
2. Aggregate decode: 8 sequences decoding together vs 1 (the continuous-batching multiplier).
3. When llama-bench is built (scripts/build_llama_server.sh: the same llama.cpp source as llama-cpp-python), its tg
   of the same token count and threads, run after each engine/plain pair, beside the engine's single-stream decode
   (target: engine >= 0.95x llama-bench tg). llama-bench decodes from an empty context and does not sample; the
   engine decodes after the prompt and samples greedily (~0.1 ms per token on the demo model).

4. `--overhead`: the engine thread's own Python time per decode step and per sampled sequence, in microseconds
   (runner.engine.steps: the loop turn minus llama_decode), with 1 and 8 sequences streamed to asyncio consumers
   as the server streams them, and the sampling the serving benchmark uses. Little affected by other load on the
   machine (unlike tok/s), so it is the number to compare optimisations of the engine's Python by.

    PYTHONPATH=. python scripts/bench_engine.py [MODEL.gguf] [--tokens 128] [--repeats 5] [--json out.json]
    PYTHONPATH=. python scripts/bench_engine.py --overhead [--tokens 128] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_serve import find_llama_bin, llama_bench  # noqa: E402  (scripts/bench_serve.py)

from runner.engine.types import SamplingParams
from runner.engine.batching import start_engine
from runner.core.run_settings import RunSettings

PROMPT = "Tell me a long story about a lighthouse keeper and a storm."


def plain_loop(path: Path, prompt_tokens: list[int], n: int, threads: int, n_ctx: int,
               flash_attn: bool = True) -> tuple[float, float]:
    """(decode tok/s, CPU seconds for prompt + n tokens) of the plainest low-level loop: llama_decode of one
    token, greedy sampler, repeat."""
    import llama_cpp as lc

    from runner.engine import native

    loaded = native.load(path, RunSettings(n_ctx=n_ctx, flash_attn=flash_attn), n_parallel=1, threads=threads)
    try:
        batch = lc.llama_batch_init(512, 0, 1)
        smpl = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        lc.llama_sampler_chain_add(smpl, lc.llama_sampler_init_greedy())

        def decode(tokens, start):
            for i, t in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, start + i, 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = i == len(tokens) - 1
            batch.n_tokens = len(tokens)
            if lc.llama_decode(loaded.ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")

        c0 = time.process_time()
        decode(prompt_tokens, 0)
        pos = len(prompt_tokens)
        tok = lc.llama_sampler_sample(smpl, loaded.ctx, -1)
        t0 = time.perf_counter()
        for _ in range(n - 1):   # n sampled tokens, n-1 decodes between the first and the last (as the engine counts)
            decode([tok], pos)
            pos += 1
            tok = lc.llama_sampler_sample(smpl, loaded.ctx, -1)
        dt = time.perf_counter() - t0
        cpu = time.process_time() - c0
        lc.llama_sampler_free(smpl)
        lc.llama_batch_free(batch)
        return (n - 1) / dt, cpu
    finally:
        loaded.free()


def plain_loop_in_child(path: Path, prompt_tokens: list[int], n: int, threads: int, n_ctx: int,
                        flash_attn: bool) -> tuple[float, float]:
    """plain_loop in a child process. Never in this one: a second thread calling llama_decode (the engine's thread
    is the first) gives libgomp a second thread team; with more OpenMP threads than cores it throttles every
    barrier's spin-wait to ~100 spins, and BOTH loops then decode at about 0.6x (measured on the demo model, 2
    threads: plain loop 161 -> 92 tok/s and the engine 141 -> 92 once both had decoded in one process)."""
    import subprocess

    spec = json.dumps({"path": str(path), "tokens": prompt_tokens, "n": n, "threads": threads, "n_ctx": n_ctx,
                       "flash_attn": flash_attn})
    r = subprocess.run([sys.executable, __file__, "--plain-worker", spec], capture_output=True, text=True,
                       check=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    tps, cpu = json.loads(r.stdout.strip().splitlines()[-1])
    return tps, cpu


def engine_single(engine, prompt_tokens: list[int], n: int) -> tuple[float, float]:
    """(decode tok/s, CPU seconds of the whole process for prompt + n tokens) of one request through the engine."""
    p = SamplingParams(temperature=0, repeat_penalty=1.0, max_tokens=n, ignore_eos=True)
    engine.generate(prompt_tokens[:3], SamplingParams(temperature=0, max_tokens=1)).result()  # no prefix to reuse
    c0 = time.process_time()
    c = engine.generate(prompt_tokens, p).result()
    cpu = time.process_time() - c0
    assert c.usage.completion_tokens == n and c.usage.cached_tokens <= 3, c
    return c.decode_tokens_per_s, cpu


def engine_aggregate(engine, n_seq: int, n: int) -> tuple[float, float]:
    """(aggregate tok/s over the decode phase, per-sequence median tok/s) for n_seq sequences started together."""
    from runner.engine.types import ChatMessage

    p = SamplingParams(temperature=0, repeat_penalty=1.0, max_tokens=n, ignore_eos=True)
    prompts = [engine.render_chat([ChatMessage("user", f"{PROMPT} Story number {i}.")]) for i in range(n_seq)]
    t0 = time.perf_counter()
    gens = [engine.generate(t, p) for t in prompts]
    results = [g.result() for g in gens]
    wall = time.perf_counter() - t0
    total = sum(r.usage.completion_tokens for r in results)
    return total / wall, statistics.median(r.decode_tokens_per_s for r in results)


SERVE_SAMPLING = dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0)   # bench_serve's


def overhead(engine, n_seq: int, n: int) -> dict:
    """Python time of the engine thread per decode step and per sampled sequence while `n_seq` sequences stream
    `n` tokens each to asyncio consumers (one event loop, as in the server)."""
    import asyncio

    from runner.engine.types import ChatMessage

    p = SamplingParams(max_tokens=n, ignore_eos=True, seed=1, **SERVE_SAMPLING)
    prompts = [engine.render_chat([ChatMessage("user", f"{PROMPT} Story number {i}.")]) for i in range(n_seq)]

    async def consume(g) -> int:
        k = 0
        async for _ in g.adeltas():
            k += 1
        return k

    async def run() -> None:
        gens = [engine.generate(t, p) for t in prompts]
        await asyncio.gather(*(consume(g) for g in gens))

    engine.step_clock.reset()
    asyncio.run(run())
    t = engine.step_clock.read()
    return {"steps": t.steps, "outputs": t.outputs, "python_us_per_step": t.python_us_per_step,
            "python_us_per_output": t.python_us_per_output, "decode_ms_per_step": t.decode_ms_per_step,
            "cpu_us_per_step": t.python_cpu_us_per_step, "cpu_us_per_output": t.python_cpu_us_per_output}


def overhead_main(path: Path, threads: int, tokens: int, repeats: int, json_out: str | None) -> int:
    eng = start_engine(path, RunSettings(n_ctx=2048 * 8, n_parallel=8), n_parallel=8, threads=threads)
    try:
        overhead(eng, 1, 16)        # warm-up
        rows: dict[int, list[dict]] = {1: [], 8: []}
        for _ in range(repeats):
            for k in rows:
                rows[k].append(overhead(eng, k, tokens))
                r = rows[k][-1]
                print(f"  {k} seq: Python CPU {r['cpu_us_per_step']:7.1f} us per decode step, "
                      f"{r['cpu_us_per_output']:6.1f} us per sequence (wall {r['python_us_per_step']:7.1f} us per "
                      f"step); llama_decode {r['decode_ms_per_step']:.2f} ms per step ({r['steps']} steps)",
                      file=sys.stderr)
    finally:
        eng.close()
    m = statistics.median
    keys = ("cpu_us_per_step", "cpu_us_per_output", "python_us_per_step", "python_us_per_output",
            "decode_ms_per_step")
    res = {str(k): {key: m(r[key] for r in v) for key in keys} for k, v in rows.items()}
    print(f"""
| engine thread outside llama_decode ({path.name}, {threads} threads, {tokens} tokens, median of {repeats}) | CPU per step | CPU per sequence | wall per step | llama_decode per step |
|---|---|---|---|---|""")
    for k, r in res.items():
        print(f"| {k} sequence{'s' if k != '1' else ''} | {r['cpu_us_per_step']:.0f} us | "
              f"{r['cpu_us_per_output']:.0f} us | {r['python_us_per_step']:.0f} us | {r['decode_ms_per_step']:.2f} ms |")
    if json_out:
        Path(json_out).write_text(json.dumps(res, indent=2) + "\n")
    return 0


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--plain-worker":      # plain_loop_in_child's child
        spec = json.loads(sys.argv[2])
        print(json.dumps(plain_loop(Path(spec["path"]), spec["tokens"], spec["n"], spec["threads"], spec["n_ctx"],
                                    spec["flash_attn"])))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", help="GGUF file (default: the demo model)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", dest="json_out")
    ap.add_argument("--single-only", action="store_true", help="skip the 8-vs-1 aggregate runs")
    ap.add_argument("--flash-attn", choices=("on", "off"), default="on",
                    help="flash attention for every run (on: llama-bench's and the planner's default)")
    ap.add_argument("--overhead", action="store_true", help="only the engine's Python microseconds per decode step")
    ap.add_argument("--llama-bin", metavar="DIR", help="folder with llama-bench (default: the cached build of "
                    "scripts/build_llama_server.sh; without one, llama-bench is skipped)")
    a = ap.parse_args()
    if a.model:
        path = Path(a.model)
    else:
        from runner.store.fetch import demo_model_path

        path = demo_model_path()
    from runner.engine.batching import default_threads

    threads = a.threads or default_threads()
    if a.overhead:
        return overhead_main(path, threads, a.tokens, a.repeats, a.json_out)
    n_ctx = 2048
    bin_dir = find_llama_bin(a.llama_bin)
    if bin_dir is None:
        print("  note: llama-bench not built (scripts/build_llama_server.sh), no llama-bench tg to compare with",
              file=sys.stderr)

    fa = a.flash_attn == "on"
    eng1 = start_engine(path, RunSettings(n_ctx=n_ctx, flash_attn=fa), n_parallel=1, threads=threads)
    from runner.engine.types import ChatMessage

    prompt_tokens = eng1.render_chat([ChatMessage("user", PROMPT)])
    engine_single(eng1, prompt_tokens, 16)   # warm-up: first touch of the mmap'd weights, thread pool start
    engine_tps, plain_tps, engine_cpu, plain_cpu, bench_tg = [], [], [], [], []
    bench_cmd = None
    for _ in range(a.repeats):
        x, c = engine_single(eng1, prompt_tokens, a.tokens)
        engine_tps.append(x)
        engine_cpu.append(c)
        x, c = plain_loop_in_child(path, prompt_tokens, a.tokens, threads, n_ctx, fa)
        plain_tps.append(x)
        plain_cpu.append(c)
        line = (f"  single stream: engine {engine_tps[-1]:.1f} tok/s ({engine_cpu[-1]:.2f} s CPU), plain loop "
                f"{plain_tps[-1]:.1f} tok/s ({plain_cpu[-1]:.2f} s CPU)")
        if bin_dir is not None:
            lb = llama_bench(bin_dir, path, threads, 0, a.tokens, 1)
            bench_tg.append(lb["tg"]["tps"])
            bench_cmd = lb["cmd"]
            line += f", llama-bench tg{a.tokens} {bench_tg[-1]:.1f} tok/s"
        print(line, file=sys.stderr)
    eng1.close()

    eng8 = start_engine(path, RunSettings(n_ctx=n_ctx * 8, n_parallel=8, flash_attn=fa), n_parallel=8,
                        threads=threads)
    agg1, agg8, per8 = [], [], []
    for _ in range(0 if a.single_only else a.repeats):
        agg1.append(engine_aggregate(eng8, 1, a.tokens)[0])
        x, y = engine_aggregate(eng8, 8, a.tokens)
        agg8.append(x)
        per8.append(y)
        print(f"  aggregate: 1 seq {agg1[-1]:.1f} tok/s, 8 seqs {agg8[-1]:.1f} tok/s", file=sys.stderr)
    eng8.close()

    m = statistics.median
    if a.single_only:
        agg1 = agg8 = per8 = [float("nan")]
    paired = [e / p for e, p in zip(engine_tps, plain_tps)]   # each engine run against the plain run right after it
    res = {"model": path.name, "threads": threads, "tokens": a.tokens, "repeats": a.repeats,
           "engine_single_tps": m(engine_tps), "plain_loop_tps": m(plain_tps),
           "engine_vs_plain": m(engine_tps) / m(plain_tps) - 1, "engine_vs_plain_paired_median": m(paired) - 1,
           "engine_cpu_ms_per_token": 1000 * m(engine_cpu) / a.tokens, "plain_cpu_ms_per_token": 1000 * m(plain_cpu) / a.tokens,
           "engine_vs_plain_cpu": m(engine_cpu) / m(plain_cpu) - 1,
           "aggregate_1_tps": m(agg1), "aggregate_8_tps": m(agg8), "per_sequence_at_8_tps": m(per8),
           "multiplier_8_vs_1": m(agg8) / m(agg1),
           "llama_bench_tg_tps": m(bench_tg) if bench_tg else None, "llama_bench_cmd": bench_cmd,
           "engine_vs_llama_bench": m(engine_tps) / m(bench_tg) if bench_tg else None,
           "engine_vs_llama_bench_paired_median": m([e / b for e, b in zip(engine_tps, bench_tg)]) if bench_tg else None}
    print(f"""
| measurement ({res['model']}, {threads} threads, {a.tokens} tokens, median of {a.repeats}) | tok/s |
|---|---|
| plain llama-cpp-python loop (llama_decode 1 token + greedy sampler) | {res['plain_loop_tps']:.1f} |
| LlamaEngine, one stream | {res['engine_single_tps']:.1f} ({res['engine_vs_plain']:+.1%}; median of paired runs {res['engine_vs_plain_paired_median']:+.1%}) |
| CPU time per token (prompt + decode), plain loop → engine | {res['plain_cpu_ms_per_token']:.2f} ms → {res['engine_cpu_ms_per_token']:.2f} ms ({res['engine_vs_plain_cpu']:+.1%}) |
| LlamaEngine, 1 sequence, wall time incl. prompt | {res['aggregate_1_tps']:.1f} |
| LlamaEngine, 8 sequences together, aggregate wall time incl. prompts | {res['aggregate_8_tps']:.1f} (x{res['multiplier_8_vs_1']:.2f}) |
| LlamaEngine, 8 sequences together, per sequence | {res['per_sequence_at_8_tps']:.1f} |""")
    if bench_tg:
        print(f"| llama-bench tg{a.tokens} (same llama.cpp source, no server, no sampling) | "
              f"{res['llama_bench_tg_tps']:.1f} |\n"
              f"| LlamaEngine one stream / llama-bench tg (target >= 0.95) | {res['engine_vs_llama_bench']:.2f} "
              f"(median of paired runs {res['engine_vs_llama_bench_paired_median']:.2f}) |")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
