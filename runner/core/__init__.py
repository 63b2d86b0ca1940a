"""Leaf values and helpers every stage uses, importing nothing else of llmrun:

- `errors`: every error class (`.hint` is the user's next step, `.exit_code` the CLI's status);
- `units`: sizes (`parse_size`, `format_size`, KiB/MiB/GiB);
- `dirs`: where llmrun keeps files, read lazily from the environment;
- `shapes`: `ModelShape`, `TensorInfo`, `GGUFHeader`;
- `run_settings`: `RunSettings` (planner → engine) and the one `KvType` table;
- `files`: atomic writes.
"""
