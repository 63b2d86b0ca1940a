"""Inference engine: llama.cpp through llama-cpp-python's low-level API, with continuous batching.
Importing this package does not import llama_cpp; `load_engine` does."""

from runner.engine.types import (  # noqa: F401
    ChatMessage, Completion, Engine, EngineStats, Generation, SamplingParams, Usage,
)


def load_engine(model_path, settings=None, **kwargs):
    """Load a GGUF and start the engine (see runner.engine.llama_engine.load_engine)."""
    from runner.engine.llama_engine import load_engine as _load

    return _load(model_path, settings, **kwargs)
