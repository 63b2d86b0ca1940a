"""`llmrun bench`: measures the demo model, stores bench.json in the format the planner reads."""

from __future__ import annotations

import json

from click.testing import CliRunner

from runner.plan import speed
from runner.cli import cli


def test_bench_stores_a_result_the_planner_finds(demo_gguf, _isolated_home):
    r = CliRunner().invoke(cli, ["bench", str(demo_gguf), "--prompt-tokens", "32", "--gen-tokens", "8",
                                 "--repeats", "1", "--threads", "1", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output[r.output.index("{"):])
    assert out["prompt_tps"] > 0 and out["decode_tps"] > 0 and out["n_threads"] == 1
    assert out["buffers"]["CPU KV"] > 0

    from runner.hardware import probe as hw

    bench = speed.load_bench()
    rec = speed.bench_record(bench, (demo_gguf.name,), speed.hardware_fingerprint(hw.probe(measure=False)))
    assert rec is not None and rec["decode_tps"] == round(out["decode_tps"], 3)
    assert {"prompt_tps", "n_threads", "fingerprint", "date"} <= set(rec)


def test_bench_of_a_catalog_model_not_downloaded_says_how_to_pull(_isolated_home):
    from runner.model.catalog import load_catalog

    name = next(e.name for e in load_catalog().entries if e.family == "llama2")
    r = CliRunner().invoke(cli, ["bench", name])
    assert r.exit_code != 0
    assert "is not downloaded" in r.output and "llmrun pull" in r.output
