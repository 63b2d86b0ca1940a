"""Options and output helpers shared by the commands."""

from __future__ import annotations

import json
from typing import Any

import click

json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def console():
    from rich.console import Console

    return Console()


def hardware_options(f):
    """--hardware NAME|FILE, --gpu SIZE (repeatable), --ram SIZE: plan for a machine you may not have."""
    f = click.option("--ram", metavar="SIZE", help="Pretend this much RAM is available, e.g. 64GiB.")(f)
    f = click.option("--gpu", "gpus", metavar="SIZE", multiple=True,
                     help="Pretend an NVIDIA GPU with this much free VRAM, e.g. 24GiB; repeat for several.")(f)
    f = click.option("--hardware", metavar="NAME|FILE",
                     help="A hardware profile from configs/hardware (e.g. rtx4090-24gb) or a TOML file, instead "
                          "of probing this machine.")(f)
    return f


def resolve_hardware(hardware: str | None, gpus: tuple[str, ...] = (), ram: str | None = None, *,
                     measure: bool = False, remeasure: bool = False):
    """The HardwareProfile the options describe: probe this machine (or load a profile), then apply overrides.
    Probing is instant unless `measure` (bandwidth once, then cached) or `remeasure` is asked for."""
    from runner.hardware import probe as hw, profiles
    from runner.core.units import parse_size

    profile = profiles.load_profile(hardware) if hardware else hw.probe(measure=measure, remeasure=remeasure)
    if gpus or ram:
        profile = profiles.with_overrides(
            profile,
            gpus=[parse_size(g, what="--gpu") for g in gpus] or None,
            ram=parse_size(ram, what="--ram") if ram else None,
        )
    return profile


def workers_options(f):
    """--workers HOST:PORT[,...] and --network: llama.cpp RPC workers (`llmrun worker`) that join the split."""
    f = click.option("--network", metavar="SPEED[,RTT]",
                     help="Link to the workers for the speed prediction, e.g. 10gbps,0.2ms "
                          "(default 1gbps,0.5ms).")(f)
    f = click.option("--workers", metavar="HOST:PORT[,...]",
                     help="llama.cpp RPC workers started with `llmrun worker`; their memory joins the plan. "
                          "HOST:PORT=SIZE plans with SIZE free there without asking (machines you don't have).")(f)
    return f


def apply_workers(profile, workers: str | None, network: str | None = None):
    """The profile with the --workers' devices added (asks each worker for its memory)."""
    if not workers and not network:
        return profile
    from runner.cluster import workers as cluster

    return cluster.profile_from_options(profile, workers, network)


def resolve_launch(model, ctx, hardware, gpus, ram, *, n_parallel: int, workers: str | None = None,
                   network: str | None = None):
    """What chat, run and serve load: a path, catalog name or nothing → a `Launch` (probe → plan → pull, or the demo
    model when the hub can't be reached), planned over RPC workers when --workers is given. Prints the notice and
    the one-line plan summary on stderr."""
    if workers:  # cluster: plan over local devices + RPC workers; the engine then runs in a child process
        from runner.app.launch import launch_with_workers

        launch = launch_with_workers(model, apply_workers(resolve_hardware(hardware, gpus, ram), workers, network),
                                     n_ctx=ctx, n_parallel=n_parallel)
    else:
        from runner.app.launch import resolve_model

        # measure=True: the memory bandwidth is measured when the cache has none, or again when it was measured
        # on a busy machine and this one is quiet now (about a second, before loading a model anyway)
        launch = resolve_model(model, hardware=lambda: resolve_hardware(hardware, gpus, ram, measure=True),
                               n_ctx=ctx, n_parallel=n_parallel)
    if launch.notice:
        click.echo(launch.notice, err=True)
    click.echo(launch.summary, err=True)
    return launch
