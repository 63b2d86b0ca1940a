"""IsolatedEngine: an Engine whose llama.cpp runs in a child process, for models split across RPC workers.

llama.cpp's RPC client aborts the whole process when a worker's connection breaks (`GGML_ABORT("Remote RPC
server crashed or returned malformed response")`), so the process that serves users must not be the one that
talks to workers. When the child dies we name the dead worker(s), finish the requests in flight with
finish_reason "error", answer new ones with ClusterError (the server's 503) and reload once every worker
answers a probe again. The child is a plain `python -c` process (not multiprocessing's spawn, which would re-run
`python -m runner`'s __main__) talking pickled message dataclasses (below) over a socketpair through
multiprocessing's Connection (runner.cluster.protocol: the messages, and the allow-lists of operations the child
runs).
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from runner.cluster import rpc
from runner.cluster.protocol import (CALLS, GENERATIONS, QUERIES, ApplyTemplate, Call, Cancel, Close, Detokenize,
                                     Done, Embed, ErrorInfo, Generate, GenerationOp, Load, LoadFailed, Piece, Query,
                                     QueryOp, Raised, Ready, Reply, Started, Tokenize)
from runner.core.errors import ClusterError, EngineError, LlmrunError
from runner.core.run_settings import RunSettings
from runner.engine.generation import GenerationHandle, completion
from runner.engine.types import ChatMessage, EmbedInput, Embeddings, EngineStats, SamplingParams, Tools

CALL_TIMEOUT_S = 120.0               # a child that answers no call within this long is reported, never waited on


# ---------------------------------------------------------------------------------------------------------
# sockets

KEEPALIVE_IDLE_S = 5                 # TCP keepalive on llama.cpp's worker sockets: probe after 5 s idle,
KEEPALIVE_INTERVAL_S = 2             # every 2 s, give up after 3 missed answers
KEEPALIVE_COUNT = 3
USER_TIMEOUT_MS = 15000              # unacknowledged data for 15 s: the kernel closes the connection


def harden_sockets(endpoints, *, fds=None) -> int:
    """Make llama.cpp's own sockets to `endpoints` notice a vanished worker host (power, cable): TCP keepalive and
    TCP_USER_TIMEOUT, so a recv that would block forever fails instead (and llama.cpp then aborts this child,
    which the parent reports). llama.cpp sets no timeout itself. Returns how many sockets were changed."""

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
    conn = Connection(fd)
    load = conn.recv()
    if not isinstance(load, Load):
        raise SystemExit(f"expected a Load message, got {type(load).__name__}")
    _child_main(conn, load)


def _child_main(conn: Connection, load: Load) -> None:
    """The engine process: register the workers, load, then serve the parent's messages over `conn`."""
    lock = threading.Lock()

    def send(msg: object) -> None:
        with lock:
            conn.send(msg)

    servers = load.settings.rpc_servers
    try:
        rpc.register_servers(servers)

        def keep_hardening() -> None:   # llama.cpp opens its worker sockets during the load and may reopen them
            while True:
                harden_sockets(servers)
                time.sleep(1.0)

        threading.Thread(target=keep_hardening, name="llmrun-rpc-keepalive", daemon=True).start()
        from runner.engine.batching import start_engine

        engine = start_engine(load.model_path, load.settings, **load.options)
    except LlmrunError as e:
        send(LoadFailed(ErrorInfo.of(e)))
        return
    send(Ready(engine.model_name, engine.n_ctx, engine.n_parallel, dict(engine.buffers)))
    handles: dict[int, GenerationHandle] = {}

    def call(msg: Call) -> None:
        try:
            send(Reply(msg.rid, CALLS[type(msg)](engine, msg)))
        except LlmrunError as e:
            send(Raised(msg.rid, ErrorInfo.of(e)))

    def pump(rid: int, index: int, handle: GenerationHandle) -> None:
        for delta in handle.deltas():
            send(Piece(rid, index, delta))
        send(Done(rid, index, handle.result()))
        if all(h.done for h in handle.choices):
            handles.pop(rid, None)

    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):       # the parent is gone
            break
        if isinstance(msg, Close):
            break
        if isinstance(msg, Cancel):
            if msg.rid in handles:
                for choice in handles[msg.rid].choices:
                    choice.cancel()
            continue
        try:
            if isinstance(msg, Generate) and msg.op in GENERATIONS:
                handle = GENERATIONS[msg.op](engine, msg)
                handles[msg.rid] = handle
                send(Started(msg.rid, handle.notice, handle.dropped_messages))
                for i, choice in enumerate(handle.choices):
                    threading.Thread(target=pump, args=(msg.rid, i, choice), daemon=True).start()
            elif isinstance(msg, Query) and msg.op in QUERIES:
                send(Reply(msg.rid, QUERIES[msg.op](engine, msg.text)))
            elif type(msg) in CALLS:
                threading.Thread(target=call, args=(msg,), daemon=True).start()
            else:
                rid = getattr(msg, "rid", 0)
                send(Raised(rid, ErrorInfo("EngineError", f"unknown message {type(msg).__name__}", None)))
        except LlmrunError as e:
            send(Raised(msg.rid, ErrorInfo.of(e)))
    engine.close()
    conn.close()


class _Call:
    """A round trip waiting for its reply (Started, Reply or Raised)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reply: Started | Reply | Raised | None = None


class IsolatedEngine:
    """An Engine whose llama.cpp runs in a child process, for models split across RPC workers.

    llama.cpp's RPC client calls abort() when a worker's connection breaks, which would take the whole
    server down. Here only the child dies: requests in flight finish with finish_reason "error" and a message
    naming the worker that went away, new requests raise ClusterError (HTTP 503) while `health()` reports the
    outage, and the model is reloaded in a fresh child as soon as every worker answers a probe again. A worker
    host that vanishes without closing its socket (power, cable) is caught by a watchdog: no progress for
    `stall_s` while requests are running and a worker that accepts no TCP connection → the child is killed.
    Every round trip to the child waits at most `call_timeout_s`."""

    def __init__(self, model_path: str | os.PathLike[str], settings: RunSettings, *, retry_s: float = 2.0,
                 stall_s: float = 20.0, ping_s: float = 5.0, load_timeout_s: float | None = None,
                 call_timeout_s: float = CALL_TIMEOUT_S, **load_options: Any):
        self._load = Load(str(model_path), settings, dict(load_options))
        self.workers: tuple[str, ...] = tuple(settings.rpc_servers)
        self._retry_s, self._stall_s, self._ping_s, self._load_timeout_s = retry_s, stall_s, ping_s, load_timeout_s
        self._call_timeout_s = call_timeout_s
        self._ids = itertools.count(1)
        self._lock = threading.RLock()
        self._send_lock = threading.Lock()
        self._pending: dict[int, list[GenerationHandle]] = {}     # a request's choices, by request id
        self._calls: dict[int, _Call] = {}
        self._down: ClusterError | None = None
        self._closing = False
        self._last_msg = time.monotonic()
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self.model_name, self.n_ctx, self.n_parallel = Path(model_path).stem, 0, 0
        self.buffers: dict[str, int] = {}      # llama.cpp's logged buffer sizes, as LlamaEngine.buffers
        self.restarts = 0
        self._start()                              # raises the child's load error, like start_engine
        threading.Thread(target=self._watchdog, name="llmrun-cluster-watchdog", daemon=True).start()

    # ------------------------------------------------------------------ child process lifecycle
    def _start(self) -> None:
        for ep in self.workers:                    # fail early and clearly; the child would abort
            rpc.probe(ep)
        ours, theirs = socket.socketpair()
        proc = subprocess.Popen(
            [sys.executable, "-c",
             "import sys; from runner.cluster.isolated import _child_entry; _child_entry(int(sys.argv[1]))",
             str(theirs.fileno())],
            pass_fds=[theirs.fileno()],  # no PDEATHSIG here: it fires when the *thread* that spawned us ends
            env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "GGML_NO_BACKTRACE": "1"})
        theirs.close()
        parent = Connection(ours.detach())
        parent.send(self._load)
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
        if isinstance(msg, LoadFailed):
            proc.wait(5)
            raise msg.error.error()
        if not isinstance(msg, Ready):
            proc.kill()
            proc.wait()
            raise EngineError(f"the engine process answered its load with {type(msg).__name__}")
        self.model_name, self.n_ctx, self.n_parallel = msg.model_name, msg.n_ctx, msg.n_parallel
        self.buffers = dict(msg.buffers)
        with self._lock:
            self._proc, self._conn = proc, parent
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

    def _reader(self, proc: subprocess.Popen[bytes], conn: Connection) -> None:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                break
            self._last_msg = time.monotonic()
            with self._lock:
                if isinstance(msg, Piece):
                    if msg.rid in self._pending:
                        self._pending[msg.rid][msg.index].push(msg.delta)
                elif isinstance(msg, Done):
                    if msg.rid in self._pending:
                        choices = self._pending[msg.rid]
                        choices[msg.index].finish(msg.completion)
                        if all(h.done for h in choices):
                            del self._pending[msg.rid]
                elif isinstance(msg, (Started, Reply, Raised)) and msg.rid in self._calls:
                    call = self._calls[msg.rid]
                    call.reply = msg
                    call.event.set()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:   # EOF but still alive: it cannot serve us any more
            proc.kill()
            proc.wait()
        if self._closing:
            return
        self._on_death(proc.returncode)

    def _on_death(self, exitcode: int | None) -> None:
        err = self._death_error(exitcode, while_="generating")
        with self._lock:
            if self._down is not None:
                return
            self._down = err
            pending, self._pending = self._pending, {}
            calls, self._calls = self._calls, {}
        for handle in (h for choices in pending.values() for h in choices):
            handle.finish(completion(handle.text_so_far(), "error", prompt_tokens=0, completion_tokens=0,
                                     cached_tokens=0, ttft=0.0, decode_tps=0.0, error=err.message))
        for call in calls.values():
            call.reply = Raised(0, ErrorInfo.of(err))
            call.event.set()
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
                if self._proc is not None:
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
                proc = self._proc
            if proc is None or not up:
                continue
            now = time.monotonic()
            stalled = busy and now - self._last_msg > self._stall_s
            if stalled or now - last_ping >= self._ping_s:
                last_ping = now
                if any(not rpc.reachable(ep, timeout=2.0) for ep in self.workers):
                    proc.kill()                     # the reader sees EOF and reports the dead worker

    # ------------------------------------------------------------------ Engine protocol
    def health(self) -> LlmrunError | None:
        """None when serving, else the outage (name of the dead worker, and that a reload is pending)."""
        return self._down

    def _send(self, msg: Generate | Query | Call | Cancel | Close) -> None:
        if self._closing:
            raise EngineError("the engine is closed")
        with self._lock:
            if self._down is not None:
                raise ClusterError(self._down.message, hint=self._down.hint)
            conn = self._conn
        if conn is None:
            raise ClusterError("the engine process using the RPC workers is not running")
        try:
            with self._send_lock:
                conn.send(msg)
        except (OSError, ValueError) as e:
            raise ClusterError("the engine process using the RPC workers is gone",
                               hint="the model reloads by itself once every worker answers") from e

    def _round_trip(self, rid: int, msg: Generate | Query | Call,
                    choices: list[GenerationHandle] | None = None) -> Started | Reply:
        call = _Call()
        with self._lock:
            self._calls[rid] = call
            if choices is not None:   # registered before sending: deltas may arrive right after Started
                self._pending[rid] = choices
        try:
            self._send(msg)
            if not call.event.wait(self._call_timeout_s):
                raise ClusterError(f"the engine process did not answer a {msg.op} request within "
                                   f"{self._call_timeout_s:g} s",
                                   hint="the workers may be overloaded or unreachable; see /health")
        except BaseException:
            with self._lock:
                self._pending.pop(rid, None)
            raise
        finally:
            with self._lock:
                self._calls.pop(rid, None)
        reply = call.reply
        if isinstance(reply, Raised) or reply is None:
            with self._lock:
                self._pending.pop(rid, None)
            raise reply.error.error() if reply is not None else EngineError("no reply from the engine process")
        return reply

    def _generate(self, op: GenerationOp, payload: Any, params: SamplingParams, tools: Tools | None = None,
                  template_kwargs: Mapping[str, Any] | None = None) -> GenerationHandle:
        rid = next(self._ids)
        choices = [GenerationHandle(lambda _handle: self._cancel(rid)) for _ in range(max(1, params.n))]
        for h in choices:
            h.set_choices(choices)
        msg = Generate(rid, op, payload, params, tools, dict(template_kwargs) if template_kwargs else None)
        started = self._round_trip(rid, msg, choices)
        assert isinstance(started, Started)
        for h in choices:
            h.notice, h.dropped_messages = started.notice, started.dropped_messages
        return choices[0]

    def _query(self, op: QueryOp, text: str = "") -> Any:
        rid = next(self._ids)
        reply = self._round_trip(rid, Query(rid, op, text))
        assert isinstance(reply, Reply)
        return reply.value

    def _cancel(self, rid: int) -> None:
        try:
            self._send(Cancel(rid))
        except LlmrunError:
            pass

    def chat(self, messages: Sequence[ChatMessage], params: SamplingParams, *, tools: Tools | None = None,
             template_kwargs: Mapping[str, Any] | None = None) -> GenerationHandle:
        return self._generate("chat", list(messages), params, tools, template_kwargs)

    def complete(self, prompt: str, params: SamplingParams) -> GenerationHandle:
        return self._generate("complete", prompt, params)

    def generate(self, tokens: Sequence[int], params: SamplingParams) -> GenerationHandle:
        return self._generate("generate", list(tokens), params)

    def tokenize(self, text: str) -> list[int]:
        return list(self._query("tokenize", text))

    def prompt_tokens(self, text: str) -> list[int]:
        return list(self._query("prompt_tokens", text))

    def _call(self, make: Callable[[int], Call]) -> Any:
        rid = next(self._ids)
        reply = self._round_trip(rid, make(rid))
        assert isinstance(reply, Reply)
        return reply.value

    def embed(self, inputs: Sequence[EmbedInput], *, truncate: bool = False) -> Embeddings:
        value = self._call(lambda rid: Embed(rid, tuple(i if isinstance(i, str) else tuple(i) for i in inputs),
                                             truncate))
        assert isinstance(value, Embeddings)
        return value

    def tokenize_with(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        return list(self._call(lambda rid: Tokenize(rid, text, add_special, parse_special)))

    def detokenize(self, tokens: Sequence[int]) -> str:
        return str(self._call(lambda rid: Detokenize(rid, tuple(tokens), pieces=False)))

    def token_pieces(self, tokens: Sequence[int]) -> list[bytes]:
        return list(self._call(lambda rid: Detokenize(rid, tuple(tokens), pieces=True)))

    def apply_template(self, messages: Sequence[ChatMessage], *, tools: Tools | None = None) -> str:
        return str(self._call(lambda rid: ApplyTemplate(rid, tuple(messages), tools)))

    def stats(self) -> EngineStats:
        value = self._query("stats")
        assert isinstance(value, EngineStats)
        return value

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        proc, conn = self._proc, self._conn
        if conn is not None:
            try:
                with self._send_lock:
                    conn.send(Close())
            except (OSError, ValueError):
                pass
        if proc is not None:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> "IsolatedEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
