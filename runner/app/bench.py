"""How fast models really decode on this machine, for the planner: `llmrun bench` measures prompt and decode
speed through llama.cpp the way llama-bench does (pp: one batch of prompt tokens; tg: one token per
llama_decode), medians over repeats; and every `chat`, `run` and `serve` records the speed its engine really
decoded at (`record_run`). Both go to dirs.home()/bench.json, {model name: {decode_tps, prompt_tps, n_threads,
fingerprint, source, date}}, which the planner (runner.plan.speed) reads to replace its prediction for that model
and to calibrate the others.

A figure never replaces a higher one for the same model from the same machine (fingerprint): a busy machine only
measures low, so the best figure is the machine's."""

from __future__ import annotations

import json
import random
import statistics
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from runner.core import dirs
from runner.core.errors import EngineError, UsageError
from runner.core.files import atomic_write_json
from runner.core.run_settings import RunSettings
from runner.app.launch import Launch
from runner.engine.types import Engine

BENCH_FILE = "bench.json"


@dataclass(frozen=True)
class BenchResult:
    model: str
    path: str
    prompt_tps: float
    decode_tps: float
    n_prompt: int
    n_gen: int
    repeats: int
    n_threads: int
    fingerprint: str
    date: str
    buffers: dict


def _decode(ctx, batch, tokens: list[int], start: int) -> None:
    from runner.engine import compute

    for i, t in enumerate(tokens):
        batch.token[i] = t
        batch.pos[i] = start + i
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = i == len(tokens) - 1
    batch.n_tokens = len(tokens)
    rc = compute.decode(ctx, batch)      # where every engine of the process decodes (runner.engine.compute)
    if rc != 0:
        raise EngineError(f"llama_decode failed during the benchmark (code {rc})")


def measure(path: Path, *, n_prompt: int = 256, n_gen: int = 64, repeats: int = 3, threads: int | None = None,
            name: str | None = None, fingerprint: str = "", base: RunSettings | None = None) -> BenchResult:
    """pp{n_prompt} and tg{n_gen} of the model at `path`, medians of `repeats` runs."""
    import llama_cpp as lc

    from runner.engine import native
    from runner.engine.batching import default_threads

    if n_prompt < 1 or n_gen < 1 or repeats < 1:
        raise UsageError("--prompt-tokens, --gen-tokens and --repeats must be at least 1")
    base = base or RunSettings()
    threads = threads or base.n_threads or default_threads()
    n_ctx = max(512, ((n_prompt + n_gen + 255) // 256) * 256)
    rs = replace(base, n_ctx=n_ctx, n_batch=max(n_prompt, 512), n_parallel=1)
    loaded = native.load(Path(path), rs, n_parallel=1, threads=threads)
    try:
        mem = lc.llama_get_memory(loaded.ctx)
        batch = lc.llama_batch_init(max(n_prompt, 1), 0, 1)
        rng = random.Random(0)
        tokens = [rng.randrange(1, loaded.n_vocab) for _ in range(n_prompt + n_gen)]
        pp, tg = [], []
        try:
            _decode(loaded.ctx, batch, tokens[:8], 0)  # warm-up (first-touch of mmap'd weights)
            for _ in range(repeats):
                lc.llama_memory_clear(mem, True)
                t0 = time.perf_counter()
                _decode(loaded.ctx, batch, tokens[:n_prompt], 0)
                lc.llama_synchronize(loaded.ctx)
                pp.append(n_prompt / (time.perf_counter() - t0))
                t0 = time.perf_counter()
                for i in range(n_gen):
                    _decode(loaded.ctx, batch, [tokens[n_prompt + i]], n_prompt + i)
                    lc.llama_get_logits_ith(loaded.ctx, 0)
                lc.llama_synchronize(loaded.ctx)
                tg.append(n_gen / (time.perf_counter() - t0))
        finally:
            lc.llama_batch_free(batch)
    finally:
        loaded.free()
    return BenchResult(model=name or Path(path).name, path=str(path), prompt_tps=statistics.median(pp),
                       decode_tps=statistics.median(tg), n_prompt=n_prompt, n_gen=n_gen, repeats=repeats,
                       n_threads=threads, fingerprint=fingerprint,
                       date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       buffers=native.parse_buffer_lines(loaded.log_lines))


def bench_file() -> Path:
    return dirs.home() / BENCH_FILE


def store(result: BenchResult, keys: tuple[str, ...]) -> tuple[Path, bool]:
    """Add the result under each key (catalog name and/or file name) to bench.json, atomically. Returns the file
    and whether the result was kept (False: a higher figure from this machine is there already)."""
    rec: dict[str, object] = {
        "decode_tps": round(result.decode_tps, 3), "prompt_tps": round(result.prompt_tps, 3),
        "n_threads": result.n_threads, "fingerprint": result.fingerprint, "source": "bench", "date": result.date,
        "n_prompt": result.n_prompt, "n_gen": result.n_gen, "path": result.path}
    return bench_file(), _merge(keys, rec)


# A real run's record needs this many single-sequence decode steps (fewer say too little) ...
MIN_RUN_TOKENS = 32


def record_run(engine: Engine, launch: Launch, *, source: str, threads: int | None = None) -> bool:
    """Record the decode speed a `chat`, `run` or `serve` of `launch` really reached, from its engine's steps in
    which one sequence decoded alone (`EngineStats.solo_decode_*`: the speed the planner predicts), under the
    launch's keys, for this machine. Nothing is recorded for fewer than MIN_RUN_TOKENS such steps, for a run with
    its own --threads (the plan assumes the machine's), or for one split over RPC workers (not this machine's
    speed alone). Returns whether it was kept (a higher figure from this machine stays); a home that cannot be
    written only loses the record."""
    from runner.hardware import probe as hw
    from runner.plan.speed import hardware_fingerprint

    if threads is not None or launch.settings.rpc_servers or not launch.speed_keys:
        return False
    stats = engine.stats()
    if stats.solo_decode_tokens < MIN_RUN_TOKENS or stats.solo_decode_seconds <= 0:
        return False
    rec: dict[str, object] = {
        "decode_tps": round(stats.solo_decode_tokens / stats.solo_decode_seconds, 3),
        "fingerprint": hardware_fingerprint(hw.probe(measure=False)), "source": source,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "n_gen": stats.solo_decode_tokens,
        "path": str(launch.path)}
    try:
        return _merge(launch.speed_keys, rec)
    except OSError:
        return False


def _merge(keys: tuple[str, ...], rec: dict[str, object]) -> bool:
    """Write `rec` under each key unless that key holds a higher decode_tps from the same machine; a record
    without a prompt speed keeps the one measured before on this machine. Atomic; True when written anywhere."""
    path = bench_file()
    try:
        data = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, json.JSONDecodeError):
        data = {}
    if not isinstance(data, dict):
        data = {}
    kept = False
    for k in keys:
        found = data.get(k)
        old: dict[str, object] = found if isinstance(found, dict) and found.get("fingerprint") == \
            rec["fingerprint"] else {}                       # this machine's record for k, if any
        if _tps(old.get("decode_tps")) >= _tps(rec["decode_tps"]):
            continue
        new = dict(rec)
        if "prompt_tps" not in new and _tps(old.get("prompt_tps")) > 0:
            new["prompt_tps"] = old["prompt_tps"]
        data[k] = new
        kept = True
    if kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, data)
    return kept


def _tps(value: object) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0
