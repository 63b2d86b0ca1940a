"""What every face (CLI, server) calls:

- `launch`: what the user asked for (path, name, nothing) → a file and settings: probe → plan → pull, the demo
  model when the hub is unreachable, and the split over RPC workers;
- `load`: load a launch (in process, or isolated with workers) and compare llama.cpp's buffers with the plan;
- `models`: the one resolution of a model name (server, chat and CLI alike) and the models a process serves;
- `pool`: the models a server holds in memory: load on demand, keep alive, evict, never past the budget
  (`pool_values`: the budget, what a load takes and gives, the loader protocol, the snapshots);
- `serving`: the budget, the per-model settings file and the real loader `llmrun serve` gives the pool;
- `manage`: a server's model management: pulls with progress (one per model), delete, copy;
- `threads`: blocking work on daemon threads of its own, results back on the event loop;
- `chat`: the terminal chat session and REPL;
- `bench`: `llmrun bench`.
"""
