"""Any GGUF on the Hugging Face hub, by reference: `hf.co/ORG/REPO[:QUANT]`, `ORG/REPO[:QUANT]`,
`ORG/REPO/FILE.gguf` or a `https://huggingface.co/...` URL (runner.model.hubref parses them).

    resolve(text) -> HubModel          the repo's quants as catalog entries, pinned to a commit, the referenced one
                                       planned from its GGUF header (read over HTTP Range: the header, not the
                                       weights)
    hub_entry(text) -> CatalogEntry | None   the referenced file's entry; None when `text` is no hub reference
    find_entry(name) -> CatalogEntry   a hub reference or a catalog name (what `show`, `pull`, `rm` take)
    with_header(model, entry) -> HubModel    read one more quant's header (the planner's choice)
    local_hub_entries() -> list[CatalogEntry]   hub files known to this machine (their listing and header cached)

One request lists the repo (files, LFS sha256 and sizes, the commit, the card's licence), and a few Range
requests read the header. Both are cached under $LLMRUN_HOME/hub/ORG--REPO: `refs/REVISION.json` (the listing
the revision resolved to, used offline and when the hub cannot be reached) and `COMMIT/FILE.json` (a parsed header,
valid forever: a commit's files never change), so a second resolution reads nothing but the listing, and works
offline. huggingface_hub's errors are translated by runner.store.fetch (`translate_hub_error`).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import quote

from runner.core import dirs
from runner.core.errors import FetchError, HubUnreachableError, LlmrunError, UsageError
from runner.core.files import atomic_write_json
from runner.core.shapes import GGUFHeader, TensorInfo
from runner.model import catalog as catalog_module
from runner.model.catalog import Catalog, CatalogEntry, quant_rank
from runner.model.gguf import derive_shape, read_header_remote
from runner.model.hubmodel import RemoteFile, entries_for_repo, openness_card
from runner.model.hubref import HubRef, QuantGroup, parse_hub_ref, quant_groups, select_group
from runner.store import fetch

_CACHE_VERSION = 1
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_SHARD_FIRST_BYTES = 256 * 1024    # a later shard's header holds no vocabulary: a small first read


@dataclass(frozen=True)
class Listing:
    """What the hub says about a repo at one commit."""

    repo: str                       # the hub's spelling of ORG/REPO
    commit: str
    files: dict[str, RemoteFile] = field(hash=False)
    card: dict[str, object] = field(hash=False)
    released: dt.date
    gated: bool = False
    fetched_at: float = 0.0
    from_cache: bool = False


@dataclass(frozen=True)
class HubModel:
    """A resolved reference: the repo's quants as catalog entries (the referenced one is `chosen`)."""

    ref: HubRef
    listing: Listing
    groups: tuple[QuantGroup, ...]
    headers: dict[str, list[GGUFHeader]] = field(hash=False)
    entries: tuple[CatalogEntry, ...]
    chosen: CatalogEntry
    fetched_bytes: int = 0            # header bytes read over the network by this resolution (0: all cached)

    @property
    def catalog(self) -> Catalog:
        return Catalog(self.entries)

    def notes(self) -> list[str]:
        out = []
        where = f"hf.co/{self.listing.repo}@{self.listing.commit[:12]}"
        if self.fetched_bytes:
            out.append(f"{where}: planned from the GGUF header alone ({_mib(self.fetched_bytes)} read over HTTP "
                       "Range; no weights downloaded)")
        else:
            out.append(f"{where}: planned from cached GGUF headers (nothing downloaded)")
        if self.listing.from_cache:
            out.append(f"the hub was not asked: the file list cached {_age(self.listing.fetched_at)} was used")
        predicted = [e.quant for e in self.entries if not e.weights_exact]
        if predicted:
            out.append(f"{', '.join(predicted)} of this repo: tensors sized from the download with llama.cpp's "
                       "quant mix (header not read)")
        return out


def _mib(n: int) -> str:
    return f"{n / 1024 ** 2:.1f} MiB"


def _age(t: float) -> str:
    s = max(0, int(time.time() - t))
    return f"{s // 86400} days ago" if s >= 86400 else f"{s // 3600} h ago" if s >= 3600 else f"{s // 60} min ago"


# ------------------------------------------------------------------------------------------------------ cache

def cache_dir() -> Path:
    """$LLMRUN_HOME/hub: listings and parsed headers of hub repos."""
    return dirs.home() / "hub"


def _repo_dir(repo: str) -> Path:
    return cache_dir() / repo.lower().replace("/", "--")


def _listing_path(repo: str, revision: str) -> Path:
    return _repo_dir(repo) / "refs" / (quote(revision, safe="") + ".json")


def _header_path(repo: str, commit: str, filename: str) -> Path:
    return _repo_dir(repo) / commit / (quote(filename, safe="") + ".json")


def _save_listing(listing: Listing, revision: str) -> None:
    data = {"version": _CACHE_VERSION, "repo": listing.repo, "commit": listing.commit,
            "files": [{"name": f.name, "size": f.size, "sha256": f.sha256} for f in listing.files.values()],
            "card": listing.card, "released": listing.released.isoformat(), "gated": listing.gated,
            "fetched_at": listing.fetched_at}
    for rev in {revision, listing.commit}:
        path = _listing_path(listing.repo, rev)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, data, indent=1)


def _load_listing(repo: str, revision: str) -> Listing | None:
    try:
        data = json.loads(_listing_path(repo, revision).read_text())
        if data.get("version") != _CACHE_VERSION:
            return None
        files = {f["name"]: RemoteFile(f["name"], int(f["size"]), str(f["sha256"])) for f in data["files"]}
        return Listing(repo=str(data["repo"]), commit=str(data["commit"]), files=files, card=dict(data["card"]),
                       released=dt.date.fromisoformat(data["released"]), gated=bool(data.get("gated")),
                       fetched_at=float(data.get("fetched_at", 0.0)), from_cache=True)
    except (OSError, ValueError, KeyError, TypeError):
        return None           # missing or damaged: only costs a request


def _save_header(repo: str, commit: str, filename: str, header: GGUFHeader) -> None:
    data = {"version": _CACHE_VERSION, "gguf_version": header.version, "metadata": header.metadata,
            "tensors": [[t.name, list(t.shape), t.type_name, t.offset, t.n_bytes] for t in header.tensors],
            "data_offset": header.data_offset, "alignment": header.alignment, "file_size": header.file_size}
    path = _header_path(repo, commit, filename)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, data)


def _load_header(repo: str, commit: str, filename: str) -> GGUFHeader | None:
    path = _header_path(repo, commit, filename)
    try:
        data = json.loads(path.read_text())
        if data.get("version") != _CACHE_VERSION:
            return None
        tensors = tuple(TensorInfo(name=n, shape=tuple(s), type_name=t, offset=o, n_bytes=b)
                        for n, s, t, o, b in data["tensors"])
        metadata = data["metadata"]
        return GGUFHeader(version=data["gguf_version"], metadata=metadata, tensors=tensors,
                          data_offset=data["data_offset"], alignment=data["alignment"],
                          file_size=data["file_size"], shape=derive_shape(metadata, tensors))
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ---------------------------------------------------------------------------------------------------- the hub

def _fetch_listing(ref: HubRef) -> Listing:
    """The repo's files at the reference's revision (one model-info request), pinned to its commit."""
    from huggingface_hub import HfApi

    revision = ref.revision or "main"
    try:
        info = HfApi(endpoint=fetch.hub_endpoint()).model_info(ref.repo, revision=revision, files_metadata=True)
    except fetch.hub_errors() as e:
        raise fetch.translate_hub_error(e, ref.repo, revision, context="reference") from e
    files: dict[str, RemoteFile] = {}
    for s in info.siblings or ():
        size = s.lfs.size if s.lfs else s.size
        sha = s.lfs.sha256.lower() if s.lfs else ""
        files[s.rfilename] = RemoteFile(s.rfilename, int(size or 0), sha)
    card = info.card_data.to_dict() if info.card_data is not None else {}
    keep = {k: card[k] for k in ("license", "license_name", "license_link", "base_model") if k in card}
    when = info.last_modified or info.created_at
    released = when.date() if when is not None else dt.date.today()
    return Listing(repo=info.id or ref.repo, commit=info.sha or revision, files=files, card=keep,
                   released=released, gated=bool(info.gated), fetched_at=time.time())


def listing(ref: HubRef) -> Listing:
    """The repo's listing: from the hub (and cached), or from the cache when offline, when the hub cannot be
    reached, or when the reference pins a commit that was listed before."""
    revision = ref.revision or "main"
    if ref.revision and _COMMIT_RE.match(ref.revision):
        cached = _load_listing(ref.repo, ref.revision)
        if cached is not None:
            return cached
    if fetch.offline():
        cached = _load_listing(ref.repo, revision)
        if cached is None:
            raise HubUnreachableError(f"offline (HF_HUB_OFFLINE is set) and hf.co/{ref.repo} was never resolved "
                                      "on this machine", hint="resolve it once with the network (`llmrun plan "
                                      f"hf.co/{ref.repo}`), or unset HF_HUB_OFFLINE")
        return cached
    try:
        fresh = _fetch_listing(ref)
    except HubUnreachableError:
        cached = _load_listing(ref.repo, revision)
        if cached is None:
            raise
        return cached
    _save_listing(fresh, revision)
    return fresh


def _file_url(repo: str, commit: str, filename: str) -> str:
    return f"{fetch.hub_endpoint()}/{repo}/resolve/{commit}/{quote(filename)}"


def read_headers(lst: Listing, group: QuantGroup) -> tuple[list[GGUFHeader], int]:
    """The GGUF headers of a group's files (every shard's: each holds its own tensors), from the cache or over
    HTTP Range; and the bytes read over the network."""
    headers: list[GGUFHeader] = []
    fetched = 0
    auth: dict[str, str] | None = None
    for i, name in enumerate(group.files):
        header = _load_header(lst.repo, lst.commit, name)
        if header is None:
            if fetch.offline():
                raise HubUnreachableError(f"offline (HF_HUB_OFFLINE is set) and the header of hf.co/{lst.repo}/"
                                          f"{name} is not cached", hint="plan it once with the network")
            if auth is None:
                from huggingface_hub.utils import build_hf_headers

                auth = dict(build_hf_headers())
            got: list[int] = []
            header = read_header_remote(_file_url(lst.repo, lst.commit, name), headers=auth, require_shape=i == 0,
                                        first_bytes=_SHARD_FIRST_BYTES if i else 1024 * 1024, fetched=got)
            fetched += sum(got)
            size = lst.files[name].size if name in lst.files else None
            if size and header.file_size and header.file_size != size:
                raise FetchError(f"hf.co/{lst.repo}/{name}: the server says {header.file_size} bytes, the listing "
                                 f"{size}", hint="try again; the repo may be changing")
            _save_header(lst.repo, lst.commit, name, header)
        headers.append(header)
    return headers, fetched


def _rank_of(label: str) -> int | None:
    try:
        return quant_rank(label)
    except UsageError:
        return None


def resolve(text: str | HubRef) -> HubModel:
    """The repo a reference names, at one commit: every quant as a catalog entry, the referenced (or default)
    one with its header read."""
    ref = parse_hub_ref(text) if isinstance(text, str) else text
    if ref is None:
        raise UsageError(f"{text!r} is not a hub reference",
                         hint="hf.co/ORG/REPO[:QUANT], ORG/REPO/FILE.gguf or https://huggingface.co/ORG/REPO")
    lst = listing(ref)
    groups = quant_groups(list(lst.files))
    group = select_group(ref, groups, rank=_rank_of)
    headers, fetched = read_headers(lst, group)
    model = _build(ref, lst, tuple(groups), {group.first: headers}, group)
    return replace(model, fetched_bytes=fetched)


def _build(ref: HubRef, lst: Listing, groups: tuple[QuantGroup, ...], headers: dict[str, list[GGUFHeader]],
           chosen: QuantGroup) -> HubModel:
    meta = headers[chosen.first][0].metadata
    lic = meta.get("general.license")
    card = openness_card(f"hf.co/{lst.repo}", lst.repo.split("/")[0], lst.card, lst.released,
                         header_license=lic if isinstance(lic, str) else None)
    entries = entries_for_repo(repo=lst.repo, commit=lst.commit, groups=list(groups), files=lst.files,
                               headers=headers, chosen=chosen, card=card)
    default = next(e for e in entries if e.default)
    return HubModel(ref=ref, listing=lst, groups=groups, headers=headers, entries=entries, chosen=default)


def with_header(model: HubModel, entry: CatalogEntry) -> HubModel:
    """`model` with `entry`'s own header read, so its tensors are exact (the chosen one stays the default)."""
    group = next(g for g in model.groups if g.first == entry.local_file)
    if group.first in model.headers:
        return model
    headers, fetched = read_headers(model.listing, group)
    chosen = next(g for g in model.groups if g.first == model.chosen.local_file)
    rebuilt = _build(model.ref, model.listing, model.groups, {**model.headers, group.first: headers}, chosen)
    return replace(rebuilt, fetched_bytes=model.fetched_bytes + fetched)


def hub_entry(text: str) -> CatalogEntry | None:
    """The entry a hub reference names (with its header read), or None when `text` is not a hub reference.
    What a name resolver calls for the hub forms before the catalog's."""
    if Path(text).expanduser().exists():
        return None
    ref = parse_hub_ref(text)
    return resolve(ref).chosen if ref is not None else None


def find_entry(name: str, catalog: Catalog | None = None) -> CatalogEntry:
    """A hub reference's entry, else the catalog's (UnknownModelError with close matches)."""
    entry = hub_entry(name)
    if entry is not None:
        return entry
    return (catalog or catalog_module.load_catalog()).get(name)


def local_hub_entries() -> list[CatalogEntry]:
    """Hub files this machine resolved before (their listing and header in the cache) and has pulled: what
    `llmrun list` shows beside the catalog's models."""
    from runner.store import local as store

    out: list[CatalogEntry] = []
    root = cache_dir()
    if not root.is_dir():
        return out
    for refs in sorted(root.glob("*/refs")):
        seen: set[str] = set()
        for path in sorted(refs.glob("*.json")):
            data = None
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            repo, commit = data.get("repo"), data.get("commit")
            if not isinstance(repo, str) or not isinstance(commit, str) or commit in seen:
                continue
            seen.add(commit)
            lst = _load_listing(repo, commit) or _load_listing(repo, path.stem)
            if lst is None:
                continue
            groups = tuple(quant_groups(list(lst.files)))
            for g in groups:
                if any(store.cached_repo_file(lst.repo, lst.commit, f) is None for f in g.files):
                    continue                         # not pulled: its header is not even read
                headers = [_load_header(lst.repo, lst.commit, f) for f in g.files]
                if any(h is None for h in headers):
                    continue
                ref = HubRef(repo=lst.repo, filename=g.first, revision=lst.commit)
                try:
                    entry = _build(ref, lst, groups, {g.first: [h for h in headers if h is not None]}, g).chosen
                except LlmrunError:
                    continue
                if store.local_model(entry) is not None:
                    out.append(entry)
    return out


__all__ = ["HubModel", "Listing", "resolve", "hub_entry", "find_entry", "with_header", "listing", "read_headers",
           "local_hub_entries", "cache_dir"]
