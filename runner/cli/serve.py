"""`llmrun serve`: parse options, build the model index, budget and pool, hand over to runner.server (which
imports FastAPI/uvicorn)."""

from __future__ import annotations

from pathlib import Path

import click

from runner.cli.common import apply_workers, hardware_options, resolve_hardware, workers_options
from runner.server.config import DEFAULT_MAX_TOKENS


@click.command()
@click.option("--model", "-m", "models", metavar="NAME|PATH", multiple=True,
              help="A model to serve besides the local ones: a name `llmrun list` shows, a catalog name (pulled at "
                   "start), or a GGUF file; repeatable. With one --model, it is loaded at start. Default: every "
                   "local model, loaded when first asked for (or, with none local, the best fit, pulled).")
@click.option("--name", metavar="NAME", help="The name clients see for the one --model (default: its catalog name, or "
                                            "its file name); it still answers to its other names.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Per-model settings (ctx, parallel, keep_alive) and more GGUF files by name: a TOML file, see "
                   "docs/server.md.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; 0.0.0.0 exposes the server to the network (use --api-key).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option("--parallel", "-np", default=4, show_default=True, type=click.IntRange(1, 256),
              help="Requests each model decodes at once (continuous batching slots).")
@click.option("--queue", default=64, show_default=True, type=click.IntRange(0, 100000),
              help="Requests that may wait for a slot, per model; more get 429 with Retry-After.")
@click.option("--ctx", type=click.IntRange(128, 1 << 20), default=None,
              help="Context per request in tokens (default: the plan's; 4096 for a GGUF file). Each model's KV "
                   "cache holds ctx x parallel.")
@click.option("--keep-alive", default="5m", show_default=True, metavar="DURATION",
              help="How long a model stays loaded after its last request (Ollama's forms: 5m, 30s, 1h, 0 = unload "
                   "at once, -1 = forever); requests may say otherwise.")
@click.option("--max-memory", metavar="SIZE",
              help="RAM the server may hold, models included (default: RAM available less 5%, at least 256 MiB).")
@click.option("--max-vram", metavar="SIZE[,SIZE...]",
              help="VRAM the models may hold on each GPU (one size for all, or one per GPU; default: free VRAM).")
@click.option("--pull", is_flag=True, help="Pull a catalog model the first time a request names it (default: 404 "
                                           "saying `llmrun pull NAME`).")
@click.option("--swap-wait", default=60.0, show_default=True, type=click.FloatRange(0, 3600), metavar="SECONDS",
              help="How long a model's load waits for busy models to free memory before the request gets 503.")
@click.option("--threads", "-t", type=click.IntRange(1, 1024), help="CPU threads (default: the physical cores).")
@click.option("--api-key", envvar="LLMRUN_API_KEY", metavar="KEY",
              help="Require 'Authorization: Bearer KEY' (also from $LLMRUN_API_KEY). Without one, a server "
                   "listening beyond localhost refuses /api/pull, /api/delete and /api/copy.")
@click.option("--cors-origin", "cors_origins", multiple=True, metavar="ORIGIN",
              help="Allow browser requests from this origin (repeatable); CORS is off otherwise.")
@click.option("--max-body", default="1MiB", show_default=True, metavar="SIZE", help="Largest request body.")
@click.option("--max-tokens", default=DEFAULT_MAX_TOKENS, show_default=True, type=click.IntRange(0, 2 ** 31 - 1),
              help="Tokens a request may generate when it sets no limit (a request may ask for more, up to the "
                   "context); 0 = until the context is full.")
@click.option("--grace", default=30.0, show_default=True, type=click.FloatRange(0, 3600),
              help="Seconds in-flight requests may take to finish after SIGTERM / Ctrl-C.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@hardware_options
@workers_options
def serve(models, name, config_file, host, port, parallel, queue, ctx, keep_alive, max_memory, max_vram, pull,
          swap_wait, threads, api_key, cors_origins, max_body, max_tokens, grace, log_level, hardware, gpus, ram,
          workers, network):
    """Serve local models over an OpenAI-compatible (/v1) and Ollama-compatible (/api) HTTP API, each loaded
    when first asked for, as many at once as the memory budget holds."""
    from runner.app.models import ModelIndex
    from runner.app.pool import ModelPool
    from runner.app.serving import ModelSettings, ModelsConfig, PlannedLoader, budget_from, read_models_config
    from runner.core.errors import UsageError
    from runner.core.units import format_duration, format_size, parse_duration, parse_size
    from runner.model.catalog import load_catalog
    from runner.server.config import ServerConfig
    from runner.server.lifecycle import bind, exposure_warning, serve as run_server

    if name and len(models) != 1:
        raise UsageError("--name names the one --model", hint='name more models in --config: [models."NAME"] '
                                                                     'path = "FILE"')
    config = ServerConfig(host=host, port=port, queue=queue, api_key=api_key or None,
                          cors_origins=tuple(cors_origins), max_body_bytes=int(parse_size(max_body, what="--max-body")),
                          grace_seconds=grace, max_tokens=max_tokens or None)
    keep_alive_s = parse_duration(keep_alive, what="--keep-alive")
    defaults = ModelSettings(ctx=ctx, parallel=parallel, keep_alive=keep_alive_s)
    models_config = read_models_config(config_file) if config_file else ModelsConfig()
    profile = apply_workers(resolve_hardware(hardware, gpus, ram), workers, network)

    catalog = load_catalog()
    index = ModelIndex(files=models_config.files, catalog=catalog, pull=pull)
    named = [_add_model(index, m, name) for m in models]
    if not named and not index.refs:
        named = [_default_model(index, ctx, profile, parallel)]   # nothing local: today's plan, pulled or the demo
    preload = named[0] if len(named) == 1 else None

    _import_serving()   # what the process holds before any model: llama.cpp and the HTTP stack imported
    budget = budget_from(profile, max_memory=parse_size(max_memory, what="--max-memory") if max_memory else None,
                         max_vram=[parse_size(v, what="--max-vram") for v in max_vram.split(",")] if max_vram else (),
                         process_bytes=_rss())
    loader = PlannedLoader(index, profile, budget, defaults=defaults, config=models_config, threads=threads)
    if preload is not None:
        loader.keep_forever(index.resolve(preload))
    pool = ModelPool(index, loader, budget, wait_s=swap_wait)

    warning = exposure_warning(config)
    if warning:
        click.secho(warning, fg="red", bold=True, err=True)
    sock = bind(host, port)
    shown = f"[{host}]" if ":" in host else host
    served = preload or f"{len(index.refs)} model(s)"
    port = sock.getsockname()[1]
    click.echo(f"llmrun serve: {served} on http://{shown}:{port}  "
               f"OpenAI: /v1  Ollama: /api  health: /health  metrics: /metrics  "
               f"({parallel} slots per model, queue {queue}, keep-alive {format_duration(keep_alive_s)})",
               err=True)
    budget_text = ", ".join(f"{'RAM' if d == 'CPU' else d} {format_size(n)}" for d, n in budget.limits.items())
    click.echo(f"models: {', '.join(r.name for r in index.refs) or 'none yet'}; memory budget: {budget_text} "
               f"({budget.source})", err=True)
    local = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(host, shown)   # a wildcard address is not a place to browse
    click.echo(f"chat in a browser: http://{local}:{port}/", err=True)
    run_server(config, pool, preload=preload, sock=sock, log_level=log_level)


def _add_model(index, model: str, name: str | None) -> str:
    """Serve `model` (a GGUF file, or a name: pulled now when it is a catalog model not yet local, as the user
    named it); returns the name it is served under."""
    from runner.app.launch import is_model_path
    from runner.app.models import ServedFile
    from runner.core.errors import ModelNotLocalError, UsageError

    if is_model_path(model):
        path = Path(model).expanduser()
        if not path.is_file():
            raise UsageError(f"--model {model}: no such file", hint="give the path of a GGUF file, or a name "
                                                                   "`llmrun list` shows")
        index.add(ServedFile(name or path.stem, path))
        return next(r.name for r in index.refs if r.path == path)
    try:
        ref = index.resolve(model)
    except ModelNotLocalError:
        from runner.store import fetch, hub

        entry = hub.find_entry(model.removesuffix(":latest"), index.catalog)
        fetch.ensure_local(entry)
        index.refresh()
        ref = index.resolve(entry.name)
    if name and ref.path is not None:     # the same model, listed under the given name first
        index.add(ServedFile(name, ref.path))
        return name
    return ref.name


def _default_model(index, ctx, profile, parallel) -> str:
    """No --model and no local model: the plan's best fit for this machine, pulled (or the demo model offline)."""
    import os

    from runner.app.launch import resolve_model
    from runner.app.models import ServedFile

    launch = resolve_model(None, hardware=lambda: profile, n_ctx=ctx, n_parallel=parallel)
    if launch.notice:
        click.echo(launch.notice, err=True)
    click.echo(launch.summary, err=True)
    index.refresh()
    same = [r for r in index.refs if r.path is not None and os.path.realpath(r.path) == os.path.realpath(launch.path)]
    if same:
        return same[0].name
    index.add(ServedFile(launch.name, launch.path))
    return launch.name


def _import_serving() -> None:
    import uvicorn  # noqa: F401

    import runner.server.app  # noqa: F401  (FastAPI, pydantic, the adapters)
    try:
        import runner.engine.batching  # noqa: F401  (llama_cpp)
    except ImportError:
        pass   # loading reports it, with the fix


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


COMMANDS = [serve]
