"""Architectures as data: for each llama.cpp architecture llmrun covers, the tensors its files hold (names, roles
for the quantization mixes, shapes as functions of the model shape, in the order llama.cpp's converter writes
them), how its KV cache is laid out, what its vocabulary is, and the metadata llama.cpp's loader needs to read a
file of it. Read from llama.cpp's `src/models/<arch>.cpp` (`load_arch_hparams`, `load_arch_tensors`) in the
version llama-cpp-python 0.3.36 vendors.

    ARCHS[name] -> ArchSpec       every covered architecture
    arch_spec(name) -> ArchSpec | None
    is_covered(arch) -> bool      KV layout and compute graph measured against llama.cpp (docs/estimation.md)

An architecture that is not here still plans from a GGUF header's tensors (the weights are exact); its KV cache
and compute buffer are then estimated as for llama and the plan says they are approximate.

KV layouts (llama.cpp `llama_model::create_memory`): "kv" is the plain cache (K and V of every layer,
n_head_kv · head_dim wide, grouped-query included); layers the shape marks as sliding-window (`swa_pattern`) get
a second, window-sized cache; MLA (`head_dim_mla`, deepseek2) keeps only K (the compressed latent plus the rope
part); "none" (BERT-style encoders) has no KV cache at all.

Leaf of the estimator: imports only runner.core (no numpy, no gguf).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

from runner.core.shapes import ModelShape

ShapeFn = Callable[[ModelShape], "tuple[int, ...] | None"]
TensorSpec = tuple[str, str, ShapeFn]     # name template (".weight" added unless it ends in ".bias"), role, shape
Table = tuple[TensorSpec, ...]


def _norm(s: ModelShape) -> tuple[int, ...]:
    """A norm's weight (or bias): one value per embedding dimension."""
    return (s.n_embd,)


def _dense(s: ModelShape) -> bool:
    return s.n_expert == 0


def _q_width(s: ModelShape) -> int:
    return s.head_dim * s.n_head


def _v_width(s: ModelShape) -> int:
    return s.head_dim_v * s.n_head_kv


def _when(cond: Callable[[ModelShape], bool], fn: ShapeFn) -> ShapeFn:
    return lambda s: fn(s) if cond(s) else None


# --------------------------------------------------------------------------------------------- building blocks
_QKV = (  # separate Q, K, V (grouped-query) and the output projection
    ("attn_q", "attn_q", lambda s: (s.n_embd, _q_width(s))),
    ("attn_k", "attn_k", lambda s: (s.n_embd, s.n_embd_k_gqa)),
    ("attn_v", "attn_v", lambda s: (s.n_embd, _v_width(s))),
    ("attn_output", "attn_output", lambda s: (s.head_dim_v * s.n_head, s.n_embd)),
)
_QKV_BIASED = (  # qwen2, gpt-oss, bert: Q/K/V with biases
    ("attn_q", "attn_q", lambda s: (s.n_embd, _q_width(s))),
    ("attn_q.bias", "bias", lambda s: (_q_width(s),)),
    ("attn_k", "attn_k", lambda s: (s.n_embd, s.n_embd_k_gqa)),
    ("attn_k.bias", "bias", lambda s: (s.n_embd_k_gqa,)),
    ("attn_v", "attn_v", lambda s: (s.n_embd, _v_width(s))),
    ("attn_v.bias", "bias", lambda s: (_v_width(s),)),
)
_QK_NORM = (  # qwen3, gemma3: RMS norms over each Q and K head
    ("attn_q_norm", "norm", lambda s: (s.head_dim,)),
    ("attn_k_norm", "norm", lambda s: (s.head_dim,)),
)
_SWIGLU = (
    ("ffn_gate", "ffn_gate", lambda s: (s.n_embd, s.n_ff)),
    ("ffn_down", "ffn_down", lambda s: (s.n_ff, s.n_embd)),
    ("ffn_up", "ffn_up", lambda s: (s.n_embd, s.n_ff)),
)
_EXPERTS = (  # merged expert tensors (ne2 = n_expert), width expert_ff
    ("ffn_gate_inp", "router", lambda s: (s.n_embd, s.n_expert)),
    ("ffn_gate_exps", "ffn_gate", lambda s: (s.n_embd, s.expert_ff, s.n_expert)),
    ("ffn_down_exps", "ffn_down", lambda s: (s.expert_ff, s.n_embd, s.n_expert)),
    ("ffn_up_exps", "ffn_up", lambda s: (s.n_embd, s.expert_ff, s.n_expert)),
)
_HEAD: Table = (("token_embd", "token_embd", lambda s: (s.n_embd, s.n_vocab)),)
_TAIL: Table = (
    ("output_norm", "norm", _norm),
    ("output", "output", lambda s: (s.n_embd, s.n_vocab)),
)


# llama (Llama 1-3.x, Mistral; with n_expert > 0 Mixtral): dense SwiGLU or merged experts
_LLAMA_BLOCK: Table = (
    ("attn_norm", "norm", _norm),
    *_QKV,
    ("ffn_norm", "norm", _norm),
    *((n, r, _when(_dense, f)) for n, r, f in _SWIGLU),
    *((n, r, _when(lambda s: s.n_expert > 0, f)) for n, r, f in _EXPERTS),
)
_GROK_BLOCK: Table = (
    ("attn_norm", "norm", _norm),
    *_QKV,
    ("attn_output_norm", "norm", _norm),
    ("ffn_norm", "norm", _norm),
    *_EXPERTS,
    ("layer_output_norm", "norm", _norm),
)


# Falcon (LLM_ARCH_FALCON): LayerNorm with bias, one fused QKV matrix, GELU MLP without gate, parallel attention +
# MLP. attn_norm_2 is Falcon-40B's second LayerNorm (present when n_head_kv > 1). Order as the converter writes the
# HF state dict (attention, MLP, then the norms).
def _falcon_norm_2(s: ModelShape) -> tuple[int, ...] | None:
    return (s.n_embd,) if s.n_head_kv > 1 else None


_FALCON_BLOCK: Table = (
    ("attn_qkv", "attn_qkv", lambda s: (s.n_embd, s.head_dim * s.n_head + 2 * s.n_embd_k_gqa)),
    ("attn_output", "attn_output", lambda s: (s.head_dim * s.n_head, s.n_embd)),
    ("ffn_up", "ffn_up", lambda s: (s.n_embd, s.n_ff)),
    ("ffn_down", "ffn_down", lambda s: (s.n_ff, s.n_embd)),
    ("attn_norm", "norm", _norm),
    ("attn_norm.bias", "norm", _norm),
    ("attn_norm_2", "norm", _falcon_norm_2),
    ("attn_norm_2.bias", "norm", _falcon_norm_2),
)
_FALCON_TAIL: Table = (
    ("output_norm", "norm", _norm),
    ("output_norm.bias", "norm", _norm),
    ("output", "output", lambda s: (s.n_embd, s.n_vocab)),
)

# qwen2: Llama's block with Q/K/V biases
_QWEN2_BLOCK: Table = (
    ("attn_norm", "norm", _norm),
    *_QKV_BIASED,
    ("attn_output", "attn_output", lambda s: (_q_width(s), s.n_embd)),
    ("ffn_norm", "norm", _norm),
    *_SWIGLU,
)
# qwen3: no biases, Q/K head norms; qwen3moe: the same attention with merged experts (no shared expert)
_QWEN3_BLOCK: Table = (
    ("attn_norm", "norm", _norm),
    *_QKV,
    *_QK_NORM,
    ("ffn_norm", "norm", _norm),
    *_SWIGLU,
)
_QWEN3MOE_BLOCK: Table = (
    ("attn_norm", "norm", _norm),
    *_QKV,
    *_QK_NORM,
    ("ffn_norm", "norm", _norm),
    *_EXPERTS,
)
# gemma2: norms after attention and FFN as well as before; the output is always tied to token_embd. gemma3 adds
# Q/K head norms (and may carry its own output).
_GEMMA2_BLOCK: Table = (
    ("attn_norm", "norm", _norm),
    *_QKV,
    ("post_attention_norm", "norm", _norm),
    ("ffn_norm", "norm", _norm),
    ("ffn_gate", "ffn_gate", lambda s: (s.n_embd, s.n_ff)),
    ("ffn_up", "ffn_up", lambda s: (s.n_embd, s.n_ff)),
    ("ffn_down", "ffn_down", lambda s: (s.n_ff, s.n_embd)),
    ("post_ffw_norm", "norm", _norm),
)
_GEMMA3_BLOCK: Table = (
    ("attn_norm", "norm", _norm),
    *_QKV,
    ("post_attention_norm", "norm", _norm),
    *_QK_NORM,
    ("ffn_norm", "norm", _norm),
    ("ffn_gate", "ffn_gate", lambda s: (s.n_embd, s.n_ff)),
    ("ffn_up", "ffn_up", lambda s: (s.n_embd, s.n_ff)),
    ("ffn_down", "ffn_down", lambda s: (s.n_ff, s.n_embd)),
    ("post_ffw_norm", "norm", _norm),
)
_NORM_ONLY_TAIL: Table = (("output_norm", "norm", _norm),)
# phi3: fused QKV and a fused gate+up projection (2·n_ff wide)
_PHI3_BLOCK: Table = (
    ("attn_norm", "norm", _norm),
    ("attn_qkv", "attn_qkv", lambda s: (s.n_embd, _q_width(s) + s.n_embd_k_gqa + _v_width(s))),
    ("attn_output", "attn_output", lambda s: (_q_width(s), s.n_embd)),
    ("ffn_norm", "norm", _norm),
    ("ffn_down", "ffn_down", lambda s: (s.n_ff, s.n_embd)),
    ("ffn_up", "ffn_up", lambda s: (s.n_embd, 2 * s.n_ff)),
)


# deepseek2 with MLA (DeepSeek-V2/V3, Kimi K2, GLM-4.7 Lite...): compressed Q (q_lora_rank) and KV (kv_lora_rank =
# head_dim_v), the rope part (head_dim - head_dim_v) shared by all heads; K/V decompression split per head (attn_k_b,
# attn_v_b: 3-D); the first n_layer_dense_lead layers dense, the rest routed experts plus shared experts.
def _mla_rope(s: ModelShape) -> int:
    return s.head_dim - s.head_dim_v


def _moe_layer(fn: ShapeFn) -> Callable[[ModelShape, int], tuple[int, ...] | None]:
    return lambda s, i: fn(s) if i >= s.n_layer_dense_lead else None


def _dense_layer(fn: ShapeFn) -> Callable[[ModelShape, int], tuple[int, ...] | None]:
    return lambda s, i: fn(s) if i < s.n_layer_dense_lead else None


_DEEPSEEK2_BLOCK: Table = (
    ("attn_norm", "norm", _norm),
    ("attn_q_a_norm", "norm", lambda s: (s.q_lora_rank,) if s.q_lora_rank else None),
    ("attn_kv_a_norm", "norm", lambda s: (s.head_dim_v,)),
    ("attn_q_a", "attn_q", lambda s: (s.n_embd, s.q_lora_rank) if s.q_lora_rank else None),
    ("attn_q_b", "attn_q", lambda s: (s.q_lora_rank, s.n_head * s.head_dim_mla) if s.q_lora_rank else None),
    ("attn_q", "attn_q", lambda s: None if s.q_lora_rank else (s.n_embd, s.n_head * s.head_dim_mla)),
    ("attn_kv_a_mqa", "attn_kv", lambda s: (s.n_embd, s.head_dim)),
    ("attn_k_b", "attn_k", lambda s: (s.head_dim_mla - _mla_rope(s), s.head_dim_v, s.n_head)),
    ("attn_v_b", "attn_v", lambda s: (s.head_dim_v, s.head_dim_v_mla, s.n_head)),
    ("attn_output", "attn_output", lambda s: (s.n_head * s.head_dim_v_mla, s.n_embd)),
    ("ffn_norm", "norm", _norm),
)
# per-layer tensors that depend on the layer index (dense lead vs MoE): name, role, fn(shape, layer)
LayerFn = Callable[[ModelShape, int], "tuple[int, ...] | None"]
_DEEPSEEK2_FFN: tuple[tuple[str, str, LayerFn], ...] = (
    ("ffn_gate", "ffn_gate", _dense_layer(lambda s: (s.n_embd, s.n_ff))),
    ("ffn_down", "ffn_down", _dense_layer(lambda s: (s.n_ff, s.n_embd))),
    ("ffn_up", "ffn_up", _dense_layer(lambda s: (s.n_embd, s.n_ff))),
    ("ffn_gate_inp", "router", _moe_layer(lambda s: (s.n_embd, s.n_expert))),
    ("exp_probs_b.bias", "bias", _moe_layer(lambda s: (s.n_expert,))),
    ("ffn_gate_exps", "ffn_gate", _moe_layer(lambda s: (s.n_embd, s.expert_ff, s.n_expert))),
    ("ffn_down_exps", "ffn_down", _moe_layer(lambda s: (s.expert_ff, s.n_embd, s.n_expert))),
    ("ffn_up_exps", "ffn_up", _moe_layer(lambda s: (s.n_embd, s.expert_ff, s.n_expert))),
    ("ffn_gate_shexp", "ffn_gate", _moe_layer(lambda s: (s.n_embd, s.expert_ff * s.n_expert_shared))),
    ("ffn_down_shexp", "ffn_down", _moe_layer(lambda s: (s.expert_ff * s.n_expert_shared, s.n_embd))),
    ("ffn_up_shexp", "ffn_up", _moe_layer(lambda s: (s.n_embd, s.expert_ff * s.n_expert_shared))),
)
# gpt-oss (LLM_ARCH_OPENAI_MOE): biased Q/K/V/O, per-head attention sinks, experts with biases, sliding window on
# every other layer
_GPT_OSS_BLOCK: Table = (
    ("attn_norm", "norm", _norm),
    ("post_attention_norm", "norm", _norm),
    *_QKV_BIASED,
    ("attn_output", "attn_output", lambda s: (_q_width(s), s.n_embd)),
    ("attn_output.bias", "bias", _norm),
    ("attn_sinks", "norm", lambda s: (s.n_head,)),
    ("ffn_gate_inp", "router", lambda s: (s.n_embd, s.n_expert)),
    ("ffn_gate_inp.bias", "bias", lambda s: (s.n_expert,)),
    ("ffn_gate_exps", "ffn_gate", lambda s: (s.n_embd, s.expert_ff, s.n_expert)),
    ("ffn_gate_exps.bias", "bias", lambda s: (s.expert_ff, s.n_expert)),
    ("ffn_down_exps", "ffn_down", lambda s: (s.expert_ff, s.n_embd, s.n_expert)),
    ("ffn_down_exps.bias", "bias", lambda s: (s.n_embd, s.n_expert)),
    ("ffn_up_exps", "ffn_up", lambda s: (s.n_embd, s.expert_ff, s.n_expert)),
    ("ffn_up_exps.bias", "bias", lambda s: (s.expert_ff, s.n_expert)),
)
# BERT encoders: learned positions and token types, LayerNorms with biases, no output matrix (embeddings out)
N_TOKEN_TYPES = 2
_BERT_HEAD: Table = (
    ("token_embd", "token_embd", lambda s: (s.n_embd, s.n_vocab)),
    ("token_types", "bias", lambda s: (s.n_embd, N_TOKEN_TYPES)),   # F32: added to every row
    ("position_embd", "keep", lambda s: (s.n_embd, s.n_ctx_train)),
    ("token_embd_norm", "norm", _norm),
    ("token_embd_norm.bias", "bias", _norm),
)
_BERT_BLOCK: Table = (
    *_QKV_BIASED,
    ("attn_output", "attn_output", lambda s: (s.n_embd, s.n_embd)),
    ("attn_output.bias", "bias", _norm),
    ("attn_output_norm", "norm", _norm),
    ("attn_output_norm.bias", "bias", _norm),
    ("ffn_up", "ffn_up", lambda s: (s.n_embd, s.n_ff)),
    ("ffn_up.bias", "bias", lambda s: (s.n_ff,)),
    ("ffn_down", "ffn_down", lambda s: (s.n_ff, s.n_embd)),
    ("ffn_down.bias", "bias", _norm),
    ("layer_output_norm", "norm", _norm),
    ("layer_output_norm.bias", "bias", _norm),
)
# nomic-bert: fused QKV without biases, rotary positions (no position_embd), SwiGLU
_NOMIC_HEAD: Table = (
    ("token_embd", "token_embd", lambda s: (s.n_embd, s.n_vocab)),
    ("token_types", "bias", lambda s: (s.n_embd, N_TOKEN_TYPES)),   # F32: added to every row
    ("token_embd_norm", "norm", _norm),
    ("token_embd_norm.bias", "bias", _norm),
)
_NOMIC_BLOCK: Table = (
    ("attn_qkv", "attn_qkv", lambda s: (s.n_embd, 3 * s.n_embd)),
    ("attn_output", "attn_output", lambda s: (s.n_embd, s.n_embd)),
    ("attn_output_norm", "norm", _norm),
    ("attn_output_norm.bias", "bias", _norm),
    ("ffn_up", "ffn_up", lambda s: (s.n_embd, s.n_ff)),
    ("ffn_gate", "ffn_gate", lambda s: (s.n_embd, s.n_ff)),
    ("ffn_down", "ffn_down", lambda s: (s.n_ff, s.n_embd)),
    ("layer_output_norm", "norm", _norm),
    ("layer_output_norm.bias", "bias", _norm),
)

Vocab = Literal["spm", "bpe", "wpm"]
KvLayout = Literal["kv", "none"]


@dataclass(frozen=True)
class ArchSpec:
    """One llama.cpp architecture as data."""

    name: str
    head: Table
    block: Table
    tail: Table
    layer_tensors: tuple[tuple[str, str, LayerFn], ...] = ()  # per-layer tensors that depend on the layer index
    norm: Literal["rms", "layer"] = "rms"         # which epsilon key llama.cpp reads
    vocab: Vocab = "spm"                          # the vocabulary of its usual files (synthetic files use it)
    pre: str = ""                                 # BPE pre-tokenizer name
    kv: KvLayout = "kv"
    swa_pattern: int = 0                          # llama.cpp's default set_swa_pattern(n) for this architecture
    swa_default: int = 0                          # the window when the file gives none (gemma2: 4096)
    swa_needs_key: bool = False                   # SWA only when the file sets {arch}.attention.sliding_window
    embedding: bool = False                       # an encoder for embeddings: pooled output, no causal mask
    tied_output: bool = False                     # never an output matrix: token_embd is duplicated (gemma2)
    flash_attn: bool = True                       # False: llama.cpp forces flash attention off (grok)
    covered: bool = True                          # KV layout and compute graph measured against llama.cpp
    metadata: tuple[tuple[str, float | int | bool], ...] = ()  # fixed hparams its loader needs (synthetic files)
    special_tokens: tuple[str, ...] = ()          # control tokens llama.cpp looks up by text (the vocabulary's end)

    def tables(self) -> tuple[Table, Table, Table]:
        return self.head, self.block, self.tail


ARCHS: dict[str, ArchSpec] = {a.name: a for a in (
    ArchSpec("llama", _HEAD, _LLAMA_BLOCK, _TAIL),
    ArchSpec("grok", _HEAD, _GROK_BLOCK, _TAIL, flash_attn=False),
    ArchSpec("falcon", _HEAD, _FALCON_BLOCK, _FALCON_TAIL, norm="layer", vocab="bpe", pre="falcon"),
    ArchSpec("qwen2", _HEAD, _QWEN2_BLOCK, _TAIL, vocab="bpe", pre="qwen2"),
    ArchSpec("qwen3", _HEAD, _QWEN3_BLOCK, _TAIL, vocab="bpe", pre="qwen2"),
    ArchSpec("qwen3moe", _HEAD, _QWEN3MOE_BLOCK, _TAIL, vocab="bpe", pre="qwen2"),
    ArchSpec("gemma2", _HEAD, _GEMMA2_BLOCK, _NORM_ONLY_TAIL, swa_pattern=2, swa_default=4096, tied_output=True,
             metadata=(("attn_logit_softcapping", 50.0), ("final_logit_softcapping", 30.0))),
    ArchSpec("gemma3", _HEAD, _GEMMA3_BLOCK, _TAIL, swa_pattern=6, swa_needs_key=True),
    ArchSpec("phi3", _HEAD, _PHI3_BLOCK, _TAIL, special_tokens=("<|endoftext|>",)),
    ArchSpec("deepseek2", _HEAD, _DEEPSEEK2_BLOCK, _TAIL, layer_tensors=_DEEPSEEK2_FFN, vocab="bpe",
             pre="deepseek-v3", metadata=(("expert_weights_scale", 2.5), ("expert_weights_norm", True),
                                          ("expert_gating_func", 2))),
    ArchSpec("gpt-oss", _HEAD, _GPT_OSS_BLOCK, _TAIL, vocab="bpe", pre="gpt-4o", swa_pattern=2,
             swa_needs_key=True),
    ArchSpec("bert", _BERT_HEAD, _BERT_BLOCK, (), norm="layer", vocab="wpm", kv="none", embedding=True,
             metadata=(("pooling_type", 1),)),
    ArchSpec("nomic-bert", _NOMIC_HEAD, _NOMIC_BLOCK, (), norm="layer", vocab="wpm", kv="none", embedding=True,
             metadata=(("pooling_type", 1),)),
)}


def arch_spec(name: str) -> ArchSpec | None:
    return ARCHS.get(name)


def is_covered(arch: str) -> bool:
    """Whether llmrun's KV and compute terms for `arch` were measured against llama.cpp (weights are exact from a
    header for any architecture)."""
    spec = ARCHS.get(arch)
    return spec is not None and spec.covered


def tensor_name(template: str) -> str:
    return template if template.endswith(".bias") else template + ".weight"


def layer_specs(spec: ArchSpec, shape: ModelShape, il: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, role, shape) of every tensor of layer `il` for this shape, in file order."""
    out = []
    for template, role, fn in spec.block:
        tshape = fn(shape)
        if tshape is not None:
            out.append((f"blk.{il}.{tensor_name(template)}", role, tshape))
    for template, role, lfn in spec.layer_tensors:
        tshape = lfn(shape, il)
        if tshape is not None:
            out.append((f"blk.{il}.{tensor_name(template)}", role, tshape))
    return out


def global_specs(table: Table, shape: ModelShape) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(tensor_name(t), role, s) for t, role, fn in table if (s := fn(shape)) is not None]


__all__ = ["ARCHS", "ArchSpec", "arch_spec", "is_covered", "layer_specs", "global_specs", "tensor_name",
           "N_TOKEN_TYPES"]
