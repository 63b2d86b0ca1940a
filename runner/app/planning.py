"""What `llmrun plan` (and chat, run, serve before they load) plans: the catalog, a hub reference, or a local GGUF,
all as catalog entries through the one planner.

    kind_of(model) -> "catalog" | "hub" | "file"
    plan_model(model, hardware, prefs) -> Planned   PlanResult, plus the resolved hub model for a reference

A hub reference is planned from GGUF headers alone: the referenced file's header is read (a few MiB over HTTP
Range, cached), the repo's other quants are sized from their downloads with llama.cpp's mixes, and the quant the
planner would choose is read too before it is reported, so a chosen configuration always stands on a real
header. With a tag (`:Q4_K_M`) that quant is planned and the best quant of the repo that fits here is named in
a note; without one, every quant of the repo is a candidate.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from runner.hardware.types import HardwareProfile
from runner.model.catalog import Catalog, CatalogEntry
from runner.plan.ruled_out import PLACEMENT_LABEL
from runner.plan.select import Preferences, PlanResult, make_plan

Kind = Literal["catalog", "hub", "file"]


def kind_of(model: str | None) -> Kind:
    """How a model name is read: a GGUF file on this disk, a hub reference, or a catalog name (also None)."""
    if model is None:
        return "catalog"
    from runner.model.hubref import is_hub_ref

    path = Path(model).expanduser()
    if path.exists():
        return "file"
    if is_hub_ref(model):
        return "hub"
    if model.lower().endswith(".gguf"):
        return "file"
    return "catalog"


@dataclass(frozen=True)
class Planned:
    result: PlanResult
    hub: object | None = None        # runner.store.hub.HubModel for a hub reference (typed loosely: the store
                                     # is imported only when a reference is planned)


def file_entry(path: str | Path) -> CatalogEntry:
    """A local GGUF (or the first shard of a split one) as a catalog entry, from its own header(s)."""
    import re

    from runner.core.errors import GGUFError
    from runner.model.gguf import read_header
    from runner.model.hubmodel import entry_for_file

    p = Path(path).expanduser()
    if not p.is_file():
        raise GGUFError(f"{p}: no such file", hint="check the path, or name a catalog model or hf.co/ORG/REPO")
    paths = [p]
    m = re.match(r"^(?P<base>.+)-00001-of-(?P<n>\d{5})\.gguf$", p.name, re.IGNORECASE)
    if m:
        n = int(m.group("n"))
        paths = [p.with_name(f"{m.group('base')}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]
        missing = [q.name for q in paths if not q.is_file()]
        if missing:
            raise GGUFError(f"{p}: shards missing beside it: {', '.join(missing)}",
                            hint="llama.cpp loads a split model from all its shards in one folder")
    headers = [read_header(q, require_shape=q == p) for q in paths]
    released = dt.date.fromtimestamp(p.stat().st_mtime)
    return entry_for_file(str(p), headers, size=sum(q.stat().st_size for q in paths), released=released)


def plan_model(model: str | None, hardware: HardwareProfile, prefs: Preferences, *,
               exhaustive: bool = False) -> Planned:
    """Plan `model` (catalog name or None, hub reference, or GGUF path) with `prefs` on `hardware`."""
    kind = kind_of(model)
    if kind == "catalog":
        return Planned(make_plan(hardware, replace(prefs, model=model), exhaustive=exhaustive))
    if kind == "file":
        assert model is not None
        entry = file_entry(model)
        result = make_plan(hardware, replace(prefs, model=entry.name), Catalog([entry]), exhaustive=exhaustive)
        return Planned(result)
    assert model is not None
    return _plan_hub(model, hardware, prefs, exhaustive=exhaustive)


def _plan_hub(model: str, hardware: HardwareProfile, prefs: Preferences, *, exhaustive: bool) -> Planned:
    from runner.store import hub

    hm = hub.resolve(model)
    every = replace(prefs, model=hm.chosen.model)
    tagged = hm.ref.tag is not None or hm.ref.filename is not None
    best = make_plan(hardware, every, hm.catalog, exhaustive=exhaustive)
    for _ in range(3):   # without a tag the planner's choice is the answer: it must stand on its own header
        if tagged or best.chosen is None or best.chosen.entry.weights_exact:
            break
        hm = hub.with_header(hm, best.chosen.entry)
        best = make_plan(hardware, every, hm.catalog, exhaustive=exhaustive)
    result = best
    notes = hm.notes()
    if tagged:   # the tagged quant is the answer; the repo's best is a note (sized from its download)
        result = make_plan(hardware, replace(prefs, model=hm.chosen.name), hm.catalog, exhaustive=exhaustive)
        b = best.chosen
        if b is not None and (result.chosen is None or b.entry.name != result.chosen.entry.name):
            speed = f", ~{b.speed.decode_tps:.1f} tok/s" if b.speed is not None else ""
            where = PLACEMENT_LABEL[b.placement] if b.placement is not None else "?"
            notes.append(f"the best quant of hf.co/{hm.listing.repo} for this machine is {b.entry.quant} "
                         f"({where}{speed}): `llmrun plan {b.entry.name}`")
        elif b is None:
            notes.append(f"no quant of hf.co/{hm.listing.repo} fits this machine")
    return Planned(replace(result, notes=tuple(dict.fromkeys(tuple(notes) + result.notes))), hub=hm)


__all__ = ["Kind", "Planned", "kind_of", "plan_model", "file_entry"]
