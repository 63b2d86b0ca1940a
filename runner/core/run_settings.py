"""How llama.cpp is asked to run a model: `RunSettings` (what the planner chooses and the engine loads with) and
the one table of KV cache types (ggml type ids for the engine, block sizes for the estimate)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from runner.core.errors import UsageError

MAX_EMBED_SEQS = 256         # llama.cpp's LLAMA_MAX_SEQ: sequences (inputs) in one embedding decode


@dataclass(frozen=True)
class RunSettings:
    """How llama.cpp is asked to run a model: what the planner chooses and the engine loads with."""

    n_ctx: int = 4096                 # context size as passed to llama.cpp (all parallel sequences together)
    n_batch: int = 2048
    n_ubatch: int = 512
    n_parallel: int = 1               # sequences decoded at once (llama.cpp n_seq_max)
    type_k: str = "f16"               # KV cache types: f16, q8_0, q4_0 (see KV_TYPES)
    type_v: str = "f16"
    flash_attn: bool = False
    n_gpu_layers: int = 0             # llama.cpp semantics: the output layer counts as one; -1 = all
    main_gpu: int = 0
    tensor_split: tuple[float, ...] = ()  # share of offloaded layers per GPU (llama.cpp semantics)
    experts_on_cpu: bool = False      # keep MoE expert tensors (ffn_*_exps) in host RAM
    use_mmap: bool = True
    n_threads: int | None = None      # None = the hardware profile's CPU.threads
    rpc_servers: tuple[str, ...] = ()  # llama.cpp RPC workers "host:port" whose devices join the split
    kv_unified: bool = False          # llama.cpp kv_unified: one KV stream shared by all sequences
    repack: bool = True               # llama.cpp extra buffer types (CPU_REPACK); False = --no-repack
    swa_full: bool = True             # llama.cpp swa_full (its default): sliding-window layers get a full-size KV
                                      # cache; False = a window-sized one (llama-server's default)

    @property
    def n_ctx_seq(self) -> int:
        """Context per sequence."""
        return self.n_ctx // max(self.n_parallel, 1)


def embedding_settings(settings: RunSettings, n_ctx_train: int) -> RunSettings:
    """The second context a loaded model gets for embeddings (runner.engine.embedding): n_tokens cells (n_ubatch,
    at most what the model was trained on) in one unified KV cache, n_batch = n_ubatch = n_tokens so that every
    decode is ONE ubatch, and up to LLAMA_MAX_SEQ inputs per decode. KV types and flash attention as `settings`."""
    n = min(n_ctx_train, settings.n_ubatch) if n_ctx_train > 0 else settings.n_ubatch
    return replace(settings, n_ctx=n, n_batch=n, n_ubatch=n, n_parallel=min(MAX_EMBED_SEQS, n), kv_unified=True)


@dataclass(frozen=True)
class KvType:
    """A KV cache element type: its ggml type id (what llama.cpp is given) and its block layout (what it costs:
    `block_bytes` per `block` values)."""

    name: str
    ggml_type: int
    block: int
    block_bytes: int

    def row_bytes(self, n: int) -> int:
        """Bytes of `n` values of this type (whole blocks)."""
        return -(-n // self.block) * self.block_bytes


# ggml type ids from ggml.h (enum ggml_type) of the pinned llama.cpp; block layouts from ggml's type traits
KV_TYPES: dict[str, KvType] = {t.name: t for t in (
    KvType("f32", 0, 1, 4),
    KvType("f16", 1, 1, 2),
    KvType("q4_0", 2, 32, 18),
    KvType("q4_1", 3, 32, 20),
    KvType("q5_0", 6, 32, 22),
    KvType("q5_1", 7, 32, 24),
    KvType("q8_0", 8, 32, 34),
    KvType("iq4_nl", 20, 32, 18),
    KvType("bf16", 30, 1, 2),
)}


def kv_type(name: str) -> KvType:
    """The KV type called `name` (case-insensitive); UsageError naming the choices otherwise."""
    try:
        return KV_TYPES[name.lower()]
    except KeyError:
        raise UsageError(f"unknown KV cache type {name!r}",
                         hint="use one of: " + ", ".join(KV_TYPES)) from None
