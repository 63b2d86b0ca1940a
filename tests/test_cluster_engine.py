"""IsolatedEngine: the demo model split across two loopback workers through llmrun's own engine; a worker
killed mid-generation gives a clear error naming it within seconds, the engine process that serves users stays
up (new requests get ClusterError, i.e. 503), and the model comes back by itself when the worker does."""

from __future__ import annotations

import os
import signal
import time

import pytest

from runner.cluster import workers as cluster
from runner.cluster.isolated import IsolatedEngine
from runner.engine.types import SamplingParams
from runner.core.errors import ClusterError
from runner.core.run_settings import RunSettings
from tests.test_cluster import free_port

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, repeat_penalty=1.0)
PROMPT = "The capital of France is"


class Workers:
    def __init__(self):
        self.procs: dict[str, object] = {}

    def start(self, port: int | None = None) -> str:
        port = port or free_port()
        ep = f"127.0.0.1:{port}"
        proc = cluster.spawn_worker("127.0.0.1", port, threads=1, quiet=True)
        cluster.wait_ready(proc, ep, timeout=30)
        self.procs[ep] = proc
        return ep

    def kill(self, ep: str) -> None:
        os.kill(self.procs[ep].pid, signal.SIGKILL)
        self.procs[ep].wait()

    def stop_all(self) -> None:
        for p in self.procs.values():
            cluster.stop_worker(p)


@pytest.fixture
def workers():
    w = Workers()
    yield w
    w.stop_all()


@pytest.fixture(scope="module")
def local_text(demo_gguf):
    from runner.engine.batching import start_engine

    with start_engine(demo_gguf, RunSettings(n_ctx=256), threads=1) as eng:
        return eng.complete(PROMPT, GREEDY).result(60).text


def split_settings(eps) -> RunSettings:
    return RunSettings(n_ctx=256, n_gpu_layers=-1, tensor_split=(1.0,) * len(eps), rpc_servers=tuple(eps))


def test_split_across_two_workers_matches_the_local_engine(demo_gguf, workers, local_text):
    eps = [workers.start(), workers.start()]
    with IsolatedEngine(demo_gguf, split_settings(eps), threads=1, load_timeout_s=120) as eng:
        assert eng.health() is None
        assert eng.tokenize("Paris") and eng.n_parallel == 1
        assert eng.complete(PROMPT, GREEDY).result(60).text == local_text
        stats = eng.stats()
        assert stats.tokens_out > 0


def test_embeddings_and_token_calls_cross_the_process_boundary(demo_gguf, workers):
    """IsolatedEngine's typed Embed/Tokenize/Detokenize/ApplyTemplate messages: the child answers them as the
    in-process engine does, and its errors come back as the same llmrun errors."""
    from runner.core.errors import ContextOverflowError, UsageError
    from runner.engine.batching import start_engine
    from runner.engine.types import ChatMessage

    texts = ["a first text", "a second one"]
    with start_engine(demo_gguf, RunSettings(n_ctx=256), threads=1) as local:
        expected = local.embed(texts)
        tokens = local.tokenize_with("Hi <|im_end|>", add_special=False, parse_special=True)
        prompt = local.apply_template([ChatMessage("user", "hi")])
    eps = [workers.start(), workers.start()]
    with IsolatedEngine(demo_gguf, split_settings(eps), threads=1, load_timeout_s=120) as eng:
        got = eng.embed(texts)
        assert got.dimensions == expected.dimensions and got.decodes == 1 and got.pooling == "mean"
        for a, b in zip(got.vectors, expected.vectors):
            dot = sum(x * y for x, y in zip(a, b))
            assert dot / (sum(x * x for x in a) * sum(y * y for y in b)) ** 0.5 > 0.9999
        assert eng.tokenize_with("Hi <|im_end|>", add_special=False, parse_special=True) == tokens
        assert eng.detokenize(tokens) == "Hi <|im_end|>"
        assert b"".join(eng.token_pieces(tokens)) == b"Hi <|im_end|>"
        assert eng.apply_template([ChatMessage("user", "hi")]) == prompt
        with pytest.raises(UsageError, match="not a token id"):
            eng.detokenize([10 ** 7])
        with pytest.raises(ContextOverflowError):
            eng.embed(["word " * 1000])


def test_killed_worker_fails_fast_names_it_and_the_model_returns_with_it(demo_gguf, workers, local_text):
    eps = [workers.start(), workers.start()]
    victim = eps[1]
    with IsolatedEngine(demo_gguf, split_settings(eps), threads=1, retry_s=0.3,
                                load_timeout_s=120) as eng:
        gen = eng.complete("Once upon a time", SamplingParams(temperature=0.0, max_tokens=400))
        it = iter(gen)
        next(it)                                  # generating across both workers
        workers.kill(victim)
        done = gen.result(timeout=15)             # TimeoutError here would be the hang we must never have
        assert done.finish_reason == "error"
        assert victim in done.error and eps[0] not in done.error
        assert isinstance(eng.health(), ClusterError)
        with pytest.raises(ClusterError, match=victim):
            eng.complete(PROMPT, GREEDY)
        with pytest.raises(ClusterError):
            eng.stats()
        # the worker comes back on the same address: the engine reloads by itself
        workers.start(int(victim.rsplit(":", 1)[1]))
        deadline = time.monotonic() + 60
        while eng.health() is not None:
            assert time.monotonic() < deadline, f"no reload: {eng.health()}"
            time.sleep(0.2)
        assert eng.restarts == 1
        assert eng.complete(PROMPT, GREEDY).result(60).text == local_text


def test_unreachable_worker_at_load_is_a_clear_error(demo_gguf):
    ep = f"127.0.0.1:{free_port()}"
    with pytest.raises(ClusterError, match=f"RPC worker {ep} is unreachable"):
        IsolatedEngine(demo_gguf, split_settings([ep]), threads=1)


def test_load_error_in_the_child_is_raised_as_ours(tmp_path, workers):
    from runner.core.errors import EngineError

    ep = workers.start()
    bad = tmp_path / "not-a-model.gguf"
    bad.write_bytes(b"nope" * 100)
    with pytest.raises(EngineError, match="GGUF"):
        IsolatedEngine(bad, split_settings([ep]), threads=1)


def _run_cli(demo_gguf, *extra):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    return subprocess.run([sys.executable, "-m", "runner", "run", "What is the capital of France?", "--model",
                           str(demo_gguf), "--temperature", "0", "--max-tokens", "12", "--ctx", "512", *extra],
                          cwd=repo, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONPATH": str(repo)})


def test_run_command_with_workers_answers_as_without(demo_gguf, workers):
    eps = [workers.start(), workers.start()]
    alone = _run_cli(demo_gguf)
    split = _run_cli(demo_gguf, "--workers", ",".join(eps))
    assert alone.returncode == 0 and split.returncode == 0, split.stderr[-2000:]
    assert split.stdout == alone.stdout and "Paris" in split.stdout
    assert "split over 2 RPC worker(s)" in split.stderr


def test_run_command_with_an_unreachable_worker_names_it(demo_gguf, workers):
    ep, dead = workers.start(), f"127.0.0.1:{free_port()}"
    r = _run_cli(demo_gguf, "--workers", f"{ep},{dead}")
    assert r.returncode == 1
    assert f"RPC worker {dead} is unreachable" in r.stderr and "Traceback" not in r.stderr


def test_sockets_to_workers_get_keepalive_and_a_user_timeout():
    import socket

    from runner.cluster import isolated

    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        ep = "127.0.0.1:%d" % srv.getsockname()[1]
        with socket.create_connection(srv.getsockname()) as to_worker, socket.socket() as other:
            assert isolated.harden_sockets([ep], fds=[to_worker.fileno(), other.fileno()]) == 1
            assert to_worker.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert to_worker.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == isolated.USER_TIMEOUT_MS
            assert to_worker.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == isolated.KEEPALIVE_IDLE_S
            assert other.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0


def test_an_idle_worker_that_dies_is_noticed_without_a_request(demo_gguf, workers):
    eps = [workers.start(), workers.start()]
    with IsolatedEngine(demo_gguf, split_settings(eps), threads=1, ping_s=0.3, retry_s=0.3,
                                load_timeout_s=120) as eng:
        assert eng.health() is None
        workers.kill(eps[0])
        deadline = time.monotonic() + 15
        while eng.health() is None:
            assert time.monotonic() < deadline, "a dead idle worker went unnoticed"
            time.sleep(0.1)
        assert eps[0] in eng.health().message
        with pytest.raises(ClusterError, match=eps[0]):
            eng.complete(PROMPT, GREEDY)


def test_tool_calls_and_choices_cross_the_process_boundary(demo_gguf, workers):
    from runner.engine.types import ChatMessage, Tool, Tools

    eps = [workers.start()]
    settings = RunSettings(n_ctx=1024, n_gpu_layers=-1, tensor_split=(1.0,), rpc_servers=tuple(eps))
    weather = Tool("get_weather", "Weather in a city", {"type": "object", "properties": {"city": {"type": "string"}},
                                                         "required": ["city"]})
    with IsolatedEngine(demo_gguf, settings, threads=1, load_timeout_s=120, n_parallel=2) as eng:
        g = eng.chat([ChatMessage("user", "Weather in Paris?")],
                     SamplingParams(temperature=0.8, seed=3, max_tokens=60, n=2, logprobs=True),
                     tools=Tools((weather,), choice="required", parallel=False))
        assert len(g.choices) == 2
        pieces = [p for d in g.choices[1].deltas() for p in d.tool_calls]
        for choice in g.choices:
            c = choice.result(120)
            assert c.finish_reason == "tool_calls" and c.tool_calls[0].name == "get_weather"
            assert c.logprobs and len(c.logprobs) == c.usage.completion_tokens
        assert "".join(p.arguments for p in pieces) == g.choices[1].result().tool_calls[0].arguments
