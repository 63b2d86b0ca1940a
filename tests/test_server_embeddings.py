"""HTTP behaviour of the embeddings and token routes against the FAKE engine (tests/fake_engine.py): response
shapes, normalisation per API, the error shape of each API, model names, the API key, the body limit, admission
(429) and metrics labels. The real model and the official clients: tests/test_embeddings.py."""

from __future__ import annotations

import base64
import contextlib
import threading

import httpx
import numpy as np
import pytest

from fake_engine import EMBED_DIMS, FakeEngine
from live_server import running
from runner.server.app import create_app
from runner.server.config import ModelCard, ServerConfig

ROUTES = {   # route -> a valid body
    "/v1/embeddings": {"model": "fake-model", "input": "hello there"},
    "/api/embed": {"model": "fake-model", "input": "hello there"},
    "/api/embeddings": {"model": "fake-model", "prompt": "hello there"},
    "/tokenize": {"content": "hello there"},
    "/detokenize": {"tokens": [1, 2, 3]},
    "/apply-template": {"messages": [{"role": "user", "content": "hi"}]},
}


@contextlib.contextmanager
def serve(config: ServerConfig | None = None, **engine_kwargs):
    engine = FakeEngine(**engine_kwargs)
    with running(create_app(config or ServerConfig(), engine=engine, card=ModelCard(name="fake-model"))) as base:
        yield base, engine


@pytest.fixture(scope="module")
def fake():
    with serve() as s:
        yield s


def test_openai_shape_and_unit_vectors(fake):
    base, engine = fake
    r = httpx.post(f"{base}/v1/embeddings", json={"model": "fake-model", "input": ["a b", "ccc", "a b"],
                                                   "encoding_format": "float", "user": "u1"})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list" and body["model"] == "fake-model"
    assert [d["index"] for d in body["data"]] == [0, 1, 2] and all(d["object"] == "embedding" for d in body["data"])
    vecs = np.array([d["embedding"] for d in body["data"]])
    assert vecs.shape == (3, EMBED_DIMS)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0) and np.array_equal(vecs[0], vecs[2])
    assert body["usage"] == {"prompt_tokens": 5, "total_tokens": 5}
    raw = np.array(engine.embed(["a b"]).vectors[0])
    assert np.allclose(vecs[0], raw / np.linalg.norm(raw), atol=1e-7)


def test_openai_base64_and_token_arrays(fake):
    base, _ = fake
    floats = httpx.post(f"{base}/v1/embeddings", json={"model": "fake-model", "input": [[1, 2], [3]]}).json()
    b64 = httpx.post(f"{base}/v1/embeddings", json={"model": "fake-model", "input": [[1, 2], [3]],
                                                     "encoding_format": "base64"}).json()
    for f, b in zip(floats["data"], b64["data"]):
        assert np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4").tolist() == f["embedding"]
    one = httpx.post(f"{base}/v1/embeddings", json={"model": "fake-model", "input": [1, 2]}).json()
    assert len(one["data"]) == 1 and one["data"][0]["embedding"] == floats["data"][0]["embedding"]
    same = httpx.post(f"{base}/v1/embeddings", json={"model": "fake-model", "input": "x",
                                                      "dimensions": EMBED_DIMS})
    assert same.status_code == 200


def test_ollama_shapes_and_normalisation(fake):
    base, _ = fake
    r = httpx.post(f"{base}/api/embed", json={"model": "fake-model:latest", "input": ["a b", "ccc"],
                                              "keep_alive": "5m", "options": {"temperature": 0}}).json()
    assert set(r) == {"model", "embeddings", "total_duration", "load_duration", "prompt_eval_count"}
    assert np.allclose(np.linalg.norm(r["embeddings"], axis=1), 1.0) and r["prompt_eval_count"] == 3
    legacy = httpx.post(f"{base}/api/embeddings", json={"model": "fake-model", "prompt": "a b"}).json()
    assert set(legacy) == {"embedding"}
    v = np.array(legacy["embedding"])
    assert np.linalg.norm(v) > 1.5 and np.allclose(v / np.linalg.norm(v), r["embeddings"][0])   # raw, as Ollama


def test_ollama_empty_input_loads_and_returns_nothing(fake):
    base, engine = fake
    calls = engine.embed_calls
    assert httpx.post(f"{base}/api/embed", json={"model": "fake-model"}).json() == {"model": "fake-model",
                                                                                  "embeddings": []}
    assert httpx.post(f"{base}/api/embed", json={"model": "fake-model", "input": ""}).json()["embeddings"] == []
    assert httpx.post(f"{base}/api/embeddings", json={"model": "fake-model", "prompt": ""}).json() == {"embedding": []}
    assert engine.embed_calls == calls
    assert httpx.post(f"{base}/api/embed", json={"model": "nope", "input": ""}).status_code == 404


def test_truncation_is_said_not_silent(fake):
    base, engine = fake
    long = "w " * (engine.n_ctx + 10)
    r = httpx.post(f"{base}/api/embed", json={"model": "fake-model", "input": ["ok", long]})
    assert r.status_code == 200 and r.headers["x-llmrun-notice"].endswith("input[1]")
    r = httpx.post(f"{base}/api/embed", json={"model": "fake-model", "input": ["ok", long], "truncate": False})
    assert r.status_code == 400 and "at most" in r.json()["error"]
    r = httpx.post(f"{base}/v1/embeddings", json={"model": "fake-model", "input": ["ok", long]})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded" and r.json()["error"]["param"] == "input"


def test_each_api_answers_errors_in_its_shape(fake):
    base, _ = fake
    oai = httpx.post(f"{base}/v1/embeddings", json={"model": "fake-model", "input": [""]}).json()
    assert set(oai["error"]) == {"message", "type", "param", "code"} and oai["error"]["param"] == "input[0]"
    for path, body in (("/api/embed", {"model": "fake-model", "input": 5}),
                       ("/api/embeddings", {"model": "fake-model", "prompt": ["x"]})):
        r = httpx.post(base + path, json=body)
        assert r.status_code == 400 and isinstance(r.json()["error"], str)
    r = httpx.post(f"{base}/detokenize", json={"tokens": [5, 99999]})
    assert r.status_code == 400 and "99999" in r.json()["error"]["message"] and r.json()["error"]["param"] == "tokens"


@pytest.mark.parametrize("path", sorted(ROUTES))
def test_unknown_model_is_404_on_every_route(fake, path):
    base, _ = fake
    r = httpx.post(base + path, json={**ROUTES[path], "model": "other-model"})
    assert r.status_code == 404, r.text
    assert "other-model" in (r.json()["error"] if path.startswith("/api/") else r.json()["error"]["message"])


def test_token_routes(fake):
    base, _ = fake
    assert httpx.post(f"{base}/tokenize", json={}).json() == {"tokens": []}
    assert httpx.post(f"{base}/tokenize", json={"content": "a bb"}).json() == {"tokens": [1, 2]}
    assert httpx.post(f"{base}/tokenize", json={"content": "a bb", "add_special": True}).json() == {"tokens": [1, 1, 2]}
    assert httpx.post(f"{base}/tokenize", json={"content": ["a", 7, "bb"]}).json() == {"tokens": [1, 7, 2]}
    assert httpx.post(f"{base}/tokenize", json={"content": "a bb", "with_pieces": True}).json() == {
        "tokens": [{"id": 1, "piece": "<1>"}, {"id": 2, "piece": "<2>"}]}
    assert httpx.post(f"{base}/detokenize", json={}).json() == {"content": ""}
    assert httpx.post(f"{base}/detokenize", json={"tokens": [4, 2]}).json() == {"content": "<4><2>"}
    r = httpx.post(f"{base}/apply-template", json={"model": "fake-model", "temperature": 0.5, "messages": [
        {"role": "developer", "content": "be nice"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]})
    assert r.json() == {"prompt": "<system>be nice\n<user>hi\n<assistant>"}


@pytest.mark.parametrize("path", sorted(ROUTES))
def test_api_key_and_body_limit_apply(path):
    with serve(ServerConfig(api_key="s3cret", max_body_bytes=2000)) as (base, _):
        assert httpx.post(base + path, json=ROUTES[path]).status_code == 401
        ok = httpx.post(base + path, json=ROUTES[path], headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200, ok.text
        big = {**ROUTES[path], "padding": "x" * 3000}
        assert httpx.post(base + path, json=big, headers={"Authorization": "Bearer s3cret"}).status_code == 413
        metrics = httpx.get(f"{base}/metrics", headers={"Authorization": "Bearer s3cret"}).text
        assert f'endpoint="{path}",status="200"' in metrics


def test_embeddings_wait_their_turn_at_the_gate():
    """Embedding requests take a place at the model's admission gate like generations: full gate -> 429."""
    with serve(ServerConfig(queue=0), n_parallel=1, token_delay=0.05) as (base, engine):
        holding = threading.Thread(target=httpx.post, args=(f"{base}/v1/completions",),
                                   kwargs={"json": {"model": "fake-model", "prompt": "hi", "max_tokens": 40},
                                           "timeout": 30})
        holding.start()
        try:
            for _ in range(200):
                if engine.generations:
                    break
                threading.Event().wait(0.01)
            r = httpx.post(f"{base}/v1/embeddings", json=ROUTES["/v1/embeddings"])
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            r = httpx.post(f"{base}/api/embed", json=ROUTES["/api/embed"])
            assert r.status_code == 429 and "busy" in r.json()["error"]
        finally:
            holding.join()
        assert httpx.post(f"{base}/v1/embeddings", json=ROUTES["/v1/embeddings"]).status_code == 200


def test_over_a_pool_of_models(tmp_path):
    """Several models: embeddings load the one named (on demand), and the token routes, whose llama-server shape
    names no model, need `model` once more than one is in memory."""
    from fake_pool import MiB, FakeLoader, fake_pool

    loader = FakeLoader({"one": 100 * MiB, "two": 100 * MiB})
    app = create_app(ServerConfig(), pool=fake_pool(tmp_path, loader, budget=None))
    with running(app) as base:
        r = httpx.post(f"{base}/tokenize", json={"content": "a bb"})
        assert r.status_code == 400 and "none is loaded" in r.json()["error"]["message"]
        assert httpx.post(f"{base}/v1/embeddings", json={"model": "one", "input": "x"}).status_code == 200
        assert loader.loads == ["one"]
        assert httpx.post(f"{base}/tokenize", json={"content": "a bb"}).json() == {"tokens": [1, 2]}
        assert httpx.post(f"{base}/api/embed", json={"model": "two", "input": ""}).json()["embeddings"] == []
        assert loader.loads == ["one", "two"]                   # an empty /api/embed loads the model, as Ollama
        r = httpx.post(f"{base}/detokenize", json={"tokens": [1]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "model" and "one, two" in r.text
        assert httpx.post(f"{base}/detokenize", json={"tokens": [1], "model": "two"}).json() == {"content": "<1>"}
