"""Running the server: bind (with a clear error when the port is taken), load the start-up model in the
background, serve with uvicorn, and on SIGTERM / Ctrl-C stop accepting, let in-flight requests finish within the
grace period, close the engines, exit."""

from __future__ import annotations

import logging
import signal
import socket
import threading
from typing import Callable

from runner.app.pool import ModelPool
from runner.core.errors import ServerError
from runner.server.config import ServerConfig


def exposure_warning(config: ServerConfig) -> str | None:
    """A loud warning when the server listens beyond this machine without an API key."""
    if not config.exposed_without_key:
        return None
    return (f"WARNING: listening on {config.host}:{config.port} WITHOUT an API key: anyone who can reach this "
            "machine can use the models (pulling, deleting and copying models is refused until you add a key). "
            "Add --api-key KEY (clients send 'Authorization: Bearer KEY'), or bind 127.0.0.1.")


def bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ServerError(f"cannot resolve --host {host!r}: {e.strerror}",
                          hint="use an IP address such as 127.0.0.1 or 0.0.0.0") from e
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise ServerError(f"cannot listen on {host}:{port}: {e.strerror}",
                          hint="another server may be using that port; choose one with --port") from e
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(config: ServerConfig, pool: ModelPool, *, preload: str | None = None, sock: socket.socket | None = None,
          log_level: str = "info", on_listening: Callable[[int], None] | None = None) -> None:
    """Serve `pool`'s models until SIGTERM / Ctrl-C. `preload` names a model loaded at start while /health answers
    503; its load failure stops the server and is raised here."""
    import uvicorn

    from runner.server.app import create_app

    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO), format="%(message)s")
    sock = sock or bind(config.host, config.port)
    failures: list[BaseException] = []
    holder: dict = {}

    def failed(e: BaseException) -> None:
        failures.append(e)
        holder["server"].should_exit = True

    app = create_app(config, pool=pool, preload=preload, on_load_failed=failed)
    # h11, not httptools, even when installed: uvicorn's httptools protocol never reports a client gone that sent
    # bytes past its request (tests/test_server_field.py, test_server_kill_fuzz.py); the event loop is uvloop
    # when installed (loop="auto")
    uconfig = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_keep_alive=5, http="h11",
                             timeout_graceful_shutdown=max(1, int(config.grace_seconds)))
    server = uvicorn.Server(uconfig)
    holder["server"] = server
    if on_listening:
        on_listening(sock.getsockname()[1])
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal to the handlers it found;
    # make those record it, so a requested stop ends with exit status 0 instead of death by signal.
    stopped_by: list[int] = []
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, lambda n, _f: stopped_by.append(n)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    if failures:
        raise failures[0]
    if stopped_by:
        logging.getLogger("llmrun.server").info("stopped (%s)", signal.Signals(stopped_by[0]).name)
