"""`llmrun worker`: lend this host's memory and compute to another llmrun over llama.cpp's RPC protocol."""

from __future__ import annotations

import click


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but loopback exposes an unauthenticated, unencrypted protocol: "
                   "use a private network only.")
@click.option("--port", default=50052, show_default=True, type=click.IntRange(1, 65535), help="TCP port.")
@click.option("--device", "devices", multiple=True, metavar="NAME",
              help="A llama.cpp device to serve (CPU, CUDA0, ...); repeat for several. Default: every GPU, "
                   "else the CPU.")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for the CPU device (default: half the "
                                                             "logical cores).")
@click.option("--cache-dir", type=click.Path(file_okay=False),
              help="Keep received weights here so a reload of the same model skips the network.")
@click.option("--list-devices", is_flag=True, help="List the devices this host can serve and exit.")
def worker(host: str, port: int, devices: tuple[str, ...], threads: int | None, cache_dir: str | None,
           list_devices: bool) -> None:
    """Serve this host's GPUs (or CPU memory) to `llmrun plan/chat/serve --workers HOST:PORT`."""
    from runner.cluster import workers as cluster
    from runner.cluster import rpc

    if list_devices:
        for d in rpc.local_devices():
            click.echo(f"{d.name:8} {d.description}  {d.total_bytes / 2**30:.1f} GiB, "
                       f"{d.free_bytes / 2**30:.1f} GiB free")
        return
    code = cluster.run_worker(host, port, devices=devices, threads=threads, cache_dir=cache_dir,
                              echo=click.echo, warn=lambda s: click.secho(s, fg="red", bold=True, err=True))
    raise SystemExit(code)


COMMANDS = [worker]
