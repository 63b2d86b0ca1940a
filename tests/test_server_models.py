"""One server, many models, end to end: the real `llmrun serve` CLI in a subprocess, the real engine, two local
models (the demo model in the local store, `smollm2-135m:Q4_1`, and the same file registered again under the
name `second` in a --config file), the official `openai` and `ollama` clients. Budgets are set with
--max-memory: one that holds one model (swaps), one that holds both, one that holds neither."""

from __future__ import annotations

import contextlib
import re
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import psutil
import pytest

from live_server import serve_process

REPO = Path(__file__).resolve().parent.parent
DEMO = "smollm2-135m:Q4_1"
MiB = 1024 ** 2
ONE = 420 * MiB        # the process (~60-80 MiB) + one model at 1024 x 2 tokens (~255 MiB measured), not two
BOTH = 800 * MiB
RSS_MARGIN = 64 * MiB  # peak RSS may pass the budget by the estimate's error and allocator slack, no more
pytestmark = pytest.mark.llama


@contextlib.contextmanager
def llmrun_serve(home: Path, *args: str, timeout: float = 120.0):
    """`llmrun serve --port 0 ARGS` with LLMRUN_HOME=home; yields (base_url, process, stderr lines), and checks
    afterwards that the server logged no traceback."""
    with serve_process(home, "--hardware", "ci-2core-24gb", "--log-level", "info", *args,
                       timeout=timeout) as (base, proc, lines):
        yield base, proc, lines
    assert "Traceback" not in "".join(lines), "".join(lines)


def make_home(root: Path, demo_gguf: Path) -> tuple[Path, Path]:
    """A home with the demo model in its store, and a models.toml serving the same file as `second`."""
    (root / "models").mkdir(parents=True)
    (root / "models" / demo_gguf.name).symlink_to(demo_gguf)
    config = root / "models.toml"
    config.write_text(f'[models.second]\npath = "{demo_gguf}"\n\n[models."smollm2-135m"]\nctx = 1024\n')
    return root, config


def serve(tmp_path_factory, demo_gguf, budget: int, *args: str):
    home, config = make_home(tmp_path_factory.mktemp("home"), Path(demo_gguf))
    return llmrun_serve(home, "--config", str(config), "--ctx", "1024", "--parallel", "2",
                        "--max-memory", f"{budget // MiB}MiB", *args)


@pytest.fixture(scope="module")
def one(tmp_path_factory, demo_gguf):
    """A server whose budget holds one model at a time."""
    with serve(tmp_path_factory, demo_gguf, ONE) as s:
        yield s


def ps(base: str) -> dict[str, dict]:
    return {m["name"]: m for m in httpx.get(f"{base}/api/ps").json()["models"]}


def metric(base: str, name: str, model: str) -> float:
    text = httpx.get(f"{base}/metrics").text
    m = re.search(rf'^{name}{{model="{re.escape(model)}"}} ([0-9.]+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def ask(base: str, model: str, text: str = "Say hello.", **extra) -> httpx.Response:
    return httpx.post(f"{base}/v1/chat/completions", timeout=120, json={
        "model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 8, "temperature": 0, **extra})


def wait_for(predicate, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


# ---------------------------------------------------------------------------------------------- a budget for one
def test_both_clients_list_and_use_both_models_swapping_under_a_budget_for_one(one):
    import ollama
    import openai

    base, _, _ = one
    oai = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    assert sorted(m.id for m in oai.models.list()) == sorted(["second", DEMO])
    client = ollama.Client(host=base)
    assert sorted(m.model for m in client.list().models) == sorted(["second", DEMO])
    answers = {}
    for name in [DEMO, "second", DEMO, "second"]:
        r = oai.chat.completions.create(model=name, messages=[{"role": "user", "content": "Name a fruit."}],
                                        max_tokens=8, temperature=0)
        answers.setdefault(name, r.choices[0].message.content)
        assert r.model == name and r.choices[0].message.content == answers[name]
        assert list(ps(base)) == [name], "only the model just used is in memory"
        o = client.chat(model=name, messages=[{"role": "user", "content": "Name a fruit."}],
                        options={"num_predict": 8, "temperature": 0})
        assert o.message.content == answers[name], "the same model answers the same through both APIs"
    assert answers["second"] == answers[DEMO], "the same file, greedy: the same answer under both names"
    loaded = client.ps().models
    assert [m.model for m in loaded] == ["second"] and loaded[0].size > 100 * MiB and loaded[0].size_vram == 0
    assert loaded[0].context_length == 1024
    assert metric(base, "llmrun_model_evictions_total", DEMO) >= 2
    assert metric(base, "llmrun_model_evictions_total", "second") >= 1


def test_eight_concurrent_clients_over_two_models_while_swapping(one):
    base, proc, _ = one
    process = psutil.Process(proc.pid)
    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    before = {m: metric(base, "llmrun_model_loads_total", m) for m in (DEMO, "second")}
    results: dict[tuple[int, int], tuple[int, str]] = {}

    def client(i: int) -> None:
        for k in range(4):
            model = [DEMO, "second"][(i + k) % 2]
            if k % 2:      # streaming half the time
                with httpx.stream("POST", f"{base}/v1/chat/completions", timeout=120, json={
                        "model": model, "messages": [{"role": "user", "content": f"Fact {i}.{k}?"}],
                        "max_tokens": 6, "stream": True}) as r:
                    body = r.read().decode()
                    results[(i, k)] = (r.status_code, "[DONE]" if body.rstrip().endswith("[DONE]") else body)
            else:
                r = ask(base, model, f"Fact {i}.{k}?")
                results[(i, k)] = (r.status_code, r.json()["choices"][0]["message"]["content"] if r.is_success
                                   else r.text)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    stop.set()
    sampler.join()
    assert len(results) == 32, "no request lost"
    assert all(status == 200 and text for status, text in results.values()), results
    loads = {m: metric(base, "llmrun_model_loads_total", m) - before[m] for m in (DEMO, "second")}
    assert all(n >= 1 for n in loads.values()), loads
    for m in (DEMO, "second"):   # never two copies of a model: every load but the one in memory was unloaded
        held = metric(base, "llmrun_model_loads_total", m) - metric(base, "llmrun_model_unloads_total", m)
        assert held in (0, 1)
    assert len(ps(base)) == 1
    assert peak[0] <= ONE + RSS_MARGIN, f"peak RSS {peak[0] / MiB:.0f} MiB, budget {ONE / MiB:.0f} MiB"


def test_keep_alive_zero_a_duration_and_forever(one):
    import ollama

    base, _, _ = one
    client = ollama.Client(host=base)

    def gen(model, keep_alive):
        return client.generate(model=model, prompt="Hi.", options={"num_predict": 2}, keep_alive=keep_alive)

    gen(DEMO, 0)
    assert wait_for(lambda: DEMO not in ps(base), 3), "keep_alive 0 unloads right after the reply"
    gen(DEMO, "10s")
    expires = datetime.fromisoformat(ps(base)[DEMO]["expires_at"].replace("Z", "+00:00"))
    assert abs((expires - datetime.now(timezone.utc)).total_seconds() - 10) < 3
    gen(DEMO, "1s")
    assert DEMO in ps(base)
    assert wait_for(lambda: DEMO not in ps(base), 5), "a keep_alive of 1s expires"
    gen("second", -1)
    assert datetime.fromisoformat(ps(base)["second"]["expires_at"].replace("Z", "+00:00")).year > 2200
    time.sleep(1.5)
    assert "second" in ps(base), "-1 keeps it"


def test_an_empty_request_loads_and_with_keep_alive_zero_unloads(one):
    base, _, _ = one
    r = httpx.post(f"{base}/api/generate", json={"model": "second"}, timeout=60)
    assert r.status_code == 200 and r.json()["done_reason"] == "load" and "second" in ps(base)
    r = httpx.post(f"{base}/api/chat", json={"model": "second", "messages": [], "keep_alive": 0}, timeout=60)
    assert r.status_code == 200 and r.json()["done_reason"] == "unload" and "second" not in ps(base)
    r = httpx.post(f"{base}/api/generate", json={"model": "second", "keep_alive": "forever"}, timeout=60)
    assert r.status_code == 400 and "keep_alive" in r.json()["error"]


def test_every_name_form_and_the_404_texts(one, demo_gguf):
    base, _, _ = one
    for name in ["smollm2-135m", "smollm2-135m:latest", DEMO.lower(), Path(demo_gguf).stem, "second:latest"]:
        r = ask(base, name)
        assert r.status_code == 200 and r.json()["model"] == name, (name, r.text)
    r = ask(base, "llama-2-7b-chat:Q4_K_M")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert "`llmrun pull llama-2-7b-chat:Q4_K_M`" in r.json()["error"]["message"]
    r = httpx.post(f"{base}/api/chat", json={"model": "smolm2", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 and "did you mean" in r.json()["error"] and "smollm2-135m" in r.json()["error"]
    r = httpx.post(f"{base}/api/show", json={"model": "second"})
    assert r.status_code == 200 and r.json()["details"]["quantization_level"] == "Q4_1"


# ---------------------------------------------------------------------------------------- other budgets
def test_a_budget_for_both_keeps_both_without_swapping(tmp_path_factory, demo_gguf):
    with serve(tmp_path_factory, demo_gguf, BOTH) as (base, _, _):
        for name in [DEMO, "second", DEMO, "second"]:
            assert ask(base, name).status_code == 200
        assert sorted(ps(base)) == sorted([DEMO, "second"])
        for name in (DEMO, "second"):
            assert metric(base, "llmrun_model_loads_total", name) == 1
            assert metric(base, "llmrun_model_evictions_total", name) == 0


def test_a_model_that_can_never_fit_is_507_with_the_numbers_and_the_server_stays_healthy(tmp_path_factory,
                                                                                          demo_gguf):
    with serve(tmp_path_factory, demo_gguf, 150 * MiB) as (base, _, _):
        r = ask(base, "second")
        assert r.status_code == 507 and r.json()["error"]["code"] == "insufficient_memory"
        msg = r.json()["error"]["message"]
        assert "second can never fit" in msg and re.search(r"needs \d+\.\d MiB RAM", msg)
        assert "--max-memory 150.0 MiB" in msg and "less context" in msg
        r = httpx.post(f"{base}/api/chat", json={"model": DEMO, "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 507 and "can never fit" in r.json()["error"] and "MiB" in r.json()["error"]
        assert httpx.get(f"{base}/health").status_code == 200
        assert len(httpx.get(f"{base}/v1/models").json()["data"]) == 2
