"""What `llmrun chat`/`run`/`serve` load: a path as given, a plan's choice, or the demo model when the hub is
unreachable and nothing is cached (announced, never silent)."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.store import fetch
from runner.hardware.profiles import load_profile
from runner.app.launch import DEMO_NAME, resolve_model


def test_a_path_is_loaded_as_given(demo_gguf):
    launch = resolve_model(str(demo_gguf), n_ctx=2048, n_parallel=2)
    assert launch.path == Path(demo_gguf)
    assert launch.settings.n_ctx == 4096 and launch.settings.n_parallel == 2
    assert "context 2048 tokens x 2 slots" in launch.summary
    assert launch.notice is None


def test_no_model_offline_and_nothing_cached_uses_the_demo_model_and_says_so(monkeypatch, demo_gguf):
    monkeypatch.setattr(fetch, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(fetch, "demo_model_path", lambda progress=True: Path(demo_gguf))
    launch = resolve_model(None, hardware=lambda: load_profile("ci-2core-24gb"))
    assert launch.path == Path(demo_gguf) and launch.name == DEMO_NAME
    assert launch.notice.startswith(f"hub unreachable: using the built-in demo model {DEMO_NAME}")
    assert "llmrun pull" in launch.notice


def test_no_model_plans_for_the_hardware(monkeypatch, tmp_path):
    """With the hub reachable, the plan's choice is pulled (ensure_local) and summarised in one line."""
    pulled = []
    monkeypatch.setattr(fetch, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(fetch, "ensure_local", lambda entry, **kw: pulled.append(entry) or tmp_path / "m.gguf")
    launch = resolve_model(None, hardware=lambda: load_profile("rtx4090-24gb"))
    assert pulled and launch.name == pulled[0].name
    assert launch.summary.startswith(f"plan: {pulled[0].name}") and "tok/s" in launch.summary
    assert launch.settings.n_gpu_layers != 0
    assert launch.estimate is not None


def test_cli_offline_fresh_install_answers_with_the_demo_model(demo_gguf, _isolated_home):
    import os
    import subprocess
    import sys

    models = _isolated_home / "models"
    models.mkdir(parents=True)
    (models / Path(demo_gguf).name).symlink_to(demo_gguf)     # as `fetch.demo_model_path` leaves it
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent), LLMRUN_HOME=str(_isolated_home),
               HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "runner", "run", "--temperature", "0", "--hardware", "ci-2core-24gb",
                        "What is the capital of France?"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "hub unreachable: using the built-in demo model SmolLM2-135M-Instruct" in r.stderr
    assert "Paris" in r.stdout
