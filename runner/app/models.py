"""Which models a process can serve, and the one resolution of a model name: used by the HTTP server, `llmrun chat`
and the CLI alike.

A name resolves, in this order (case-insensitive):

1. a served name exactly: a local catalog model (`smollm2-135m:Q4_1`), a GGUF file given to the server (its
   `--name`, or a name from `--config`), or any alias of one (a file's stem, `SmolLM2-135M-Instruct.Q4_1`);
2. Ollama's `NAME:latest`, as NAME;
3. a catalog model without a quant (`smollm2-135m`): the best local quant of it;
4. a hub reference (`hf.co/ORG/REPO[:QUANT]`, `ORG/REPO/FILE.gguf`, a huggingface.co URL: runner.store.hub): the
   file it names when it is local, else as for a catalog name not local (below);
5. a catalog name that is not local: `ModelNotLocalError` saying `llmrun pull NAME` (or, when the index may pull,
   a `ModelRef` without a path: the loader pulls it first);
6. anything else: `UnknownModelError` listing close matches among the served names and the catalog.

Copies (`/api/copy`, runner.store.aliases) are more names of a served model: they resolve to the same model (one
load, one file), are listed as models of their own, and never hide a model's own name.

A miss rescans the local store once before it is refused, so a model pulled while the server runs is found.
More forms of names go in `ModelIndex.steps` (served here) or `ModelIndex.remote_steps` (to pull first: hub
references such as `hf.co/ORG/REPO:QUANT` would be one more, before the catalog's).
"""

from __future__ import annotations

import difflib
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from runner.core.errors import GGUFError, ModelNotLocalError, UnknownModelError, UsageError
from runner.model.catalog import Catalog, CatalogEntry, quant_rank
from runner.store import aliases as alias_store
from runner.store.local import LocalModel

QUANT_RE = re.compile(r"(?i)(IQ\d_[A-Z0-9]+(?:_[SML])?|Q\d_K(?:_[SML])?|Q\d_\d|BF16|F16|F32)")
CARD_KEYS = ("general.architecture", "general.name", "general.size_label", "general.file_type",
             "general.parameter_count", "general.license")
LATEST = ":latest"
RESCAN_S = 2.0
POOLING_NAMES = {0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}   # llama.cpp's enum llama_pooling_type


@dataclass(frozen=True)
class ModelCard:
    """What /v1/models, /api/tags, /api/show and /api/ps say about a model (beyond its engine)."""

    name: str
    path: str | None = None
    size_bytes: int = 0
    family: str = ""
    parameter_size: str = ""           # e.g. "7B"
    quantization: str = ""             # e.g. "Q4_K_M"
    chat_template: str = ""
    modified_at: float = 0.0           # unix seconds
    pooling: str = ""                  # the pooling type an embedding model declares ("mean", "cls", ...); "" for
                                       # a model that generates text
    extra: dict = field(default_factory=dict, compare=False)  # GGUF metadata worth showing in /api/show


def read_card(path: Path, name: str) -> ModelCard:
    """A model file's card: file facts plus a few GGUF metadata keys (an unreadable header leaves them out)."""
    from runner.model.gguf import read_header

    stat = path.stat()
    try:
        meta = read_header(path).metadata
    except (GGUFError, OSError):
        meta = {}
    arch = str(meta.get("general.architecture", ""))
    m = QUANT_RE.search(path.name)
    extra = {k: meta[k] for k in CARD_KEYS if k in meta and isinstance(meta[k], (str, int, float))}
    if arch and f"{arch}.context_length" in meta:
        extra[f"{arch}.context_length"] = meta[f"{arch}.context_length"]
    pooling = ""
    value = meta.get(f"{arch}.pooling_type")
    if arch and isinstance(value, int):      # an embedding model (as Ollama and llama.cpp tell them apart)
        pooling = POOLING_NAMES.get(value, str(value))
        extra[f"{arch}.pooling_type"] = value
    return ModelCard(name=name, path=str(path), size_bytes=stat.st_size, modified_at=stat.st_mtime, family=arch,
                     parameter_size=str(meta.get("general.size_label", "")),
                     quantization=m.group(1).upper() if m else "",
                     chat_template=str(meta.get("tokenizer.chat_template", "")), extra=extra,
                     pooling=pooling)


@dataclass(frozen=True)
class ModelRef:
    """One model a name resolves to."""

    name: str                          # what clients see in /v1/models and /api/tags
    path: Path | None                  # the GGUF llama.cpp loads; None: a catalog model to pull first
    entry: CatalogEntry | None = None  # its catalog entry (planned from the catalog's shape), None for other files
    aliases: tuple[str, ...] = ()      # other names that resolve to it (the file's stem, the catalog name)
    copies: tuple[str, ...] = ()       # names given by /api/copy (runner.store.aliases), listed as models too

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases, *self.copies)


@dataclass(frozen=True)
class ServedFile:
    """A model served under a name of its own: a GGUF file (`llmrun serve --model PATH [--name NAME]`, or `path`
    in --config), or with `path=None` an engine handed to the server already loaded."""

    name: str
    path: Path | None
    merge: bool = True    # a file that is a local catalog model too is that one model, under this name first;
                          # False: a model of its own (the same file served again under another name)


LocalScan = Callable[[Catalog], Sequence[LocalModel]]
Step = Callable[[str], "ModelRef | None"]
EntryStep = Callable[[str], "CatalogEntry | None"]
Copies = Callable[[], Mapping[str, str]]


def _real(path: Path) -> str:
    return os.path.realpath(path)


def _store_scan(catalog: Catalog) -> Sequence[LocalModel]:
    from runner.store import local as store

    return store.list_local(catalog)


HubScan = Callable[[], Sequence["tuple[CatalogEntry, LocalModel]"]]


def _hub_scan() -> Sequence[tuple[CatalogEntry, LocalModel]]:
    """Hub files pulled to this machine (resolved before: their listing and header are cached)."""
    from runner.store import hub, local as store

    out = []
    for entry in hub.local_hub_entries():
        lm = store.local_model(entry)
        if lm is not None:
            out.append((entry, lm))
    return out


class ModelIndex:
    """The models one process serves (local catalog models, plus named files) and the resolution of names.
    `catalog=None` serves only `files` (a server built around one engine). `pull=True` resolves catalog models
    that are not local yet (the loader pulls them); otherwise they get ModelNotLocalError with the pull command."""

    def __init__(self, *, files: Iterable[ServedFile] = (), catalog: Catalog | None = None,
                 scan: LocalScan | None = _store_scan, pull: bool = False, rescan_s: float = RESCAN_S,
                 hub_scan: HubScan | None = _hub_scan, copies: Copies | None = alias_store.load):
        self.files = tuple(files)
        self.catalog = catalog
        self.scan = scan if catalog is not None else None
        self.hub_scan = hub_scan if catalog is not None and scan is not None else None
        self.read_copies = copies
        self.copies: Mapping[str, str] = {}     # copy name -> the name it stands for, as stored
        self.pull = pull
        self.rescan_s = rescan_s            # a miss or a listing rescans the store at most this often
        self._scanned_at = -math.inf
        self._scanning = threading.Lock()
        self.refs: tuple[ModelRef, ...] = ()
        self._by_name: dict[str, ModelRef] = {}
        # the resolution order (see the module docstring): names of models served here, tried again after a
        # rescan, then names of models not here yet (hub references, then the catalog)
        self.steps: list[Step] = [self._served, self._latest, self._best_local_quant]
        self.remote_steps: list[Step] = [self._hub, self._catalog]
        # what a pull of a name downloads (/api/pull): a hub reference, then a catalog name
        self.pull_steps: list[EntryStep] = [self._hub_entry, self.catalog_entry]
        self.refresh()

    # ------------------------------------------------------------------------------------------------ listing
    def refresh(self, *, force: bool = True) -> None:
        """Rescan the local store: file stats and the verified marks, nothing hashed (tens of ms for the whole
        catalog on a busy machine, so a server rescans at most every `rescan_s` unless `force`). Threads that
        rescan at once take turns, so an older scan never replaces a newer one."""
        if not force and time.monotonic() - self._scanned_at < self.rescan_s:
            return
        with self._scanning:
            self._scan()

    def _scan(self) -> None:
        self._scanned_at = time.monotonic()
        local: list[ModelRef] = []
        if self.catalog is not None and self.scan is not None:
            for lm in self.scan(self.catalog):
                entry = self.catalog.get(lm.name)
                local.append(ModelRef(lm.name, Path(lm.path), entry, aliases=(Path(lm.path).stem,)))
        if self.hub_scan is not None:
            for entry, lm in self.hub_scan():
                local.append(ModelRef(entry.name, Path(lm.path), entry, aliases=(Path(lm.path).stem,)))
        by_path = {_real(r.path): r for r in local if r.path is not None}
        refs: list[ModelRef] = []
        for f in self.files:
            same = by_path.pop(_real(f.path), None) if f.path is not None and f.merge else None
            if f.path is None:
                refs.append(ModelRef(f.name, None))
            elif same is not None:   # a store model given by its path: one model, the given name first
                refs.append(ModelRef(f.name, f.path, same.entry, aliases=_unique((f.path.stem, *same.names), f.name)))
            else:
                refs.append(ModelRef(f.name, f.path, None, aliases=_unique((f.path.stem,), f.name)))
        refs += [r for r in local if r.path is not None and _real(r.path) in by_path]
        copies = dict(self.read_copies()) if self.read_copies is not None else {}
        refs = _with_copies(refs, copies)
        by_name: dict[str, ModelRef] = {}
        for r in refs:                          # names before aliases: an alias never hides a name
            by_name.setdefault(r.name.lower(), r)
        for r in refs:
            for a in (*r.aliases, *r.copies):
                by_name.setdefault(a.lower(), r)
        self.refs, self._by_name, self.copies = tuple(refs), by_name, copies

    def listing(self) -> tuple[ModelRef, ...]:
        """Every model served now (the local store rescanned, if not just now)."""
        self.refresh(force=False)
        return self.refs

    def add(self, served: ServedFile) -> None:
        """Serve one more model under its name."""
        self.files += (served,)
        self.refresh()

    def files_at(self, path: Path) -> tuple[ServedFile, ...]:
        """The named files that are `path` (the same real file): a store model also given by its path."""
        real = _real(path)
        return tuple(f for f in self.files if f.path is not None and _real(f.path) == real)

    def drop(self, files: Iterable[ServedFile]) -> None:
        """Stop serving these named files (deleted), from the next `refresh()` on."""
        gone = set(files)
        self.files = tuple(f for f in self.files if f not in gone)

    # ---------------------------------------------------------------------------------------------- resolution
    def resolve(self, text: str) -> ModelRef:
        """The model `text` names (see the module docstring for the forms), or UnknownModelError /
        ModelNotLocalError (both HTTP 404) saying what would be right."""
        name = text.strip()
        if not name:
            raise UsageError("the model name is empty", hint="`llmrun list` shows the local models")
        for attempt in range(2):
            gone = False
            for step in self.steps:
                ref = step(name)
                if ref is not None:
                    if attempt or ref.path is None or ref.path.exists():
                        return ref
                    gone = True         # deleted since the last scan (`llmrun rm` elsewhere): look again now
                    break
            if attempt == 0:
                self.refresh(force=gone)    # pulled (or deleted) since the last scan?
        for step in self.remote_steps:
            ref = step(name)
            if ref is not None:
                return ref
        copy = self.copy_name(name)
        if copy is not None:
            raise ModelNotLocalError(f"{copy!r} is a copy of {self.copies[copy]!r}, which is not on this machine",
                                     hint=f"pull {self.copies[copy]} again, or delete the copy {copy}")
        raise UnknownModelError(name, self.close_matches(name),
                                hint="GET /v1/models (or `llmrun list`) shows the models served here; "
                                     "`llmrun list --available` the whole catalog")

    def _served(self, name: str) -> ModelRef | None:
        return self._by_name.get(name.lower())

    def _latest(self, name: str) -> ModelRef | None:
        if not name.lower().endswith(LATEST) or len(name) == len(LATEST):
            return None
        base = name[:-len(LATEST)]
        return self._served(base) or self._best_local_quant(base)

    def _best_local_quant(self, name: str) -> ModelRef | None:
        if ":" in name:
            return None
        model = name.lower()
        quants = [r for r in self.refs if r.entry is not None and r.entry.model == model]
        return max(quants, key=lambda r: quant_rank(r.entry.quant) if r.entry else -1, default=None)

    def _hub(self, name: str) -> ModelRef | None:
        """A hub reference: the file it names (resolved against the hub, or its cached listing), served when
        local, pulled first when the index may pull."""
        if self.catalog is None:
            return None
        from runner.model.hubref import is_hub_ref

        if Path(name).expanduser().exists() or not is_hub_ref(name):
            return None
        from runner.store import hub, local as store

        entry = hub.resolve(name).chosen
        lm = store.local_model(entry)
        if lm is not None:
            return ModelRef(entry.name, Path(lm.path), entry, aliases=(Path(lm.path).stem,))
        if self.pull:
            return ModelRef(entry.name, None, entry)
        raise ModelNotLocalError(f"{entry.name} is on the hub but not on this machine",
                                 hint=f"`llmrun pull {entry.name}` downloads it (or serve with --pull to pull models "
                                      "when first asked for)")

    def _catalog(self, name: str) -> ModelRef | None:
        if self.catalog is None:
            return None
        base = name[:-len(LATEST)] if name.lower().endswith(LATEST) else name
        try:
            entry = self.catalog.get(base)
        except UnknownModelError:
            return None
        if self.pull:
            return ModelRef(entry.name, None, entry)
        raise ModelNotLocalError(f"the model {name!r} is in the catalog but not on this machine",
                                 hint=f"`llmrun pull {entry.name}` downloads it (or serve with --pull to pull models "
                                      "when first asked for)")

    def owner(self, name: str) -> ModelRef | None:
        """The model whose own name (or file stem, or catalog name) `name` is, as served now; copies not counted."""
        ref = self._by_name.get(name.strip().lower())
        if ref is None or name.strip().lower() in (c.lower() for c in ref.copies):
            return None
        return ref

    def copy_name(self, name: str) -> str | None:
        """The copy (/api/copy) `name` names, as stored (also as NAME:latest); None when it names none."""
        text = name.strip()
        base = text[:-len(LATEST)] if text.lower().endswith(LATEST) else text
        return alias_store.find(text, dict(self.copies)) or alias_store.find(base, dict(self.copies))

    def pull_entry(self, name: str) -> CatalogEntry:
        """What pulling `name` downloads: the catalog entry it names (or the one behind a served model's name);
        UnknownModelError with close matches, or UsageError for a model that has nothing to pull."""
        text = name.strip()
        if not text:
            raise UsageError("the model name is empty", hint="`llmrun list --available` shows the catalog")
        for step in self.pull_steps:
            entry = step(text)
            if entry is not None:
                return entry
        try:
            ref = self.resolve(text)
        except ModelNotLocalError:
            ref = None
        except UnknownModelError as e:
            raise UnknownModelError(text, e.close_matches, hint="`llmrun list --available` shows the models a pull "
                                                              "can fetch") from e
        if ref is not None and ref.entry is not None:
            return ref.entry
        if ref is not None:
            what = f"the file {ref.path}" if ref.path is not None else "an engine handed to the server loaded"
            raise UsageError(f"{text!r} is {what}, served as it is: there is nothing to pull",
                             hint="pull a catalog model (`llmrun list --available` shows them)")
        raise UnknownModelError(text, self.close_matches(text))

    def _hub_entry(self, name: str) -> CatalogEntry | None:
        if self.catalog is None:
            return None
        from runner.store import hub

        return hub.hub_entry(name)

    def catalog_entry(self, name: str) -> CatalogEntry | None:
        """The catalog's entry called `name` (`:latest` allowed), or None."""
        if self.catalog is None:
            return None
        try:
            return self.catalog.get(name[:-len(LATEST)] if name.lower().endswith(LATEST) else name)
        except UnknownModelError:
            return None

    def close_matches(self, name: str) -> list[str]:
        """Served names like `name`, then the catalog's."""
        query = name.lower().removesuffix(LATEST)
        served: dict[str, str] = {}
        for r in self.refs:
            for n in (*r.names, *((r.entry.model,) if r.entry else ())):
                served.setdefault(n.lower(), n)
        out = [served[m] for m in difflib.get_close_matches(query, list(served), n=4, cutoff=0.6)]
        out += [n for k, n in served.items() if query and query in k and n not in out]
        if self.catalog is not None:
            try:
                self.catalog.get(query)
            except UnknownModelError as e:
                out += [m for m in e.close_matches if m not in out]
        return out[:6]

    # --------------------------------------------------------------------------------------------------- cards
    def card(self, ref: ModelRef) -> ModelCard:
        """The ref's card: read from its file (cached until the file changes), or the catalog's facts when the
        file is not local yet."""
        if ref.path is None:       # not local yet, or an engine handed over (its own card is used)
            e = ref.entry
            return ModelCard(name=ref.name, size_bytes=e.size_bytes if e else 0, family=e.shape.arch if e else "",
                             parameter_size=f"{e.params_b:g}B" if e else "", quantization=e.quant if e else "")
        try:
            st = ref.path.stat()
            key = (str(ref.path), st.st_mtime_ns, ref.name)
            card = _CARDS.get(key)
            if card is None:
                card = _CARDS[key] = read_card(ref.path, ref.name)
        except FileNotFoundError as e:
            raise ModelNotLocalError(f"{ref.name}: its file {ref.path} is gone",
                                     hint="pull it again, or serve the file from where it is now") from e
        return card


_CARDS: dict[tuple[str, int, str], ModelCard] = {}


def _with_copies(refs: list[ModelRef], copies: Mapping[str, str]) -> list[ModelRef]:
    """`refs` with each copy's name on the model it stands for; a copy whose model is not here, or whose name is
    a model's own name, is left out."""
    names = {n.lower(): i for i, r in enumerate(refs) for n in (r.name, *r.aliases)}
    added: dict[int, list[str]] = {}
    for copy, target in copies.items():
        i = names.get(target.lower())
        if i is not None and copy.lower() not in names:
            added.setdefault(i, []).append(copy)
    return [replace(r, copies=tuple(added[i])) if i in added else r for i, r in enumerate(refs)]


def _unique(names: Iterable[str], besides: str) -> tuple[str, ...]:
    out: list[str] = []
    for n in names:
        if n.lower() != besides.lower() and n.lower() not in (o.lower() for o in out):
            out.append(n)
    return tuple(out)

