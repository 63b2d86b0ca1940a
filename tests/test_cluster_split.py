"""A model split across two loopback RPC workers gives the same greedy output as one process.

llama.cpp's RPC registration is process-wide and its client aborts on a broken worker, so each load runs in a
child process here (as `IsolatedEngine` does in production)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from runner.cluster import workers as cluster
from tests.test_cluster import free_port

REPO = Path(__file__).resolve().parent.parent

LOAD = r"""
import json, sys
from runner.cluster import rpc
eps = [e for e in sys.argv[2].split(",") if e]
n = rpc.register_servers(eps)
import llama_cpp
m = llama_cpp.Llama(sys.argv[1], n_ctx=256, n_gpu_layers=-1 if n else 0, tensor_split=[1.0] * n if n else None,
                    n_threads=1, verbose=bool(n))
out = m.create_completion("The capital of France is", max_tokens=16, temperature=0.0)
print(json.dumps({"rpc_devices": n, "text": out["choices"][0]["text"]}))
"""


@pytest.fixture
def two_workers():
    procs, eps = [], []
    for _ in range(2):
        port = free_port()
        procs.append(cluster.spawn_worker("127.0.0.1", port, threads=1, quiet=True))
        eps.append(f"127.0.0.1:{port}")
    try:
        for p, ep in zip(procs, eps):
            cluster.wait_ready(p, ep, timeout=30)
        yield eps
    finally:
        for p in procs:
            cluster.stop_worker(p)


def _load(model: Path, endpoints: list[str]):
    r = subprocess.run([sys.executable, "-c", LOAD, str(model), ",".join(endpoints)], capture_output=True,
                       text=True, timeout=180, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


def test_demo_model_split_across_two_workers_matches_single_process(demo_gguf, two_workers):
    single, _ = _load(demo_gguf, [])
    split, log = _load(demo_gguf, two_workers)
    assert split["rpc_devices"] == 2
    # every repeating layer went to a worker, half each (SmolLM2-135M has 30)
    assert "layer   0 assigned to device RPC0" in log and "layer  29 assigned to device RPC1" in log
    assert "assigned to device CPU" not in log.split("load_tensors: layer  29")[0].split("load_tensors: layer   0")[-1]
    assert split["text"] == single["text"]
    assert "Paris" in single["text"]


SYNTH = r"""
import json, sys
from runner.cluster import rpc
eps = [e for e in sys.argv[2].split(",") if e]
n = rpc.register_servers(eps)
import llama_cpp
m = llama_cpp.Llama(sys.argv[1], n_ctx=512, n_gpu_layers=-1 if n else 0, tensor_split=[1.0] * n if n else None,
                    n_threads=1, verbose=True)
out = m.create_completion("Hello there", max_tokens=4, temperature=0.0)
print(json.dumps({"text": out["choices"][0]["text"]}))
"""


def test_shape_true_synthetic_llama_split_matches_and_the_estimate_predicts_each_worker(two_workers):
    """A Llama-2-7B-shaped Q4_0 GGUF cut to 2 layers (runner.synth, sparse zeros: 0.4 GB, no download)."""
    import dataclasses

    from runner.model import catalog, synth
    from runner.core.run_settings import RunSettings
    from runner.model.layout import layout_from_recipe
    from runner.plan import estimate as est

    shape = dataclasses.replace(catalog.load_catalog().get("llama-2-7b-chat:Q4_0").shape, n_layer=2)
    path = synth.ensure_synth(shape, "Q4_0", n_layer=2)

    def run(eps):
        r = subprocess.run([sys.executable, "-c", SYNTH, str(path), ",".join(eps)], capture_output=True, text=True,
                           timeout=180, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert r.returncode == 0, r.stderr[-3000:]
        buffers: dict = {}   # llama.cpp's own log lines (verbose) are the ground truth
        for kind, pat in (("weights", r"load_tensors: +(\S+) model buffer size = +([\d.]+) MiB"),
                          ("kv_cache", r"llama_kv_cache: +(\S+) KV buffer size = +([\d.]+) MiB")):
            for name, mib in re.findall(pat, r.stderr):
                buffers.setdefault(name, {})[kind] = float(mib)
        return {**json.loads(r.stdout.strip().splitlines()[-1]), "buffers": buffers}

    single, split = run([]), run(two_workers)
    assert split["text"] == single["text"]
    # llama.cpp names a worker's buffers "RPC<device on that worker>[host:port]"
    logged = {ep: next(v for k, v in split["buffers"].items() if k.endswith(f"[{ep}]")) for ep in two_workers}
    settings = RunSettings(n_ctx=512, n_gpu_layers=-1, tensor_split=(1.0, 1.0), rpc_servers=tuple(two_workers))
    predicted = {d.device: d for d in est.estimate(shape, layout_from_recipe(shape, "Q4_0"), settings).devices}
    for i, ep in enumerate(two_workers):
        d = predicted[f"RPC{i}"]
        assert logged[ep]["weights"] == pytest.approx(d.weights / 2**20, rel=0.01)
        assert logged[ep].get("kv_cache", 0.0) == pytest.approx(d.kv_cache / 2**20, rel=0.01)
    assert predicted["RPC0"].kv_cache > 0              # both layers (and their KV) went to the first worker


def test_worker_cache_dir_keeps_received_weights(demo_gguf, tmp_path):
    cache = tmp_path / "rpc-cache"
    port = free_port()
    proc = cluster.spawn_worker("127.0.0.1", port, threads=1, cache_dir=str(cache), quiet=True)
    try:
        cluster.wait_ready(proc, f"127.0.0.1:{port}")
        result, _ = _load(demo_gguf, [f"127.0.0.1:{port}"])
    finally:
        cluster.stop_worker(proc)
    assert "Paris" in result["text"]
    # llama.cpp caches weight tensors over 10 MiB by hash: here the tied output/embedding matrix (30 MB)
    files = list(cache.iterdir())
    assert files and max(f.stat().st_size for f in files) > 10 * 2**20
