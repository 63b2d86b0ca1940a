"""RPC workers on loopback: the worker process, the wire probe against llama.cpp's own client, discovery into
a HardwareProfile, and argument parsing. Everything binds 127.0.0.1 on free ports and stops by itself."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runner.cluster import workers as cluster
from runner.cluster import rpc
from runner.core.errors import ClusterError, UsageError
from runner.hardware.types import CPU, GPU, HardwareProfile

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def worker():
    """A real llama.cpp RPC worker (CPU device) on a free loopback port."""
    procs = []

    def start() -> str:
        port = free_port()
        proc = cluster.spawn_worker("127.0.0.1", port, threads=1, quiet=True)
        procs.append(proc)
        ep = f"127.0.0.1:{port}"
        cluster.wait_ready(proc, ep, timeout=30)
        return ep

    yield start
    for p in procs:
        cluster.stop_worker(p)


def test_probe_reports_the_workers_memory_as_llama_cpps_own_client_does(worker):
    ep = worker()
    info = rpc.probe(ep)
    assert info.version[0] == rpc.PROTO_MAJOR
    assert len(info.devices) == 1
    dev = info.devices[0]
    assert 0 < dev.free_bytes <= dev.total_bytes
    # the same numbers through ggml_backend_rpc_get_device_memory, in a child (the C client may abort)
    code = f"from runner.cluster import rpc; print(*rpc.device_memory({ep!r}, 0))"
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    free, total = map(int, out.stdout.split())
    assert total == dev.total_bytes
    assert abs(free - dev.free_bytes) < 2**30   # free RAM moves a little between the two calls


def test_probe_of_a_closed_port_is_a_clear_error_not_an_abort():
    ep = f"127.0.0.1:{free_port()}"
    with pytest.raises(ClusterError, match=f"RPC worker {ep} is unreachable"):
        rpc.probe(ep, timeout=1)
    assert not rpc.reachable(ep)


def test_probe_of_something_that_is_not_a_worker_times_out_clearly():
    with socket.socket() as srv:            # accepts but never answers
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        ep = "127.0.0.1:%d" % srv.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(ClusterError, match="did not answer"):
            rpc.probe(ep, timeout=0.5)
        assert time.monotonic() - t0 < 5


def test_profile_with_real_workers_adds_one_rpc_device_each_in_front(worker):
    eps = [worker(), worker()]
    base = HardwareProfile(name="main", cpu=CPU("x", "x86_64", 2, 2, 2.0), ram_total_bytes=8 << 30,
                           ram_available_bytes=6 << 30,
                           gpus=(GPU(0, "RTX 4090", 24 << 30, 23 << 30),))
    prof = cluster.profile_with_workers(base, eps, network=cluster.Network(10.0, 0.0002))
    assert [g.vendor for g in prof.gpus] == ["rpc", "rpc", "nvidia"]
    assert [g.name for g in prof.gpus[:2]] == [f"RPC[{eps[0]}]", f"RPC[{eps[1]}]"]
    assert [g.index for g in prof.gpus] == [0, 1, 0]       # RPC0, RPC1, then the local GPU0
    assert prof.gpus[0].endpoint == eps[0] and prof.gpus[0].link_gbps == 10.0
    total = rpc.probe(eps[0]).devices[0].total_bytes
    assert prof.gpus[0].total_bytes == total
    # a CPU worker reports all its RAM as free (ggml's CPU backend): the plan keeps 10% (at least 2 GiB) back
    assert prof.gpus[0].free_bytes == total - max(2 * 2**30, int(total * 0.10))
    assert any("reports its RAM as all free" in n for n in prof.notes)
    assert cluster.rpc_servers_of(prof) == tuple(eps)
    assert any(eps[1] in n for n in prof.notes)


def test_profile_names_the_unreachable_worker():
    base = HardwareProfile(name="main", cpu=CPU("x", "x86_64", 2, 2, 2.0), ram_total_bytes=8 << 30,
                           ram_available_bytes=6 << 30)
    ep = f"127.0.0.1:{free_port()}"
    with pytest.raises(ClusterError, match=ep):
        cluster.profile_with_workers(base, [ep])


def test_parse_workers_and_network():
    assert cluster.parse_workers("h1:50052, h2:50053") == ("h1:50052", "h2:50053")
    assert cluster.parse_workers(["a:1", "b:2,c:3"]) == ("a:1", "b:2", "c:3")
    assert cluster.parse_workers(None) == ()
    for bad in ("h1", "h1:", ":50052", "h1:99999", "h1:x", "[::1]:5"):
        with pytest.raises(ClusterError, match="worker address"):
            cluster.parse_workers(bad)
    with pytest.raises(UsageError, match="twice"):
        cluster.parse_workers("a:1,a:1")
    assert cluster.Network.parse(None) == cluster.Network(1.0, 0.0005)
    assert cluster.Network.parse("10gbps,0.2ms") == cluster.Network(10.0, 0.0002)
    assert cluster.Network.parse("100mbps,300us") == cluster.Network(0.1, 0.0003)
    with pytest.raises(UsageError, match="--network"):
        cluster.Network.parse("fast")


def _run_cli(args, **kw):
    return subprocess.Popen([PY, "-m", "runner", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, **kw)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_worker_command_serves_then_stops_cleanly_on_signal(sig):
    port = free_port()
    proc = _run_cli(["worker", "--port", str(port), "--threads", "1"])
    try:
        ep = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                info = rpc.probe(ep, timeout=1)
                break
            except ClusterError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
        assert info.devices
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "worker ready on" in out and "stopping the worker" in out
    assert "WARNING" not in err                       # loopback: no warning
    assert not rpc.reachable(ep)                      # the llama.cpp child is gone too


def test_worker_on_a_taken_port_fails_clearly():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = _run_cli(["worker", "--port", str(port), "--threads", "1"])
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert "error:" in err and "in use" in err


def test_worker_bound_beyond_loopback_warns_loudly():
    port = free_port()
    proc = _run_cli(["worker", "--host", "0.0.0.0", "--port", str(port), "--threads", "1"])
    try:
        deadline = time.monotonic() + 30
        while not rpc.reachable(f"127.0.0.1:{port}"):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "NO authentication and NO encryption" in err
    assert "private" in err


def test_worker_with_an_unknown_device_names_the_ones_there():
    proc = _run_cli(["worker", "--port", str(free_port()), "--device", "CUDA7"])
    out, err = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert "unknown device(s) CUDA7" in err and "CPU" in err


def test_buffer_report_numbers_workers_in_llama_cpps_device_order():
    from runner.engine.report import actual_terms

    # as llama.cpp logs them: each one-device worker's buffers are "RPC0[host:port]"
    logged = {"CPU_Mapped model": 30, "RPC0[10.0.0.2:50052] model": 35, "RPC0[10.0.0.3:50052] model": 61,
              "RPC0[10.0.0.2:50052] KV": 3, "RPC0[10.0.0.3:50052] KV": 2, "CUDA0 model": 7}
    assert actual_terms(logged) == {("CPU", "weights"): 30, ("RPC0", "weights"): 35, ("RPC1", "weights"): 61,
                                    ("RPC0", "kv_cache"): 3, ("RPC1", "kv_cache"): 2, ("GPU0", "weights"): 7}
