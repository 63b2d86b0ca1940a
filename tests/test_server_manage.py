"""Model management over HTTP (runner/app/manage.py, runner/server/manage_api.py): the official `ollama` client's
pull against the local fake hub (driven by the real huggingface_hub client) with its progress, a pull that stops
when its client goes away and resumes later, one download for two clients, licences, delete, copy, /api/show's
capabilities for the demo model, and the rule that a server exposed without an API key refuses all of it.
Models are loaded by a fake loader (no llama.cpp); the files, the hub client, the store and the HTTP stack are
real."""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from pathlib import Path

import httpx
import ollama
import pytest

from fake_engine import FakeEngine
from fake_pool import FakeLoader
from live_server import running
from runner.app import manage
from runner.app.models import ModelIndex, read_card
from runner.app.pool import ModelPool
from runner.app.pool_values import Budget
from runner.core import dirs
from runner.model.catalog import Catalog, load_catalog
from runner.server.app import create_app
from runner.server.config import ModelCard, ServerConfig
from runner.store import local as store
from tests.fakehub import LLAMA2, FakeHub, entry, make_gguf, use_hub

MiB = 1024 ** 2
TINY, GATED = "tiny:Q4_0", "llama-2-7b-chat:Q4_K_M"
FILE = "tiny.Q4_0.gguf"
DEMO = "smollm2-135m:Q4_1"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A fake hub with an open model (about 400 KB, sent in 64 KiB chunks: several progress steps) and a
    licence-gated one, and the catalog naming both."""
    import huggingface_hub.constants as hfc

    data = make_gguf(tmp_path / "t.gguf", 100_000)
    with FakeHub() as h:
        use_hub(h, monkeypatch, tmp_path)
        monkeypatch.setattr(hfc, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
        monkeypatch.setattr(manage, "PROGRESS_EVERY_S", 0.0)
        r1 = h.add_repo("org/tiny-GGUF", {FILE: data})
        r2 = h.add_repo("TheBloke/Llama-2-7B-Chat-GGUF", {"llama-2-7b-chat.Q4_K_M.gguf": data})
        h.catalog = Catalog([entry(TINY, "org/tiny-GGUF", {FILE: data}, revision=r1.commit),
                             entry(GATED, "TheBloke/Llama-2-7B-Chat-GGUF", {"llama-2-7b-chat.Q4_K_M.gguf": data},
                                   revision=r2.commit, card=LLAMA2)])
        h.data = data
        yield h


def serve(catalog: Catalog | None, config: ServerConfig = ServerConfig(), *, token_delay: float = 0.002,
          index: ModelIndex | None = None):
    """The app over a pool of `catalog`'s local models, loaded by the fake loader; (running context, app,
    loader)."""
    loader = FakeLoader(need=defaultdict(lambda: MiB), token_delay=token_delay)
    pool = ModelPool(index or ModelIndex(catalog=catalog), loader, Budget.unlimited())
    app = create_app(config, pool=pool)
    return running(app), app, loader


def wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def tags(base: str) -> list[str]:
    return [m["name"] for m in httpx.get(f"{base}/api/tags").json()["models"]]


def downloads(events) -> list:
    return [e for e in events if e.digest]


# ---------------------------------------------------------------------------------------------------- pull
def test_the_ollama_client_pulls_with_real_progress_through_a_dropped_connection(hub):
    hub.drop_after[FILE] = 150_000       # the connection drops mid-file: the hub client resumes it (Range)
    run, app, _ = serve(hub.catalog)
    with run as base:
        client = ollama.Client(host=base)
        assert TINY not in tags(base)
        events = list(client.pull(TINY, stream=True))

        assert events[0].status == "pulling manifest"
        assert events[-1].status == "success"
        sha = hub.repos["org/tiny-GGUF"].sha256(FILE)
        steps = downloads(events)
        assert {e.digest for e in steps} == {f"sha256:{sha}"}
        assert {e.status for e in steps} == {f"pulling {sha[:12]}"}
        assert {e.total for e in steps} == {len(hub.data)}
        done = [e.completed for e in steps]
        assert done == sorted(done) and done[0] == 0 and done[-1] == len(hub.data)
        assert len(set(done)) >= 4, done      # the bytes as they landed, not a start and an end
        assert any(e.status == "verifying sha256 digest" for e in events)
        assert [r.headers.get("range") for r in hub.gets(FILE)] == [None, "bytes=131072-"]

        lm = store.local_model(hub.catalog.get(TINY))
        assert lm is not None and lm.verified and lm.path.read_bytes() == hub.data
        assert TINY in tags(base)        # the index saw it at once
        # again: already here, nothing downloaded; the non-streaming answer
        n = len(hub.requests)
        assert client.pull(TINY).status == "success"
        assert len(hub.requests) == n
        again = list(client.pull(TINY, stream=True))
        assert [e.completed for e in downloads(again)] == [len(hub.data)] and again[-1].status == "success"
        r = httpx.post(f"{base}/api/generate", json={"model": TINY, "prompt": "hi", "stream": False}, timeout=30)
        assert r.status_code == 200 and r.json()["response"]


def test_a_pull_stops_when_its_client_goes_away_and_the_next_one_resumes(hub):
    go = threading.Event()
    hub.stall[FILE] = (150_000, go)
    e = hub.catalog.get(TINY)
    run, app, _ = serve(hub.catalog)
    manager = app.state.llm.manager
    with run as base:
        with httpx.stream("POST", f"{base}/api/pull", json={"model": TINY}, timeout=30) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if json.loads(line).get("completed", 0) >= 128 * 1024:
                    break
        job = manager.pulls[TINY]
        wait_for(job.cancel.is_set)       # the server saw the client go
        go.set()
        wait_for(lambda: TINY not in manager.pulls)
        [partial] = store.partial_dir(e).glob("*.incomplete")
        kept = partial.stat().st_size
        assert 128 * 1024 <= kept < len(hub.data)
        assert store.local_model(e) is None and TINY not in tags(base)

        events = list(ollama.Client(host=base).pull(TINY, stream=True))
        assert downloads(events)[0].completed == kept          # it starts where the last one stopped
        assert hub.gets(FILE)[-1].headers["range"] == f"bytes={kept}-"
        assert events[-1].status == "success" and store.local_model(e).verified
        assert not partial.exists()


def test_two_clients_share_one_download(hub):
    go = threading.Event()
    hub.stall[FILE] = (100_000, go)
    run, app, _ = serve(hub.catalog)
    manager = app.state.llm.manager
    with run as base:
        results: list[list] = []

        def pull() -> None:
            results.append(list(ollama.Client(host=base).pull(TINY, stream=True)))

        first = threading.Thread(target=pull)
        first.start()
        wait_for(lambda: TINY in manager.pulls)
        second = threading.Thread(target=pull)
        second.start()
        wait_for(lambda: len(manager.pulls[TINY].watchers) == 2)
        go.set()
        first.join(30)
        second.join(30)
        assert len(results) == 2 and all(r[-1].status == "success" for r in results)
        assert all(downloads(r)[-1].completed == len(hub.data) for r in results)
        assert len(hub.gets(FILE)) == 1


def test_a_gated_licence_is_a_403_saying_how_to_accept_it(hub):
    run, _, _ = serve(hub.catalog)
    with run as base:
        client = ollama.Client(host=base)
        for stream in (True, False):
            with pytest.raises(ollama.ResponseError) as e:
                result = client.pull(GATED, stream=stream)
                list(result) if stream else None
            assert e.value.status_code == 403
            assert "Llama 2 Community License" in e.value.error and "nothing was downloaded" in e.value.error
            assert f"llmrun pull {GATED} --accept-license" in e.value.error and '"accept_license": true' in e.value.error
        assert not hub.requests
        r = httpx.post(f"{base}/api/pull", json={"model": GATED, "stream": False, "accept_license": True}, timeout=30)
        assert r.status_code == 200 and r.json() == {"status": "success"}
        assert "llama2" in json.loads((dirs.home() / "licenses.json").read_text())
        assert GATED in tags(base)


def test_pull_errors_before_any_byte_get_their_own_status(hub, monkeypatch):
    run, _, _ = serve(hub.catalog)
    with run as base:
        r = httpx.post(f"{base}/api/pull", json={"model": "tinyy:Q4_0"})
        assert r.status_code == 404 and "did you mean: tiny" in r.json()["error"]
        assert "llmrun list --available" in r.json()["error"]
        hub.repos.pop("org/tiny-GGUF")          # the hub lost the repo: 404 naming it (as for a hub reference to
        r = httpx.post(f"{base}/api/pull", json={"model": TINY}, timeout=30)   # nothing), not a 200 with an error line
        assert r.status_code == 404 and "org/tiny-GGUF" in r.json()["error"]
        monkeypatch.setattr("runner.store.fetch.free_space", lambda path: 1000)
        hub.add_repo("org/tiny-GGUF", {FILE: hub.data}, commit=hub.catalog.get(TINY).revision)
        r = httpx.post(f"{base}/api/pull", json={"model": TINY}, timeout=30)
        assert r.status_code == 507 and "not enough disk space" in r.json()["error"]
        assert not list(store.partial_dir(hub.catalog.get(TINY)).glob("*.incomplete"))


# -------------------------------------------------------------------------------------------- delete, copy
def test_delete_unloads_first_and_refuses_while_requests_run(hub):
    run, app, loader = serve(hub.catalog, token_delay=0.05)
    with run as base:
        client = ollama.Client(host=base)
        assert client.pull(TINY).status == "success"
        e = hub.catalog.get(TINY)
        blob = Path(store.local_model(e).path).resolve()
        # in use: 409, nothing deleted
        with httpx.stream("POST", f"{base}/api/chat", json={"model": TINY, "messages": [
                {"role": "user", "content": "hi"}]}, timeout=30) as r:
            lines = r.iter_lines()
            assert json.loads(next(lines))["done"] is False
            busy = httpx.request("DELETE", f"{base}/api/delete", json={"model": TINY})
            assert busy.status_code == 409 and "in use" in busy.json()["error"] and "not deleted" in busy.json()["error"]
            assert json.loads(list(lines)[-1])["done_reason"] == "stop"     # the request was not disturbed
        assert store.local_model(e) is not None
        assert [m["name"] for m in httpx.get(f"{base}/api/ps").json()["models"]] == [TINY]
        # idle: unloaded, then the files go
        r = httpx.request("DELETE", f"{base}/api/delete", json={"model": TINY})
        assert r.status_code == 200 and r.json() == {"status": "success", "freed_bytes": len(hub.data)}
        assert loader.closes == [TINY] and httpx.get(f"{base}/api/ps").json()["models"] == []
        assert store.local_model(e) is None and not blob.exists() and TINY not in tags(base)
        with pytest.raises(ollama.ResponseError) as err:
            client.delete(TINY)
        assert err.value.status_code == 404
        r = httpx.post(f"{base}/api/chat", json={"model": TINY, "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 404 and f"llmrun pull {TINY}" in r.json()["error"]


def test_copy_is_another_name_for_the_same_model(hub):
    run, app, loader = serve(hub.catalog)
    with run as base:
        client = ollama.Client(host=base)
        client.pull(TINY)
        assert client.copy(TINY, "team/tiny:v2").status == "success"
        assert json.loads((dirs.home() / "aliases.json").read_text()) == {"team/tiny:v2": TINY}
        assert sorted(tags(base)) == sorted([TINY, "team/tiny:v2"])
        assert "team/tiny:v2" in [m["id"] for m in httpx.get(f"{base}/v1/models").json()["data"]]
        for name in ("team/tiny:v2", TINY, "TEAM/TINY:V2"):
            r = httpx.post(f"{base}/api/generate", json={"model": name, "prompt": "hi", "stream": False}, timeout=30)
            assert r.status_code == 200 and r.json()["model"] == name
        assert loader.loads == [TINY]        # one model, one load
        # another process (the CLI, `llmrun chat`) resolves it to the same file
        assert ModelIndex(catalog=hub.catalog).resolve("team/tiny:v2").path == store.local_model(
            hub.catalog.get(TINY)).path
        # Ollama's NAME / NAME:latest
        client.copy(TINY, "plain:latest")
        assert "plain" in tags(base)
        assert httpx.post(f"{base}/api/show", json={"model": "plain:latest"}).status_code == 200

        for dest, status, text in [(TINY, 409, "already names"), ("tiny.Q4_0", 409, "already names"),
                                   (GATED, 409, "catalog model"), ("bad name!", 400, "not a model name"),
                                   ("x.gguf", 400, "not a model name")]:
            r = httpx.post(f"{base}/api/copy", json={"source": TINY, "destination": dest})
            assert r.status_code == status and text in r.json()["error"], (dest, r.text)
        r = httpx.post(f"{base}/api/copy", json={"source": GATED, "destination": "g"})
        assert r.status_code == 404 and f"llmrun pull {GATED}" in r.json()["error"]

        # the model cannot go while a copy names it; the copy can
        r = httpx.request("DELETE", f"{base}/api/delete", json={"model": TINY})
        assert r.status_code == 409 and "team/tiny:v2" in r.json()["error"] and "plain" in r.json()["error"]
        for name in ("team/tiny:v2", "plain:latest"):
            r = httpx.request("DELETE", f"{base}/api/delete", json={"model": name})
            assert r.status_code == 200 and r.json()["freed_bytes"] == 0
        assert tags(base) == [TINY] and store.local_model(hub.catalog.get(TINY)) is not None
        assert client.delete(TINY).status == "success"
        assert tags(base) == []


def test_a_copy_whose_model_went_says_so_and_can_be_deleted(hub):
    run, _, _ = serve(hub.catalog)
    with run as base:
        client = ollama.Client(host=base)
        client.pull(TINY)
        client.copy(TINY, "mine")
        store.remove(hub.catalog.get(TINY))      # `llmrun rm` from another process
        r = httpx.post(f"{base}/api/show", json={"model": "mine"})
        assert r.status_code == 404 and "copy of 'tiny:Q4_0'" in r.json()["error"]
        assert client.delete("mine").status == "success"
        assert json.loads((dirs.home() / "aliases.json").read_text()) == {}


def test_files_the_server_was_given_are_not_deleted(tmp_path):
    path = tmp_path / "notes.Q4_0.gguf"
    make_gguf(path, 1000)
    from runner.app.models import ServedFile

    run, _, _ = serve(None, index=ModelIndex(files=[ServedFile("notes", path)]))
    with run as base:
        r = httpx.request("DELETE", f"{base}/api/delete", json={"model": "notes"})
        assert r.status_code == 400 and "deletes only models it pulled" in r.json()["error"] and path.exists()
        r = httpx.post(f"{base}/api/pull", json={"model": "notes"})
        assert r.status_code == 400 and "nothing to pull" in r.json()["error"]


# ----------------------------------------------------------------------------------------------------- show
def test_show_for_the_demo_model(demo_local):
    run, _, _ = serve(load_catalog())
    with run as base:
        client = ollama.Client(host=base)
        show = client.show(DEMO)
        assert show.capabilities == ["completion", "tools", "embedding"]
        assert "<|im_start|>" in show.template and show.template == read_card(demo_local, DEMO).chat_template
        assert "temperature                    0.8" in show.parameters and "num_ctx" not in show.parameters
        assert show.modelfile.startswith(f"FROM {demo_local}\n") and "PARAMETER top_k" in show.modelfile
        assert show.license.startswith("Apache License 2.0")
        assert show.modelinfo["general.architecture"] == "llama"
        # loaded: the context each request gets is known
        httpx.post(f"{base}/api/generate", json={"model": DEMO}, timeout=30)
        assert "num_ctx                        256" in client.show(DEMO).parameters


def test_capabilities_claim_only_what_the_server_does(demo_local):
    """Each claim is checked against the server's own answer, so a merge that adds tool calling or embeddings
    and does not update the claims (or claims them without serving them) fails here."""
    run, _, _ = serve(load_catalog())
    with run as base:
        caps = ollama.Client(host=base).show(DEMO).capabilities
        tool = {"type": "function", "function": {"name": "f", "description": "d", "parameters": {
            "type": "object", "properties": {}}}}
        r = httpx.post(f"{base}/api/chat", json={"model": DEMO, "stream": False, "tools": [tool],
                                                 "messages": [{"role": "user", "content": "hi"}]}, timeout=30)
        assert ("tools" in caps) == (r.status_code == 200), r.text
        r = httpx.post(f"{base}/api/embed", json={"model": DEMO, "input": "hi"}, timeout=30)
        assert ("embedding" in caps) == (r.status_code == 200), r.text
        r = httpx.post(f"{base}/api/generate", json={"model": DEMO, "prompt": "hi", "stream": False}, timeout=30)
        assert ("completion" in caps) == (r.status_code == 200)


def test_an_embedding_model_is_told_apart_by_its_pooling_type(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "embed.F32.gguf"
    w = gguf.GGUFWriter(str(path), "bert")
    w.add_block_count(1)
    w.add_uint32("bert.pooling_type", 2)
    w.add_tensor("token_embd.weight", np.zeros(16, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    card = read_card(path, "embed")
    assert card.pooling == "cls" and card.extra["bert.pooling_type"] == 2
    from runner.app.models import ServedFile
    from runner.server.ollama_api import capabilities

    run, app, _ = serve(None, index=ModelIndex(files=[ServedFile("embed", path)]))
    with run as base:
        embeds = httpx.post(f"{base}/api/embed", json={"model": "embed", "input": "x"}).status_code != 404
        assert capabilities(card) == (["embedding"] if embeds else [])
        assert "completion" not in httpx.post(f"{base}/api/show", json={"model": "embed"}).json()["capabilities"]
    assert capabilities(ModelCard(name="x"))[0] == "completion"     # no pooling type: a text model


# ---------------------------------------------------------------------------------------------------- auth
@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "::", "my-host.example"])
def test_exposed_without_a_key_management_is_refused(host):
    engine = FakeEngine(n_parallel=1)
    with running(create_app(ServerConfig(host=host), engine=engine, card=ModelCard(name="fake-model"))) as base:
        for method, path, body in [("POST", "/api/pull", {"model": "fake-model"}),
                                   ("DELETE", "/api/delete", {"model": "fake-model"}),
                                   ("POST", "/api/copy", {"source": "fake-model", "destination": "x"})]:
            r = httpx.request(method, base + path, json=body)
            assert r.status_code == 403, (path, r.text)
            error = r.json()["error"]
            assert "refused" in error and "without an API key" in error and "--api-key KEY" in error
            assert "--host 127.0.0.1" in error
        with pytest.raises(ollama.ResponseError) as e:
            ollama.Client(host=base).pull("fake-model")
        assert e.value.status_code == 403
        # reading is not managing
        assert httpx.post(f"{base}/api/show", json={"model": "fake-model"}).status_code == 200
        assert not (dirs.home() / "aliases.json").exists()


def test_with_a_key_management_needs_it_and_localhost_needs_none():
    engine = FakeEngine(n_parallel=1)
    card = ModelCard(name="fake-model")
    with running(create_app(ServerConfig(host="0.0.0.0", api_key="sekrit"), engine=engine, card=card)) as base:
        r = httpx.post(f"{base}/api/copy", json={"source": "fake-model", "destination": "x"})
        assert r.status_code == 401 and "Authorization: Bearer" in r.json()["error"]
        r = httpx.post(f"{base}/api/copy", json={"source": "fake-model", "destination": "x"},
                       headers={"Authorization": "Bearer sekrit"})
        assert r.status_code == 200
        client = ollama.Client(host=base, headers={"Authorization": "Bearer sekrit"})
        assert client.delete("x").status == "success"
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert ServerConfig(host=host).local_only and not ServerConfig(host=host).exposed_without_key
    with running(create_app(ServerConfig(), engine=FakeEngine(n_parallel=1), card=card, close_engine=True)) as base:
        r = httpx.post(f"{base}/api/copy", json={"source": "fake-model", "destination": "y"})
        assert r.status_code == 200


def test_the_body_limit_holds_for_a_chunked_delete():
    engine = FakeEngine(n_parallel=1)
    config = ServerConfig(max_body_bytes=1000)
    with running(create_app(config, engine=engine, card=ModelCard(name="fake-model"))) as base:
        def chunks():
            for _ in range(10):
                yield b'{"model": "' + b"x" * 200

        r = httpx.request("DELETE", f"{base}/api/delete", content=chunks(),
                          headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "1000 bytes" in r.json()["error"]
        r = httpx.post(f"{base}/api/pull", content=b'{"model": "' + b"x" * 2000 + b'"}',
                       headers={"Content-Type": "application/json"})
        assert r.status_code == 413


# ------------------------------------------------------------------------------------- the real `llmrun serve`
@pytest.mark.llama
def test_the_real_server_pulls_shows_copies_and_deletes(tmp_path, demo_gguf, monkeypatch):
    """`llmrun serve` in its own process (a catalog of our own through LLMRUN_CONFIGS, the hub environment set
    before it starts), the demo model loaded at start, the `ollama` client managing models against it."""
    import shutil

    from test_server_models import llmrun_serve
    from tests.conftest import REPO
    from tests.fakehub import write_catalog

    data = make_gguf(tmp_path / "t.gguf", 50_000)
    configs = tmp_path / "configs"
    shutil.copytree(REPO / "configs" / "hardware", configs / "hardware")
    with FakeHub() as fake:
        repo = fake.add_repo("org/tiny-GGUF", {FILE: data})
        write_catalog(configs, [("tiny", repo, "Q4_0", "Apache-2.0")])
        monkeypatch.setenv("LLMRUN_CONFIGS", str(configs))
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        with llmrun_serve(tmp_path / "home", "--model", str(demo_gguf), "--name", "demo", "--ctx", "512") as (
                base, _, lines):
            client = ollama.Client(host=base)
            events = list(client.pull(TINY, stream=True))
            assert events[0].status == "pulling manifest" and events[-1].status == "success"
            assert downloads(events)[-1].completed == len(data)
            assert sorted(tags(base)) == ["demo", TINY]
            show = client.show("demo")
            assert show.capabilities == ["completion", "tools", "embedding"] and "num_ctx                        512" in show.parameters
            assert client.copy(TINY, "mine").status == "success" and "mine" in tags(base)
            assert client.delete("mine").status == "success" and client.delete(TINY).status == "success"
            assert tags(base) == ["demo"]
            assert any("pulled tiny:Q4_0" in line for line in lines)
