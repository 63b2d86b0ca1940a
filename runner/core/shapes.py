"""Values describing a model's architecture and tensors, shared by the GGUF reader, the catalog, the synthetic
model writer and the estimator. Leaf module: imports nothing of llmrun."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeAlias, Union

# A GGUF metadata value as the reader keeps it: a number, bool or string; a short array as a list; a long array
# (tokenizer tokens, scores, merges) as a summary {"type": "array", "item_type": "STRING", "len": N}.
GGUFValue: TypeAlias = Union[int, float, bool, str, list["GGUFValue"], dict[str, Union[str, int]]]


@dataclass(frozen=True)
class ModelShape:
    """Hyper-parameters that decide memory and speed. Names follow llama.cpp's hparams."""

    arch: str                 # llama.cpp architecture name: "llama", "grok", "falcon", ...
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int                 # dense FFN width (for MoE: the expert FFN width if no dense FFN)
    n_vocab: int
    n_ctx_train: int
    head_dim: int = 0         # K head width ({arch}.attention.key_length); 0 = n_embd // n_head
    n_expert: int = 0
    n_expert_used: int = 0
    sliding_window: int = 0   # 0 = none; only SWA layers (swa_pattern) use it
    n_params: int = 0         # 0 = unknown
    head_dim_v: int = 0       # V head width ({arch}.attention.value_length); 0 = head_dim
    swa_pattern: int = 0      # llama.cpp's set_swa_pattern(n): layer i uses the sliding window when
                              # i % n < n - 1 (gemma2, gpt-oss 2; gemma3 6); 0 = no sliding-window layers
    head_dim_mla: int = 0     # MLA (deepseek2): key_length_mla; the KV cache then holds K only (the compressed
                              # latent + rope part, head_dim wide, n_head_kv 1), no V
    head_dim_v_mla: int = 0   # MLA: value_length_mla (the decompressed V head)
    q_lora_rank: int = 0      # MLA: rank of the compressed Q (0 = a plain Q projection)
    n_ff_exp: int = 0         # MoE expert FFN width when it differs from n_ff (expert_feed_forward_length)
    n_expert_shared: int = 0  # MoE shared experts per layer (deepseek2)
    n_layer_dense_lead: int = 0  # leading layers with a dense FFN instead of experts (deepseek2)

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.n_embd // max(self.n_head, 1))
        if self.head_dim_v == 0:
            object.__setattr__(self, "head_dim_v", self.head_dim)

    @property
    def n_embd_k_gqa(self) -> int:
        return self.head_dim * self.n_head_kv

    @property
    def n_embd_v_gqa(self) -> int:
        """V width per token and layer; 0 for MLA, whose cache holds no V."""
        return 0 if self.head_dim_mla else self.head_dim_v * self.n_head_kv

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0

    @property
    def expert_ff(self) -> int:
        """The FFN width of one expert."""
        return self.n_ff_exp or self.n_ff

    def is_swa(self, il: int) -> bool:
        """Whether layer `il` attends through the sliding window (llama.cpp `hparams.is_swa`)."""
        p = self.swa_pattern
        return self.sliding_window > 0 and p > 0 and il % p < p - 1

    @property
    def n_swa_layers(self) -> int:
        return sum(1 for il in range(self.n_layer) if self.is_swa(il))


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a GGUF header describes it. `shape` is in GGUF/ggml order (ne0 first)."""

    name: str
    shape: tuple[int, ...]
    type_name: str            # ggml type name: "F32", "F16", "Q4_0", "Q4_K", "Q6_K", "Q8_0", ...
    offset: int               # bytes from the start of the tensor data section
    n_bytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class GGUFHeader:
    """What the GGUF reader returns: metadata, tensor infos, and where tensor data starts."""

    version: int
    metadata: dict[str, GGUFValue] = field(hash=False, compare=False)
    tensors: tuple[TensorInfo, ...]
    data_offset: int          # absolute file offset of the tensor data section
    alignment: int
    file_size: int | None     # None when only a prefix of a remote file was read
    shape: ModelShape | None  # None when the architecture's keys are missing
