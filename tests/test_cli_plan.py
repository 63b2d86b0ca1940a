"""`llmrun plan`: human output, --json, exit codes, options."""

from __future__ import annotations

import json
import re

from click.testing import CliRunner

from runner.cli import cli


def run(*args: str):
    return CliRunner().invoke(cli, ["plan", *args], catch_exceptions=False)


def test_this_machine_profile_reads_right():
    r = run("--hardware", "ci-2core-24gb")
    assert r.exit_code == 0, r.output
    out = r.output
    assert re.search(r"model\s+llama-2-(7b|13b)-chat:\S+", out)
    assert "CPU only" in out and "tok/s" in out and "predicted" in out
    assert "Llama 2 Community License" in out        # the licence of the choice
    assert "memory per device" in out and "not chosen" in out
    assert "need" in out and "GiB RAM" in out         # a rejected 70B / Grok-1 with its number


def test_rtx4090_json_chooses_13b_on_gpu():
    r = run("--hardware", "rtx4090-24gb", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    c = data["chosen"]
    assert c["model"].startswith("llama-2-13b") and c["placement"] == "gpu"
    assert c["n_gpu_layers"] == c["n_layer"] + 1
    assert set(c["memory"]) == {"CPU", "GPU0"}
    assert c["speed"]["decode_tps"] > 20
    assert data["rejected"] and all(x["reason"] for x in data["rejected"])


def test_8x_h100_chooses_grok1():
    r = run("--hardware", "8x-h100-80gb", "--json")
    c = json.loads(r.output)["chosen"]
    assert c["family"] == "grok1" and c["quant"] in ("Q6_K", "Q8_0") and c["placement"] == "gpu"
    assert c["license"] == "Apache-2.0" and c["license_osi_approved"] is True


def test_laptop_grok1_refusal_exits_3_naming_at_least_112gb():
    r = run("--hardware", "laptop-16gb", "--family", "grok1")
    assert r.exit_code == 3
    err = r.stderr if hasattr(r, "stderr") else r.output
    assert "error: nothing fits laptop-16gb" in err
    gb = [float(x) for x in re.findall(r"([0-9.]+) GB\b", err)]
    assert gb and max(gb) >= 112
    assert "hint: ways out" in err


def test_json_refusal_exits_3_with_the_error():
    r = run("--hardware", "laptop-16gb", "--family", "grok1", "--json")
    assert r.exit_code == 3
    data = json.loads(r.stdout)
    assert data["chosen"] is None and "nothing fits" in data["error"]["message"]


def test_max_download_and_license_open():
    r = run("--hardware", "a100-80gb", "--max-download", "20GB", "--json")
    data = json.loads(r.output)
    assert data["chosen"]["download_bytes"] <= 20e9
    assert any(x["reason"].startswith("download ") for x in data["rejected"])
    r = run("--hardware", "ci-2core-24gb", "--license", "open", "--json")
    data = json.loads(r.output)
    assert data["chosen"]["license_osi_approved"] is True
    assert all(x["license"] != "llama2" for x in data["rejected"])


def test_all_lists_every_configuration():
    short = run("--hardware", "rtx4090-24gb")
    full = run("--hardware", "rtx4090-24gb", "--all")
    assert full.exit_code == 0
    assert full.output.count("\n") > short.output.count("\n")
    assert "not estimated" in short.output and "not estimated" not in full.output


def test_gpu_and_ram_overrides():
    r = run("--hardware", "ci-2core-24gb", "--gpu", "24GiB", "--ram", "64GiB", "--json")
    assert r.exit_code == 0, r.output
    c = json.loads(r.output)["chosen"]
    assert c["placement"] == "gpu" and "GPU0" in c["memory"]


def test_bad_options_are_usage_errors():
    r = run("--hardware", "ci-2core-24gb", "--max-download", "lots")
    assert r.exit_code == 2 and "--max-download" in r.output
    r = run("--hardware", "ci-2core-24gb", "--family", "nope")
    assert r.exit_code == 2 and "unknown family" in r.output
    r = run("--hardware", "ci-2core-24gb", "--model", "llama-2-7b-chat:Q9_9")
    assert r.exit_code == 2
    r = run("--hardware", "ci-2core-24gb", "--prefer", "fast")
    assert r.exit_code == 2


def test_probe_of_this_machine_does_not_measure(monkeypatch):
    """Without --hardware the plan probes this machine but never runs the bandwidth measurement."""
    from runner.hardware import probe as hardware

    seen = []
    real = hardware.cached_memory_bandwidth

    def spy(cpu_model, measure, **kw):
        seen.append(measure)
        return real(cpu_model, None)

    monkeypatch.setattr(hardware, "cached_memory_bandwidth", spy)
    r = run("--json", "--model", "smollm2-135m")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["chosen"]["model"] == "smollm2-135m"
    assert seen == [None]
