"""`llmrun probe`: the table, --json, --hardware/--gpu/--ram, --save, --list-profiles, and clean errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from runner.hardware import probe as hw, profiles
from runner.cli import cli
from runner.core.units import GiB, MiB

REPO = Path(__file__).resolve().parent.parent


def run(*args: str):
    return CliRunner().invoke(cli, ["probe", *args], catch_exceptions=False)


def test_table_for_this_machine():
    r = run()
    assert r.exit_code == 0, r.output
    for word in ("CPU", "cores", "flags", "RAM", "bandwidth", "disk", "GB/s"):
        assert word in r.output
    if not hw.probe(measure=False).gpus:
        assert "no NVIDIA GPU found (" in r.output


def test_json_has_stable_keys():
    r = run("--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert set(data) >= {"name", "source", "cpu", "ram", "gpus", "disk", "notes", "memory_bandwidth_gbps",
                         "unified_memory"}
    assert set(data["cpu"]) >= {"model", "arch", "cores", "threads", "usable_cores", "flags"}
    assert data["ram"]["total"] > 0 and data["cpu"]["cores"] >= 1
    assert data["memory_bandwidth_gbps"] > 0  # measured once, then cached in LLMRUN_HOME
    again = json.loads(run("--json").output)
    assert set(again) == set(data) and set(again["cpu"]) == set(data["cpu"])
    assert again["memory_bandwidth_gbps"] == data["memory_bandwidth_gbps"]  # from the cache
    assert profiles.profile_from_dict(data).cpu == hw.probe(measure=False).cpu


def test_profile_table_and_overrides():
    r = run("--hardware", "2x-rtx3090")
    assert r.exit_code == 0, r.output
    assert r.output.count("NVIDIA GeForce RTX 3090") == 2
    assert "compute" in r.output and "8.6" in r.output
    data = json.loads(run("--hardware", "rtx4090-24gb", "--gpu", "12GiB", "--gpu", "8GiB", "--ram", "32GiB",
                          "--json").output)
    assert [g["free"] for g in data["gpus"]] == [12 * GiB, 8 * GiB]
    assert data["ram"]["total"] == 32 * GiB
    assert data["name"] == "rtx4090-24gb"


def test_save_and_reload(tmp_path):
    out = tmp_path / "box.toml"
    r = run("--save", str(out))
    assert r.exit_code == 0, r.output
    p = profiles.load_profile(str(out))
    assert p.name == "box" and p.cpu.physical_cores >= 1
    r = run("--hardware", str(out), "--json")
    assert json.loads(r.output)["name"] == "box"
    r = run("--hardware", "rtx4090-24gb", "--save", str(tmp_path / "g.toml"), "--json")
    assert json.loads(r.output)["gpus"][0]["total"] == 24564 * MiB
    assert profiles.load_profile(str(tmp_path / "g.toml")).gpus == profiles.load_profile("rtx4090-24gb").gpus


def test_list_profiles():
    r = run("--list-profiles")
    assert r.exit_code == 0, r.output
    for name in ("laptop-16gb", "rtx4090-24gb", "8x-h100-80gb", "m2-max-96gb"):
        assert name in r.output
    data = json.loads(run("--list-profiles", "--json").output)
    assert {d["name"] for d in data} >= {"laptop-16gb", "ci-2core-24gb"}


def test_errors_are_clean():
    r = CliRunner().invoke(cli, ["probe", "--hardware", "rtx4090"])
    assert r.exit_code == 2
    assert "error: unknown hardware profile 'rtx4090'; did you mean: rtx4090-24gb" in r.output
    assert "hint: profiles:" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(cli, ["probe", "--gpu", "huge"])
    assert r.exit_code == 2 and "--gpu: cannot read 'huge' as a size" in r.output


def test_console_script_json():
    """The real entry point in a subprocess: `python -m runner probe --json` parses."""
    r = subprocess.run([sys.executable, "-m", "runner", "probe", "--json", "--hardware", "ci-2core-24gb"],
                       capture_output=True, text=True, cwd=REPO, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["cpu"]["model"] == "AMD EPYC"


def test_measure_bandwidth_option():
    from runner.core import dirs

    dirs.home().mkdir(parents=True, exist_ok=True)
    model = hw.probe(measure=False).cpu.model
    (dirs.home() / "hardware-cache.json").write_text(json.dumps({model: {"memory_bandwidth_gbps": 0.001}}))
    assert json.loads(run("--json").output)["memory_bandwidth_gbps"] == 0.001
    data = json.loads(run("--measure-bandwidth", "--json").output)
    assert data["memory_bandwidth_gbps"] > 0.5
