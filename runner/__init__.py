"""llmrun: a local LLM runner with a hardware-aware launcher.

The pipeline is the package, one subpackage per stage; imports only ever point down this list (an
import-linter contract in pyproject.toml holds it):

    core       errors, sizes, where files live, model shapes, RunSettings and the KV type table, atomic writes
    hardware   probe this machine; hardware profiles for machines you don't have
    model      GGUF headers, tensor layouts, the catalog, shape-true synthetic files
    plan       the memory estimate, configurations that fit, the planner, speed prediction, accuracy matrix
    store      pull (resumable, verified), the local store, licence acceptance
    engine     llama.cpp: the ggml loader, native calls, continuous batching, the engine contract
    cluster    llama.cpp RPC workers: protocol, worker process, the engine in a child process
    app        what every face calls: launch (probe → plan → pull), load, chat session, bench
    server     the HTTP faces (OpenAI, Ollama) over one native path
    cli        click commands: parse, call one function, print
"""

__version__ = "0.1.0"
