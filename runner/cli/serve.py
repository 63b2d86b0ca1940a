"""`llmrun serve`: parse options, resolve the model, hand over to runner.server (which imports FastAPI/uvicorn)."""

from __future__ import annotations

import re
from pathlib import Path

import click

from runner.cli.common import hardware_options, resolve_launch, workers_options
from runner.server.config import DEFAULT_MAX_TOKENS

QUANT_RE = re.compile(r"(?i)(IQ\d_[A-Z0-9]+(?:_[SML])?|Q\d_K(?:_[SML])?|Q\d_\d|BF16|F16|F32)")
CARD_KEYS = ("general.architecture", "general.name", "general.size_label", "general.file_type",
             "general.parameter_count", "general.license")


def model_card(path: Path, name: str):
    """What /api/show, /api/tags and /v1/models say: file facts plus a few GGUF metadata keys."""
    from runner.core.errors import GGUFError
    from runner.server.config import ModelCard

    stat = path.stat()
    meta: dict = {}
    try:
        from runner.model.gguf import read_header

        meta = read_header(path).metadata
    except (GGUFError, OSError):
        meta = {}
    arch = str(meta.get("general.architecture", ""))
    m = QUANT_RE.search(path.name)
    extra = {k: meta[k] for k in CARD_KEYS if k in meta and isinstance(meta[k], (str, int, float))}
    if arch and f"{arch}.context_length" in meta:
        extra[f"{arch}.context_length"] = meta[f"{arch}.context_length"]
    return ModelCard(name=name, path=str(path), size_bytes=stat.st_size, modified_at=stat.st_mtime, family=arch,
                     parameter_size=str(meta.get("general.size_label", "")),
                     quantization=m.group(1).upper() if m else "",
                     chat_template=str(meta.get("tokenizer.chat_template", "")), extra=extra)


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
@click.option("--ctx", type=click.IntRange(128, 1 << 20), default=None,
              help="Context per request in tokens (default: the plan's; 4096 for a GGUF path). The KV cache holds "
                   "--ctx x --parallel.")
@click.option("--threads", "-t", type=click.IntRange(1, 1024), help="CPU threads (default: the physical cores).")
@click.option("--api-key", envvar="LLMRUN_API_KEY", metavar="KEY",
              help="Require 'Authorization: Bearer KEY' (also from $LLMRUN_API_KEY).")
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
def serve(model, name, host, port, parallel, queue, ctx, threads, api_key, cors_origins, max_body, max_tokens, grace,
          log_level, hardware, gpus, ram, workers, network):
    """Serve a model over an OpenAI-compatible (/v1) and Ollama-compatible (/api) HTTP API."""
    from runner.server.config import ServerConfig
    from runner.server.lifecycle import bind, exposure_warning, serve as run_server
    from runner.core.units import parse_size

    config = ServerConfig(host=host, port=port, queue=queue, api_key=api_key or None,
                          cors_origins=tuple(cors_origins), max_body_bytes=int(parse_size(max_body, what="--max-body")),
                          grace_seconds=grace, max_tokens=max_tokens or None)
    launch = resolve_launch(model, ctx, hardware, gpus, ram, n_parallel=parallel, workers=workers, network=network)
    served_name = name or launch.name
    slot_ctx = launch.settings.n_ctx // max(launch.settings.n_parallel, 1)

    def loader():
        from runner.app.load import load  # in process, or isolated from llama.cpp's abort with workers

        loaded = load(launch, model_name=served_name, n_parallel=parallel, threads=threads)
        for w in loaded.warnings:
            click.secho(f"warning: {w}", fg="yellow", err=True)
        return loaded.engine, model_card(Path(launch.path), served_name)

    warning = exposure_warning(config)
    if warning:
        click.secho(warning, fg="red", bold=True, err=True)
    sock = bind(host, port)
    shown = f"[{host}]" if ":" in host else host
    port = sock.getsockname()[1]
    click.echo(f"llmrun serve: {served_name} on http://{shown}:{port}  "
               f"OpenAI: /v1  Ollama: /api  health: /health  metrics: /metrics  "
               f"({parallel} slots x {slot_ctx} tokens, queue {queue})", err=True)
    local = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(host, shown)   # a wildcard address is not a place to browse
    click.echo(f"chat in a browser: http://{local}:{port}/", err=True)

    def record_speed(engine) -> None:   # the speed it really decoded at, for the planner (bench.json)
        from runner.app.bench import record_run

        record_run(engine, launch, source="serve", threads=threads)

    run_server(config, loader, sock=sock, log_level=log_level, on_shutdown=record_speed)


COMMANDS = [serve]
