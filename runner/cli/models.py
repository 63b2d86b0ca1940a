"""`llmrun pull`, `llmrun list`, `llmrun rm`: the local model store."""

from __future__ import annotations

import click

from runner.cli.common import json_option, print_json


def _local_dict(lm) -> dict:
    return {"name": lm.name, "quant": lm.quant, "size_bytes": lm.size, "verified": lm.verified,
            "path": str(lm.path), "paths": [str(p) for p in lm.paths]}


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join("{:<%d}" % w for w in widths[:-1]) + "  {}"
    return "\n".join(fmt.format(*r).rstrip() for r in [header, *rows])


@click.command()
@click.argument("name")
@click.option("--accept-license", is_flag=True,
              help="Accept the model's licence (needed once per licence for models that are not open source).")
@click.option("--license", "license_", type=click.Choice(["any", "open"]), default="any", show_default=True,
              help="open: refuse models whose licence is not OSI-approved open source.")
@click.option("--force", is_flag=True, help="Delete the local copy first and download it again.")
@json_option
def pull(name: str, accept_license: bool, license_: str, force: bool, as_json: bool) -> None:
    """Download a model (resumable, sha256-verified) into the local store.

    NAME is a catalog name (llama-2-7b-chat:Q4_K_M) or a hub reference: hf.co/ORG/REPO[:QUANT] (Q4_K_M, or the
    quant nearest to it, when none is given), ORG/REPO/FILE.gguf, or a https://huggingface.co/... URL."""
    from runner.store import fetch, hub, local as store
    from runner.core.errors import UsageError
    from runner.core.units import format_size

    entry = hub.find_entry(name)
    if license_ == "open" and not entry.license_open:
        lic = entry.card.license_name if entry.card else entry.license
        raise UsageError(f"{entry.name} is under the {lic}, which is not an OSI-approved open-source licence",
                         hint="drop --license open to pull it anyway, or pick an open model "
                              "(`llmrun list --available` marks them)")
    before = store.local_model(entry)
    lm = fetch.pull(entry, accept_license=accept_license, progress=not as_json, force=force)
    if as_json:
        print_json({**_local_dict(lm), "downloaded": force or before is None})
        return
    state = "already local" if before is not None and not force else "pulled"
    click.echo(f"{state}: {lm.name} ({format_size(lm.size)}, {'verified' if lm.verified else 'not verified'})")
    click.echo(f"  {lm.path}")


@click.command("list")
@click.option("--available", is_flag=True, help="List every model in the catalog, not only the local ones.")
@json_option
def list_(available: bool, as_json: bool) -> None:
    """Local models (name, quant, size, verified, path); with --available, the whole catalog."""
    from runner.store import local as store
    from runner.model.catalog import load_catalog
    from runner.core.units import format_size

    catalog = load_catalog()
    local = {lm.name: lm for lm in store.list_local(catalog)}
    if not available:
        from runner.store import hub

        local.update((lm.name, lm) for lm in store.list_local(hub.local_hub_entries()))
    if available:
        if as_json:
            print_json([{"name": e.name, "quant": e.quant, "size_bytes": e.size_bytes, "size_exact": e.size_exact,
                         "license": e.license, "license_open": e.license_open, "layout": e.layout,
                         "local": e.name in local} for e in catalog])
            return
        rows = [[e.name, ("" if e.size_exact else "~") + format_size(e.size_bytes), e.license,
                 "open source" if e.license_open else "accept first", "local" if e.name in local else ""]
                for e in catalog]
        click.echo(_table(rows, ["NAME", "SIZE", "LICENCE", "TERMS", "LOCAL"]))
        return
    if as_json:
        print_json([_local_dict(lm) for lm in local.values()])
        return
    if not local:
        click.echo("no local models; `llmrun list --available` shows the catalog, `llmrun pull NAME` fetches one")
        return
    rows = [[lm.name, lm.quant, format_size(lm.size), "yes" if lm.verified else "no", str(lm.path)]
            for lm in local.values()]
    click.echo(_table(rows, ["NAME", "QUANT", "SIZE", "VERIFIED", "PATH"]))


@click.command()
@click.argument("name")
@json_option
def rm(name: str, as_json: bool) -> None:
    """Delete a local model's files (including partial downloads) and say how much space that freed."""
    from runner.store import hub, local as store
    from runner.core.units import format_size

    entry = hub.find_entry(name)
    freed = store.remove(entry)
    if as_json:
        print_json({"name": entry.name, "freed_bytes": freed})
        return
    click.echo(f"removed {entry.name}: freed {format_size(freed)} ({freed:,} bytes)")


COMMANDS = [pull, list_, rm]
