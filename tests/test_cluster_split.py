"""A model split across two loopback RPC workers gives the same greedy output as one process.

llama.cpp's RPC registration is process-wide and its client aborts on a broken worker, so each load runs in a
child process here (as `IsolatedEngine` does in production)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runner import cluster
from tests.test_cluster import free_port

REPO = Path(__file__).resolve().parent.parent

LOAD = r"""
import json, sys
from runner.engine import rpc
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
