"""The memory estimate: KV cache, placement, quant recipes, repack, compute buffer (fast, no llama.cpp)."""

from __future__ import annotations

import pytest

from runner.core.errors import UsageError
from runner.plan.estimate import MiB, estimate, layer_devices, repacked_types
from runner.plan.graph import compute_buffer_bytes, output_buffer_bytes
from runner.plan.kv import kv_cache_bytes
from runner.core.run_settings import RunSettings
from runner.model.layout import layout_from_recipe
from runner.model.layout import RECIPES, tensor_bytes
from runner.core.shapes import ModelShape

L7 = ModelShape("llama", 32, 4096, 32, 32, 11008, 32000, 4096)
L13 = ModelShape("llama", 40, 5120, 40, 40, 13824, 32000, 4096)
L70 = ModelShape("llama", 80, 8192, 64, 8, 28672, 32000, 4096)
GROK = ModelShape("grok", 64, 6144, 48, 8, 32768, 131072, 8192, n_expert=8, n_expert_used=2)
SMOL = ModelShape("llama", 30, 576, 9, 3, 1536, 49152, 8192)
TINY_GROK = ModelShape("grok", 2, 2048, 16, 8, 2048, 8000, 8192, n_expert=8, n_expert_used=2)
TINY_GROK_F2 = ModelShape("grok", 2, 2048, 16, 8, 4096, 8000, 8192, n_expert=8, n_expert_used=2)
FALCON_7B = ModelShape("falcon", 32, 4544, 71, 1, 18176, 65024, 2048)
FALCON_40B = ModelShape("falcon", 60, 8192, 128, 8, 32768, 65024, 2048)
AVX2 = frozenset({"avx", "avx2", "fma", "f16c"})
KiB = 1024


@pytest.mark.parametrize("shape, per_token", [(L7, 512 * KiB), (L13, 800 * KiB), (L70, 320 * KiB),
                                              (GROK, 256 * KiB)])
def test_kv_cache_per_token_matches_the_catalog(shape, per_token):
    assert kv_cache_bytes(shape, RunSettings(n_ctx=4096)) == per_token * 4096


def test_kv_cache_pads_the_context_to_256_cells_and_parallel_sequences_share_it():
    assert kv_cache_bytes(L7, RunSettings(n_ctx=1000)) == 512 * KiB * 1024
    # n_seq_max splits n_ctx into streams (llama.cpp logs 8192 cells for -c 8192 -np 4), it does not multiply it
    assert kv_cache_bytes(L7, RunSettings(n_ctx=8192, n_parallel=4)) == kv_cache_bytes(L7, RunSettings(n_ctx=8192))
    assert kv_cache_bytes(L7, RunSettings(n_ctx=8192, n_parallel=4, kv_unified=True)) == 512 * KiB * 8192


def test_quantized_kv_uses_the_real_block_sizes():
    f16 = kv_cache_bytes(L7, RunSettings(n_ctx=4096))
    assert kv_cache_bytes(L7, RunSettings(n_ctx=4096, type_k="q8_0", type_v="q8_0")) == f16 * 34 // 64
    assert kv_cache_bytes(L7, RunSettings(n_ctx=4096, type_k="q4_0", type_v="q4_0")) == f16 * 18 // 64
    with pytest.raises(UsageError, match="KV cache type"):
        kv_cache_bytes(L7, RunSettings(type_k="q3_x"))


def test_output_layer_is_offloaded_first_and_token_embd_stays_on_the_host():
    layers, out, ngl = layer_devices(32, RunSettings(n_gpu_layers=1), gpus=1)
    assert out == "GPU0" and set(layers) == {"CPU"} and ngl == 1
    layers, out, _ = layer_devices(32, RunSettings(n_gpu_layers=10), gpus=1)
    assert layers[:23] == ["CPU"] * 23 and layers[23:] == ["GPU0"] * 9 and out == "GPU0"
    for ngl in (33, 99, -1):
        layers, out, eff = layer_devices(32, RunSettings(n_gpu_layers=ngl), gpus=1)
        assert set(layers) == {"GPU0"} and out == "GPU0" and eff == 33
    layout = layout_from_recipe(L7, "Q4_0")
    est = estimate(L7, layout, RunSettings(n_gpu_layers=-1), gpus=1)
    embd = layout.by_name()["token_embd.weight"].n_bytes
    assert est.host.weights == embd and est.host.kv_cache == 0
    assert est.gpu(0).weights == layout.weights_bytes - embd
    assert est.gpu(0).kv_cache == kv_cache_bytes(L7, RunSettings())


def test_without_gpus_everything_is_on_the_host():
    est = estimate(L7, layout_from_recipe(L7, "Q8_0"), RunSettings(n_gpu_layers=20))
    assert [d.device for d in est.devices] == ["CPU"] and est.n_gpu_layers_effective == 0


def test_layers_split_across_gpus_by_tensor_split_or_free_memory():
    layers, out, _ = layer_devices(40, RunSettings(n_gpu_layers=-1), gpus=2)
    assert layers.count("GPU0") == 21 and layers.count("GPU1") == 19 and out == "GPU1"
    layers, _, _ = layer_devices(40, RunSettings(n_gpu_layers=-1, tensor_split=(3, 1)), gpus=2)
    assert layers.count("GPU0") == 31 and layers.count("GPU1") == 9
    layers, _, _ = layer_devices(40, RunSettings(n_gpu_layers=-1), gpus=2, gpu_free=(24 << 30, 8 << 30))
    assert layers.count("GPU0") == 31
    # RPC workers come first in llama.cpp's device order: the first layers go to them, the output stays local
    layers, out, _ = layer_devices(40, RunSettings(n_gpu_layers=-1, rpc_servers=("10.0.0.2:50052",)), gpus=1)
    assert layers[0] == "RPC0" and layers[-1] == "GPU0" and out == "GPU0"
    layers, out, _ = layer_devices(40, RunSettings(n_gpu_layers=-1, rpc_servers=("a:1", "b:2")), gpus=0)
    assert layers.count("RPC0") == 21 and layers.count("RPC1") == 19 and out == "RPC1"


def test_moe_experts_stay_in_host_ram_when_asked():
    layout = layout_from_recipe(GROK, "Q4_K")
    est = estimate(GROK, layout, RunSettings(n_gpu_layers=-1, experts_on_cpu=True), gpus=8)
    experts = sum(t.n_bytes for t in layout.tensors if "_exps." in t.name)
    embd = layout.by_name()["token_embd.weight"].n_bytes
    # the mapped span covers the whole file (experts sit in every layer); the dense pages in it are reclaimable
    assert est.host.weights > experts + embd
    assert est.host.weights - est.host.reclaimable == experts + embd
    assert est.host.needed == est.host.total - est.host.reclaimable
    dense = sum(d.weights for d in est.gpus)
    assert dense == layout.weights_bytes - experts - embd
    assert dense < 8e9 < experts


def test_grok_layout_has_the_published_parameter_count():
    layout = layout_from_recipe(GROK, "Q8_0")
    assert sum(t.n_elements for t in layout.tensors) == 316_490_127_360
    assert layout.by_name()["blk.0.ffn_gate_exps.weight"].shape == (6144, 32768, 8)
    # 8-expert models: attn_k/attn_v are bumped to Q8_0 in every mix
    assert layout_from_recipe(GROK, "Q2_K").by_name()["blk.3.attn_v.weight"].type_name == "Q8_0"


CATALOG_GB = {  # TheBloke's model cards (GB = 1e9)
    "Q3_K_S": (2.95, 5.66, 29.92), "Q3_K_M": (3.30, 6.34, 33.19), "Q3_K_L": (3.60, 6.93, 36.15),
    "Q4_0": (3.83, 7.37, 38.87), "Q4_K_S": (3.86, 7.41, 39.07), "Q4_K_M": (4.08, 7.87, 41.42),
    "Q5_0": (4.65, 8.97, 47.46), "Q5_K_S": (4.65, 8.97, 47.46), "Q5_K_M": (4.78, 9.23, 48.75),
    "Q6_K": (5.53, 10.68, 56.59), "Q8_0": (7.16, 13.83, 73.29),
}


@pytest.mark.parametrize("quant", sorted(CATALOG_GB))
def test_recipe_sizes_match_the_published_files(quant):
    for shape, gb in zip((L7, L13, L70), CATALOG_GB[quant]):
        size = layout_from_recipe(shape, quant).file_bytes
        assert abs(size / 1e9 - gb) / gb < 0.005, (quant, shape.n_layer, size)


def test_q2_k_is_close_to_the_2023_files():
    # TheBloke's Q2_K files came from a 2023 llama.cpp whose Q2_K mix we reproduce only approximately
    for shape, gb in zip((L7, L13), (2.83, 5.43)):
        assert abs(layout_from_recipe(shape, "Q2_K").file_bytes / 1e9 - gb) / gb < 0.02


def test_recipe_is_byte_exact_for_the_7b_files():
    assert layout_from_recipe(L7, "Q4_K_M").file_bytes == 4_081_004_224
    assert layout_from_recipe(L7, "Q5_K_M").file_bytes == 4_783_156_928
    assert layout_from_recipe(L7, "Q8_0").file_bytes == 7_161_089_728
    assert abs(layout_from_recipe(L13, "Q4_K_M").file_bytes - 7_865_956_224) <= 32


def test_q4_k_m_mix_follows_use_more_bits():
    types = {t.name: t.type_name for t in layout_from_recipe(L7, "Q4_K_M").tensors}
    more = [i for i in range(32) if i < 4 or i >= 28 or (i - 4) % 3 == 2]
    for i in range(32):
        want = "Q6_K" if i in more else "Q4_K"
        assert types[f"blk.{i}.attn_v.weight"] == want and types[f"blk.{i}.ffn_down.weight"] == want
        assert types[f"blk.{i}.attn_q.weight"] == "Q4_K" and types[f"blk.{i}.attn_norm.weight"] == "F32"
    assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K"
    q8 = {t.name: t.type_name for t in layout_from_recipe(L7, "Q8_0").tensors}
    assert q8["output.weight"] == "Q8_0" and q8["blk.0.attn_v.weight"] == "Q8_0"


def test_recipes_are_data_and_unknown_quants_are_refused():
    assert {"Q4_0", "Q4_K_M", "Q8_0", "Q6_K"} <= set(RECIPES)
    with pytest.raises(UsageError, match="unknown quantization"):
        layout_from_recipe(L7, "Q7_X")
    with pytest.raises(UsageError, match="architecture"):
        layout_from_recipe(ModelShape("mamba", 2, 256, 4, 4, 512, 1000, 512), "Q8_0")
    assert tensor_bytes((576, 49152), "Q8_0") == 576 // 32 * 34 * 49152


def test_falcon_tensors_follow_llama_cpps_table():
    f7 = layout_from_recipe(FALCON_7B, "Q8_0").by_name()
    assert f7["blk.0.attn_qkv.weight"].shape == (4544, 4544 + 2 * 64)      # fused QKV, multi-query
    assert f7["blk.31.ffn_up.weight"].shape == (4544, 18176) and "blk.0.ffn_gate.weight" not in f7
    assert f7["blk.0.attn_norm.bias"].shape == (4544,) and "blk.0.attn_norm_2.weight" not in f7
    assert {"output_norm.weight", "output_norm.bias", "output.weight"} <= set(f7)
    f40 = layout_from_recipe(FALCON_40B, "Q8_0")
    names = f40.by_name()
    assert names["blk.59.attn_qkv.weight"].shape == (8192, 8192 + 2 * 512)
    assert names["blk.0.attn_norm_2.bias"].type_name == "F32"              # Falcon-40B's second LayerNorm
    assert len(f40.tensors) == 2 + 60 * 8 + 3 - 1 and len(f7) == 1 + 32 * 6 + 3
    # 40B has its own lm_head: the parameter count is the model card's 41.84B
    assert abs(sum(t.n_elements for t in f40.tensors) / 1e9 - 41.84) < 0.01


def test_falcon_quant_mix_has_llama_quants_falcon_rules_and_row_fallbacks():
    t7 = {t.name: t.type_name for t in layout_from_recipe(FALCON_7B, "Q4_K_M").tensors}
    # 4544 is not a multiple of 256: k-quants of rows of 4544 fall back (Q4_K->Q5_0, Q5_K->Q5_1, Q6_K->Q8_0)
    assert t7["blk.5.attn_qkv.weight"] == "Q5_1"          # attn_qkv gets Q5_K in Q4_K_M
    assert t7["blk.5.attn_output.weight"] == "Q5_0" and t7["token_embd.weight"] == "Q5_0"
    assert t7["output.weight"] == "Q8_0"                  # falcon's output is always Q8_0
    # ffn_down rows are n_ff = 18176 = 71 * 256: falcon's own Q4_K_M rule, Q6_K below n/16, Q5_K on more_bits
    assert [t7[f"blk.{i}.ffn_down.weight"] for i in (0, 1, 2, 3, 5, 31)] == ["Q6_K", "Q6_K", "Q5_K", "Q5_K",
                                                                           "Q4_K", "Q5_K"]
    t40 = {t.name: t.type_name for t in layout_from_recipe(FALCON_40B, "Q3_K_M").tensors}
    assert t40["blk.10.attn_qkv.weight"] == "Q4_K" and t40["blk.10.attn_output.weight"] == "Q3_K"
    assert t40["blk.0.ffn_down.weight"] == "Q5_K" and t40["blk.8.ffn_down.weight"] == "Q3_K"
    assert t40["blk.9.ffn_down.weight"] == "Q4_K"         # use_more_bits(9, 60)
    # the llama mix is unchanged by the falcon rules
    assert {t.name: t.type_name for t in layout_from_recipe(L7, "Q3_K_M").tensors}["blk.10.attn_output.weight"] \
        == "Q4_K"


def test_falcon_kv_and_compute_follow_its_graph():
    # multi-query: one 64-wide K/V head per layer, 32 layers, f16 -> 8 KiB per token
    assert kv_cache_bytes(FALCON_7B, RunSettings(n_ctx=2048)) == 2 * 32 * 64 * 2 * 2048
    assert kv_cache_bytes(FALCON_40B, RunSettings(n_ctx=2048)) == 2 * 60 * 512 * 2 * 2048
    # logged by llama.cpp on 2-layer shape-true files (U = 512): 7B n_ctx 4096 620.88 MiB, 512 144.75 MiB (the
    # output phase); 40B (1 layer) n_ctx 2048 566.01 MiB
    assert compute_buffer_bytes(FALCON_7B, RunSettings(n_ctx=4096)) / MiB == pytest.approx(620.88, rel=0.003)
    assert compute_buffer_bytes(FALCON_7B, RunSettings(n_ctx=512)) / MiB == pytest.approx(144.75, rel=0.003)
    assert compute_buffer_bytes(FALCON_40B, RunSettings(n_ctx=2048)) / MiB == pytest.approx(566.01, rel=0.003)


def test_a_row_length_that_does_not_fit_the_block_falls_back_like_llama_quantize():
    types = {t.name: t.type_name for t in layout_from_recipe(SMOL, "Q4_K_M").tensors}
    assert types["output.weight"] == "Q8_0"          # Q6_K needs rows of 256; 576 is not
    assert types["blk.0.attn_q.weight"] == "Q5_0"    # Q4_K -> Q5_0


def test_repack_depends_on_the_cpu_and_excludes_token_embd_and_q6_k_output():
    assert repacked_types(AVX2) == {"Q4_0", "Q4_K", "IQ4_NL", "MXFP4"}
    assert "Q8_0" not in repacked_types(AVX2 | {"avx512f"})
    assert "Q8_0" in repacked_types(frozenset({"neon", "dotprod"}))
    layout = layout_from_recipe(L7, "Q4_0")
    est = estimate(L7, layout, RunSettings(n_ctx=4096), cpu_flags=AVX2)
    blocks = sum(t.n_bytes for t in layout.tensors if t.name.startswith("blk.") and t.type_name == "Q4_0")
    assert est.host.repack == blocks == 3_642_753_024       # llama.cpp logs CPU_REPACK 3474.00 MiB
    assert estimate(L7, layout, RunSettings(repack=False), cpu_flags=AVX2).host.repack == 0
    assert estimate(L7, layout_from_recipe(L7, "Q8_0"), RunSettings(), cpu_flags=AVX2).host.repack == 0
    assert estimate(L7, layout, RunSettings(), cpu_flags=frozenset()).host.repack == 0


# compute buffers llama.cpp logged for llama-shaped models (2-layer shape-true files; the size does not depend on
# n_layer): (shape, n_ctx, n_ubatch, flash_attn) -> MiB
LOGGED_COMPUTE = [
    (L7, 512, 512, False, 105.51), (L7, 2048, 512, False, 188.01), (L7, 4096, 512, False, 320.01),
    (L7, 4096, 128, False, 80.0), (L7, 4096, 256, False, 160.0), (L7, 1000, 512, False, 122.01),
    (L7, 512, 512, True, 97.01), (L7, 4096, 512, True, 100.51),
    (L13, 512, 512, False, 132.01), (L13, 4096, 512, False, 398.01), (L13, 4096, 128, False, 99.5),
    (L13, 512, 512, True, 121.51), (L13, 4096, 512, True, 125.01),
    (L70, 2048, 512, False, 344.01), (L70, 4096, 512, False, 604.01), (L70, 4096, 512, True, 236.01),
    (SMOL, 512, 512, False, 98.25), (SMOL, 2048, 512, False, 99.38),
    # Grok-architecture (MoE, 8 experts, 2 used; flash attention is forced off for grok)
    (TINY_GROK, 512, 512, True, 41.04), (TINY_GROK, 4096, 512, False, 160.01),
    (TINY_GROK_F2, 512, 512, False, 65.04), (TINY_GROK_F2, 2048, 512, True, 92.01),
]


@pytest.mark.parametrize("shape, n_ctx, n_ubatch, fa, mib", LOGGED_COMPUTE)
def test_compute_buffer_matches_llama_cpp_logs(shape, n_ctx, n_ubatch, fa, mib):
    got = compute_buffer_bytes(shape, RunSettings(n_ctx=n_ctx, n_ubatch=n_ubatch, flash_attn=fa)) / MiB
    assert abs(got - mib) / mib < 0.03, got


def test_parallel_sequences_attend_over_their_own_stream():
    # llama.cpp -c 8192 -np 4 logs the same compute buffer as -c 2048, and an output row per sequence
    four = RunSettings(n_ctx=8192, n_parallel=4)
    assert compute_buffer_bytes(L7, four) == compute_buffer_bytes(L7, RunSettings(n_ctx=2048))
    assert output_buffer_bytes(L7, four) == 4 * 32000 * 4


def test_the_host_total_adds_every_term():
    est = estimate(L7, layout_from_recipe(L7, "Q4_0"), RunSettings(n_ctx=4096), cpu_flags=AVX2)
    h = est.host
    assert h.total == h.weights + h.kv_cache + h.compute_committed + h.output + h.repack + h.overhead + h.margin
    assert 9.2 * 2**30 < h.total < 9.8 * 2**30   # measured peak RSS 9225 MiB + the compute buffer
    assert est.total == h.total and any("CPU_REPACK" in n for n in est.notes)


def test_gpus_carry_context_overhead_and_margin():
    est = estimate(L13, layout_from_recipe(L13, "Q4_K_M"), RunSettings(n_gpu_layers=-1), gpus=1)
    g = est.gpu(0)
    assert g.overhead > 0 and g.margin > 0 and g.compute > 0 and g.n_layers == 40
    assert g.total == g.weights + g.kv_cache + g.compute + g.overhead + g.margin
    with pytest.raises(UsageError):
        est.gpu(3)


def test_grok_sizes_are_close_to_the_published_shards():
    # Arki05/Grok-1-GGUF totals (GB); Q2_K is 116.3 GB in mradermacher's newer quantization, which ours follows
    for quant, gb, tol in (("Q6_K", 259.8, 0.005), ("Q4_K", 186.0, 0.04), ("Q2_K", 112.4, 0.04),
                           ("IQ3_XS", 125.4, 0.04)):
        size = layout_from_recipe(GROK, quant).file_bytes / 1e9
        assert abs(size - gb) / gb < tol, (quant, size)
