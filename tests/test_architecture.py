"""The rules of the layout, enforced: the pipeline's stages import one way (import-linter contracts in
pyproject.toml), the types hold (mypy, strict on core, model and plan), and planning never pays for the engine's or
the server's imports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def test_import_contracts_hold():
    r = subprocess.run([str(BIN / "lint-imports"), "--no-cache"], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


def test_planning_imports_neither_llama_cpp_nor_the_server_stack(tmp_path):
    code = """
import json, sys
from click.testing import CliRunner
from runner.cli import cli
r = CliRunner().invoke(cli, ["plan", "--hardware", "laptop-16gb", "--json"])
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"llama_cpp", "fastapi", "starlette", "uvicorn",
                                                          "huggingface_hub", "jinja2", "numpy", "torch"})
print(json.dumps({"exit": r.exit_code, "heavy": heavy, "chosen": json.loads(r.output)["chosen"]["name"]}))
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={"LLMRUN_HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["exit"] == 0 and out["chosen"]
    assert out["heavy"] == [], f"`llmrun plan` imported {out['heavy']}"


def test_mypy_is_clean():
    r = subprocess.run([str(BIN / "mypy")], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode in (0, 1), r.stdout[-4000:] + r.stderr[-2000:]  # 2: mypy itself failed (config, crash)
    errors = [line for line in r.stdout.splitlines() if ": error:" in line]
    assert not errors, f"{len(errors)} mypy errors:\n" + "\n".join(errors[:60])
