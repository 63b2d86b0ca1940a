"""What every face (CLI, server) calls:

- `launch`: what the user asked for (path, name, nothing) → a file and settings: probe → plan → pull, the demo
  model when the hub is unreachable, and the split over RPC workers;
- `load`: load a launch (in process, or isolated with workers) and compare llama.cpp's buffers with the plan;
- `chat`: the terminal chat session and REPL;
- `bench`: `llmrun bench`.
"""
