"""The KV cache llama.cpp allocates (llama_kv_cache, llama_kv_cache_iswa, llama_model::create_memory), per layer:

- cells: n_ctx padded to a multiple of 256; n_seq_max splits it into streams of n_ctx / n_seq_max cells (padded
  again), it does not multiply it; kv_unified keeps one stream of n_ctx cells.
- a layer holds K (n_head_kv · head_dim wide) and V (n_head_kv · head_dim_v wide) per cell, at the KV types' real
  block sizes (f16 2 bytes, q8_0 34/32, q4_0 18/32).
- sliding-window layers (gemma2/3, gpt-oss: `ModelShape.is_swa`) live in a second cache; with `swa_full` (llama.cpp's
  default) it is as large as the first, otherwise `pad256(min(cells, n_swa · (n_seq if unified else 1) + n_ubatch))`
  cells.
- MLA (deepseek2 with `head_dim_mla`): K only, the compressed latent plus the rope part (head_dim wide, one head).
- encoders (BERT: `ArchSpec.kv == "none"`) have no KV cache.
"""

from __future__ import annotations

from runner.core.errors import UsageError
from runner.core.run_settings import RunSettings, kv_type
from runner.core.shapes import ModelShape
from runner.model.archs import arch_spec

CTX_PAD = 256                          # llama.cpp pads the KV cache size to a multiple of 256 cells


def kv_cells(settings: RunSettings) -> tuple[int, int]:
    """(cells per stream, streams) of the KV cache llama.cpp allocates for these settings."""
    if settings.n_ctx < 1:
        raise UsageError(f"n_ctx must be positive, not {settings.n_ctx}")
    n_seq = max(settings.n_parallel, 1)
    n_ctx = -(-settings.n_ctx // CTX_PAD) * CTX_PAD
    if settings.kv_unified or n_seq == 1:
        return n_ctx, 1
    per_seq = -(-(n_ctx // n_seq) // CTX_PAD) * CTX_PAD
    return per_seq, n_seq


def swa_cells(shape: ModelShape, settings: RunSettings) -> int:
    """Cells per stream of the sliding-window cache (llama_kv_cache_iswa)."""
    cells, streams = kv_cells(settings)
    if settings.swa_full or not shape.sliding_window:
        return cells
    n_seq = max(settings.n_parallel, 1)
    u = max(1, min(settings.n_ubatch, settings.n_batch))
    window = shape.sliding_window * (n_seq if settings.kv_unified else 1) + u
    return -(-min(cells, window) // CTX_PAD) * CTX_PAD


def has_kv_cache(shape: ModelShape) -> bool:
    spec = arch_spec(shape.arch)
    return spec is None or spec.kv != "none"


def layer_cells(shape: ModelShape, settings: RunSettings, il: int) -> int:
    """Cells per stream of layer `il`'s cache."""
    return swa_cells(shape, settings) if shape.is_swa(il) else kv_cells(settings)[0]


def kv_layer_bytes(shape: ModelShape, settings: RunSettings, il: int = 0) -> int:
    """KV cache bytes of layer `il` (K and V, all streams)."""
    if not has_kv_cache(shape):
        return 0
    _cells, streams = kv_cells(settings)
    cells = layer_cells(shape, settings, il)
    k = kv_type(settings.type_k).row_bytes(shape.n_embd_k_gqa) * cells * streams
    v = kv_type(settings.type_v).row_bytes(shape.n_embd_v_gqa) * cells * streams if shape.n_embd_v_gqa else 0
    return k + v


def kv_layers(shape: ModelShape, settings: RunSettings) -> list[int]:
    """KV bytes of every layer, in order."""
    full = kv_layer_bytes(shape, settings, 0) if not shape.is_swa(0) else None
    out = []
    for il in range(shape.n_layer):
        if full is not None and not shape.is_swa(il):
            out.append(full)
        else:
            out.append(kv_layer_bytes(shape, settings, il))
    return out


def kv_cache_bytes(shape: ModelShape, settings: RunSettings) -> int:
    """The whole KV cache (all layers, all devices)."""
    return sum(kv_layers(shape, settings))


__all__ = ["CTX_PAD", "kv_cells", "swa_cells", "has_kv_cache", "layer_cells", "kv_layer_bytes", "kv_layers",
           "kv_cache_bytes"]
