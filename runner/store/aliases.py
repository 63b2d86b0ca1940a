"""Copies of models (Ollama's `/api/copy`): another name for a model this machine has, never a second file.
Kept in `dirs.home()/aliases.json` as `{"NAME": "TARGET"}` (TARGET: the model's catalog name, or the name a
served file had), read by the one name resolver (runner.app.models), so every llmrun process on the machine
sees them. Names compare case-insensitively; each change is a read-modify-write under a file lock, written
atomically (runner.core.files)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from runner.core import dirs
from runner.core.files import atomic_write_json


def _path() -> Path:
    return dirs.home() / "aliases.json"


def load() -> dict[str, str]:
    """Every copy's name and the name it stands for (a damaged or missing file: none)."""
    try:
        data = json.loads(_path().read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str) and k and v}


def find(name: str, aliases: dict[str, str] | None = None) -> str | None:
    """The copy's name as stored, when `name` is one (any case); None otherwise."""
    key = name.lower()
    return next((k for k in (load() if aliases is None else aliases) if k.lower() == key), None)


def _change(change: Callable[[dict[str, str]], None]) -> None:
    from filelock import FileLock

    path = _path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        data = load()
        change(data)
        atomic_write_json(path, data, indent=1, sort_keys=True)


def add(name: str, target: str) -> None:
    """Make `name` a copy of `target` (replacing a copy of that name, whatever its case)."""
    def change(data: dict[str, str]) -> None:
        for k in [k for k in data if k.lower() == name.lower()]:
            del data[k]
        data[name] = target

    _change(change)


def remove(name: str) -> bool:
    """Forget the copy `name` (any case); False when there was none."""
    removed: list[str] = []

    def change(data: dict[str, str]) -> None:
        for k in [k for k in data if k.lower() == name.lower()]:
            removed.append(k)
            del data[k]

    _change(change)
    return bool(removed)
