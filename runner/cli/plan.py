"""`llmrun plan`: the dry run. Which model, quant and llama.cpp settings fit this machine (or a profile), how
memory divides over the devices, how fast it should run, and why every other option was ruled out."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import click

from runner.cli.common import apply_workers, hardware_options, json_option, print_json, workers_options

if TYPE_CHECKING:  # the plan modules are imported where used: `llmrun --help` stays light
    from runner.core.run_settings import RunSettings
    from runner.plan.fit import Candidate
    from runner.plan.ruled_out import RuledOutKind
    from runner.plan.select import Prefer


def plan_hardware(hardware: str | None, gpus: tuple[str, ...] = (), ram: str | None = None):
    """Like common.resolve_hardware, but never measures bandwidth (the plan must stay instant): the probe uses
    its cached figure, if any."""
    from runner.hardware import probe as hw, profiles
    from runner.core.units import parse_size

    profile = profiles.load_profile(hardware) if hardware else hw.probe(measure=False)
    if gpus or ram:
        profile = profiles.with_overrides(profile, gpus=[parse_size(g, what="--gpu") for g in gpus] or None,
                                    ram=parse_size(ram, what="--ram") if ram else None)
    return profile


@click.command("plan")
@click.argument("model_arg", metavar="[MODEL]", required=False)
@click.option("--model", metavar="NAME[:QUANT]",
              help="Plan this model: a catalog name (all its quants, or one), hf.co/ORG/REPO[:QUANT] (planned from "
                   "its GGUF header, before any download), or a local .gguf file. Same as MODEL.")
@click.option("--family", metavar="FAMILY", help="Plan this family only: llama2, grok1, ... or any.")
@click.option("--ctx", "ctx_tokens", type=click.IntRange(min=1), metavar="TOKENS",
              help="Context per sequence (default: the model's training context, reduced to fit down to 2048).")
@click.option("--prefer", type=click.Choice(["quality", "speed"]), default="quality", show_default=True,
              help="quality: the best model and quant that fits; speed: the fastest at or above Q4.")
@click.option("--max-download", metavar="SIZE", help="Leave out models bigger than this download, e.g. 20GB.")
@click.option("--license", "license_", type=click.Choice(["open", "any"]), default="any", show_default=True,
              help="open: only models under OSI-approved open-source licences.")
@click.option("--parallel", type=click.IntRange(min=1), default=1, show_default=True,
              help="Sequences served at once (each gets its own context).")
@click.option("--all", "show_all", is_flag=True, help="Show every configuration tried, not one per model/quant.")
@hardware_options
@workers_options
@json_option
@click.pass_context
def plan(ctx: click.Context, model_arg: str | None, model: str | None, family: str | None, ctx_tokens: int | None,
         prefer: Prefer, max_download: str | None, license_: str, parallel: int, show_all: bool,
         hardware: str | None, gpus: tuple[str, ...], ram: str | None, workers: str | None, network: str | None,
         as_json: bool) -> None:
    """Show the best configuration that fits, its memory and speed, and why the others do not.

    MODEL is a catalog name, a hub reference (hf.co/ORG/REPO[:QUANT], ORG/REPO/FILE.gguf, a huggingface.co URL:
    planned from the GGUF header alone, every quant of the repo compared) or a local .gguf file; without one the
    catalog's default families are planned."""
    from runner.app.planning import plan_model
    from runner.core.errors import UsageError
    from runner.plan.select import Preferences, require_fit
    from runner.core.units import parse_size

    if model_arg and model and model_arg != model:
        raise UsageError(f"two models given: {model_arg!r} and --model {model!r}", hint="give one")
    model = model or model_arg
    prefs = Preferences(
        model=model, family=family, n_ctx=ctx_tokens, prefer=prefer,
        max_download_bytes=parse_size(max_download, what="--max-download") if max_download else None,
        license_open=license_ == "open", n_parallel=parallel)
    profile = apply_workers(plan_hardware(hardware, gpus, ram), workers, network)
    result = plan_model(model, profile, prefs, exhaustive=show_all).result
    if as_json:
        data = result.to_dict()
        if result.chosen is None:
            from runner.core.errors import DoesNotFitError

            try:
                require_fit(result)
            except DoesNotFitError as e:
                data["error"] = {"message": e.message, "hint": e.hint}
            print_json(data)
            ctx.exit(3)
        print_json(data)
        return
    render(result, show_all=show_all)
    require_fit(result)  # nothing fits: DoesNotFitError, printed as error + hint, exit 3


# ---------------------------------------------------------------------------------------------------------- output
def _tps(x: float) -> str:
    return f"{x:.1f}" if x < 100 else f"{x:.0f}"


def _kv(s: RunSettings) -> str:
    return s.type_k if s.type_k == s.type_v else f"K {s.type_k} / V {s.type_v}"


def _config(c: Candidate) -> str:
    """One line: placement, layers, context, KV ("—" for a candidate never placed)."""
    from runner.plan.ruled_out import PLACEMENT_LABEL

    if c.placement is None:
        return "—"
    s = c.settings
    n_layer = c.entry.shape.n_layer
    parts = [PLACEMENT_LABEL[c.placement]]
    if c.placement == "partial":
        parts[0] += f" ({s.n_gpu_layers}/{n_layer + 1} layers on GPU)"
    parts.append(f"ctx {c.n_ctx}" + (f" ×{s.n_parallel}" if s.n_parallel > 1 else ""))
    parts.append(f"KV {_kv(s)}")
    if not s.repack:
        parts.append("no repack")
    return ", ".join(parts)


def _distance(c: Candidate) -> float:
    """How far from fitting: the worst need/capacity ratio; candidates never sized after every sized one."""
    return c.shortfall if c.shortfall is not None else math.inf


def _kind(c: Candidate) -> RuledOutKind | None:
    return c.ruled_out.kind if c.ruled_out is not None else None


def summarize(rejected: Sequence[Candidate], chosen: Candidate | None = None) -> list[tuple[str, str, str, bool]]:
    """At most three rows per model: the quant closest to fitting among those that do not fit, the best of
    those that fit but ranked lower, and the count of those not estimated. (label, configuration, reason, dim)"""
    from runner.model.catalog import quant_rank
    from runner.plan.ruled_out import RuledOutKind

    listed_apart = (RuledOutKind.TOO_SLOW_NOT_ESTIMATED, RuledOutKind.NOT_ESTIMATED)  # entries never estimated
    by_model: dict[str, list[Candidate]] = {}
    for c in rejected:
        if chosen is not None and c.entry == chosen.entry:
            continue  # the chosen entry's richer configurations that did not fit: --all shows them
        by_model.setdefault(c.entry.model, []).append(c)
    rows = []
    for model, cands in by_model.items():
        per_quant: dict[str, Candidate] = {}
        for c in cands:  # one candidate per quant: a fitting one, else the one closest to fitting
            cur = per_quant.get(c.entry.quant)
            if cur is None or (c.fits, -_distance(c)) > (cur.fits, -_distance(cur)):
                per_quant[c.entry.quant] = c
        skipped = [c for c in per_quant.values() if not c.fits and _kind(c) in listed_apart]
        out = [c for c in per_quant.values() if not c.fits and _kind(c) not in listed_apart]
        fit = [c for c in per_quant.values() if c.fits]
        if out:
            best = min(out, key=lambda c: (_distance(c), -quant_rank(c.entry.quant)))
            more = f" (+{len(out) - 1} more)" if len(out) > 1 else ""
            rows.append((best.name + more, _config(best), best.reason, False))
        if fit:
            best = max(fit, key=lambda c: quant_rank(c.entry.quant))
            more = f" (+{len(fit) - 1} lower)" if len(fit) > 1 else ""
            rows.append((best.name + more, _config(best), best.reason, True))
        groups: dict[RuledOutKind | None, list[Candidate]] = {}
        for c in skipped:  # "too slow here: …" and "ranked below …" are listed apart
            groups.setdefault(_kind(c), []).append(c)
        for group in groups.values():
            group.sort(key=lambda c: quant_rank(c.entry.quant), reverse=True)
            first, last = group[0].entry.quant, group[-1].entry.quant
            rows.append((f"{model}: {first}…{last}" if len(group) > 1 else f"{model}:{first}", "—",
                         group[0].reason, True))
    return rows


def render(result, *, show_all: bool = False) -> None:
    from rich.console import Console
    from rich.table import Table

    from runner.model.catalog import quant_rank
    from runner.core.units import format_size

    con = Console()
    hw = result.hardware
    from rich.markup import escape

    names = [escape(g.name) for g in hw.gpus]  # "RPC[host:port]" is not rich markup
    if len(hw.gpus) > 2 and len(set(names)) == 1:
        gpus = f"{len(hw.gpus)}× {names[0]} ({format_size(min(g.free_bytes for g in hw.gpus))}+ free each)"
    else:
        from runner.plan.fit import device_name

        gpus = ", ".join(f"{device_name(g)} {escape(g.name)} ({format_size(g.free_bytes)} free)"
                         for g in hw.gpus) or "no GPU"
    con.print(f"[bold]Plan for {hw.name}[/]: {hw.cpu.model}, {hw.cpu.threads} threads, "
              f"{format_size(hw.ram_available_bytes)} RAM available"
              f"{' (unified with the GPU)' if hw.unified_memory else ''}; {gpus}")
    c = result.chosen
    if c is not None:
        s = c.settings
        card = c.entry.card
        table = Table(show_header=False, box=None, padding=(0, 2))
        table.add_column(style="bold")
        table.add_column()
        table.add_row("model", f"[green]{c.name}[/] ({c.entry.params_b:g}B parameters, {c.entry.quant})")
        table.add_row("placement", _config(c).split(", ctx")[0] + (
            f", split {' / '.join(f'{x:.0%}' for x in s.tensor_split)}" if s.tensor_split else ""))
        table.add_row("n_gpu_layers", f"{s.n_gpu_layers} of {c.entry.shape.n_layer + 1} (output layer counts as one)")
        table.add_row("context", f"{c.n_ctx} tokens" + (f" × {s.n_parallel} sequences" if s.n_parallel > 1 else ""))
        table.add_row("KV cache", _kv(s) + (" with flash attention" if s.flash_attn else "")
                      + ("" if s.repack else "; weights not repacked (--no-repack)"))
        if c.entry.shape.is_moe:
            table.add_row("experts", ("in host RAM" if s.experts_on_cpu else "with their layers") +
                          f" ({c.entry.shape.n_expert_used} of {c.entry.shape.n_expert} used per token)")
        if c.speed is not None:
            sp = c.speed
            line = (f"decode ≈ {_tps(sp.decode_tps)} tok/s (at {sp.at_tokens} tokens of context), "
                    f"prompt ≈ {_tps(sp.prompt_tps)} tok/s — {sp.basis}")
            if s.n_parallel > 1:
                line += f"; {_tps(sp.aggregate_decode_tps)} tok/s over {s.n_parallel} sequences"
            table.add_row("speed", line)
        table.add_row("download", f"{c.entry.size_bytes / 1e9:.1f} GB" + ("" if c.entry.size_exact else " (approx.)"))
        if card is not None:
            lic = f"{card.license_name}" + (" (OSI-approved)" if card.osi_approved else
                                             " (not OSI-approved: accepted once before the first pull)")
        else:
            lic = c.entry.license
        table.add_row("licence", lic)
        con.print(table)
        mem = Table(title="memory per device", title_justify="left")
        cols = (("weights", ("weights",)), ("KV cache", ("kv_cache",)), ("compute", ("compute",)),
                ("repack", ("repack",)), ("other", ("output", "overhead", "margin")), ("total", ("total",)))
        mem.add_column("device")
        for label, _ in cols:
            mem.add_column(label, justify="right")
        mem.add_column("available", justify="right")
        from runner.plan.fit import capacities

        caps = capacities(hw)
        for dev in c.estimate.devices:
            cells = [format_size(sum(int(getattr(dev, k, 0)) for k in keys)) for _, keys in cols]
            mem.add_row(dev.device, *cells, format_size(caps.get(dev.device, 0)))
        con.print(mem)
    if show_all:
        ordered = sorted(result.rejected, key=lambda r: (r.entry.model, -quant_rank(r.entry.quant)))
        rows = [(r.name, _config(r), r.reason, r.fits) for r in ordered]
    else:
        rows = summarize(result.rejected, result.chosen)
    if rows:
        rt = Table(title="not chosen" + ("" if show_all else " (per model: closest to fitting, best that fits; "
                                         "--all lists every configuration)"), title_justify="left")
        rt.add_column("model")
        rt.add_column("configuration")
        rt.add_column("why not")
        for label, config, reason, dim in rows:
            rt.add_row(label, config, f"[dim]{reason}[/]" if dim else reason)
        con.print(rt)
    for note in result.notes:
        con.print(f"[yellow]note:[/] {note}")


COMMANDS = [plan]
