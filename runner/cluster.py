"""Beyond one machine: llama.cpp RPC workers (ggml-rpc), as llama.cpp's own `rpc-server` / `--rpc` do it.

* `run_worker`: `llmrun worker` — runs llama.cpp's blocking RPC server in a child process and supervises it
  (ready check, clean stop on Ctrl-C / SIGTERM, loud warning when bound beyond loopback).
* `profile_with_workers`: asks every worker for its devices' memory and returns a HardwareProfile with one
  extra GPU entry (vendor "rpc") per remote device, so the planner splits across local devices + workers.
* `IsolatedEngine`: an Engine that loads and runs the model in a child process. llama.cpp's RPC client
  aborts the whole process when a worker's socket dies, so the process that serves users must not be the one
  that talks to workers: when the child dies we name the dead worker(s), fail the requests in flight with a
  ClusterError, answer new ones with ClusterError (the server's 503) and reload once every worker answers.

The wire protocol and the C bindings live in `runner.engine.rpc`.
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

from runner.engine import rpc
from runner.errors import ClusterError, LlmrunError, UsageError
from runner.hardware import GPU, HardwareProfile

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
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


def parse_worker_specs(text: str | Iterable[str] | None) -> tuple[tuple[str, int | None], ...]:
    """Like parse_workers, but each entry may end in '=SIZE' ('h2:50052=60GiB'): plan with that much free
    memory on the worker instead of asking it (planning for machines you do not have yet)."""
    from runner.units import parse_size

    if not text:
        return ()
    parts = [text] if isinstance(text, str) else list(text)
    items = [p.strip() for part in parts for p in part.split(",") if p.strip()]
    sizes: dict[str, int | None] = {}
    endpoints = parse_workers([i.partition("=")[0] for i in items])
    for ep, item in zip(endpoints, items):
        _, eq, size = item.partition("=")
        sizes[ep] = parse_size(size, what=f"--workers {item}") if eq else None
    return tuple(sizes.items())


def assumed_worker(endpoint: str, size: int) -> rpc.WorkerInfo:
    """A worker that is not asked: one device with `size` bytes free (`--workers host:port=SIZE`)."""
    return rpc.WorkerInfo(endpoint, (rpc.PROTO_MAJOR, 0, 0), (rpc.RemoteDevice(0, size, size),), 0.0)


def profile_from_options(profile: HardwareProfile, workers: str | Iterable[str] | None,
                         network: str | None = None) -> HardwareProfile:
    """What `--workers` and `--network` make of a profile (the CLI's one call)."""
    specs = parse_worker_specs(workers)
    if not specs:
        if network:
            raise UsageError("--network only matters with --workers")
        return profile
    sizes = dict(specs)

    def probe(ep: str) -> rpc.WorkerInfo:
        return assumed_worker(ep, sizes[ep]) if sizes[ep] is not None else rpc.probe(ep)

    return profile_with_workers(profile, [ep for ep, _ in specs], network=Network.parse(network), probe=probe)


# ---------------------------------------------------------------------------------------------------------
# planning with workers


def profile_with_workers(profile: HardwareProfile, endpoints: Iterable[str], *, network: Network | None = None,
                         probe: Callable[[str], rpc.WorkerInfo] = rpc.probe) -> HardwareProfile:
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
            name = f"RPC[{ep}]" if len(info.devices) == 1 else f"RPC[{ep}]#{dev.index}"
            remote.append(GPU(index=len(remote), name=name, total_bytes=dev.total_bytes, free_bytes=dev.free_bytes,
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
    """Start llama.cpp's RPC server in a child process (`python -m runner.engine.rpc`); returns at once."""
    endpoint = f"{host}:{port}"
    rpc.parse_endpoint(endpoint)
    threads = threads or max(1, (os.cpu_count() or 2) // 2)
    if threads < 1:
        raise UsageError("--threads must be at least 1")
    if cache_dir:
        os.makedirs(cache_dir, exist_ok=True)
    out = subprocess.DEVNULL if quiet else None
    return subprocess.Popen(
        [sys.executable, "-m", "runner.engine.rpc", endpoint, str(threads), cache_dir or "-", *devices],
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


# ---------------------------------------------------------------------------------------------------------
# the engine, isolated from llama.cpp's abort on a dead worker

_GEN_METHODS = ("chat", "complete", "generate")
_CALL_METHODS = ("tokenize", "prompt_tokens", "render_chat", "stats")


def _error_from(cls_name: str, message: str, hint: str | None) -> Exception:
    from runner import errors

    cls = getattr(errors, cls_name, None)
    if isinstance(cls, type) and issubclass(cls, errors.LlmrunError) and cls is not errors.UnknownModelError:
        return cls(message, hint=hint)
    return errors.EngineError(message, hint=hint)


def _child_entry(fd: int) -> None:
    """`IsolatedEngine`'s child process: its end of the socketpair is file descriptor `fd`."""
    from multiprocessing.connection import Connection

    conn = Connection(fd)
    model_path, settings, kwargs = conn.recv()
    _child_main(conn, model_path, settings, kwargs)


def _child_main(conn, model_path: str, settings, kwargs: dict) -> None:
    """The engine process: register the workers, load, then serve the parent's requests over `conn`."""
    import threading

    lock = threading.Lock()

    def send(*msg) -> None:
        with lock:
            conn.send(msg)

    try:
        rpc.register_servers(settings.rpc_servers)
        from runner.engine import load_engine

        engine = load_engine(model_path, settings, **kwargs)
    except LlmrunError as e:
        send("load_error", type(e).__name__, e.message, e.hint)
        return
    send("ready", {"model_name": engine.model_name, "n_ctx": engine.n_ctx, "n_parallel": engine.n_parallel})
    handles: dict = {}

    def pump(rid: int, handle) -> None:
        for delta in handle:
            send("delta", rid, delta)
        send("done", rid, handle.result())
        handles.pop(rid, None)

    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):       # the parent is gone
            break
        op, rid, args = msg[0], msg[1], msg[2:]
        if op == "close":
            break
        if op == "cancel":
            if rid in handles:
                handles[rid].cancel()
            continue
        try:
            value = getattr(engine, op)(*args)
        except LlmrunError as e:
            send("raise", rid, type(e).__name__, e.message, e.hint)
            continue
        if op in _GEN_METHODS:
            handles[rid] = value
            send("started", rid, getattr(value, "notice", None), getattr(value, "dropped_messages", 0))
            threading.Thread(target=pump, args=(rid, value), daemon=True).start()
        else:
            send("reply", rid, value)
    engine.close()
    conn.close()


class IsolatedEngine:
    """An Engine whose llama.cpp runs in a child process, for models split across RPC workers.

    llama.cpp's RPC client calls abort() when a worker's connection breaks, which would take the whole
    server down. Here only the child dies: requests in flight finish with finish_reason "error" and a message
    naming the worker that went away, new requests raise ClusterError (HTTP 503) while `health()` reports the
    outage, and the model is reloaded in a fresh child as soon as every worker answers a probe again. A worker
    host that vanishes without closing its socket (power, cable) is caught by a watchdog: no progress for
    `stall_s` while requests are running and a worker that accepts no TCP connection → the child is killed."""

    def __init__(self, model_path, settings, *, retry_s: float = 2.0, stall_s: float = 20.0,
                 load_timeout_s: float | None = None, **load_kwargs):
        import itertools
        import threading

        self._path, self._settings, self._kwargs = str(model_path), settings, load_kwargs
        self.workers: tuple[str, ...] = tuple(settings.rpc_servers)
        self._retry_s, self._stall_s, self._load_timeout_s = retry_s, stall_s, load_timeout_s
        self._ids = itertools.count(1)
        self._lock = threading.RLock()
        self._pending: dict[int, object] = {}      # rid -> GenerationHandle
        self._calls: dict[int, list] = {}          # rid -> [Event, reply]
        self._down: ClusterError | None = None
        self._closing = False
        self._last_msg = time.monotonic()
        self.restarts = 0
        self._start()                              # raises the child's load error, like load_engine
        threading.Thread(target=self._watchdog, name="llmrun-cluster-watchdog", daemon=True).start()

    # ------------------------------------------------------------------ child process lifecycle
    def _start(self) -> None:
        import socket
        import threading
        from multiprocessing.connection import Connection

        for ep in self.workers:                    # fail early and clearly; the child would abort
            rpc.probe(ep)
        # a plain child process (not multiprocessing's spawn, which re-runs `python -m runner`'s __main__),
        # talking pickles over a socketpair through multiprocessing's Connection
        ours, theirs = socket.socketpair()
        proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; from runner.cluster import _child_entry; _child_entry(int(sys.argv[1]))",
             str(theirs.fileno())],
            pass_fds=[theirs.fileno()],  # no PDEATHSIG here: it fires when the *thread* that spawned us ends
            env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "GGML_NO_BACKTRACE": "1"})
        theirs.close()
        parent = Connection(ours.detach())
        parent.send((self._path, self._settings, self._kwargs))
        if not parent.poll(self._load_timeout_s):
            proc.kill()
            proc.wait()
            raise ClusterError(f"loading the model across {', '.join(self.workers)} took over "
                               f"{self._load_timeout_s} s")
        try:
            msg = parent.recv()
        except (EOFError, OSError):
            proc.wait(5)
            raise self._death_error(proc.returncode, while_="loading the model") from None
        if msg[0] == "load_error":
            proc.wait(5)
            raise _error_from(*msg[1:])
        info = msg[1]
        self.model_name, self.n_ctx, self.n_parallel = info["model_name"], info["n_ctx"], info["n_parallel"]
        with self._lock:
            self._proc, self._conn = proc, parent
            self._send_lock = threading.Lock()
            self._down = None
            self._last_msg = time.monotonic()
        threading.Thread(target=self._reader, args=(proc, parent), name="llmrun-cluster-reader", daemon=True).start()

    def _death_error(self, exitcode: int | None, *, while_: str) -> ClusterError:
        # our child is gone, so a healthy worker is back in accept() and answers a full probe at once; a dying
        # one may still accept a TCP connection for a moment (its listening socket closes last), never a HELLO
        dead = []
        for ep in self.workers:
            try:
                rpc.probe(ep, timeout=2.0)
            except ClusterError:
                dead.append(ep)
        how = f"signal {-exitcode}" if exitcode and exitcode < 0 else f"status {exitcode}"
        if dead:
            return ClusterError(f"RPC worker{'s' if len(dead) > 1 else ''} {', '.join(dead)} stopped answering "
                                f"while {while_}; llama.cpp's engine process ended ({how})",
                                hint="restart the worker (`llmrun worker ...`); the model reloads by itself once "
                                     "every worker answers")
        return ClusterError(f"the engine process using workers {', '.join(self.workers)} ended ({how}) while "
                            f"{while_}", hint="see the messages above; the model reloads by itself")

    def _reader(self, proc, conn) -> None:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                break
            self._last_msg = time.monotonic()
            op, rid = msg[0], msg[1]
            with self._lock:
                if op == "delta" and rid in self._pending:
                    self._pending[rid].push(msg[2])
                elif op == "done" and rid in self._pending:
                    self._pending.pop(rid).finish(msg[2])
                elif rid in self._calls:
                    slot = self._calls[rid]
                    slot[1] = msg
                    slot[0].set()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:   # EOF but still alive: it cannot serve us any more
            proc.kill()
            proc.wait()
        if self._closing:
            return
        self._on_death(proc.returncode)

    def _on_death(self, exitcode: int | None) -> None:
        import threading

        from runner.engine.generation import completion

        err = self._death_error(exitcode, while_="generating")
        with self._lock:
            if self._down is not None:
                return
            self._down = err
            pending, self._pending = self._pending, {}
            calls, self._calls = self._calls, {}
        for handle in pending.values():
            text = "".join(getattr(handle, "_chunks", []))
            handle.finish(completion(text, "error", prompt_tokens=0, completion_tokens=0, cached_tokens=0,
                                     ttft=0.0, decode_tps=0.0, error=err.message))
        for slot in calls.values():
            slot[1] = ("raise", 0, "ClusterError", err.message, err.hint)
            slot[0].set()
        threading.Thread(target=self._recover, name="llmrun-cluster-recover", daemon=True).start()

    def _recover(self) -> None:
        while not self._closing:
            time.sleep(self._retry_s)
            try:
                self._start()
                self.restarts += 1
                return
            except ClusterError as e:
                with self._lock:
                    self._down = ClusterError(self._down.message if self._down else e.message,
                                              hint=f"waiting for the workers: {e.message}")

    def _watchdog(self) -> None:
        while not self._closing:
            time.sleep(min(self._stall_s / 4, 5.0))
            with self._lock:
                busy = bool(self._pending) and self._down is None
                proc = getattr(self, "_proc", None)
            if busy and time.monotonic() - self._last_msg > self._stall_s and proc is not None:
                if any(not rpc.reachable(ep, timeout=2.0) for ep in self.workers):
                    proc.kill()                     # the reader sees EOF and reports the dead worker

    # ------------------------------------------------------------------ Engine protocol
    def health(self) -> ClusterError | None:
        """None when serving, else the outage (name of the dead worker, and that a reload is pending)."""
        return self._down

    def _send(self, *msg) -> None:
        if self._closing:
            from runner.errors import EngineError

            raise EngineError("the engine is closed")
        with self._lock:
            if self._down is not None:
                raise ClusterError(self._down.message, hint=self._down.hint)
            conn, send_lock = self._conn, self._send_lock
        try:
            with send_lock:
                conn.send(msg)
        except (OSError, ValueError) as e:
            raise ClusterError("the engine process using the RPC workers is gone",
                               hint="the model reloads by itself once every worker answers") from e

    def _request(self, op: str, *args, generation: bool = False):
        import threading

        rid = next(self._ids)
        slot: list = [threading.Event(), None]
        handle = None
        if generation:   # registered before sending: deltas may arrive right after "started"
            from runner.engine.generation import GenerationHandle

            handle = GenerationHandle(lambda h, rid=rid: self._cancel(rid))
        with self._lock:
            self._calls[rid] = slot
            if handle is not None:
                self._pending[rid] = handle
        try:
            self._send(op, rid, *args)
            slot[0].wait()
        except BaseException:
            with self._lock:
                self._pending.pop(rid, None)
            raise
        finally:
            with self._lock:
                self._calls.pop(rid, None)
        reply = slot[1]
        if reply[0] == "raise":
            with self._lock:
                self._pending.pop(rid, None)
            raise _error_from(*reply[2:])
        if handle is None:
            return reply[2]
        handle.notice, handle.dropped_messages = reply[2], reply[3]
        return handle

    def _cancel(self, rid: int) -> None:
        try:
            self._send("cancel", rid)
        except LlmrunError:
            pass

    def chat(self, messages, params):
        return self._request("chat", list(messages), params, generation=True)

    def complete(self, prompt, params):
        return self._request("complete", prompt, params, generation=True)

    def generate(self, tokens, params):
        return self._request("generate", list(tokens), params, generation=True)

    def tokenize(self, text):
        return self._request("tokenize", text)

    def prompt_tokens(self, text):
        return self._request("prompt_tokens", text)

    def stats(self):
        return self._request("stats")

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        proc = getattr(self, "_proc", None)
        try:
            with self._send_lock:
                self._conn.send(("close", 0))
        except (OSError, ValueError, AttributeError):
            pass
        if proc is not None:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

