"""Issue 12: the plan changed with the machine's load at the moment the memory bandwidth was first measured. Every
`chat`, `run`, `serve` and `bench` now records the decode speed it really reached (bench.json, per model and
quant, per machine: runner.app.bench), and the planner uses those figures. With the real engine and the demo
model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from runner.app import bench as benchmod
from runner.core import dirs
from runner.engine.types import EngineStats
from runner.hardware.probe import probe
from runner.plan import speed as speedmod
from runner.plan.select import Preferences, make_plan

REPO = Path(__file__).resolve().parent.parent
DEMO = "smollm2-135m:Q4_1"
BIG = "llama-2-7b-chat:Q4_K_M"


def _set_bandwidth(gbps: float) -> None:
    """The probe's bandwidth cache for this machine's CPU, as a quiet measurement left it."""
    cpu = probe(measure=False).cpu.model
    dirs.home().mkdir(parents=True, exist_ok=True)
    (dirs.home() / "hardware-cache.json").write_text(json.dumps(
        {cpu: {"memory_bandwidth_gbps": gbps, "load_per_cpu": 0.0}}))


def _predicted(name: str) -> tuple[float, str]:
    """The plan's decode tok/s for catalog entry `name` on this machine, and its basis."""
    chosen = make_plan(probe(measure=False), Preferences(model=name)).chosen
    assert chosen is not None and chosen.speed is not None
    return chosen.speed.decode_tps, chosen.speed.basis


def _demo_in_store(home: Path, demo_gguf: Path) -> None:
    models = home / "models"
    models.mkdir(parents=True, exist_ok=True)
    (models / demo_gguf.name).symlink_to(demo_gguf)


def test_a_plan_from_a_cache_poisoned_at_half_the_bandwidth_is_corrected_after_one_real_run(demo_gguf,
                                                                                          _isolated_home):
    # one real run: `llmrun run` of the demo model, as a user runs it; it records the speed it reached
    _demo_in_store(_isolated_home, demo_gguf)
    _set_bandwidth(20.0)          # whatever: the run does not need to measure it
    r = subprocess.run([sys.executable, "-m", "runner", "run", "-m", DEMO, "--temperature", "0", "--max-tokens",
                        "48", "Write a long story about a lighthouse keeper."], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=300)
    assert r.returncode == 0, r.stderr
    bench_file = dirs.home() / "bench.json"
    record = json.loads(bench_file.read_text())[DEMO]
    assert record["source"] == "run" and record["n_gen"] >= benchmod.MIN_RUN_TOKENS
    assert record["fingerprint"] == speedmod.hardware_fingerprint(probe(measure=False))
    real = record["decode_tps"]
    recorded = bench_file.read_text()

    # the true bandwidth: the one at which the planner predicts what the run really did (decode is bandwidth
    # bound in the prediction, so it scales with the bandwidth)
    bench_file.unlink()
    _set_bandwidth(1.0)
    true_gbps = 1.0 * real / _predicted(DEMO)[0]
    _set_bandwidth(true_gbps)
    demo_true, _ = _predicted(DEMO)
    big_true, _ = _predicted(BIG)
    assert demo_true == pytest.approx(real, rel=1e-3)

    # a cache poisoned at half of it halves every prediction
    _set_bandwidth(true_gbps / 2)
    assert _predicted(DEMO)[0] == pytest.approx(real / 2, rel=1e-3)
    assert _predicted(BIG)[0] == pytest.approx(big_true / 2, rel=1e-2)

    # with the run's record, the same poisoned cache no longer decides: the demo's figure is the real one, and
    # the other models' are calibrated back to the truth
    bench_file.write_text(recorded)
    assert _predicted(DEMO) == (real, "measured")
    big, basis = _predicted(BIG)
    assert basis == "calibrated" and big == pytest.approx(big_true, rel=1e-2)


# ---- the records -----------------------------------------------------------------------------------------------

class _Stats:
    """An engine whose stats say it decoded `tokens` tokens alone in `seconds`."""

    def __init__(self, tokens: int, seconds: float):
        self._stats = EngineStats(model="m", n_ctx=512, n_parallel=1, busy_slots=0, queued=0, tokens_in=0,
                                  tokens_out=tokens, load_seconds=0.0, solo_decode_tokens=tokens,
                                  solo_decode_seconds=seconds)

    def stats(self) -> EngineStats:
        return self._stats


def _launch(demo_gguf: Path):
    from runner.app.launch import Launch
    from runner.core.run_settings import RunSettings

    return Launch(path=demo_gguf, name=DEMO, settings=RunSettings(), summary="", speed_keys=(DEMO, "demo.gguf"))


def test_a_run_keeps_the_best_figure_of_this_machine(demo_gguf):
    launch = _launch(demo_gguf)
    assert benchmod.record_run(_Stats(100, 1.0), launch, source="chat")          # 100 tok/s
    assert not benchmod.record_run(_Stats(100, 2.0), launch, source="serve")     # 50: a busy machine, kept out
    data = json.loads((dirs.home() / "bench.json").read_text())
    assert data[DEMO]["decode_tps"] == 100.0 and data["demo.gguf"]["source"] == "chat"
    assert benchmod.record_run(_Stats(120, 1.0), launch, source="serve")         # faster: replaces it
    assert json.loads((dirs.home() / "bench.json").read_text())[DEMO]["decode_tps"] == 120.0
    other = json.loads((dirs.home() / "bench.json").read_text())
    other[DEMO]["fingerprint"] = "another machine"
    (dirs.home() / "bench.json").write_text(json.dumps(other))
    assert benchmod.record_run(_Stats(60, 2.0), launch, source="chat")           # another machine's: replaced
    assert json.loads((dirs.home() / "bench.json").read_text())[DEMO]["decode_tps"] == 30.0


def test_a_run_that_says_too_little_or_is_not_the_plans_is_not_recorded(demo_gguf):
    launch = _launch(demo_gguf)
    assert not benchmod.record_run(_Stats(benchmod.MIN_RUN_TOKENS - 1, 0.1), launch, source="chat")
    assert not benchmod.record_run(_Stats(500, 1.0), launch, source="serve", threads=1)       # its own --threads
    assert not benchmod.record_run(_Stats(500, 1.0), replace(launch, settings=replace(
        launch.settings, rpc_servers=("10.0.0.2:50052",))), source="chat")                   # split over workers
    assert not (dirs.home() / "bench.json").exists()


def test_a_slow_real_run_does_not_calibrate_the_other_models_down():
    """A real run slower than predicted (a busy machine, a small model's per-token overheads) only gives that
    model its real figure; `llmrun bench` results calibrate both ways."""
    assert speedmod.calibration_ratio({"decode_tps": 40.0, "source": "chat"}, 100.0) == 1.0
    assert speedmod.calibration_ratio({"decode_tps": 250.0, "source": "serve"}, 100.0) == 2.5
    assert speedmod.calibration_ratio({"decode_tps": 40.0, "source": "bench"}, 100.0) == 0.4
    assert speedmod.calibration_ratio({"decode_tps": 40.0}, 100.0) == 0.4                  # older bench.json


def test_serve_records_the_speed_of_each_model_it_unloads(demo_gguf, _isolated_home):
    """`llmrun serve` (its model pool, with the real loader): when a model is unloaded (keep_alive, eviction,
    shutdown) the speed it reached is recorded, under its catalog name."""
    from live_server import running
    from runner.app.models import ModelIndex
    from runner.app.pool import ModelPool
    from runner.app.pool_values import Budget
    from runner.app.serving import ModelSettings, PlannedLoader
    from runner.model.catalog import load_catalog
    from runner.server.app import create_app
    from runner.server.config import ServerConfig

    _demo_in_store(_isolated_home, demo_gguf)
    index = ModelIndex(catalog=load_catalog())
    budget = Budget({"CPU": 4 * 1024 ** 3})
    loader = PlannedLoader(index, probe(measure=False), budget, defaults=ModelSettings(ctx=512, parallel=1))
    with running(create_app(ServerConfig(), pool=ModelPool(index, loader, budget))) as base:
        r = httpx.post(f"{base}/v1/completions", timeout=120, json={
            "model": DEMO, "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", "max_tokens": 40, "temperature": 0})
        assert r.json()["usage"]["completion_tokens"] == 40          # the model counts on to the limit
        assert not (dirs.home() / "bench.json").exists()              # loaded still
    record = json.loads((dirs.home() / "bench.json").read_text())[DEMO]
    assert record["source"] == "serve" and record["n_gen"] >= 36 and record["decode_tps"] > 0


def test_a_slow_real_run_does_not_rule_its_model_out():
    """One run on a busy machine (the demo decoded at 6 tok/s here while other work ran, ~100 predicted) must not
    stand for the model for good: a real run's figure only replaces a lower prediction; `llmrun bench`'s both."""
    pred = speedmod.SpeedPrediction(decode_tps=10.0, prompt_tps=100.0, aggregate_decode_tps=20.0, at_tokens=1024,
                                    bytes_per_token=1, bottleneck="CPU", basis="predicted")
    slow_run = {"decode_tps": 4.0, "source": "chat", "fingerprint": "f"}
    assert speedmod.apply_bench(pred, slow_run) == pred
    assert speedmod.apply_bench(pred, slow_run, calibration=1.5).decode_tps == 15.0
    fast_run = {"decode_tps": 25.0, "source": "serve", "fingerprint": "f"}
    assert (speedmod.apply_bench(pred, fast_run).decode_tps, speedmod.apply_bench(pred, fast_run).basis) == \
        (25.0, "measured")
    slow_bench = {"decode_tps": 4.0, "source": "bench", "fingerprint": "f"}
    assert speedmod.apply_bench(pred, slow_bench).decode_tps == 4.0
