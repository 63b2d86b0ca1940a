"""Beyond one machine, with llama.cpp's RPC backend:

- `rpc`: the worker wire protocol (probe, read-only), the worker's server loop and the registration of workers'
  devices, over `runner.engine.ggml`;
- `workers`: `llmrun worker`, `--workers`/`--network` parsing, and workers' memory as extra planner devices;
- `isolated`: `IsolatedEngine`, an engine in a child process (llama.cpp aborts the process when a worker dies);
- `protocol`: the messages between it and its child, and the allow-lists of what the child runs.
"""
