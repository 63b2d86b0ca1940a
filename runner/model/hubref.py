"""Hugging Face hub references to GGUF models, and their resolution against a repo's file list. Pure: no network
(runner.store.hub asks the hub; this module only reads names).

    parse_hub_ref(text) -> HubRef | None      None when `text` is no hub reference (a catalog name or a path)
    quant_groups(filenames) -> list[QuantGroup]   the repo's GGUF models: one per quant, shards together
    select_group(ref, groups) -> QuantGroup   the tag's group (case-insensitive), or Q4_K_M / the nearest

Reference forms (the repo as ORG/REPO):

    hf.co/ORG/REPO[:TAG]                    as Ollama takes them (huggingface.co/... too)
    ORG/REPO[:TAG]                          as llama-server's -hf takes them
    ORG/REPO/PATH/FILE.gguf                 one file (or the first shard of a split model)
    https://huggingface.co/ORG/REPO[/blob|resolve|tree/REVISION[/PATH/FILE.gguf]][:TAG]

A TAG names a quant (`Q4_K_M`, `q5_k_s`, `IQ3_M`, `UD-Q4_K_XL`): it matches a file whose quant label is the
tag, else a file whose name holds the tag between separators. `@REVISION` after the repo (or a URL's revision)
pins a branch, tag or commit; otherwise `main` is resolved to its commit when the reference is resolved.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from runner.core.errors import RemoteNotFoundError, UsageError

_REPO_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_REPO_RE = re.compile(rf"^{_REPO_PART}/{_REPO_PART}$")
_HOSTS = ("hf.co/", "huggingface.co/", "www.huggingface.co/")
_SHARD_RE = re.compile(r"^(?P<base>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$", re.IGNORECASE)
# a quant label between separators: Q4_K_M, IQ3_XXS, Q4_0_4_4, UD-Q4_K_XL, BF16, F16, F32, MXFP4, TQ1_0
_QUANT_TOKEN = r"(?:UD-)?(?:I?Q\d(?:_[A-Z0-9]+)*|TQ\d_\d|BF16|FP?16|FP?32|MXFP4(?:_MOE)?)"
_LABEL_RE = re.compile(rf"(?<![A-Za-z0-9]){_QUANT_TOKEN}(?![A-Za-z0-9])", re.IGNORECASE)
DEFAULT_TAG = "Q4_K_M"
_LABEL_ALIASES = {"FP16": "F16", "FP32": "F32"}


@dataclass(frozen=True)
class HubRef:
    """A parsed hub reference."""

    repo: str                  # "ORG/REPO" as written
    tag: str | None = None     # quant tag as written ("q4_k_m"); None = the default
    filename: str | None = None  # a file inside the repo
    revision: str | None = None  # a branch, tag or commit; None = main
    text: str = ""             # the reference as the user wrote it

    @property
    def canonical(self) -> str:
        """`hf.co/ORG/REPO` with the tag or file as given."""
        base = f"hf.co/{self.repo}"
        if self.filename:
            base += "/" + self.filename
        elif self.tag:
            base += ":" + self.tag
        return base + (f"@{self.revision}" if self.revision else "")


def parse_hub_ref(text: str) -> HubRef | None:
    """The hub reference `text` spells, or None when it is none (a catalog name such as `llama-2-7b-chat:Q4_K_M`,
    or a local path: callers check paths that exist first). A malformed reference of a hub form raises
    UsageError naming what is wrong."""
    raw = text.strip()
    s = raw
    explicit = False
    lowered = s.lower()
    for scheme in ("https://", "http://"):
        if lowered.startswith(scheme):
            s, lowered = s[len(scheme):], lowered[len(scheme):]
            if not lowered.startswith(_HOSTS):
                return None
            break
    for host in _HOSTS:
        if lowered.startswith(host):
            s = s[len(host):]
            explicit = True
            break
    if not explicit and (s.startswith(("/", ".", "~")) or "\\" in s or s.count("/") < 1
                         or (s.count("/") == 1 and s.lower().endswith(".gguf"))):
        return None                       # a path (DIR/FILE.gguf), or a catalog name
    s = s.rstrip("/")
    revision: str | None = None
    tag: str | None = None
    filename: str | None = None
    parts = s.split("/")
    if len(parts) < 2:
        if explicit:
            raise UsageError(f"{raw!r}: a hub reference names ORG/REPO", hint="e.g. hf.co/Qwen/Qwen2.5-7B-Instruct-GGUF:Q4_K_M")
        return None
    org, name, rest = parts[0], parts[1], parts[2:]
    if ":" in name:                       # REPO[@REV]:TAG or REPO:TAG[@REV]
        name, _, tag = name.partition(":")
        if "@" in tag:
            tag, _, revision = tag.partition("@")
    if "@" in name:
        name, _, revision = name.partition("@")
    if rest and rest[0] in ("blob", "resolve", "tree") and explicit:
        if len(rest) < 2:
            raise UsageError(f"{raw!r}: the URL names no revision after /{rest[0]}/")
        revision = rest[1]
        rest = rest[2:]
    if rest:
        path = "/".join(rest)
        if ":" in path and not path.lower().endswith(".gguf"):
            path, _, tag = path.rpartition(":")
        if not path.lower().endswith(".gguf"):
            if explicit:
                raise UsageError(f"{raw!r}: {path!r} is not a .gguf file in the repo",
                                 hint="name a .gguf file, or the repo with a quant tag: hf.co/ORG/REPO:Q4_K_M")
            return None
        filename = path
    repo = f"{org}/{name}"
    if not _REPO_RE.match(repo) or "--" in repo or ".." in repo:
        if explicit:
            raise UsageError(f"{raw!r}: {repo!r} is not a valid hub repo id",
                             hint="ORG/REPO with letters, digits, '-', '_' and '.'")
        return None
    if tag is not None:
        tag = tag.strip()
        if not tag or not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", tag):
            raise UsageError(f"{raw!r}: {tag!r} is not a quant tag", hint="e.g. :Q4_K_M, :Q8_0, :IQ3_M")
    return HubRef(repo=repo, tag=tag, filename=filename, revision=revision or None, text=raw)


def is_hub_ref(text: str) -> bool:
    try:
        return parse_hub_ref(text) is not None
    except UsageError:
        return True   # a hub form, malformed: resolving it reports what is wrong


# ------------------------------------------------------------------------------------------------ file lists

@dataclass(frozen=True)
class QuantGroup:
    """One model file of a repo, or the shards of one split model, and its quant label."""

    label: str                 # "Q4_K_M", "UD-Q4_K_XL", or the file stem when the name has no quant
    files: tuple[str, ...]     # repo paths, shards in order

    @property
    def first(self) -> str:
        return self.files[0]


def quant_label(filename: str) -> str | None:
    """The quant label in a file name (the last one, upper-cased), or None."""
    name = filename.rsplit("/", 1)[-1]
    m = _SHARD_RE.match(name)
    stem = m.group("base") if m else re.sub(r"(?i)\.gguf$", "", name)
    found: list[str] = _LABEL_RE.findall(stem)
    if not found:
        return None
    label = found[-1].upper()
    return _LABEL_ALIASES.get(label, label)


def _is_model_file(name: str) -> bool:
    base = name.rsplit("/", 1)[-1].lower()
    if not base.endswith(".gguf"):
        return False
    # vision projectors and importance matrices are GGUFs too, but not models llama.cpp loads on their own
    return not (base.startswith("mmproj") or "-mmproj" in base or ".mmproj" in base or "imatrix" in base)


def quant_groups(filenames: list[str] | tuple[str, ...]) -> list[QuantGroup]:
    """The repo's GGUF models in file-list order: each single file, and each complete shard set as one group.
    Vision projectors (mmproj) and imatrix files are left out; an incomplete shard set is left out too."""
    shards: dict[tuple[str, int], dict[int, str]] = {}
    order: list[str | tuple[str, int]] = []       # a file's name, or a shard set's (base, count)
    for name in filenames:
        if not _is_model_file(name):
            continue
        m = _SHARD_RE.match(name)
        if m:
            key = (m.group("base"), int(m.group("n")))
            if key not in shards:
                shards[key] = {}
                order.append(key)
            shards[key][int(m.group("i"))] = name
        else:
            order.append(name)
    groups: list[QuantGroup] = []
    for item in order:
        if isinstance(item, str):
            groups.append(QuantGroup(quant_label(item) or _stem(item), (item,)))
            continue
        parts = shards[item]
        n = item[1]
        if sorted(parts) != list(range(1, n + 1)):
            continue
        files = tuple(parts[i] for i in range(1, n + 1))
        groups.append(QuantGroup(quant_label(files[0]) or _stem(files[0]), files))
    return groups


def _stem(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    m = _SHARD_RE.match(base)
    return m.group("base") if m else re.sub(r"(?i)\.gguf$", "", base)


def _tag_re(tag: str) -> re.Pattern[str]:
    return re.compile(rf"(?<![A-Za-z0-9]){re.escape(tag)}(?![A-Za-z0-9_])", re.IGNORECASE)


def select_group(ref: HubRef, groups: list[QuantGroup], *,
                 rank: Callable[[str], int | None] | None = None) -> QuantGroup:
    """The group a reference names. A file: the group holding it. A tag: the group whose label is the tag
    (case-insensitive), else the only one whose file name holds it between separators; several: an error listing
    them. No tag: Q4_K_M, else the quant nearest to it in quality (`rank`: label -> quality, higher better, None
    when unknown; ties go to the better one), else the first file."""
    where = f"hf.co/{ref.repo}"
    if not groups:
        raise RemoteNotFoundError(f"{where} has no GGUF model file",
                                  hint="llmrun runs GGUF files; look for a repo whose name ends in -GGUF")
    choices = ", ".join(g.label for g in groups)
    if ref.filename:
        want = ref.filename.lower()
        for g in groups:
            if any(f.lower() == want for f in g.files):
                return g
        raise RemoteNotFoundError(f"{where} has no file {ref.filename}", hint=f"its GGUF models: {choices}")
    if ref.tag:
        tag = ref.tag.upper()
        exact = [g for g in groups if g.label.upper() == tag]
        if len(exact) == 1:
            return exact[0]
        pattern = _tag_re(ref.tag)
        loose = exact or [g for g in groups if any(pattern.search(f.rsplit("/", 1)[-1]) for f in g.files)]
        if len(loose) == 1:
            return loose[0]
        if not loose:
            raise RemoteNotFoundError(f"{where} has no {ref.tag} file", hint=f"its quants: {choices}")
        names = ", ".join(g.first for g in loose)
        raise UsageError(f"{where}:{ref.tag} is ambiguous: it matches {names}",
                         hint="name the file instead: " + " or ".join(f"hf.co/{ref.repo}/{g.first}" for g in loose))
    for g in groups:
        if g.label.upper() == DEFAULT_TAG:
            return g
    target = rank(DEFAULT_TAG) if rank is not None else None
    if rank is not None and target is not None:
        ranked = [(r, g) for g in groups if (r := rank(g.label)) is not None]
        if ranked:
            return min(ranked, key=lambda rg: (abs(rg[0] - target), -rg[0]))[1]
    return groups[0]


__all__ = ["HubRef", "QuantGroup", "parse_hub_ref", "is_hub_ref", "quant_groups", "quant_label", "select_group",
           "DEFAULT_TAG"]
