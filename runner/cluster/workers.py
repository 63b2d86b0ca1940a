"""Beyond one machine: llama.cpp RPC workers (ggml-rpc), as llama.cpp's own `rpc-server` / `--rpc` do it.

* `run_worker`: `llmrun worker` — runs llama.cpp's blocking RPC server in a child process and supervises it
  (ready check, clean stop on Ctrl-C / SIGTERM, loud warning when bound beyond loopback).
* `profile_with_workers`: asks every worker for its devices' memory and returns a HardwareProfile with one
  extra GPU entry (vendor "rpc") per remote device, so the planner splits across local devices + workers.

The wire protocol and the C side live in `runner.cluster.rpc`; the engine in a child process (llama.cpp's RPC
client aborts the whole process when a worker's socket dies) in `runner.cluster.isolated`.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from runner.cluster import rpc
from runner.core.errors import ClusterError, UsageError
from runner.core.run_settings import RunSettings
from runner.hardware.types import GPU, HardwareProfile

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
CPU_WORKER_RESERVE = 0.10            # share of a CPU worker's RAM kept for its system when it reports all as free
CPU_WORKER_RESERVE_MIN = 2 * 2**30
SECURITY_WARNING = """\
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
WARNING: this worker listens on {host}, not on 127.0.0.1.
  llama.cpp's RPC protocol has NO authentication and NO encryption (none exists in this llama.cpp
  version): anyone who can reach {host}:{port} can use this machine's memory and compute, read what
  it computes, and crash it. Run workers only on a private, trusted network (or a VPN / SSH tunnel),
  and firewall the port to the main host's address.
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"""


# ---------------------------------------------------------------------------------------------------------
# network assumptions for the speed prediction


@dataclass(frozen=True)
class Network:
    """The link between the main host and its workers: what each remote hop costs per token."""

    gbps: float = 1.0                # 1 Gb/s Ethernet unless told
    rtt_s: float = 0.0005            # 0.5 ms round trip per hop on a LAN

    @classmethod
    def parse(cls, text: str | None) -> "Network":
        """'10gbps', '10gbps,0.2ms', '1gbps,500us' (either part may be left out)."""
        if not text:
            return cls()
        net = cls()
        for part in (p.strip().lower() for p in text.split(",") if p.strip()):
            try:
                if part.endswith("gbps"):
                    net = dataclasses.replace(net, gbps=float(part[:-4]))
                elif part.endswith("mbps"):
                    net = dataclasses.replace(net, gbps=float(part[:-4]) / 1000)
                elif part.endswith("us"):
                    net = dataclasses.replace(net, rtt_s=float(part[:-2]) / 1e6)
                elif part.endswith("ms"):
                    net = dataclasses.replace(net, rtt_s=float(part[:-2]) / 1e3)
                else:
                    raise ValueError(part)
            except ValueError:
                raise UsageError(f"bad --network value {text!r}",
                                 hint="give a link speed and/or round trip, e.g. 10gbps,0.2ms or 1gbps") from None
        if net.gbps <= 0 or net.rtt_s < 0:
            raise UsageError(f"bad --network value {text!r}", hint="speed must be > 0 and round trip >= 0")
        return net


def parse_workers(text: str | Iterable[str] | None) -> tuple[str, ...]:
    """'h1:50052,h2:50052' (or repeated options) -> ('h1:50052', 'h2:50052'), validated, in order."""
    if not text:
        return ()
    parts = [text] if isinstance(text, str) else list(text)
    out: list[str] = []
    for part in parts:
        for ep in (p.strip() for p in part.split(",")):
            if not ep:
                continue
            host, port = rpc.parse_endpoint(ep)
            ep = f"{host}:{port}"
            if ep in out:
                raise UsageError(f"worker {ep} is listed twice")
            out.append(ep)
    if len(out) > 16:
        raise UsageError(f"{len(out)} workers given; llama.cpp supports at most 16 RPC servers")
    return tuple(out)


@dataclass(frozen=True)
class WorkerSpec:
    endpoint: str
    assumed_bytes: int | None = None   # '=SIZE': plan with this much free memory, without asking the worker
    kind: str | None = None            # '@GPU NAME': what the device is (the protocol does not say), for speed


def parse_worker_specs(text: str | Iterable[str] | None) -> tuple[WorkerSpec, ...]:
    """Like parse_workers, but each entry is HOST:PORT[=SIZE][@KIND]: '=60GiB' plans with that much free memory
    without asking the worker (machines you do not have yet); '@A100-SXM4-80GB' says the worker serves that
    GPU (a name from configs/gpus.toml), so the speed prediction uses its bandwidth instead of assuming a CPU
    worker like this host."""
    from runner.core.units import parse_size

    if not text:
        return ()
    parts = [text] if isinstance(text, str) else list(text)
    items = [p.strip() for part in parts for p in part.split(",") if p.strip()]
    out = []
    endpoints = parse_workers([i.partition("@")[0].partition("=")[0] for i in items])
    for ep, item in zip(endpoints, items):
        rest, _, kind = item.partition("@")
        _, eq, size = rest.partition("=")
        if "@" in item and not kind.strip():
            raise UsageError(f"--workers {item}: nothing after '@'", hint="name the GPU, e.g. @A100-SXM4-80GB")
        out.append(WorkerSpec(ep, parse_size(size, what=f"--workers {item}") if eq else None, kind.strip() or None))
    return tuple(out)


def assumed_worker(endpoint: str, size: int) -> rpc.WorkerInfo:
    """A worker that is not asked: one device with `size` bytes free (`--workers host:port=SIZE`)."""
    return rpc.WorkerInfo(endpoint, (rpc.PROTO_MAJOR, 0, 0), (rpc.RemoteDevice(0, size, size),), 0.0)


def profile_from_options(profile: HardwareProfile, workers: str | Iterable[str] | None,
                         network: str | None = None) -> HardwareProfile:
    """What `--workers` and `--network` make of a profile (the CLI's one call)."""
    specs = {w.endpoint: w for w in parse_worker_specs(workers)}
    if not specs:
        if network:
            raise UsageError("--network only matters with --workers")
        return profile

    def probe(ep: str) -> rpc.WorkerInfo:
        size = specs[ep].assumed_bytes
        return assumed_worker(ep, size) if size is not None else rpc.probe(ep)

    return profile_with_workers(profile, list(specs), network=Network.parse(network), probe=probe,
                                kinds={ep: w.kind for ep, w in specs.items() if w.kind})


# ---------------------------------------------------------------------------------------------------------
# planning with workers


def profile_with_workers(profile: HardwareProfile, endpoints: Iterable[str], *, network: Network | None = None,
                         probe: Callable[[str], rpc.WorkerInfo] = rpc.probe,
                         kinds: dict[str, str] | None = None) -> HardwareProfile:
    """`profile` plus one GPU entry per remote device (vendor "rpc", name "RPC[host:port]", index 0.. among the
    remote ones), in the order llama.cpp uses devices: remote first, in the order given, then the local GPUs
    (so a plan's tensor_split lines up with llama.cpp's device list). Raises
    ClusterError naming the first worker that cannot be reached."""
    network = network or Network()
    remote: list[GPU] = []
    notes = list(profile.notes)
    for ep in endpoints:
        info = probe(ep)
        if not info.devices:
            raise ClusterError(f"RPC worker {ep} offers no device")
        for dev in info.devices:
            free = dev.free_bytes
            if info.rtt_s and free == dev.total_bytes:
                # llama.cpp's CPU backend reports all of the host's RAM as free ("free system memory is
                # ill-defined", ggml-cpu.cpp); GPUs never report free == total. Keep some back for the system.
                free = dev.total_bytes - max(CPU_WORKER_RESERVE_MIN, int(dev.total_bytes * CPU_WORKER_RESERVE))
                notes.append(f"RPC worker {ep} reports its RAM as all free (llama.cpp's CPU backend does); "
                             f"planning with {free / 2**30:.1f} of {dev.total_bytes / 2**30:.1f} GiB "
                             f"(give {ep}=SIZE to set it)")
            name = f"RPC[{ep}]" if len(info.devices) == 1 else f"RPC[{ep}]#{dev.index}"
            if kinds and kinds.get(ep):
                name += f" {kinds[ep]}"       # the speed prediction looks the GPU up by name
            remote.append(GPU(index=len(remote), name=name, total_bytes=dev.total_bytes, free_bytes=free,
                              vendor="rpc", endpoint=ep, link_gbps=network.gbps, link_rtt_s=network.rtt_s))
        if info.rtt_s:
            notes.append(f"RPC worker {ep}: {len(info.devices)} device(s), protocol "
                         f"{'.'.join(map(str, info.version))}, probe round trip {info.rtt_s * 1000:.2f} ms")
        else:
            notes.append(f"RPC worker {ep}: not asked, assumed {info.devices[0].free_bytes / 2**30:.0f} GiB free")
    # local GPUs keep their indexes (GPU0...), remote devices are numbered on their own (RPC0...), as llama.cpp
    # and the estimate name them
    local = [g for g in profile.gpus if g.vendor != "rpc"]
    return dataclasses.replace(profile, gpus=tuple(remote) + tuple(local), notes=tuple(notes))


def rpc_servers_of(profile: HardwareProfile) -> tuple[str, ...]:
    """The worker endpoints a profile's GPU list refers to, in order, each once."""
    out: list[str] = []
    for g in profile.gpus:
        if g.vendor == "rpc" and g.endpoint and g.endpoint not in out:
            out.append(g.endpoint)
    return tuple(out)


# ---------------------------------------------------------------------------------------------------------
# the worker


def _die_with_parent() -> None:
    """Runs in the child between fork and exec. Linux sends the signal when the *thread* that started the
    child ends, so only use it for children started from a thread that lives as long as they should."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: never outlive the supervisor


def spawn_worker(host: str, port: int, *, devices: tuple[str, ...] = (), threads: int | None = None,
                 cache_dir: str | None = None, quiet: bool = False) -> subprocess.Popen:
    """Start llama.cpp's RPC server in a child process (`python -m runner.cluster.rpc`); returns at once."""
    endpoint = f"{host}:{port}"
    rpc.parse_endpoint(endpoint)
    threads = threads or max(1, (os.cpu_count() or 2) // 2)
    if threads < 1:
        raise UsageError("--threads must be at least 1")
    if cache_dir:
        os.makedirs(cache_dir, exist_ok=True)
    out = subprocess.DEVNULL if quiet else None
    return subprocess.Popen(
        [sys.executable, "-m", "runner.cluster.rpc", endpoint, str(threads), cache_dir or "-", *devices],
        stdout=out, stderr=out, start_new_session=True, preexec_fn=_die_with_parent,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
    )


def wait_ready(proc: subprocess.Popen, endpoint: str, *, timeout: float = 30.0) -> rpc.WorkerInfo:
    """Wait until the worker answers a probe; ClusterError if it exits or stays silent."""
    host, port = rpc.parse_endpoint(endpoint)
    local = f"127.0.0.1:{port}" if host in ("0.0.0.0", "::") else endpoint
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise ClusterError(f"the RPC worker on {endpoint} stopped at start (exit {proc.returncode})",
                               hint=f"is port {port} already in use? see the messages above")
        try:
            return rpc.probe(local, timeout=1.0)
        except ClusterError:
            if time.monotonic() > deadline:
                stop_worker(proc)
                raise ClusterError(f"the RPC worker on {endpoint} did not answer within {timeout:.0f} s") from None
            time.sleep(0.1)


def stop_worker(proc: subprocess.Popen, *, grace: float = 5.0) -> None:
    """SIGTERM (llama.cpp blocks in accept(): SIGTERM's default action ends it), then SIGKILL after `grace`."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_worker(host: str = "127.0.0.1", port: int = rpc.DEFAULT_PORT, *, devices: tuple[str, ...] = (),
               threads: int | None = None, cache_dir: str | None = None,
               echo: Callable[[str], None] = print, warn: Callable[[str], None] | None = None) -> int:
    """`llmrun worker`: serve this host's devices until Ctrl-C or SIGTERM. Returns the exit status."""
    warn = warn or (lambda s: print(s, file=sys.stderr))
    endpoint = f"{host}:{port}"
    rpc.parse_endpoint(endpoint)
    echo(rpc.check_library())
    chosen = rpc.select_devices(devices)      # fail here, clearly, before starting anything
    if host not in LOOPBACK:
        warn(SECURITY_WARNING.format(host=host, port=port))
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    proc = spawn_worker(host, port, devices=tuple(d.name for d in chosen), threads=threads, cache_dir=cache_dir)
    try:
        info = wait_ready(proc, endpoint)
        for d, r in zip(chosen, info.devices):
            echo(f"serving {d.name} ({d.description}): {r.total_bytes / 2**30:.1f} GiB, "
                 f"{r.free_bytes / 2**30:.1f} GiB free")
        echo(f"worker ready on {endpoint}; use it with `--workers {endpoint}` (Ctrl-C stops it)")
        while stop["signal"] is None:
            if proc.poll() is not None:
                raise ClusterError(f"the RPC worker on {endpoint} exited unexpectedly (status {proc.returncode})")
            time.sleep(0.2)
        echo(f"stopping the worker on {endpoint} ({signal.Signals(stop['signal']).name})")
        return 0
    finally:
        stop_worker(proc)
        for s, h in old.items():
            signal.signal(s, h)


def split_over_workers(settings: RunSettings, profile: HardwareProfile) -> RunSettings:
    """Settings for a GGUF given by path (no plan) on a profile with workers: every layer offloaded, split in
    proportion to the devices' free memory (workers first, as llama.cpp orders them)."""
    endpoints = rpc_servers_of(profile)
    if not endpoints:
        return settings
    free = [max(g.free_bytes, 0) for g in profile.gpus]
    total = sum(free) or 1
    return dataclasses.replace(settings, n_gpu_layers=-1, rpc_servers=endpoints,
                               tensor_split=tuple(round(f / total, 4) for f in free))
