"""`llmrun chat`, `llmrun run` and `llmrun bench`."""

from __future__ import annotations

import sys

import click

from runner.cli.common import hardware_options, json_option, print_json, resolve_launch, workers_options


def _sampling_options(f):
    f = click.option("--system", default=None, metavar="TEXT",
                     help='System prompt (default: "You are a helpful assistant."; "" for none).')(f)
    f = click.option("--max-tokens", type=int, default=None, help="Longest reply, in tokens (default: no limit).")(f)
    f = click.option("--seed", type=int, default=None, help="Sampling seed, for reproducible replies.")(f)
    f = click.option("--top-p", type=float, default=None, help="Nucleus sampling threshold (default 0.95).")(f)
    f = click.option("--temperature", type=float, default=None, help="0 = greedy (default 0.8).")(f)
    f = click.option("--ctx", type=int, default=None, help="Context size in tokens (default: the plan's).")(f)
    f = click.option("--model", "-m", metavar="NAME|PATH",
                     help="A catalog model (e.g. llama-2-7b-chat:Q4_K_M) or a .gguf file; default: the best that "
                          "fits this machine.")(f)
    return workers_options(hardware_options(f))


def _params(temperature, top_p, seed, max_tokens):
    from dataclasses import replace

    from runner.engine.batching import validate_params
    from runner.engine.types import SamplingParams

    p = SamplingParams()
    changes = {k: v for k, v in dict(temperature=temperature, top_p=top_p, seed=seed, max_tokens=max_tokens).items()
               if v is not None}
    p = replace(p, **changes)
    validate_params(p)
    return p


def open_engine(model, ctx, hardware, gpus, ram, *, n_parallel: int = 1, threads: int | None = None,
                workers: str | None = None, network: str | None = None):
    """Resolve, announce (one line) and load. Returns the engine and its Launch."""
    from runner.app.load import load

    if ctx is not None and ctx < 16:
        from runner.core.errors import UsageError

        raise UsageError(f"--ctx {ctx} is too small", hint="use at least a few hundred tokens, e.g. --ctx 4096")
    launch = resolve_launch(model, ctx, hardware, gpus, ram, n_parallel=n_parallel, workers=workers, network=network)
    loaded = load(launch, threads=threads)
    for w in loaded.warnings:
        click.secho(f"warning: {w}", fg="yellow", err=True)
    return loaded.engine, launch


def close_engine(engine, launch, *, source: str) -> None:
    """Record the speed the engine really decoded at (the planner's bench.json), then close it."""
    from runner.app.bench import record_run

    try:
        record_run(engine, launch, source=source)
    finally:
        engine.close()


@click.command()
@_sampling_options
def chat(model, ctx, hardware, gpus, ram, workers, network, temperature, top_p, seed, max_tokens, system):
    """Chat with a model in the terminal (or answer one question piped on stdin)."""
    from runner.app.chat import DEFAULT_SYSTEM, ChatSession, Repl, answer_once

    params = _params(temperature, top_p, seed, max_tokens)
    question = sys.stdin.read() if not sys.stdin.isatty() else None   # piped: answer it once
    if question is not None and not question.strip():
        from runner.core.errors import UsageError

        raise UsageError("nothing on stdin to answer", hint='echo "question" | llmrun chat')
    engine, launch = open_engine(model, ctx, hardware, gpus, ram, workers=workers, network=network)
    try:
        session = ChatSession(engine, params=params, system=DEFAULT_SYSTEM if system is None else (system or None))
        if question is not None:
            code = answer_once(session, question)
        else:
            code = Repl(session).run()
    finally:
        close_engine(engine, launch, source="chat")
    sys.exit(code)


@click.command()
@click.argument("prompt", required=False)
@_sampling_options
def run(prompt, model, ctx, hardware, gpus, ram, workers, network, temperature, top_p, seed, max_tokens, system):
    """Answer one PROMPT (or stdin when PROMPT is "-" or missing) and exit: for scripts."""
    from runner.app.chat import DEFAULT_SYSTEM, ChatSession, answer_once
    from runner.core.errors import UsageError

    if prompt in (None, "-"):
        if sys.stdin.isatty():
            raise UsageError("no prompt given", hint='llmrun run "your question"')
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise UsageError("the prompt is empty", hint='llmrun run "your question"')
    params = _params(temperature, top_p, seed, max_tokens)
    engine, launch = open_engine(model, ctx, hardware, gpus, ram, workers=workers, network=network)
    try:
        session = ChatSession(engine, params=params, system=DEFAULT_SYSTEM if system is None else (system or None))
        code = answer_once(session, prompt)
    finally:
        close_engine(engine, launch, source="run")
    sys.exit(code)


@click.command()
@click.argument("model", required=False, metavar="[NAME|PATH]")
@click.option("--prompt-tokens", "n_prompt", type=int, default=256, show_default=True,
              help="Prompt tokens processed in one batch (pp).")
@click.option("--gen-tokens", "n_gen", type=int, default=64, show_default=True, help="Tokens decoded one by one (tg).")
@click.option("--repeats", type=int, default=3, show_default=True, help="Runs; the median is reported.")
@click.option("--threads", type=int, default=None, help="CPU threads (default: usable physical cores).")
@click.option("--no-save", is_flag=True, help="Do not store the result in bench.json.")
@json_option
def bench(model, n_prompt, n_gen, repeats, threads, no_save, as_json):
    """Measure prompt and decode tokens/s of a local model (default: the demo model) on this machine; the planner
    uses the result instead of its prediction."""
    from pathlib import Path

    from runner.app import bench as benchmod
    from runner.app.launch import DEMO_NAME, is_model_path

    keys: tuple[str, ...]
    if model is None:
        from runner.store import fetch

        path, keys = fetch.demo_model_path(), (DEMO_NAME,)
        keys = (DEMO_NAME, path.name)
    elif is_model_path(model):
        path = Path(model).expanduser()
        keys = (path.name,)
    else:
        from runner.store import hub, local as store
        from runner.core.errors import ModelNotLocalError

        entry = hub.find_entry(model)
        lm = store.local_model(entry)
        if lm is None:
            raise ModelNotLocalError(f"{entry.name} is not downloaded", hint=f"llmrun pull {entry.name}")
        path = lm.path
        keys = tuple(k for k in (entry.name, entry.local_file) if k)
    from runner.hardware import probe as hw
    from runner.plan.speed import hardware_fingerprint

    fingerprint = hardware_fingerprint(hw.probe(measure=False))
    if not as_json:
        click.echo(f"benchmarking {path.name}: pp{n_prompt}, tg{n_gen}, {repeats} runs ...", err=True)
    result = benchmod.measure(path, n_prompt=n_prompt, n_gen=n_gen, repeats=repeats, threads=threads,
                              name=keys[0], fingerprint=fingerprint)
    saved, kept = (None, False) if no_save else benchmod.store(result, keys)
    if as_json:
        from dataclasses import asdict

        print_json({**asdict(result), "saved_to": str(saved) if kept else None})
        return
    click.echo(f"{result.model}: prompt {result.prompt_tps:.1f} tok/s, decode {result.decode_tps:.1f} tok/s "
               f"({result.n_threads} threads)")
    if kept:
        click.echo(f"saved to {saved} (`llmrun plan` now uses this measurement)", err=True)
    elif saved:
        click.echo(f"{saved} keeps the faster figure measured before on this machine (a busy machine measures "
                   "low)", err=True)


COMMANDS = [chat, run, bench]
