"""Loading what a launch names, the one way every face does it: in this process, or in a child process when
the model is split over RPC workers (llama.cpp aborts the process that loses a worker), followed by the check of
llama.cpp's real buffers against the plan's estimate."""

from __future__ import annotations

from dataclasses import dataclass

from runner.app.launch import Launch
from runner.core.errors import EngineError
from runner.engine import report
from runner.engine.types import Engine


@dataclass(frozen=True)
class Loaded:
    engine: Engine
    warnings: tuple[str, ...] = ()    # where llama.cpp allocated more than 5% away from the plan's estimate


def load(launch: Launch, *, model_name: str | None = None, n_parallel: int | None = None,
         threads: int | None = None) -> Loaded:
    """Load `launch` and start its engine. Raises the engine's errors (EngineError, ClusterError, ...)."""
    name = model_name or launch.name
    engine: Engine
    if launch.settings.rpc_servers:
        from runner.cluster.isolated import IsolatedEngine

        engine = IsolatedEngine(launch.path, launch.settings, model_name=name, n_parallel=n_parallel,
                                threads=threads)
    else:
        try:
            from runner.engine.batching import start_engine
        except ImportError as e:
            if (e.name or "").startswith("llama_cpp"):
                raise EngineError("llama-cpp-python is not installed",
                                  hint="run `make setup` (it builds llama-cpp-python for this machine)") from e
            raise
        engine = start_engine(launch.path, launch.settings, model_name=name, n_parallel=n_parallel, threads=threads)
    warnings: tuple[str, ...] = ()
    if launch.estimate is not None and engine.buffers:
        warnings = tuple(report.warnings(report.compare(dict(engine.buffers), launch.estimate)))
    return Loaded(engine, warnings)
