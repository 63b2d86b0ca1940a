"""Every llama.cpp computation of every engine in a process runs on one OS thread (runner.engine.compute): with
OpenMP, each thread that decodes gets a thread team of its own, and more OpenMP threads than cores throttle every
barrier (a second, idle engine that had decoded once slowed the first from 159 to 88 tok/s on 2 cores)."""

from __future__ import annotations

import threading

import pytest

from runner.core.run_settings import RunSettings
from runner.engine.compute import COMPUTE, ComputeThread
from runner.engine.types import SamplingParams

pytestmark = pytest.mark.llama


def test_calls_run_on_the_one_thread_in_order_and_raise_where_they_were_made():
    ct = ComputeThread("test-compute")
    seen: list[tuple[str, int]] = []

    def work(i: int) -> int:
        seen.append((threading.current_thread().name, i))
        return i * 2

    threads = [threading.Thread(target=lambda i=i: ct.call(work, i)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {name for name, _ in seen} == {"test-compute"} and sorted(i for _, i in seen) == list(range(8))
    assert ct.call(work, 21) == 42
    with pytest.raises(ZeroDivisionError):
        ct.call(lambda: 1 / 0)
    assert ct.call(lambda: ct.call(work, 1)) == 2, "a call made from a call runs in place, no deadlock"


def test_two_engines_generation_and_embeddings_all_decode_on_the_compute_thread(demo_gguf, monkeypatch):
    import llama_cpp

    from runner.engine.batching import start_engine

    callers: set[str] = set()
    real = llama_cpp.llama_decode

    def recording(ctx, batch):
        callers.add(threading.current_thread().name)
        return real(ctx, batch)

    monkeypatch.setattr(llama_cpp, "llama_decode", recording)
    a = start_engine(demo_gguf, RunSettings(n_ctx=512), model_name="a", threads=1)
    b = start_engine(demo_gguf, RunSettings(n_ctx=512), model_name="b", threads=1)
    try:
        p = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        ga, gb = a.complete("Once upon a time", p), b.complete("The sea was", p)
        assert ga.result().usage.completion_tokens == 4 and gb.result().usage.completion_tokens == 4
        assert len(b.embed(["an input to embed"]).vectors) == 1
    finally:
        a.close()
        b.close()
    assert callers == {COMPUTE.name}, f"llama_decode was called from {sorted(callers)}"
