"""Blocking work (plans, loads, pulls, deletes) off the event loop: each call on a daemon thread of its own, its
result or error back on the loop that asked."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def in_thread(name: str, fn: Callable[..., T], *args: object) -> asyncio.Future[T]:
    """Run `fn(*args)` in a daemon thread of its own; its result or error comes back on the calling loop. A
    daemon thread, so a pull or load still running cannot hold the process at exit."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: object) -> None:
        if fut.done():
            return
        if ok:
            fut.set_result(value)  # type: ignore[arg-type]
        else:
            fut.set_exception(value)  # type: ignore[arg-type]

    def work() -> None:
        try:
            result: object = fn(*args)
            ok = True
        except BaseException as e:
            result, ok = e, False
        try:
            loop.call_soon_threadsafe(settle, ok, result)
        except RuntimeError:      # the loop is gone (the process is ending)
            pass

    threading.Thread(target=work, name=name, daemon=True).start()
    return fut
