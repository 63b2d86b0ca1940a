"""The `llmrun` command line: parses arguments and calls one function per command. Each command group lives in
its own module here; heavy imports (llama_cpp, fastapi) happen inside the commands that need them."""

from __future__ import annotations

import sys

import click

from runner import __version__
from runner.core.errors import LlmrunError


class LlmrunGroup(click.Group):
    """Turns llmrun's errors into a message and a hint on stderr (never a traceback), Ctrl-C into exit 130."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except LlmrunError as e:
            click.secho(f"error: {e.message}", fg="red", err=True)
            if e.hint:
                click.echo(f"hint: {e.hint}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("\ninterrupted", err=True)
            ctx.exit(130)
        except BrokenPipeError:
            sys.stderr.close()
            ctx.exit(0)


@click.group(cls=LlmrunGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="llmrun")
def cli() -> None:
    """Run open-weight LLMs locally: probe the machine, plan what fits, pull it, chat or serve it."""


def _register() -> None:
    """Every module in this package except `common` defines COMMANDS, a list of click commands."""
    import importlib
    import pkgutil

    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name == "common":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for command in getattr(module, "COMMANDS", ()):
            cli.add_command(command)


_register()


def main() -> None:
    cli(prog_name="llmrun")
