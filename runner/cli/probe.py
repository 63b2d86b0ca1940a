"""`llmrun probe`: show this machine (or a hardware profile) as a table or JSON; save it as a profile."""

from __future__ import annotations

import click

from runner.cli.common import console, hardware_options, json_option, print_json, resolve_hardware


def _flags_text(flags: frozenset[str]) -> str:
    order = ["avx", "avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512vbmi",
             "avx_vnni", "f16c", "fma", "amx_tile", "amx_int8", "amx_bf16", "neon", "asimd", "dotprod", "i8mm",
             "fp16", "sve", "sve2"]
    shown = [f for f in order if f in flags]
    return ", ".join(shown) or "(none of the SIMD extensions llama.cpp uses)"


def render(profile) -> None:
    """The profile as a readable rich table."""
    from rich.table import Table

    from runner.core.units import format_size

    cpu = profile.cpu
    title = profile.name if profile.source == "probe" else f"{profile.name}  ({profile.source})"
    table = Table(title=title, show_header=False, title_justify="left", box=None, padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    if profile.description:
        table.add_row("", profile.description)
    table.add_row("CPU", f"{cpu.model}  [dim]({cpu.arch})[/dim]")
    cores = f"{cpu.physical_cores} physical, {cpu.logical_cores} logical"
    if cpu.quota_cores is not None:
        cores += f", cgroup quota {cpu.quota_cores:g}"
    if cpu.usable_cores < cpu.logical_cores:
        cores += f", {cpu.usable_cores:g} usable"
    table.add_row("cores", f"{cores}; llama.cpp threads: {cpu.threads}")
    table.add_row("flags", _flags_text(cpu.flags))
    ram = f"{format_size(profile.ram_total_bytes)} total, {format_size(profile.ram_available_bytes)} available"
    if profile.ram_limit_bytes is not None:
        host = f" of the host's {format_size(profile.host_ram_total_bytes)}" if profile.host_ram_total_bytes else ""
        ram += f"  [yellow](cgroup limit {format_size(profile.ram_limit_bytes)}{host})[/yellow]"
    if profile.unified_memory:
        ram += "  [dim](unified: shared with the GPU)[/dim]"
    table.add_row("RAM", ram)
    bw = profile.memory_bandwidth_gbps
    table.add_row("bandwidth", f"{bw:g} GB/s" if bw is not None else "[dim]not measured[/dim]")
    if profile.gpus:
        for g in profile.gpus:
            extra = []
            if g.compute_capability:
                extra.append(f"compute {g.compute_capability[0]}.{g.compute_capability[1]}")
            if g.driver:
                extra.append(f"driver {g.driver}")
            tail = f"  [dim]({', '.join(extra)})[/dim]" if extra else ""
            table.add_row(f"GPU {g.index}", f"{g.name}: {format_size(g.free_bytes)} free of "
                                            f"{format_size(g.total_bytes)}{tail}")
    else:
        table.add_row("GPU", "none")
    if profile.disk_free_bytes is not None:
        from runner.core import dirs

        where = " at " + str(dirs.hf_cache_dir()) if profile.source == "probe" else ""
        table.add_row("disk", f"{format_size(profile.disk_free_bytes)} free{where}")
    for note in profile.notes:
        table.add_row("note", f"[yellow]{note}[/yellow]" if note.startswith("no NVIDIA") else note)
    console().print(table)


def _render_profiles() -> None:
    from rich.table import Table

    from runner.hardware import profiles
    from runner.core.units import format_size

    table = Table(title="hardware profiles (llmrun --hardware NAME)", title_justify="left")
    for col in ("name", "RAM", "GPUs", "description"):
        table.add_column(col)
    for name in profiles.list_profiles():
        p = profiles.load_profile(name)
        gpus = ", ".join(format_size(g.total_bytes, decimals=0) for g in p.gpus) or "-"
        table.add_row(name, format_size(p.ram_total_bytes, decimals=0), gpus, p.description)
    console().print(table)


@click.command()
@hardware_options
@json_option
@click.option("--save", "save_to", metavar="FILE", type=click.Path(dir_okay=False),
              help="Write the profile as TOML, to plan for this machine elsewhere with --hardware FILE.")
@click.option("--list-profiles", is_flag=True, help="List the hardware profiles shipped with llmrun.")
@click.option("--measure-bandwidth", is_flag=True,
              help="Measure the memory bandwidth again (it is measured once and cached; a busy machine measures "
                   "low, so the best value is kept).")
def probe(hardware, gpus, ram, as_json, save_to, list_profiles, measure_bandwidth):
    """Show this machine's CPU, RAM, GPUs, disk and memory bandwidth (or a profile's, with --hardware)."""
    from runner.hardware import profiles

    if list_profiles:
        if as_json:
            print_json([profiles.profile_to_dict(profiles.load_profile(n)) for n in profiles.list_profiles()])
        else:
            _render_profiles()
        return
    profile = resolve_hardware(hardware, gpus, ram, measure=True, remeasure=measure_bandwidth)
    if save_to:
        if profile.source == "probe":  # name the saved machine after its file, as --hardware NAME would
            import dataclasses
            import time
            from pathlib import Path

            profile = dataclasses.replace(profile, name=Path(save_to).stem, description=profile.description or
                                          f"saved by `llmrun probe --save` on {time.strftime('%Y-%m-%d')}")
        path = profiles.save_profile(profile, save_to)
        if not as_json:
            click.echo(f"saved {path}", err=True)
    if as_json:
        print_json(profiles.profile_to_dict(profile))
    else:
        render(profile)


COMMANDS = [probe]
