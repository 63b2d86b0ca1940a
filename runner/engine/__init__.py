"""Inference engine: llama.cpp through llama-cpp-python's low-level API, with continuous batching.
Importing this package does not import llama_cpp; `load_engine` does."""

from runner.engine.types import (  # noqa: F401
    ChatMessage, Completion, Engine, EngineStats, Generation, SamplingParams, Usage,
)


def load_engine(model_path, settings=None, **kwargs):
    """Load a GGUF and start the engine (see runner.engine.llama_engine.load_engine)."""
    try:
        from runner.engine.llama_engine import load_engine as _load
    except ImportError as e:
        if (e.name or "").startswith("llama_cpp"):
            from runner.errors import EngineError

            raise EngineError("llama-cpp-python is not installed",
                              hint="run scripts/setup.sh (it builds llama-cpp-python for this machine)") from e
        raise
    return _load(model_path, settings, **kwargs)
