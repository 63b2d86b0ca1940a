"""The chat page's server side without a browser: GET /llmrun/status (the machine from the probe, the loaded
model with llama.cpp's real buffers per device), the page and its files (open without the API key, strict
Content-Security-Policy, ETag revalidation), the files shipped in the wheel, and the JavaScript's rules (no
string ever parsed as HTML, no inline script). The page itself is driven in Chromium by tests/test_webui.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import httpx
import pytest

from fake_engine import REPLY, FakeEngine
from fake_pool import FakeLoader, fake_pool
from live_server import running, wait_ready
from runner.core.errors import HardwareError
from runner.hardware.types import CPU, GPU, HardwareProfile
from runner.server.app import create_app
from runner.server.config import ModelCard, ServerConfig
from runner.server.status import memory_json
from runner.server.webui import ASSETS, CSP

REPO = Path(__file__).resolve().parent.parent
UI = REPO / "runner" / "server" / "ui"
GiB = 1 << 30


def _machine(gpus: tuple[GPU, ...] = ()) -> HardwareProfile:
    return HardwareProfile(name="this machine", cpu=CPU(model="Test CPU", arch="x86_64", physical_cores=8,
                                                        logical_cores=16, usable_cores=16.0),
                           ram_total_bytes=64 * GiB, ram_available_bytes=48 * GiB, gpus=gpus,
                           notes=("a note",))


def _card() -> ModelCard:
    return ModelCard(name="fake-model", family="llama", parameter_size="7B", quantization="Q4_K_M",
                     size_bytes=4 * GiB, extra={"llama.context_length": 4096})


def test_status_reports_machine_model_and_slots():
    probes = []

    def probe() -> HardwareProfile:
        probes.append(threading.current_thread().name)
        return _machine()

    app = create_app(ServerConfig(), engine=FakeEngine(n_parallel=3, n_ctx=512), card=_card(), probe=probe)
    with running(app) as base:
        for _ in range(3):
            s = httpx.get(f"{base}/llmrun/status").json()
    assert probes == ["llmrun-probe"], "the probe runs once, in its own thread, not on the event loop"
    assert s["state"] == "ready" and s["error"] is None
    m = s["machine"]
    assert m["cpu"] == "Test CPU" and m["physical_cores"] == 8 and m["ram_total_bytes"] == 64 * GiB
    assert m["ram_available_bytes"] == 48 * GiB and m["gpus"] == [] and m["notes"] == ["a note"]
    [model] = s["models"]
    assert model["name"] == "fake-model" and model["quantization"] == "Q4_K_M" and model["parameter_size"] == "7B"
    assert model["context_per_slot"] == 512 and model["slots"] == 3 and model["busy_slots"] == 0
    assert model["trained_context"] == 4096
    assert model["memory"] == []       # the fake engine has no llama.cpp buffers


def test_status_while_loading_and_when_the_probe_fails(tmp_path):
    release = threading.Event()
    loader = FakeLoader({"fake-model": 100 << 20}, hold={"fake-model": release})

    def probe() -> HardwareProfile:
        raise HardwareError("cannot tell how much RAM this machine has")

    app = create_app(ServerConfig(), pool=fake_pool(tmp_path, loader, budget=None), preload="fake-model",
                     probe=probe)
    with running(app) as base:
        r = httpx.get(f"{base}/llmrun/status")
        assert r.status_code == 200
        s = r.json()
        assert s["state"] == "loading" and s["models"] == [] and s["loading"] == ["fake-model"]
        assert s["machine"] is None and "cannot tell how much RAM" in s["machine_error"]
        release.set()
        wait_ready(base)
        s = httpx.get(f"{base}/llmrun/status").json()
        assert s["state"] == "ready" and [m["name"] for m in s["models"]] == ["fake-model"]


def test_memory_per_device_from_llama_cpp_buffers():
    hw = _machine(gpus=(GPU(index=0, name="RTX A", total_bytes=24 * GiB, free_bytes=20 * GiB),
                        GPU(index=1, name="RTX B", total_bytes=12 * GiB, free_bytes=11 * GiB)))
    buffers = {"CPU_Mapped model": 100, "CUDA0 model": 4000, "CUDA1 model": 2000, "CUDA0 KV": 512,
               "CUDA1 KV": 256, "CUDA0 compute": 300, "CUDA_Host compute": 20, "CPU output": 1,
               "RPC0[10.0.0.2:50052] model": 7000}
    rows = {r["device"]: r for r in memory_json(buffers, hw)}
    assert list(rows) == ["CPU", "GPU0", "GPU1", "RPC0"]
    assert rows["CPU"] == {"device": "CPU", "capacity_bytes": 64 * GiB, "total_bytes": 121,
                           "terms": {"weights": 100, "compute": 20, "output": 1}}
    assert rows["GPU0"]["capacity_bytes"] == 24 * GiB and rows["GPU0"]["total_bytes"] == 4812
    assert rows["GPU0"]["terms"] == {"weights": 4000, "kv_cache": 512, "compute": 300}
    assert rows["GPU1"]["capacity_bytes"] == 12 * GiB and rows["GPU1"]["total_bytes"] == 2256
    assert rows["RPC0"]["capacity_bytes"] is None and rows["RPC0"]["total_bytes"] == 7000
    assert memory_json(buffers, None)[0]["capacity_bytes"] is None


def test_status_of_the_real_engine_shows_llama_cpp_buffers(demo_gguf):
    from runner.core.run_settings import RunSettings
    from runner.engine.batching import start_engine

    engine = start_engine(demo_gguf, RunSettings(n_ctx=1024, n_parallel=2), model_name="demo")
    app = create_app(ServerConfig(), engine=engine, card=ModelCard(name="demo", family="llama"))
    with running(app) as base:
        s = httpx.get(f"{base}/llmrun/status").json()
    [model] = s["models"]
    assert model["context_per_slot"] == 512 and model["slots"] == 2
    [cpu] = model["memory"]
    assert cpu["device"] == "CPU" and cpu["capacity_bytes"] == s["machine"]["ram_total_bytes"] > 0
    terms = cpu["terms"]
    # SmolLM2-135M Q4_1 weights are about 92 MiB; the KV cache and compute buffer are llama.cpp's own numbers
    assert 60 << 20 < terms["weights"] < 130 << 20 and terms["kv_cache"] > 0 and terms["compute"] > 0
    assert cpu["total_bytes"] == sum(terms.values())


def test_the_usage_chunk_carries_the_engines_timings():
    """The page shows the engine's decode speed, sent as llama-server does: a `timings` object with the usage."""
    app = create_app(ServerConfig(), engine=FakeEngine(token_delay=0.01), card=_card(), probe=_machine)
    with running(app) as base:
        with httpx.stream("POST", f"{base}/v1/chat/completions", json={
                "model": "fake-model", "stream": True, "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": "hi"}]}) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    last = events[-1]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == len(REPLY.split())
    t = last["timings"]
    assert t["predicted_n"] == last["usage"]["completion_tokens"] and t["prompt_n"] == last["usage"]["prompt_tokens"]
    assert 10 < t["predicted_per_second"] < 150          # 10 ms a token, give or take a loaded machine
    assert t["prompt_ms"] > 0 and t["predicted_ms"] == pytest.approx(
        1000 * (t["predicted_n"] - 1) / t["predicted_per_second"], rel=1e-3)


def test_page_and_files_are_open_but_the_api_needs_the_key():
    app = create_app(ServerConfig(api_key="sesame"), engine=FakeEngine(), card=_card(), probe=_machine)
    with running(app) as base:
        page = httpx.get(f"{base}/")
        assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
        assert page.headers["content-security-policy"] == CSP
        assert "script-src 'self'" in CSP and "'unsafe-inline'" not in CSP and "require-trusted-types-for" in CSP
        assert page.headers["x-content-type-options"] == "nosniff"
        for name in ASSETS:
            r = httpx.get(f"{base}/ui/{name}")
            assert r.status_code == 200 and r.content == (UI / name).read_bytes(), name
            assert r.headers["content-type"].startswith(ASSETS[name].split(";")[0])
        assert httpx.get(f"{base}/ui/secret.txt").status_code == 401      # only the page's own files are open
        assert httpx.get(f"{base}/ui/secret.txt", headers={"Authorization": "Bearer sesame"}).status_code == 404
        assert httpx.get(f"{base}/llmrun/status").status_code == 401
        assert httpx.get(f"{base}/v1/models").status_code == 401
        ok = httpx.get(f"{base}/llmrun/status", headers={"Authorization": "Bearer sesame"})
        assert ok.status_code == 200 and ok.json()["machine"]["cpu"] == "Test CPU"
        metrics = httpx.get(f"{base}/metrics", headers={"Authorization": "Bearer sesame"}).text
        assert 'llmrun_requests_total{endpoint="/ui/{file}",status="200"}' in metrics
        assert 'llmrun_requests_total{endpoint="/llmrun/status",status="401"} 1' in metrics


def test_files_are_revalidated_by_etag():
    app = create_app(ServerConfig(), engine=FakeEngine(), card=_card(), probe=_machine)
    with running(app) as base:
        first = httpx.get(f"{base}/ui/app.js")
        etag = first.headers["etag"]
        assert first.headers["cache-control"] == "no-cache" and re.fullmatch(r'"[0-9a-f]{20}"', etag)
        again = httpx.get(f"{base}/ui/app.js", headers={"If-None-Match": etag})
        assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
        assert httpx.get(f"{base}/ui/app.js", headers={"If-None-Match": '"stale"'}).status_code == 200
        assert httpx.get(f"{base}/", headers={"If-None-Match": f'W/{httpx.get(f"{base}/").headers["etag"]}'}
                         ).status_code == 304
        head = httpx.head(f"{base}/")
        assert head.status_code == 200 and head.content == b""


def test_cors_for_the_page_is_the_apis():
    origin = "http://app.example"
    app = create_app(ServerConfig(cors_origins=(origin,)), engine=FakeEngine(), card=_card(), probe=_machine)
    with running(app) as base:
        for path in ("/", "/ui/app.js", "/llmrun/status", "/v1/models"):
            allowed = httpx.get(f"{base}{path}", headers={"Origin": origin})
            assert allowed.headers.get("access-control-allow-origin") == origin, path
            other = httpx.get(f"{base}{path}", headers={"Origin": "http://elsewhere.example"})
            assert "access-control-allow-origin" not in other.headers, path
    app = create_app(ServerConfig(), engine=FakeEngine(), card=_card(), probe=_machine)
    with running(app) as base:
        assert "access-control-allow-origin" not in httpx.get(f"{base}/", headers={"Origin": origin}).headers


def test_the_page_never_parses_strings_as_html():
    """Model output reaches the page only as text nodes; the CSP's Trusted Types enforce it in the browser, and
    this keeps the sources honest: no HTML sinks, no eval, no inline script or style in the page."""
    sinks = re.compile(r"\.(innerHTML|outerHTML)\b|insertAdjacentHTML|document\.write|\beval\(|new Function\(|"
                       r"createContextualFragment|DOMParser|setAttribute\(\s*[\"']on")
    for js in UI.glob("*.js"):
        found = sinks.findall(js.read_text())
        assert not found, f"{js.name} uses {found}"
    html = (UI / "index.html").read_text()
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", html, re.S)
    assert scripts and all('src="/ui/' in attrs and not body.strip() for attrs, body in scripts)
    assert not re.search(r"<style\b|\sstyle=|\son[a-z]+=", html)
    assert not re.search(r"https?://", html + "".join(p.read_text() for p in UI.glob("*.[jc]s*"))), \
        "the page loads nothing from elsewhere"
    referenced = set(re.findall(r'/ui/([\w.-]+)', html)) | set(re.findall(r'from "\./([\w.-]+)"',
                                                                         "".join(p.read_text() for p in UI.glob("*.js"))))
    assert referenced <= set(ASSETS), f"the page refers to files /ui/ does not serve: {referenced - set(ASSETS)}"
    assert set(ASSETS) | {"index.html"} == {p.name for p in UI.iterdir()}, "every file in ui/ is served"


def test_the_wheel_ships_the_page(tmp_path):
    """pyproject.toml's package data: a wheel built from a clean copy of the sources (no egg-info or build
    folder whose file lists setuptools would reuse) holds every file of the page."""
    src = tmp_path / "src"
    shutil.copytree(REPO / "runner", src / "runner", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    [wheel] = (tmp_path / "dist").glob("llmrun-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in [*ASSETS, "index.html"]:
        assert f"runner/server/ui/{name}" in names, name
