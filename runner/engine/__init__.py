"""Inference engine: llama.cpp through llama-cpp-python's low-level API, with continuous batching.
Importing this package does not import llama_cpp; `load_engine` does."""

from runner.engine.types import (  # noqa: F401
    ChatMessage, Completion, Engine, EngineStats, Generation, SamplingParams, Usage,
)
