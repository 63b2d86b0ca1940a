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
    head_dim: int = 0         # 0 = n_embd // n_head
    n_expert: int = 0
    n_expert_used: int = 0
    sliding_window: int = 0   # 0 = none
    n_params: int = 0         # 0 = unknown

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.n_embd // max(self.n_head, 1))

    @property
    def n_embd_k_gqa(self) -> int:
        return self.head_dim * self.n_head_kv

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0


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
