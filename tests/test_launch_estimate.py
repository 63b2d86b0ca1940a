"""Issue 12: every `llmrun serve` of the demo model warned against its own plan ("CPU weights: llama.cpp
allocated 92.1 MiB, the plan estimated 109.0 MiB (-15%)"): the launch kept the plan's estimate, made from the
quant recipe, although the file was on disk and its header gives the byte-exact one. With the real engine and
the demo model."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest

from runner.app.launch import resolve_model
from runner.app.load import load
from runner.hardware.probe import probe
from runner.model.catalog import load_catalog
from runner.model.layout import layout_from_recipe
from runner.plan.estimate import estimate
from runner.store import fetch

DEMO_ENTRY = "smollm2-135m:Q4_1"


@pytest.fixture
def demo_is_local(monkeypatch, demo_gguf):
    monkeypatch.setattr(fetch, "ensure_local", lambda entry, **kw: Path(demo_gguf))


def this_machine():
    return probe(measure=False)


def test_a_local_file_is_estimated_from_its_header_and_loads_without_a_warning(demo_is_local, demo_gguf):
    launch = resolve_model(DEMO_ENTRY, hardware=this_machine, n_ctx=512)
    assert launch.path == Path(demo_gguf) and launch.estimate is not None
    loaded = load(launch, threads=1)
    try:
        assert loaded.warnings == ()
    finally:
        loaded.engine.close()


def test_a_real_mismatch_still_warns(demo_is_local):
    launch = resolve_model(DEMO_ENTRY, hardware=this_machine, n_ctx=512)
    entry = load_catalog().get(DEMO_ENTRY)
    hw = this_machine()
    wrong = estimate(entry.shape, layout_from_recipe(entry.shape, "Q8_0"), launch.settings,   # another quant
                     cpu_flags=hw.cpu.flags)
    loaded = load(replace(launch, estimate=wrong), threads=1)
    try:
        assert any(w.startswith("CPU weights: llama.cpp allocated") for w in loaded.warnings), loaded.warnings
    finally:
        loaded.engine.close()


def test_serve_of_the_local_demo_model_prints_no_buffer_warning(demo_gguf, _isolated_home):
    """`llmrun serve -m smollm2-135m:Q4_1` with the file in the store, as a user runs it."""
    from test_server_real import cli_server

    models = _isolated_home / "models"
    models.mkdir(parents=True, exist_ok=True)
    (models / Path(demo_gguf).name).symlink_to(demo_gguf)
    with cli_server(Path(DEMO_ENTRY), "--ctx", "512", "--parallel", "1", "--log-level", "info",
                    home=_isolated_home) as (base, proc, lines):
        time.sleep(0.5)                   # the stderr reader thread catches up
        text = "".join(lines)
    assert "loaded demo" in text and "smollm2-135m:Q4_1" in text, text
    assert "llama.cpp allocated" not in text and "warning" not in text.lower(), text
