"""Planning across RPC workers: Grok-1 over simulated hosts, per-worker KV cache, the network in the speed
prediction, and `llmrun plan --workers` against a real loopback worker."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runner.cluster import workers as cluster
from runner.plan import speed
from runner.core.errors import UsageError
from runner.hardware.profiles import load_profile
from runner.plan.select import Preferences, make_plan

REPO = Path(__file__).resolve().parent.parent
GiB = 2**30


def four_hosts(network: str | None = None):
    """The main host (64 GB RAM, no GPU) plus three like it as workers, 60 GiB free each."""
    main = load_profile("cluster-host-64gb")
    workers = ",".join(f"10.0.0.{i}:50052=60GiB" for i in (2, 3, 4))
    return cluster.profile_from_options(main, workers, network)


def test_grok1_q4k_is_placed_across_four_64gb_hosts():
    prof = four_hosts()
    assert [g.name for g in prof.gpus] == ["RPC[10.0.0.2:50052]", "RPC[10.0.0.3:50052]", "RPC[10.0.0.4:50052]"]
    result = make_plan(prof, Preferences(model="grok-1"))
    c = result.chosen
    assert c is not None and c.entry.quant == "Q4_K"
    s = c.settings
    assert s.rpc_servers == ("10.0.0.2:50052", "10.0.0.3:50052", "10.0.0.4:50052")
    assert len(s.tensor_split) == 3 and abs(sum(s.tensor_split) - 1) < 1e-3
    devices = {d.device: d for d in c.estimate.devices}
    assert set(devices) == {"CPU", "RPC0", "RPC1", "RPC2"}
    for name in ("RPC0", "RPC1", "RPC2"):      # each worker holds its layers and their KV cache, and fits
        d = devices[name]
        assert d.n_layers > 10 and d.kv_cache > 0
        assert d.total <= 60 * GiB
    # the layers the workers cannot hold stay on the main host, whose RAM fits them
    assert sum(d.n_layers for d in devices.values()) == 64
    assert devices["CPU"].total <= prof.ram_available_bytes
    # alone, the main host cannot run Grok-1 at all
    alone = make_plan(load_profile("cluster-host-64gb"), Preferences(model="grok-1"))
    assert alone.chosen is None


def test_network_cost_is_in_the_speed_prediction():
    fast = make_plan(four_hosts("100gbps,0.01ms"), Preferences(model="grok-1:Q4_K")).chosen
    slow = make_plan(four_hosts("0.1gbps,5ms"), Preferences(model="grok-1:Q4_K")).chosen
    assert fast.settings == slow.settings
    assert slow.speed.decode_tps < fast.speed.decode_tps
    # per step: two round trips and the activations + graph commands to each of the 3 workers, and the logits
    # from the last one: llama.cpp offloads the output layer first, so even with 3 layers on the main host's CPU
    # the output layer is on RPC2
    rpc_layers = {d.device: d.n_layers for d in slow.estimate.devices if d.device.startswith("RPC")}
    kw = dict(n_embd=6144, n_vocab=131072, output_device="RPC2")
    net = speed.network_seconds(four_hosts("0.1gbps,5ms"), rpc_layers, **kw)
    logits = 131072 * 4 * 8 / 0.1e9
    assert net == pytest.approx(3 * (2 * 0.005 + (2 * 6144 * 4 + 21 * 460) * 8 / 0.1e9) + logits, rel=0.05)
    assert 1 / slow.speed.decode_tps - 1 / fast.speed.decode_tps == pytest.approx(
        net - speed.network_seconds(four_hosts("100gbps,0.01ms"), rpc_layers, **kw), rel=1e-6)
    without = speed.network_seconds(four_hosts("0.1gbps,5ms"), rpc_layers, n_embd=6144, n_vocab=131072,
                                    output_device="CPU")
    assert net - without == pytest.approx(logits)


def test_rpc_devices_come_first_in_the_split_as_in_llama_cpp():
    from runner.core.run_settings import RunSettings
    from runner.plan.estimate import layer_devices

    s = RunSettings(n_gpu_layers=-1, tensor_split=(0.5, 0.5), rpc_servers=("a:1",))
    layers, out_dev, _ = layer_devices(10, s, gpus=1)
    k = layers.count("RPC0")
    assert 4 <= k <= 6 and layers == ["RPC0"] * k + ["GPU0"] * (10 - k)   # the first layers go to the worker
    assert out_dev == "GPU0"      # the output layer is on the last device: no logits over the network


def test_workers_with_a_local_gpu_are_numbered_as_llama_cpp_does():
    base = load_profile("rtx4090-24gb")
    prof = cluster.profile_from_options(base, "h2:50052=60GiB")
    assert [(g.vendor, g.index) for g in prof.gpus] == [("rpc", 0), ("nvidia", 0)]
    c = make_plan(prof, Preferences(model="llama-2-70b-chat:Q4_K_M")).chosen
    assert c is not None and c.settings.rpc_servers == ("h2:50052",)
    assert {d.device for d in c.estimate.devices} >= {"RPC0", "GPU0"}


def test_bad_worker_options_are_usage_errors():
    base = load_profile("cluster-host-64gb")
    with pytest.raises(UsageError, match="--workers"):
        cluster.profile_from_options(base, "h2:50052=lots")
    with pytest.raises(UsageError, match="--network only matters"):
        cluster.profile_from_options(base, None, "10gbps")


def test_plan_command_asks_a_real_worker(tmp_path):
    from tests.test_cluster import free_port

    port = free_port()
    proc = cluster.spawn_worker("127.0.0.1", port, threads=1, quiet=True)
    try:
        cluster.wait_ready(proc, f"127.0.0.1:{port}")
        r = subprocess.run([sys.executable, "-m", "runner", "plan", "--hardware", "ci-2core-24gb", "--model",
                            "llama-2-13b-chat", "--workers", f"127.0.0.1:{port}", "--json"], cwd=REPO,
                           capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    finally:
        cluster.stop_worker(proc)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    gpus = data["hardware"]["gpus"]
    assert gpus[0]["name"] == f"RPC[127.0.0.1:{port}]" and gpus[0]["free_bytes"] > 0
    assert data["chosen"]["n_gpu_layers"] > 0


def test_plan_command_names_an_unreachable_worker():
    from tests.test_cluster import free_port

    ep = f"127.0.0.1:{free_port()}"
    r = subprocess.run([sys.executable, "-m", "runner", "plan", "--hardware", "ci-2core-24gb", "--workers", ep],
                       cwd=REPO, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 1
    assert f"RPC worker {ep} is unreachable" in r.stderr and "llmrun worker" in r.stderr
    assert "Traceback" not in r.stderr


def test_worker_specs_and_gpu_workers_in_the_speed_prediction():
    specs = cluster.parse_worker_specs("h2:50052=79GiB@A100-SXM4-80GB, h3:50052")
    assert specs[0] == cluster.WorkerSpec("h2:50052", 79 * GiB, "A100-SXM4-80GB")
    assert specs[1] == cluster.WorkerSpec("h3:50052", None, None)
    with pytest.raises(UsageError, match="nothing after '@'"):
        cluster.parse_worker_specs("h2:50052=79GiB@")
    base = load_profile("a100-80gb")
    gpu_workers = cluster.profile_from_options(base, ",".join(f"10.0.0.{i}:50052=79GiB@A100-SXM4-80GB" for i in (2, 3)))
    cpu_workers = cluster.profile_from_options(base, ",".join(f"10.0.0.{i}:50052=79GiB" for i in (2, 3)))
    fast = make_plan(gpu_workers, Preferences(model="grok-1:Q4_K")).chosen
    slow = make_plan(cpu_workers, Preferences(model="grok-1:Q4_K")).chosen
    assert fast.settings.n_gpu_layers == 65 and fast.settings.rpc_servers == ("10.0.0.2:50052", "10.0.0.3:50052")
    assert fast.speed.decode_tps > 5 * slow.speed.decode_tps    # A100 bandwidth vs a CPU like the host's
