"""`llmrun serve`: parse options, resolve the model, hand over to runner.server (which imports FastAPI/uvicorn)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import click

from runner.cli.common import apply_workers, hardware_options, resolve_hardware, workers_options
from runner.errors import UsageError

QUANT_RE = re.compile(r"(?i)\b(IQ\d_[A-Z0-9_]+|Q\d_K(?:_[SML])?|Q\d_\d|Q\d_K|F16|BF16|F32|Q8_0)\b")


def model_card(path: Path, name: str):
    from runner.server import ModelCard

    stat = path.stat()
    m = QUANT_RE.search(path.name.replace(".", " ").replace("-", " "))
    return ModelCard(name=name, path=str(path), size_bytes=stat.st_size, modified_at=stat.st_mtime,
                     quantization=m.group(1).upper() if m else "")


def resolve_model_path(model: str | None, hardware, gpus, ram) -> tuple[Path, str]:
    """A GGUF path and the name clients use for it. A path is used as is; names go through the launcher's
    resolution (probe, plan, pull; demo model when the hub is unreachable) once it is available."""
    if model and (model.endswith(".gguf") or os.sep in model or Path(model).expanduser().is_file()):
        path = Path(model).expanduser()
        if not path.is_file():
            raise UsageError(f"--model {model}: no such file", hint="give the path of a .gguf file or a model name")
        return path.resolve(), path.stem
    try:
        from runner.launch import resolve_model  # written by the engine/chat side: probe, plan, pull
    except ImportError as e:
        raise UsageError(f"--model {model or '(none)'}: resolving model names is not available in this build",
                         hint="pass the path of a GGUF file: llmrun serve --model path/to/model.gguf") from e
    resolved = resolve_model(model, hardware=hardware, gpus=gpus, ram=ram)
    return Path(resolved.path), resolved.name


@click.command()
@click.option("--model", "-m", metavar="NAME|PATH", help="Catalog model name or GGUF file (default: plan the best fit).")
@click.option("--name", metavar="NAME", help="The model name clients use (default: the file name).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; 0.0.0.0 exposes the server to the network (use --api-key).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option("--parallel", "-np", default=4, show_default=True, type=click.IntRange(1, 256),
              help="Requests decoded at once (continuous batching slots).")
@click.option("--queue", default=64, show_default=True, type=click.IntRange(0, 100000),
              help="Requests that may wait for a slot; more get 429 with Retry-After.")
@click.option("--ctx", default=4096, show_default=True, type=click.IntRange(128, 1 << 20),
              help="Context per request in tokens (the KV cache holds --ctx x --parallel).")
@click.option("--threads", "-t", type=click.IntRange(1, 1024), help="CPU threads (default: the physical cores).")
@click.option("--api-key", envvar="LLMRUN_API_KEY", metavar="KEY",
              help="Require 'Authorization: Bearer KEY' (also from $LLMRUN_API_KEY).")
@click.option("--cors-origin", "cors_origins", multiple=True, metavar="ORIGIN",
              help="Allow browser requests from this origin (repeatable); CORS is off otherwise.")
@click.option("--max-body", default="1MiB", show_default=True, metavar="SIZE", help="Largest request body.")
@click.option("--grace", default=30.0, show_default=True, type=click.FloatRange(0, 3600),
              help="Seconds in-flight requests may take to finish after SIGTERM / Ctrl-C.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@hardware_options
@workers_options
def serve(model, name, host, port, parallel, queue, ctx, threads, api_key, cors_origins, max_body, grace, log_level,
          hardware, gpus, ram, workers, network):
    """Serve a model over an OpenAI-compatible (/v1) and Ollama-compatible (/api) HTTP API."""
    from runner.estimate import RunSettings
    from runner.server import ServerConfig
    from runner.server.lifecycle import bind, exposure_warning, serve as run_server
    from runner.units import parse_size

    config = ServerConfig(host=host, port=port, queue=queue, api_key=api_key or None,
                          cors_origins=tuple(cors_origins), max_body_bytes=int(parse_size(max_body, what="--max-body")),
                          grace_seconds=grace)
    if workers:  # cluster: plan over local devices + RPC workers; the engine then runs in a child process
        from runner.cluster import launch_with_workers

        launched = launch_with_workers(model, apply_workers(resolve_hardware(hardware, gpus, ram), workers, network),
                                       n_ctx=ctx, n_parallel=parallel, n_threads=threads)
        path, default_name, settings = Path(launched.path), launched.name, launched.settings
        click.echo(launched.summary, err=True)
    else:
        path, default_name = resolve_model_path(model, hardware, gpus, ram)
        settings = RunSettings(n_ctx=ctx * parallel, n_parallel=parallel, n_threads=threads)
    served_name = name or default_name

    def loader():
        from runner.cluster import load_engine  # in process, or isolated from llama.cpp's abort with workers

        engine = load_engine(path, settings, model_name=served_name, n_parallel=parallel, threads=threads)
        return engine, model_card(path, served_name)

    warning = exposure_warning(config)
    if warning:
        click.secho(warning, fg="red", bold=True, err=True)
    sock = bind(host, port)
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"llmrun serve: {served_name} ({path}) on http://{shown}:{sock.getsockname()[1]}  "
               f"OpenAI: /v1  Ollama: /api  health: /health  metrics: /metrics  "
               f"({parallel} slots x {ctx} tokens, queue {queue})", err=True)
    run_server(config, loader, sock=sock, log_level=log_level)


COMMANDS = [serve]
