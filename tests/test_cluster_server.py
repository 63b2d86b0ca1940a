"""The HTTP server over a model split across two loopback RPC workers: a worker killed mid-request gives that
request a clear error within seconds, the server stays up and answers 503 (health and new requests, naming the
worker) until the worker returns, then serves again by itself."""

from __future__ import annotations

import threading
import time

import httpx

from runner.cluster.isolated import IsolatedEngine
from runner.server.config import ModelCard
from runner.server.app import create_app
from tests.live_server import running
from tests.test_cluster_engine import Workers, split_settings

BODY = {"model": "demo", "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0}


def test_server_survives_a_dead_worker_with_503_until_it_returns(demo_gguf):
    workers = Workers()
    try:
        eps = [workers.start(), workers.start()]
        victim = eps[0]
        engine = IsolatedEngine(demo_gguf, split_settings(eps), threads=1, retry_s=0.3, load_timeout_s=120)
        with running(create_app(engine=engine, card=ModelCard(name="demo"))) as base, \
                httpx.Client(base_url=base, timeout=30) as http:
            first = http.post("/v1/completions", json=BODY)
            assert first.status_code == 200, first.text
            expected = first.json()["choices"][0]["text"]

            # a long request in flight when the worker dies
            answer: dict = {}

            def long_request():
                answer["r"] = http.post("/v1/completions", json={**BODY, "max_tokens": 2000, "prompt": "Once"})

            t = threading.Thread(target=long_request)
            t.start()
            deadline = time.monotonic() + 20
            while engine.stats().busy_slots == 0:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            workers.kill(victim)
            t.join(timeout=20)
            assert not t.is_alive(), "the request in flight hung after the worker died"
            failed = answer["r"]
            assert failed.status_code >= 500 and victim in failed.text

            health = http.get("/health")
            assert health.status_code == 503 and victim in health.json()["error"]
            busy = http.post("/v1/completions", json=BODY)
            assert busy.status_code == 503 and victim in busy.text
            assert http.get("/").status_code == 200          # the server process itself is fine

            workers.start(int(victim.rsplit(":", 1)[1]))    # the worker returns on the same address
            deadline = time.monotonic() + 60
            while http.get("/health").status_code != 200:
                assert time.monotonic() < deadline, http.get("/health").text
                time.sleep(0.2)
            again = http.post("/v1/completions", json=BODY)
            assert again.status_code == 200 and again.json()["choices"][0]["text"] == expected
    finally:
        workers.stop_all()
