"""IsolatedEngine: an Engine whose llama.cpp runs in a child process, for models split across RPC workers.

llama.cpp's RPC client aborts the whole process when a worker's connection breaks (`GGML_ABORT("Remote RPC
server crashed or returned malformed response")`), so the process that serves users must not be the one that
talks to workers. When the child dies we name the dead worker(s), finish the requests in flight with
finish_reason "error", answer new ones with ClusterError (the server's 503) and reload once every worker
answers a probe again. The child is a plain `python -c` process (not multiprocessing's spawn, which would re-run
`python -m runner`'s __main__) talking pickles over a socketpair through multiprocessing's Connection.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from runner.engine import rpc
from runner.errors import ClusterError, LlmrunError


_GEN_METHODS = ("chat", "complete", "generate")


def _error_from(cls_name: str, message: str, hint: str | None) -> Exception:
    from runner import errors

    cls = getattr(errors, cls_name, None)
    if isinstance(cls, type) and issubclass(cls, errors.LlmrunError) and cls is not errors.UnknownModelError:
        return cls(message, hint=hint)
    return errors.EngineError(message, hint=hint)


KEEPALIVE_IDLE_S = 5                 # TCP keepalive on llama.cpp's worker sockets: probe after 5 s idle,
KEEPALIVE_INTERVAL_S = 2             # every 2 s, give up after 3 missed answers
KEEPALIVE_COUNT = 3
USER_TIMEOUT_MS = 15000              # unacknowledged data for 15 s: the kernel closes the connection


def harden_sockets(endpoints, *, fds=None) -> int:
    """Make llama.cpp's own sockets to `endpoints` notice a vanished worker host (power, cable): TCP keepalive and
    TCP_USER_TIMEOUT, so a recv that would block forever fails instead (and llama.cpp then aborts this child,
    which the parent reports). llama.cpp sets no timeout itself. Returns how many sockets were changed."""
    import socket

    wanted = set()
    for ep in endpoints:
        host, port = rpc.parse_endpoint(ep)
        try:
            for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
                wanted.add((info[4][0], port))
        except OSError:
            continue
    if fds is None:
        try:
            fds = [int(n) for n in os.listdir("/proc/self/fd")]
        except OSError:
            return 0
    changed = 0
    for fd in fds:
        try:
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            if sock.type != socket.SOCK_STREAM or sock.getpeername()[:2] not in wanted:
                continue
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            for opt, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE_S), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
                               ("TCP_KEEPCNT", KEEPALIVE_COUNT), ("TCP_USER_TIMEOUT", USER_TIMEOUT_MS)):
                if hasattr(socket, opt):
                    sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)
            changed += 1
        except OSError:
            continue
        finally:
            sock.close()     # closes the duplicate only
    return changed


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

        def keep_hardening() -> None:   # llama.cpp opens its worker sockets during the load and may reopen them
            while True:
                harden_sockets(settings.rpc_servers)
                time.sleep(1.0)

        threading.Thread(target=keep_hardening, name="llmrun-rpc-keepalive", daemon=True).start()
        from runner.engine import load_engine

        engine = load_engine(model_path, settings, **kwargs)
    except LlmrunError as e:
        send("load_error", type(e).__name__, e.message, e.hint)
        return
    send("ready", {"model_name": engine.model_name, "n_ctx": engine.n_ctx, "n_parallel": engine.n_parallel,
                   "buffers": dict(getattr(engine, "buffers", {}) or {})})
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

    def __init__(self, model_path, settings, *, retry_s: float = 2.0, stall_s: float = 20.0, ping_s: float = 5.0,
                 load_timeout_s: float | None = None, **load_kwargs):
        import itertools
        import threading

        self._path, self._settings, self._kwargs = str(model_path), settings, load_kwargs
        self.workers: tuple[str, ...] = tuple(settings.rpc_servers)
        self._retry_s, self._stall_s, self._ping_s, self._load_timeout_s = retry_s, stall_s, ping_s, load_timeout_s
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
            [sys.executable, "-c", "import sys; from runner.engine.isolated import _child_entry; _child_entry(int(sys.argv[1]))",
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
        self.buffers = info.get("buffers", {})   # llama.cpp's logged buffer sizes, as LlamaEngine.buffers
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
        delay = self._retry_s
        while not self._closing:
            time.sleep(delay)
            try:
                self._start()
            except LlmrunError as e:     # a worker still down (ClusterError), or the reload itself failed
                with self._lock:
                    self._down = ClusterError(self._down.message if self._down else e.message,
                                              hint=f"waiting for the workers: {e.message}")
                if not isinstance(e, ClusterError):
                    delay = min(delay * 2, 30.0)    # a failing load is retried less and less often
                continue
            if self._closing:                 # closed while we were reloading: do not leave the child behind
                self._proc.kill()
                return
            self.restarts += 1
            return

    def _watchdog(self) -> None:
        """Every `ping_s`: a worker that accepts no TCP connection any more (process gone, host unreachable) ends
        the child at once, so /health says 503 before a request trips over it (a worker serving our child still
        accepts: the kernel queues the connection). While requests run, no progress for `stall_s` also checks."""
        last_ping = time.monotonic()
        while not self._closing:
            time.sleep(min(self._stall_s / 4, self._ping_s, 5.0))
            with self._lock:
                up = self._down is None
                busy = bool(self._pending) and up
                proc = getattr(self, "_proc", None)
            if proc is None or not up:
                continue
            now = time.monotonic()
            stalled = busy and now - self._last_msg > self._stall_s
            if stalled or now - last_ping >= self._ping_s:
                last_ping = now
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
