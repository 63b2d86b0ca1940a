"""Licence acceptance before a first pull: models whose weights licence is not an OSI-approved open-source licence
(e.g. the Llama 2 Community License) need a one-time acceptance, asked on the terminal or given with
`--accept-license`, remembered per licence in `dirs.home()/licenses.json`. Without it nothing is downloaded."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from runner.core import dirs
from runner.core.files import atomic_write_json
from runner.model.catalog import CatalogEntry
from runner.core.errors import LicenseNotAcceptedError


@dataclass(frozen=True)
class LicenceTerms:
    key: str                      # what acceptance is remembered under: the SPDX id or short name
    name: str                     # "Llama 2 Community License Agreement"
    link: str | None
    restrictions: tuple[str, ...]
    requires_acceptance: bool


def terms(entry: CatalogEntry) -> LicenceTerms:
    """The licence facts of an entry, from its openness card (an entry without a card must be accepted, like the
    catalog's `requires_acceptance` says)."""
    card = entry.card
    if card is None:
        return LicenceTerms(entry.license, entry.license, None, (), entry.requires_acceptance)
    return LicenceTerms(card.license, card.license_name, card.license_url, tuple(card.restrictions),
                        entry.requires_acceptance)


def _path() -> Path:
    return dirs.home() / "licenses.json"


def accepted() -> dict[str, dict]:
    try:
        data = json.loads(_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def is_accepted(entry: CatalogEntry) -> bool:
    t = terms(entry)
    return not t.requires_acceptance or t.key in accepted()


def record_acceptance(entry: CatalogEntry) -> None:
    t = terms(entry)
    data = accepted()
    data[t.key] = {"name": t.name, "link": t.link, "model": entry.name,
                   "accepted_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    path = _path()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, data, indent=1, sort_keys=True)


def question(entry: CatalogEntry) -> str:
    t = terms(entry)
    lines = [f"{entry.name} is released under the {t.name}, which is not an OSI-approved open-source licence."]
    if t.link:
        lines.append(f"Read it: {t.link}")
    if t.restrictions:
        lines.append("Key restrictions:")
        lines += [f"  - {r}" for r in t.restrictions]
    lines.append(f"Do you accept the {t.name}?")
    return "\n".join(lines)


def _ask_terminal(text: str) -> bool:
    import click

    return click.confirm(text, default=False, err=True)


def require_acceptance(entry: CatalogEntry, *, accept_license: bool = False,
                       ask: Callable[[str], bool] | None = None) -> None:
    """Return when the entry's licence needs no acceptance or was accepted (now or before); else raise
    LicenseNotAcceptedError. `ask` defaults to a terminal question when stdin is a terminal."""
    if is_accepted(entry):
        return
    t = terms(entry)
    if accept_license:
        record_acceptance(entry)
        return
    if ask is None and sys.stdin is not None and sys.stdin.isatty():
        ask = _ask_terminal
    hint = f"read {t.link or 'the licence'}, then pass --accept-license (asked once per licence)"
    if ask is None:
        raise LicenseNotAcceptedError(
            f"{entry.name} is under the {t.name}, which must be accepted before the first download; "
            "nothing was downloaded", hint=hint)
    if not ask(question(entry)):
        raise LicenseNotAcceptedError(f"the {t.name} was not accepted; nothing was downloaded", hint=hint)
    record_acceptance(entry)
