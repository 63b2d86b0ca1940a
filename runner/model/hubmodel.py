"""Catalog entries for GGUF files that are not in the catalog: a hub repo's quants (runner.store.hub asks the hub
for the file list, the card and the headers) or a local file. Pure: everything here works on values.

    openness_card(model, publisher, card, released, header_license) -> OpennessCard   the hub card's licence
    entries_for_repo(...) -> tuple[CatalogEntry, ...]   one per quant: shape and tensors from the headers read,
                                                         llama.cpp's mixes for the quants whose header was not
    entry_for_file(path, headers) -> CatalogEntry        a local GGUF, planned like any catalog model

The entries are the same values the planner, `show`, `pull`, `chat` and `serve` use for catalog models, so a hub
reference needs no second path through them.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from runner.core.errors import GGUFError
from runner.core.shapes import GGUFHeader, ModelShape
from runner.model.catalog import CatalogEntry, ModelFile, OpennessCard, is_known_quant
from runner.model.gguf import derive_shape
from runner.model.hubref import QuantGroup
from runner.model.layout import WeightsLayout, layout_for_quant, layout_from_headers

# llama.cpp's llama_ftype (general.file_type) -> the quant name its files are called by
FILE_TYPE_NAMES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
    19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL",
    26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0",
    37: "TQ2_0", 38: "MXFP4_MOE",
}


@dataclass(frozen=True)
class Licence:
    key: str                  # what acceptance is remembered under (the catalog's key where it has one)
    name: str
    spdx: str | None
    url: str
    osi_approved: bool
    commercial_use: bool
    restrictions: tuple[str, ...] = ()


def _osi(spdx: str, name: str, url: str) -> Licence:
    return Licence(spdx, name, spdx, url, True, True)


# The hub's licence ids (the `license:` key of a model card) -> what they are. OSI-approved licences need no
# acceptance; every other one is accepted once before the first pull, as the catalog's Llama 2 is.
HUB_LICENCES: dict[str, Licence] = {
    "apache-2.0": _osi("Apache-2.0", "Apache License 2.0", "https://www.apache.org/licenses/LICENSE-2.0"),
    "mit": _osi("MIT", "MIT License", "https://opensource.org/license/mit"),
    "bsd-2-clause": _osi("BSD-2-Clause", "BSD 2-Clause License", "https://opensource.org/license/bsd-2-clause"),
    "bsd-3-clause": _osi("BSD-3-Clause", "BSD 3-Clause License", "https://opensource.org/license/bsd-3-clause"),
    "isc": _osi("ISC", "ISC License", "https://opensource.org/license/isc-license-txt"),
    "mpl-2.0": _osi("MPL-2.0", "Mozilla Public License 2.0", "https://www.mozilla.org/en-US/MPL/2.0/"),
    "gpl-2.0": _osi("GPL-2.0", "GNU General Public License v2.0", "https://www.gnu.org/licenses/old-licenses/gpl-2.0.html"),
    "gpl-3.0": _osi("GPL-3.0", "GNU General Public License v3.0", "https://www.gnu.org/licenses/gpl-3.0.html"),
    "lgpl-2.1": _osi("LGPL-2.1", "GNU Lesser General Public License v2.1", "https://www.gnu.org/licenses/old-licenses/lgpl-2.1.html"),
    "lgpl-3.0": _osi("LGPL-3.0", "GNU Lesser General Public License v3.0", "https://www.gnu.org/licenses/lgpl-3.0.html"),
    "agpl-3.0": _osi("AGPL-3.0", "GNU Affero General Public License v3.0", "https://www.gnu.org/licenses/agpl-3.0.html"),
    "artistic-2.0": _osi("Artistic-2.0", "Artistic License 2.0", "https://opensource.org/license/artistic-2-0"),
    "bsl-1.0": _osi("BSL-1.0", "Boost Software License 1.0", "https://www.boost.org/LICENSE_1_0.txt"),
    "epl-2.0": _osi("EPL-2.0", "Eclipse Public License 2.0", "https://www.eclipse.org/legal/epl-2.0/"),
    "unlicense": _osi("Unlicense", "The Unlicense", "https://unlicense.org/"),
    "zlib": _osi("Zlib", "zlib License", "https://opensource.org/license/zlib"),
    "cc0-1.0": Licence("CC0-1.0", "Creative Commons Zero v1.0 Universal", "CC0-1.0",
                       "https://creativecommons.org/publicdomain/zero/1.0/", False, True),
    "cc-by-4.0": Licence("CC-BY-4.0", "Creative Commons Attribution 4.0", "CC-BY-4.0",
                         "https://creativecommons.org/licenses/by/4.0/", False, True,
                         ("Attribution is required.",)),
    "cc-by-sa-4.0": Licence("CC-BY-SA-4.0", "Creative Commons Attribution Share Alike 4.0", "CC-BY-SA-4.0",
                            "https://creativecommons.org/licenses/by-sa/4.0/", False, True,
                            ("Attribution is required; derivatives must be shared under the same licence.",)),
    "cc-by-nc-4.0": Licence("CC-BY-NC-4.0", "Creative Commons Attribution Non Commercial 4.0", "CC-BY-NC-4.0",
                            "https://creativecommons.org/licenses/by-nc/4.0/", False, False,
                            ("No commercial use.",)),
    "cc-by-nc-sa-4.0": Licence("CC-BY-NC-SA-4.0", "Creative Commons Attribution Non Commercial Share Alike 4.0",
                               "CC-BY-NC-SA-4.0", "https://creativecommons.org/licenses/by-nc-sa/4.0/", False,
                               False, ("No commercial use.",)),
    "llama2": Licence("llama2", "Llama 2 Community License Agreement", None, "https://ai.meta.com/llama/license/",
                      False, True, ("A separate licence is needed above 700 million monthly active users.",)),
    "llama3": Licence("llama3", "Meta Llama 3 Community License", None,
                      "https://www.llama.com/llama3/license/", False, True,
                      ("A separate licence is needed above 700 million monthly active users.",)),
    "llama3.1": Licence("llama3.1", "Llama 3.1 Community License", None,
                        "https://www.llama.com/llama3_1/license/", False, True,
                        ("A separate licence is needed above 700 million monthly active users.",)),
    "llama3.2": Licence("llama3.2", "Llama 3.2 Community License", None,
                        "https://www.llama.com/llama3_2/license/", False, True,
                        ("A separate licence is needed above 700 million monthly active users.",)),
    "llama3.3": Licence("llama3.3", "Llama 3.3 Community License", None,
                        "https://www.llama.com/llama3_3/license/", False, True,
                        ("A separate licence is needed above 700 million monthly active users.",)),
    "llama4": Licence("llama4", "Llama 4 Community License", None, "https://www.llama.com/llama4/license/", False,
                      True, ("A separate licence is needed above 700 million monthly active users.",)),
    "gemma": Licence("gemma", "Gemma Terms of Use", None, "https://ai.google.dev/gemma/terms", False, True,
                     ("Use must follow the Gemma Prohibited Use Policy.",)),
    "openrail": Licence("openrail", "Open RAIL License", None, "https://www.licenses.ai/", False, True,
                        ("Use-based restrictions apply (RAIL).",)),
    "creativeml-openrail-m": Licence("creativeml-openrail-m", "CreativeML Open RAIL-M", None,
                                     "https://huggingface.co/spaces/CompVis/stable-diffusion-license", False, True,
                                     ("Use-based restrictions apply (RAIL).",)),
}


def licence_for(card: dict[str, object], header_license: str | None = None) -> Licence:
    """The licence a model card's metadata names (`license`, with `license_name` and `license_link` for
    "other"), else the GGUF's general.license, else "not stated" (which must be accepted, like any licence that
    is not OSI-approved)."""
    raw = card.get("license")
    if isinstance(raw, list):
        raw = raw[0] if raw else None
    hub_id = str(raw).strip().lower() if raw else ""
    if not hub_id and header_license:
        hub_id = header_license.strip().lower()
    if hub_id in HUB_LICENCES:
        return HUB_LICENCES[hub_id]
    name = str(card.get("license_name") or "").strip()
    link = str(card.get("license_link") or "").strip()
    if hub_id and hub_id not in ("other", "unknown"):
        return Licence(hub_id, name or hub_id, None, link, False, True)
    if name:
        return Licence(name.lower(), name, None, link, False, True)
    return Licence("unstated", "no licence stated", None, link, False, False,
                   ("The model card names no licence: check the repo before using the model.",))


def openness_card(model: str, publisher: str, card: dict[str, object], released: dt.date,
                  header_license: str | None = None, source: str = "the hub model card") -> OpennessCard:
    """An openness card from what a hub repo says: the licence (its card metadata) is all that is known; what
    its publisher disclosed about training is not read, so it shows as not disclosed."""
    lic = licence_for(card, header_license)
    return OpennessCard(
        model=model, license=lic.key, license_name=lic.name, spdx=lic.spdx, license_url=lic.url,
        osi_approved=lic.osi_approved, commercial_use=lic.commercial_use, restrictions=lic.restrictions,
        training_data_disclosed=False, training_code_published=False, publisher=publisher, released=released,
        notes=(f"licence read from {source}; training data and code disclosure not checked",))


# --------------------------------------------------------------------------------------------------- entries

def header_shape(headers: list[GGUFHeader] | tuple[GGUFHeader, ...], where: str) -> ModelShape:
    """The model shape from a file's headers (the first shard's metadata, every shard's tensors)."""
    tensors = [t for h in headers for t in h.tensors]
    return derive_shape(headers[0].metadata, tensors, require=True, where=where)


def file_type_quant(header: GGUFHeader) -> str | None:
    """The quant name general.file_type declares (the mix llama-quantize was asked for), if any."""
    ft = header.metadata.get("general.file_type")
    return FILE_TYPE_NAMES.get(ft) if isinstance(ft, int) and not isinstance(ft, bool) else None


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int
    sha256: str


def entries_for_repo(*, repo: str, commit: str, groups: list[QuantGroup], files: dict[str, RemoteFile],
                     headers: dict[str, list[GGUFHeader]], chosen: QuantGroup, card: OpennessCard,
                     family: str | None = None) -> tuple[CatalogEntry, ...]:
    """One entry per quant of a hub repo, named `hf.co/ORG/REPO:QUANT`. The groups whose headers were read
    (`headers`, by first file) get their exact tensors; the others llama.cpp's mix for their quant over the same
    tensors, scaled to their download (`weights_exact` False). A group whose quant cannot be ranked (a file
    named without one, and no header read) is left out. The chosen group is the default."""
    model = f"hf.co/{repo}"
    read = headers[chosen.first]
    shape = header_shape(read, f"hf.co/{repo}/{chosen.first}")
    template = layout_from_headers(read)
    out: list[CatalogEntry] = []
    seen: set[str] = set()
    for g in sorted(groups, key=lambda g: g != chosen):     # the chosen group keeps its label when two share one
        hs = headers.get(g.first)
        quant = g.label
        if hs is not None and not is_known_quant(quant):
            quant = file_type_quant(hs[0]) or quant
        if not is_known_quant(quant) or quant.upper() in seen:
            continue
        seen.add(quant.upper())
        size = sum(files[f].size for f in g.files)
        if hs is not None:
            weights, exact = layout_from_headers(hs), True
        else:
            weights, exact = layout_for_quant(template, shape, quant, size - template.header_bytes), False
        out.append(CatalogEntry(
            name=f"hf.co/{repo}:{quant}", model=model, quant=quant, family=family or shape.arch,
            params_b=round((shape.n_params or 0) / 1e9, 3) or 0.001, shape=shape, source="hf", repo=repo,
            revision=commit, files=tuple(ModelFile(f, files[f].size, files[f].sha256) for f in g.files),
            layout="shards" if len(g.files) > 1 else "single", size_bytes=size, size_exact=True,
            chat=_has_chat_template(read[0]), license=card.license, local_file=g.first, card=card,
            default=(g == chosen), weights=weights, weights_exact=exact,
            notes=() if exact else ("tensor types predicted from llama.cpp's quant mix (this file's header is "
                                    "read when it is planned or pulled)",)))
    if not any(e.default for e in out):
        raise GGUFError(f"hf.co/{repo}: {chosen.first} declares no quantization llmrun can rank "
                        f"({chosen.label})", hint="name another quant of the repo")
    return tuple(out)


def _has_chat_template(header: GGUFHeader) -> bool:
    template = header.metadata.get("tokenizer.chat_template")
    return isinstance(template, str) and bool(template.strip())


def entry_for_file(path: str, headers: list[GGUFHeader], *, size: int, released: dt.date) -> CatalogEntry:
    """A local GGUF as an entry (named by its path), planned from its own header like a hub file."""
    from pathlib import Path

    shape = header_shape(headers, path)
    quant = file_type_quant(headers[0]) or "F16"
    meta = headers[0].metadata
    lic = meta.get("general.license")
    card = openness_card(Path(path).name, str(meta.get("general.organization") or "unknown"), {}, released,
                         header_license=lic if isinstance(lic, str) else None, source="the file's metadata")
    return CatalogEntry(
        name=path, model=path, quant=quant, family=shape.arch, params_b=round((shape.n_params or 0) / 1e9, 3)
        or 0.001, shape=shape, source="file", repo="", revision=None, files=(ModelFile(Path(path).name, size, None),),
        layout="single" if len(headers) == 1 else "shards", size_bytes=size, size_exact=True,
        chat=_has_chat_template(headers[0]), license=card.license, local_file=path, card=card, default=True,
        weights=WeightsLayout(tensors=layout_from_headers(headers).tensors,
                              header_bytes=sum(h.data_offset for h in headers)),
        weights_exact=True)


__all__ = ["HUB_LICENCES", "Licence", "licence_for", "openness_card", "entries_for_repo", "entry_for_file",
           "header_shape", "file_type_quant", "RemoteFile", "FILE_TYPE_NAMES"]
