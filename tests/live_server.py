"""Start the llmrun app for tests: in a background thread (uvicorn, `running`), or as a real `llmrun serve`
process (`serve_process`). Either stops by itself at the end of the `with` block."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def running(app, *, timeout: float = 30.0):
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(256)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=5,
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.01)
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


def wait_ready(base: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(f"{base}/health").status_code == 200:
            return
        time.sleep(0.05)
    raise RuntimeError("server never became ready")


@contextlib.contextmanager
def serve_process(home: Path, *args: str, timeout: float = 120.0):
    """`llmrun serve --port 0 --threads 1 ARGS` in a subprocess with LLMRUN_HOME=home (its hub cache in
    home/hf-cache), once it answers /health; yields (base_url, process, its stderr lines as they come). SIGTERM at
    the end of the block, killed if it does not exit within 30 s."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "LLMRUN_HOME": str(home), "HF_HUB_CACHE": str(home / "hf-cache")}
    proc = subprocess.Popen([sys.executable, "-m", "runner", "serve", "--port", "0", "--threads", "1", *args],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env, cwd=REPO)
    assert proc.stderr is not None
    lines: list[str] = []
    port = None
    deadline = time.monotonic() + timeout
    while port is None:
        line = proc.stderr.readline()
        if not line:
            raise RuntimeError("server exited: " + "".join(lines))
        lines.append(line)
        m = re.search(r"on http://127\.0\.0\.1:(\d+)", line)
        if m:
            port = int(m.group(1))
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("no banner")
    threading.Thread(target=lambda: [lines.append(x) for x in proc.stderr], daemon=True).start()
    base = f"http://127.0.0.1:{port}"
    try:
        while httpx.get(f"{base}/health").status_code != 200:
            assert proc.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "model never became ready"
            time.sleep(0.1)
        yield base, proc, lines
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
