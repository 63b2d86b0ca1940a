"""`llmrun synth MODEL[:QUANT]`: write a shape-true synthetic GGUF (real tensor names, shapes and quant types,
sparse zero data) for a catalog model, a hub reference or local GGUF (from its header), or an architecture's tiny
accuracy file, for tests and benchmarks that must not download weights."""

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
    """Write a GGUF with MODEL's exact tensors, tensor data left as a sparse hole (no disk used). llama.cpp loads
    it and decodes zeros at the real model's speed and memory use.

    MODEL is a catalog model (with llama.cpp's QUANT mix), a hub reference such as hf.co/ORG/REPO:QUANT or a
    local .gguf (the file's own tensors, read from its header: no weights downloaded), or one of the accuracy
    matrix's tiny per-architecture files (tiny-qwen2, tiny-gemma3, tiny-deepseek2, ...)."""
    from runner.app.planning import file_entry, kind_of
    from runner.core.errors import UsageError
    from runner.model import synth
    from runner.model.catalog import load_catalog
    from runner.model.layout import known_quants
    from runner.plan.accuracy import ARCH_CASES

    kind = kind_of(spec)
    tensors = None
    if kind in ("hub", "file"):
        if kind == "hub":
            from runner.store import hub

            entry = hub.resolve(spec).chosen
        else:
            entry = file_entry(spec)
        shape, quant, label, tensors = entry.shape, entry.quant, Path(entry.local_file or spec).stem, entry.weights
    elif spec.partition(":")[0] in ARCH_CASES:
        shape, quant = ARCH_CASES[spec.partition(":")[0]]
        quant = (spec.partition(":")[2] or quant).upper()
        label = spec.partition(":")[0]
    else:
        model, _, quant = spec.partition(":")
        entry = load_catalog().get(model)
        shape, quant, label = entry.shape, (quant or entry.quant).upper(), entry.model
    if layers is not None and not 1 <= layers <= shape.n_layer:
        raise UsageError(f"--layers must be between 1 and {shape.n_layer} for {label}, not {layers}")
    if tensors is None and quant not in known_quants():
        raise UsageError(f"no quantization recipe for {quant!r}", hint="known: " + ", ".join(known_quants()))
    if output is None and tensors is None:
        path = synth.ensure_synth(shape, quant, n_layer=layers, name=label)
        layout = None
    else:
        path = output or synth.synth_path(shape, quant, n_layer=layers, name=label)
        layout = synth.write_synth(shape, quant, path, n_layer=layers, name=label, tensors=tensors)
    stat = path.stat()
    on_disk = stat.st_blocks * 512
    info = {"path": str(path), "model": label, "quant": quant,
            "layers": layers or shape.n_layer, "bytes": stat.st_size, "bytes_on_disk": on_disk}
    if layout is not None:
        info["tensors"] = len(layout.tensors)
    if as_json:
        print_json(info)
        return
    from runner.core.units import format_size

    click.echo(f"{path}")
    click.echo(f"  {label} {quant}, {info['layers']} layers: {format_size(stat.st_size)} "
               f"({format_size(on_disk)} on disk)")


COMMANDS = [synth_command]
