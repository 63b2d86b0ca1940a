"""llama.cpp's RPC backend (ggml-rpc), bound with ctypes against the libraries llama-cpp-python ships.

Two halves:

* the **wire protocol client** (`probe`): a few read-only commands (HELLO, DEVICE_COUNT, GET_DEVICE_MEMORY)
  spoken in pure Python over a socket with timeouts. The planner and health checks use it, because the C
  client aborts the whole process (`GGML_ABORT`) when a worker is unreachable or its socket dies;
* the **C bindings** (`start_server`, `register_servers`, `device_memory`): the worker's blocking server loop
  and the registration of remote devices into llama.cpp's backend registry before a model load, the way
  llama.cpp's own `--rpc` does it (`ggml_backend_reg_by_name("RPC")` → `ggml_backend_reg_get_proc_address(reg,
  "ggml_backend_rpc_add_server")` → `ggml_backend_register`).

The C signatures are not checked by ctypes, so the one ggml loader (`runner.engine.ggml`) refuses any ggml version
whose API was not read and tested, and `probe()` refuses a worker whose protocol major differs from ours.

Facts about the pinned llama.cpp (ggml 0.25.3, commit 0c1e570, RPC protocol 7.0.0), read from its source and
checked here:
* `ggml_backend_rpc_start_server(endpoint, cache_dir, n_threads, n_devices, devices)` blocks forever in an
  accept loop and serves **one client at a time**; it has no memory override (older `rpc-server -m` is gone)
  and no authentication or encryption of any kind.
* client side, any failed send/recv (worker killed, connection reset) ends in `GGML_ABORT("Remote RPC server
  crashed or returned malformed response")`, i.e. SIGABRT of the process using the model; an unreachable
  worker at registration aborts too ("Failed to connect to ..."). Hence: probe first, and run models that use
  workers in a child process (`runner.cluster.IsolatedEngine`).
* RPC devices are put at the *front* of llama.cpp's device list, in registration order, so a tensor split is
  `[worker devices..., local GPUs...]`.
"""

from __future__ import annotations

import contextlib
import ctypes
import socket
import struct
from dataclasses import dataclass
from typing import Iterator

from runner.core.errors import ClusterError, EngineError, UsageError
from runner.engine import ggml

PROTO_MAJOR = 7                      # RPC_PROTO_MAJOR_VERSION of the pinned llama.cpp
DEFAULT_PORT = 50052

_CMD_GET_DEVICE_MEMORY = 11
_CMD_HELLO = 14                      # fixed forever by the protocol (static_assert upstream)
_CMD_DEVICE_COUNT = 15
_CONN_CAPS_SIZE = 24                 # RPC_CONN_CAPS_SIZE in ggml-rpc/transport.h (protocol 7)


# ---------------------------------------------------------------------------------------------------------
# endpoints and the wire protocol


def parse_endpoint(text: str) -> tuple[str, int]:
    """'host:port' -> (host, port); the form llama.cpp accepts (it splits at the first ':'). ClusterError if not."""
    host, sep, port_text = text.strip().partition(":")
    if not sep or not host or ":" in port_text:
        raise ClusterError(f"bad worker address {text!r}", hint="write it as HOST:PORT, e.g. 192.168.1.20:50052 "
                           "(IPv6 literals are not understood by llama.cpp's RPC client)")
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not 0 < port < 65536:
        raise ClusterError(f"bad port in worker address {text!r}", hint="a port is a number from 1 to 65535")
    return host, port


@dataclass(frozen=True)
class RemoteDevice:
    index: int                       # device number on the worker
    free_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class WorkerInfo:
    endpoint: str                    # "host:port"
    version: tuple[int, int, int]    # the worker's RPC protocol version
    devices: tuple[RemoteDevice, ...]
    rtt_s: float                     # round trip of one small command, seconds


class _Conn:
    def __init__(self, endpoint: str, timeout: float):
        self.endpoint = endpoint
        host, port = parse_endpoint(endpoint)
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as e:
            raise ClusterError(f"RPC worker {endpoint} is unreachable: {e.strerror or e}",
                               hint=f"start it there with `llmrun worker --host <its LAN address> --port {port}` "
                                    "and check the firewall") from e
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def call(self, cmd: int, payload: bytes, out_size: int) -> bytes:
        try:
            self.sock.sendall(bytes([cmd]) + struct.pack("<Q", len(payload)) + payload)
            size = struct.unpack("<Q", self._recv(8))[0]
            if size != out_size:
                raise ClusterError(f"RPC worker {self.endpoint} answered command {cmd} with {size} bytes, "
                                   f"expected {out_size}",
                                   hint="the worker runs an incompatible llama.cpp; use the same llmrun on both")
            return self._recv(size)
        except socket.timeout as e:
            raise ClusterError(f"RPC worker {self.endpoint} did not answer within {self.sock.gettimeout()} s",
                               hint="a worker serves one client at a time: is another llmrun using it?") from e
        except OSError as e:
            raise ClusterError(f"RPC worker {self.endpoint} dropped the connection: {e.strerror or e}") from e

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionResetError(104, "connection closed by the worker")
            buf += chunk
        return bytes(buf)

    def close(self) -> None:
        self.sock.close()


def probe(endpoint: str, *, timeout: float = 3.0) -> WorkerInfo:
    """Ask a worker for its protocol version and each device's free/total memory (the same
    RPC_CMD_GET_DEVICE_MEMORY that `ggml_backend_rpc_get_device_memory` sends), without any risk of aborting
    this process. Raises ClusterError when it is unreachable, busy with another client, or incompatible."""
    import time

    conn = _Conn(endpoint, timeout)
    try:
        t0 = time.perf_counter()
        hello = conn.call(_CMD_HELLO, bytes(_CONN_CAPS_SIZE), 4 + _CONN_CAPS_SIZE)
        rtt = time.perf_counter() - t0
        version = (hello[0], hello[1], hello[2])
        if version[0] != PROTO_MAJOR:
            raise ClusterError(f"RPC worker {endpoint} speaks protocol {'.'.join(map(str, version))}, this "
                               f"llmrun speaks {PROTO_MAJOR}.x",
                               hint="install the same llmrun and llama-cpp-python version on every host")
        (count,) = struct.unpack("<I", conn.call(_CMD_DEVICE_COUNT, b"", 4))
        devices = []
        for i in range(count):
            free, total = struct.unpack("<QQ", conn.call(_CMD_GET_DEVICE_MEMORY, struct.pack("<I", i), 16))
            devices.append(RemoteDevice(i, free, total))
        return WorkerInfo(endpoint, version, tuple(devices), rtt)
    finally:
        conn.close()


def reachable(endpoint: str, *, timeout: float = 1.0) -> bool:
    """Whether anything accepts a TCP connection there (a worker busy with our own model still does)."""
    try:
        host, port = parse_endpoint(endpoint)
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except (OSError, ClusterError, UsageError):
        return False


# ---------------------------------------------------------------------------------------------------------
# C side, over runner.engine.ggml (the one loader of llama.cpp's ggml libraries)


@contextlib.contextmanager
def _as_cluster_error() -> Iterator[None]:
    """The ggml loader speaks EngineError; at this boundary a broken RPC library is a ClusterError."""
    try:
        yield
    except EngineError as e:
        raise ClusterError(e.message, hint=e.hint) from e


def check_library() -> str:
    """Load and check the RPC backend; returns 'ggml VERSION (COMMIT), RPC protocol N'. ClusterError if unusable."""
    with _as_cluster_error():
        lib = ggml.libs()
        if not ggml.has_rpc():
            raise ClusterError("this llama.cpp build has no RPC backend registered",
                               hint="reinstall llama-cpp-python with CMAKE_ARGS=-DGGML_RPC=ON (`make setup` does)")
    return f"ggml {lib.version}, RPC protocol {PROTO_MAJOR}"


def local_devices() -> list[ggml.Device]:
    """The devices this host's llama.cpp build can expose to clients."""
    with _as_cluster_error():
        return ggml.devices()


def select_devices(names: tuple[str, ...] = ()) -> list[ggml.Device]:
    """The devices a worker serves: the named ones, else every accelerator, else the CPU (as rpc-server does)."""
    devices = local_devices()
    if names:
        by_name = {d.name.lower(): d for d in devices}
        missing = [n for n in names if n.lower() not in by_name]
        if missing:
            raise ClusterError(f"unknown device(s) {', '.join(missing)}",
                               hint="devices here: " + ", ".join(f"{d.name} ({d.description})" for d in devices))
        return [by_name[n.lower()] for n in names]
    return [d for d in devices if not d.is_cpu] or [d for d in devices if d.is_cpu]


def start_server(endpoint: str, devices: list[ggml.Device], *, n_threads: int, cache_dir: str | None = None) -> None:
    """Serve `devices` to RPC clients on `endpoint`. Blocks for good (run it in its own process); returns only
    if llama.cpp could not start (e.g. the port is taken), which it reports on stderr."""
    parse_endpoint(endpoint)
    if not devices:
        raise ClusterError("no device to serve")
    check_library()
    lib = ggml.libs()
    assert lib.rpc is not None  # check_library said so
    handles = [ggml.device_handle(d.name) for d in devices]
    array = (ctypes.c_void_p * len(handles))(*handles)
    lib.rpc.ggml_backend_rpc_start_server(endpoint.encode(), cache_dir.encode() if cache_dir else None,
                                          n_threads, len(handles), array)


def device_memory(endpoint: str, device: int = 0) -> tuple[int, int]:
    """(free, total) through llama.cpp's own client. Probes first: the C call aborts on an unreachable worker."""
    probe(endpoint)
    check_library()
    lib = ggml.libs()
    assert lib.rpc is not None
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    lib.rpc.ggml_backend_rpc_get_device_memory(endpoint.encode(), device, ctypes.byref(free), ctypes.byref(total))
    return free.value, total.value


def register_servers(endpoints: tuple[str, ...] | list[str], *, timeout: float = 3.0) -> int:
    """Add every worker's devices to llama.cpp's backend registry, in order, so the next model load splits across
    them. Every worker is probed first (all or nothing), because llama.cpp aborts the process on an unreachable
    one. Returns the number of RPC devices now registered."""
    for ep in endpoints:
        probe(ep, timeout=timeout)
    check_library()
    with _as_cluster_error():
        return ggml.register_rpc_servers(tuple(endpoints))


def _main(argv: list[str] | None = None) -> None:
    """`python -m runner.cluster.rpc ENDPOINT THREADS CACHE_DIR|- [DEVICE...]`: the worker child process."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    endpoint, threads, cache_dir, names = args[0], int(args[1]), args[2], tuple(args[3:])
    try:
        check_library()
        devices = select_devices(names)
    except ClusterError as e:
        print(f"error: {e.message}" + (f"\nhint: {e.hint}" if e.hint else ""), file=sys.stderr)
        raise SystemExit(2) from None
    sys.stdout.flush()
    start_server(endpoint, devices, n_threads=threads, cache_dir=None if cache_dir == "-" else cache_dir)
    raise SystemExit(1)             # start_server only returns when llama.cpp could not listen


if __name__ == "__main__":
    _main()
