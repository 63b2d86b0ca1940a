"""The compute buffer llama.cpp reserves for its graph (`sched_reserve`), per architecture, fitted to the sizes it
logs (docs/estimation.md has the fits and their residuals).

llama.cpp reserves the largest graph it may run: a ubatch of U = min(n_ubatch, n_ctx) tokens attending to all K
cells of a stream, with all U outputs. The buffer is the largest live set over three phases of that graph, plus
the attention masks, inputs that live until the last layer. With E = n_embd, Q = n_head·head_dim, KV =
n_head_kv·head_dim, F = n_ff (MoE: the expert width × experts used), H = n_head, V = n_vocab (bytes):

    masks        = 4·U·K per kind of layer (full and sliding-window: two for gemma2/3 and gpt-oss); f16 (2·U·K)
                   with flash attention or on an offload device
    attention    = 4·U·K·H (KQ scores, absent with flash attention) + 4·U·(a·E + b·Q + c·KV)
    feed-forward = 4·U·(f·F + g·E) (+ 4·U·E without flash attention, dense models)
    output       = 4·U·V + 8·U·E      (4·U·E instead of 8 on an offload device)

with (a, b, c, f, g) per architecture in GRAPH_FITS; MLA (deepseek2) keeps the absorbed query alive instead:
4·U·(3E + 2·H·kv_lora + 2·H·key_length_mla). Encoders (BERT) have no cache: K = U, no output phase.
Architectures not in GRAPH_FITS use llama's (the plan says the term is approximate).
"""

from __future__ import annotations

from dataclasses import dataclass

from runner.core.run_settings import RunSettings
from runner.core.shapes import ModelShape
from runner.model.archs import ARCHS, arch_spec
from runner.plan.kv import has_kv_cache, kv_cells, swa_cells

SMALL_INPUTS = 10 * 1024               # token ids, positions, output ids: a few KiB in every graph

# architectures whose graph llama.cpp runs without flash attention whatever is asked ("flash_attn is not
# compatible with Grok - forcing off")
NO_FLASH_ATTN_ARCHS = frozenset(name for name, spec in ARCHS.items() if not spec.flash_attn)


def flash_attn_effective(settings: RunSettings, shape: ModelShape | None = None) -> bool:
    """Whether llama.cpp will run flash attention: off for architectures that do not support it; on when asked,
    or when the V cache is quantized (llama.cpp needs it then and turns it on)."""
    if shape is not None and shape.arch in NO_FLASH_ATTN_ARCHS:
        return False
    return settings.flash_attn or settings.type_v.lower() not in ("f16", "f32", "bf16")


@dataclass(frozen=True)
class GraphFit:
    """An architecture's compute-graph phases in f32 values per ubatch token (each × 4·U bytes), fitted to
    llama.cpp's logged compute buffers. Attention: attn_embd·E + attn_q·Q + attn_kv·KV of projections alive
    beside the KQ scores (attn_embd_mqa instead of attn_embd when n_head_kv is 1); feed-forward: ffn_ff·F +
    ffn_embd·E (+ ffn_embd_no_fa·E without flash attention, dense models), plus the projections 5E + 2KV when the
    MLP runs beside attention (ffn_with_projections); MLA: mla_lora·H·kv_lora + mla_q·H·key_length_mla with
    attn_embd·E; encoders: encoder_embd·E beside the scores."""

    attn_embd: int = 3
    attn_q: int = 2
    attn_kv: int = 2
    attn_embd_mqa: int | None = None
    attn_q_fa: int | None = None      # attn_q with flash attention, when it differs
    ffn_ff: int = 3
    ffn_embd: int = 4
    ffn_embd_no_fa: int = 1
    ffn_with_projections: bool = False
    mla_lora: int = 2
    mla_q: int = 2
    encoder_embd: int = 6


# llama/grok/qwen2/qwen3/qwen3moe/mixtral: separate Q/K/V (3E + 2Q + 2KV, which is 5E + 2KV when Q = E); gate + up
# + SiLU product (3F). phi3: fused QKV leaves 3E + 2KV; the fused gate+up output is split in place (3F + 3E).
# gemma2/3: Q is scaled into a copy (3E + 3Q + 2KV). gpt-oss: biased K and V keep copies (3E + 2Q + 4KV).
# falcon: up + GELU in place (F); the MLP runs in parallel with attention, so the projections are still alive;
# the fused QKV leaves 3E + 2KV (GQA), 5E + 2KV (multi-query). nomic-bert: fused QKV and rotary Q/K copies (8E).
GRAPH_FITS: dict[str, GraphFit] = {
    "llama": GraphFit(),
    "grok": GraphFit(),
    "qwen2": GraphFit(),
    "qwen3": GraphFit(attn_q_fa=3),
    "qwen3moe": GraphFit(attn_q_fa=3),
    "phi3": GraphFit(attn_q=0, ffn_embd=3),
    "gemma2": GraphFit(attn_q=3),
    "gemma3": GraphFit(attn_q=3),
    "gpt-oss": GraphFit(attn_kv=4),
    "deepseek2": GraphFit(),
    "falcon": GraphFit(attn_q=0, attn_embd_mqa=5, ffn_ff=1, ffn_embd=0, ffn_embd_no_fa=0,
                       ffn_with_projections=True),
    "bert": GraphFit(encoder_embd=6, ffn_ff=2, ffn_embd_no_fa=0),
    "nomic-bert": GraphFit(encoder_embd=8, ffn_embd_no_fa=0),
}


def graph_fit(shape: ModelShape) -> GraphFit:
    return GRAPH_FITS.get(shape.arch, GRAPH_FITS["llama"])


def ubatch(settings: RunSettings) -> int:
    """Tokens of the worst-case ubatch llama.cpp reserves for."""
    return max(1, min(settings.n_ubatch, settings.n_batch, settings.n_ctx))


def attended_cells(shape: ModelShape, settings: RunSettings) -> tuple[list[int], int]:
    """(cells of each kind of cache present: full, sliding-window; the most any layer attends to). An encoder
    attends to its ubatch only."""
    if not has_kv_cache(shape):
        u = ubatch(settings)
        return [u], u
    cells, _streams = kv_cells(settings)
    n_swa = shape.n_swa_layers
    kinds = ([cells] if n_swa < shape.n_layer else []) + ([swa_cells(shape, settings)] if n_swa else [])
    return kinds, max(kinds)


def compute_buffer_bytes(shape: ModelShape, settings: RunSettings, *, with_output: bool = True,
                         n_outputs: int | None = None, host: bool = True) -> int:
    """The compute buffer of a device that runs the whole graph (CPU-only): graph inputs + the largest of the
    attention, feed-forward and output phases (module docstring). `host=False`: the buffer of an offload device
    (checked with an RPC device; a GPU's is unverified)."""
    u = ubatch(settings)
    kinds, k = attended_cells(shape, settings)
    e, kv, h = shape.n_embd, shape.n_embd_k_gqa, shape.n_head
    q = shape.head_dim * shape.n_head
    fa = flash_attn_effective(settings, shape)
    fit = graph_fit(shape)
    # an offload device gets the masks as f16; with flash attention one mask's worth is what stays (measured on
    # gemma2 and gpt-oss, whose two masks otherwise both count)
    mask = u * k * 2 if fa else sum(u * c * (4 if host else 2) for c in kinds)
    scores = 0 if fa else 4 * u * k * h
    encoder = not has_kv_cache(shape)
    if encoder:
        projections = fit.encoder_embd * e
    elif shape.head_dim_mla:
        projections = fit.attn_embd * e + fit.mla_lora * h * shape.head_dim_v + fit.mla_q * h * shape.head_dim_mla
    else:
        attn_embd = fit.attn_embd_mqa if shape.n_head_kv == 1 and fit.attn_embd_mqa is not None else fit.attn_embd
        attn_q = fit.attn_q_fa if fa and fit.attn_q_fa is not None else fit.attn_q
        projections = attn_embd * e + attn_q * q + fit.attn_kv * kv
    phases = [mask + scores + 4 * u * projections]

    def ffn(f: int, moe: bool) -> int:
        width = fit.ffn_ff * f + fit.ffn_embd * e + (0 if fa or moe else fit.ffn_embd_no_fa * e)
        if fit.ffn_with_projections:
            width += 5 * e + 2 * kv
        return mask + 4 * u * width

    if shape.is_moe:
        phases.append(ffn(shape.expert_ff * max(shape.n_expert_used, 1), True))
        if shape.n_layer_dense_lead:
            phases.append(ffn(shape.n_ff, False))
    else:
        phases.append(ffn(shape.n_ff, False))
    phases = [p + SMALL_INPUTS for p in phases]
    if with_output and not encoder:
        n_out = u if n_outputs is None else max(1, min(n_outputs, u))
        phases.append(4 * n_out * shape.n_vocab + (8 if host else 4) * n_out * e)
    return max(phases)


def compute_committed_bytes(shape: ModelShape, settings: RunSettings, *, with_output: bool = True) -> int:
    """The part of a host compute buffer that becomes resident at worst while generating: the CPU backend
    mallocs the buffer and only the pages a graph touches are committed. Prompt processing with a full context
    touches the attention and feed-forward phases; the output phase of the reservation (logits for every token
    of a ubatch) is touched only when all logits are requested (perplexity, embeddings), so it counts with one
    output per sequence. ggml's allocator plans each graph anew as the context grows, so the pages touched are
    the largest phase plus about one [n_embd + n_ff, U] f32 activation that lands elsewhere (measured on the demo
    model while filling 512-4096 contexts), capped by the buffer itself; plus the CPU matmul work buffer."""
    u = ubatch(settings)
    phase = compute_buffer_bytes(shape, settings, with_output=with_output, n_outputs=max(settings.n_parallel, 1))
    spill = 4 * u * (shape.n_embd + shape.n_ff)
    committed = min(compute_buffer_bytes(shape, settings, with_output=with_output), phase + spill)
    return committed + cpu_work_buffer_bytes(shape, settings)


def cpu_work_buffer_bytes(shape: ModelShape, settings: RunSettings) -> int:
    """The CPU backend's matmul work buffer (not logged by llama.cpp): without flash attention the softmaxed
    KQ scores are converted to f16 for the KQV product, 2 * U * K * n_head bytes at a full context."""
    if flash_attn_effective(settings, shape):
        return 0
    _kinds, k = attended_cells(shape, settings)
    return 2 * ubatch(settings) * k * shape.n_head


def output_buffer_bytes(shape: ModelShape, settings: RunSettings) -> int:
    """llama.cpp's output buffer: logits (n_vocab floats) per sequence, and for an embedding model the pooled
    embedding too (it is only used with embeddings on)."""
    spec = arch_spec(shape.arch)
    embd = shape.n_embd if spec is not None and spec.embedding else 0
    return (shape.n_vocab + embd) * 4 * max(settings.n_parallel, 1)


__all__ = ["GraphFit", "GRAPH_FITS", "NO_FLASH_ATTN_ARCHS", "SMALL_INPUTS", "graph_fit", "ubatch",
           "attended_cells", "compute_buffer_bytes", "compute_committed_bytes", "cpu_work_buffer_bytes",
           "flash_attn_effective", "output_buffer_bytes"]
