"""`llmrun synth MODEL[:QUANT]`: write a shape-true synthetic GGUF (real tensor names, shapes and quant types,
sparse zero data) for a catalog model, for tests and benchmarks that must not download weights."""

from __future__ import annotations

from pathlib import Path

import click

from runner.cli.common import json_option, print_json


@click.command("synth")
@click.argument("spec", metavar="MODEL[:QUANT]")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the GGUF (default: the synthetic-model cache, reused when present).")
@click.option("--layers", type=int, default=None, help="Keep only the first N layers (a small shape-true file).")
@json_option
def synth_command(spec: str, output: Path | None, layers: int | None, as_json: bool) -> None:
    """Write a GGUF with MODEL's exact tensors and llama.cpp's QUANT mix, tensor data left as a sparse hole
    (no disk used). llama.cpp loads it and decodes zeros at the real model's speed and memory use."""
    from runner.model import synth
    from runner.model.catalog import load_catalog
    from runner.core.errors import UsageError
    from runner.model.layout import known_quants

    model, _, quant = spec.partition(":")
    entry = load_catalog().get(model)
    quant = (quant or entry.quant).upper()
    if layers is not None and not 1 <= layers <= entry.shape.n_layer:
        raise UsageError(f"--layers must be between 1 and {entry.shape.n_layer} for {entry.model}, not {layers}")
    if quant not in known_quants():
        raise UsageError(f"no quantization recipe for {quant!r}", hint="known: " + ", ".join(known_quants()))
    if output is None:
        path = synth.ensure_synth(entry.shape, quant, n_layer=layers, name=entry.model)
        layout = None
    else:
        layout = synth.write_synth(entry.shape, quant, output, n_layer=layers, name=entry.model)
        path = output
    stat = path.stat()
    on_disk = stat.st_blocks * 512
    info = {"path": str(path), "model": entry.model, "quant": quant,
            "layers": layers or entry.shape.n_layer, "bytes": stat.st_size, "bytes_on_disk": on_disk}
    if layout is not None:
        info["tensors"] = len(layout.tensors)
    if as_json:
        print_json(info)
        return
    from runner.core.units import format_size

    click.echo(f"{path}")
    click.echo(f"  {entry.model} {quant}, {info['layers']} layers: {format_size(stat.st_size)} "
               f"({format_size(on_disk)} on disk)")


COMMANDS = [synth_command]
