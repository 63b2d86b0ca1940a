"""runner.core.files: the one atomic write. A failure at any point leaves the old file as it was and no temporary
file behind; a success leaves exactly the new file, with ordinary permissions."""

from __future__ import annotations

import json
import os
import stat

import pytest

from runner.core import files
from runner.core.files import atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text, atomic_writer


def _names(d) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_writes_replace_the_file_and_leave_nothing_else(tmp_path):
    target = tmp_path / "a.json"
    target.write_text("old")
    atomic_write_bytes(target, b"\x00bytes")
    assert target.read_bytes() == b"\x00bytes"
    atomic_write_text(target, "tëxt")
    assert target.read_bytes() == "tëxt".encode()
    atomic_write_json(target, {"b": 1, "a": ["é"]}, indent=1, sort_keys=True)
    assert target.read_text(encoding="utf-8") == '{\n "a": [\n  "\\u00e9"\n ],\n "b": 1\n}\n'
    atomic_write_json(target, {"a": "é"}, ensure_ascii=False)
    assert json.loads(target.read_text(encoding="utf-8")) == {"a": "é"}
    assert _names(tmp_path) == ["a.json"]


def test_permissions_follow_the_umask_like_a_plain_open(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "new", "x")
        (tmp_path / "plain").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o640


def test_a_failure_mid_write_keeps_the_old_file_and_removes_the_temp(tmp_path):
    target = tmp_path / "bench.json"
    target.write_text("old content")
    with pytest.raises(KeyboardInterrupt):
        with atomic_writer(target) as f:
            f.write(b"half of the new con")
            assert len(_names(tmp_path)) == 2  # the temporary file is next to the target while writing
            raise KeyboardInterrupt
    assert target.read_text() == "old content"
    assert _names(tmp_path) == ["bench.json"]


@pytest.mark.parametrize("step", ["fsync", "replace"])
def test_a_failing_fsync_or_rename_keeps_the_old_file_and_removes_the_temp(tmp_path, monkeypatch, step):
    target = tmp_path / "profile.toml"
    target.write_text("old")

    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, step, fail)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_text(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert _names(tmp_path) == ["profile.toml"]


def test_a_value_json_cannot_hold_writes_nothing(tmp_path):
    target = tmp_path / "verified.json"
    target.write_text("{}")
    with pytest.raises(TypeError):
        atomic_write_json(target, {"x": object()})
    assert target.read_text() == "{}" and _names(tmp_path) == ["verified.json"]


def test_a_missing_directory_is_an_oserror_and_creates_nothing(tmp_path):
    with pytest.raises(FileNotFoundError):
        atomic_write_text(tmp_path / "absent" / "x.json", "x")
    assert _names(tmp_path) == []


def test_atomic_path_for_writers_that_open_the_file_themselves(tmp_path):
    target = tmp_path / "m.gguf"
    with atomic_path(target, suffix=".incomplete") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith("m.gguf.") and tmp.name.endswith(".incomplete")
        assert not target.exists()
        with open(tmp, "wb") as f:
            f.write(b"GGUF")
    assert target.read_bytes() == b"GGUF" and _names(tmp_path) == ["m.gguf"]

    with pytest.raises(ValueError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"broken")
            raise ValueError("the writer failed")
    assert target.read_bytes() == b"GGUF" and _names(tmp_path) == ["m.gguf"]


def test_directory_fsync_after_the_rename(tmp_path, monkeypatch):
    synced = []
    real = files.fsync_directory
    monkeypatch.setattr(files, "fsync_directory", lambda p: (synced.append(p), real(p)))
    atomic_write_bytes(tmp_path / "a", b"1")
    assert synced == []
    atomic_write_bytes(tmp_path / "a", b"2", fsync_dir=True)
    assert synced == [tmp_path] and (tmp_path / "a").read_bytes() == b"2"


def test_temp_names_never_clobber_an_existing_file(tmp_path, monkeypatch):
    """O_EXCL: a name already taken (another writer's temp file) is skipped, not overwritten."""
    taken = tmp_path / "x.00000000.tmp"
    taken.write_text("another writer's")
    tokens = iter(["00000000", "11111111"])
    monkeypatch.setattr(files.secrets, "token_hex", lambda n: next(tokens))
    atomic_write_text(tmp_path / "x", "mine")
    assert taken.read_text() == "another writer's" and (tmp_path / "x").read_text() == "mine"
