"""Memory estimate: (model shape + tensor layout, run settings, placement) -> bytes per device, broken into the
terms llama.cpp really allocates. A pure function; see docs/estimation.md for its measured accuracy."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RunSettings:
    """How llama.cpp is asked to run a model: what the planner chooses and the engine loads with."""

    n_ctx: int = 4096                 # context size as passed to llama.cpp (all parallel sequences together)
    n_batch: int = 2048
    n_ubatch: int = 512
    n_parallel: int = 1               # sequences decoded at once (llama.cpp n_seq_max)
    type_k: str = "f16"               # KV cache types: f16, q8_0, q4_0
    type_v: str = "f16"
    flash_attn: bool = False
    n_gpu_layers: int = 0             # llama.cpp semantics: the output layer counts as one; -1 = all
    main_gpu: int = 0
    tensor_split: tuple[float, ...] = ()  # share of offloaded layers per GPU (llama.cpp semantics)
    experts_on_cpu: bool = False      # keep MoE expert tensors (ffn_*_exps) in host RAM
    use_mmap: bool = True
    n_threads: int | None = None      # None = the hardware profile's CPU.threads
    rpc_servers: tuple[str, ...] = ()  # llama.cpp RPC workers "host:port" whose devices join the split
