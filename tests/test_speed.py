"""Speed prediction: the GPU table, bandwidth-bound decode, MoE, multi-device sums, bench calibration."""

from __future__ import annotations

import json

import pytest

from runner.plan import speed
from runner.model.catalog import load_catalog
from runner.core.errors import ConfigError
from runner.core.run_settings import RunSettings
from runner.plan.estimate import estimate
from runner.model.layout import layout_from_recipe
from runner.hardware.types import CPU, GPU, HardwareProfile
from runner.hardware.profiles import load_profile

GiB = 1024**3
CPU2 = CPU("test cpu", "x86_64", 2, 2, 2.0, frozenset({"avx2", "fma"}))


def _cpu_only(bandwidth: float | None = 26.0) -> HardwareProfile:
    return HardwareProfile("t", CPU2, 24 * GiB, 22 * GiB, memory_bandwidth_gbps=bandwidth)


def test_gpu_table_exact_normalized_and_longest_match():
    assert speed.gpu_spec("NVIDIA GeForce RTX 4090")[:2] == (1008.0, 330.0)
    assert speed.gpu_spec("GeForce RTX 3060")[0] == 360.0
    assert speed.gpu_spec("NVIDIA GeForce RTX 3090 Ti")[0] == 1008.0   # not the RTX 3090 row (936)
    assert speed.gpu_spec("NVIDIA GeForce RTX 3090")[0] == 936.0
    assert speed.gpu_spec("NVIDIA H100 80GB HBM3")[0] == 3350.0
    assert speed.gpu_spec("NVIDIA H100 PCIe")[0] == 2000.0
    assert speed.gpu_spec("Apple M2 Max GPU")[0] == 400.0           # profile name carries a " GPU" suffix
    bw, tf, known = speed.gpu_spec("Some Future Accelerator 9000")
    assert not known and (bw, tf) == (250.0, 20.0)


def test_gpu_table_rejects_a_malformed_file(tmp_path):
    bad = tmp_path / "gpus.toml"
    bad.write_text('[default]\nbandwidth_gbps = 100\ntflops_fp16 = 1\n["X"]\nbandwidth_gbps = "fast"\n')
    with pytest.raises(ConfigError, match=r"\[X\]"):
        speed.load_gpu_table(str(bad))
    bad.write_text("not toml [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        speed.load_gpu_table(str(bad))


def _flows(entry, settings, hw, at_tokens):
    layout = layout_from_recipe(entry.shape, entry.quant)
    mem = estimate(entry.shape, layout, settings, gpus=len(hw.gpus), gpu_free=tuple(g.free_bytes for g in hw.gpus),
                   cpu_flags=hw.cpu.flags, unified=hw.unified_memory)
    shape = entry.shape
    weights = {d.device: d.weights for d in mem.devices}
    bpp = sum(weights.values()) / shape.n_params
    flows = speed.traffic(
        weights=weights, kv_cache={d.device: d.kv_cache for d in mem.devices}, n_ctx=settings.n_ctx,
        at_tokens=at_tokens, n_params=shape.n_params, token_embd_bytes=int(shape.n_vocab * shape.n_embd * bpp),
        expert_bytes=int(3 * shape.n_embd * shape.n_ff * shape.n_expert * shape.n_layer * bpp),
        n_expert=shape.n_expert, n_expert_used=shape.n_expert_used, experts_on_cpu=settings.experts_on_cpu)
    return flows, mem


def test_calibration_7b_q4_0_on_this_cpu():
    """memory-and-speed.md: Llama-2-7B Q4_0 decodes at 7.3 tok/s here, with ≈26 GB/s copy bandwidth."""
    entry = load_catalog().get("llama-2-7b-chat:Q4_0")
    hw = load_profile("ci-2core-24gb")
    assert hw.memory_bandwidth_gbps == 26.0
    flows, _ = _flows(entry, RunSettings(n_ctx=4096), hw, at_tokens=16)
    pred = speed.predict(flows, hw, at_tokens=16)
    assert pred.decode_tps == pytest.approx(7.3, rel=0.12)
    assert pred.basis == "predicted" and pred.bottleneck == "CPU"
    # the prompt is compute bound and faster than decode on a CPU, but not by orders of magnitude
    assert pred.decode_tps < pred.prompt_tps < 50 * pred.decode_tps


def test_decode_slows_with_context_read_and_is_bandwidth_proportional():
    entry = load_catalog().get("llama-2-7b-chat:Q4_K_M")
    hw = _cpu_only(26.0)
    short = speed.predict(_flows(entry, RunSettings(n_ctx=4096), hw, 16)[0], hw, at_tokens=16)
    long = speed.predict(_flows(entry, RunSettings(n_ctx=4096), hw, 4096)[0], hw, at_tokens=4096)
    assert long.decode_tps < short.decode_tps
    # 2 GiB of f16 KV read at 4096 tokens on top of ≈3.9 GB of weights
    assert long.bytes_per_token - short.bytes_per_token == pytest.approx(2 * GiB * (4096 - 16) / 4096, rel=0.01)
    cpu16 = CPU("test cpu", "x86_64", 16, 32, 32.0, frozenset({"avx2", "fma"}))
    slow16 = HardwareProfile("t", cpu16, 24 * GiB, 22 * GiB, memory_bandwidth_gbps=26.0)
    fast16 = HardwareProfile("t", cpu16, 24 * GiB, 22 * GiB, memory_bandwidth_gbps=52.0)
    a = speed.predict(_flows(entry, RunSettings(), slow16, 16)[0], slow16, at_tokens=16).decode_tps
    b = speed.predict(_flows(entry, RunSettings(), fast16, 16)[0], fast16, at_tokens=16).decode_tps
    assert b == pytest.approx(2 * a, rel=1e-6)


def test_a_two_core_cpu_is_compute_bound_with_enough_bandwidth():
    entry = load_catalog().get("llama-2-7b-chat:Q4_K_M")
    hw = _cpu_only(500.0)
    pred = speed.predict(_flows(entry, RunSettings(), hw, 16)[0], hw, at_tokens=16)
    flops_bound = speed.cpu_gflops(CPU2) * 1e9 / (2 * entry.shape.n_params)
    assert pred.decode_tps <= flops_bound * 1.03   # the embedding rows are not multiplied
    assert pred.decode_tps == pytest.approx(flops_bound, rel=0.05)


def test_moe_reads_only_the_used_experts():
    entry = load_catalog().get("grok-1:Q4_K")
    hw = load_profile("workstation-256gb")
    flows, mem = _flows(entry, RunSettings(n_ctx=8192), hw, 16)
    total = sum(d.weights for d in mem.devices)
    active = sum(f.weight_bytes for f in flows)
    # ≈98% of Grok-1's weights are experts, 2 of 8 used: a bit over a quarter is read per token
    assert 0.25 * total < active < 0.30 * total


def test_experts_in_ram_put_the_expert_reads_on_the_host():
    entry = load_catalog().get("grok-1:Q4_K")
    hw = load_profile("a100-80gb")
    s = RunSettings(n_ctx=8192, n_gpu_layers=65, experts_on_cpu=True)
    flows, mem = _flows(entry, s, hw, 16)
    by = {f.device: f for f in flows}
    assert by["CPU"].weight_bytes > 5 * by["GPU0"].weight_bytes
    pred = speed.predict(flows, hw, at_tokens=16)
    assert pred.bottleneck == "CPU"


def test_devices_a_token_passes_through_add_up():
    hw = HardwareProfile("t", CPU2, 64 * GiB, 60 * GiB, (GPU(0, "NVIDIA GeForce RTX 3090", 24 * GiB, 23 * GiB),),
                         memory_bandwidth_gbps=50.0)
    flows = [speed.Traffic("CPU", 5e9, 0, 5e9), speed.Traffic("GPU0", 5e9, 0, 5e9)]
    pred = speed.predict(flows, hw, at_tokens=1)
    t_cpu = 5e9 / (50e9 * speed.CPU_DECODE_EFFICIENCY)
    t_gpu = 5e9 / (936e9 * speed.GPU_DECODE_EFFICIENCY["nvidia"])
    assert pred.decode_tps == pytest.approx(1 / (t_cpu + t_gpu))
    assert pred.bottleneck == "CPU"


def test_parallel_sequences_share_the_weight_reads():
    entry = load_catalog().get("llama-2-7b-chat:Q4_K_M")
    hw = load_profile("rtx4090-24gb")
    s = RunSettings(n_ctx=4 * 2048, n_parallel=4, n_gpu_layers=33)
    flows, _ = _flows(entry, s, hw, 1024)
    one = speed.predict(flows, hw, at_tokens=1024, n_parallel=1)
    four = speed.predict(flows, hw, at_tokens=1024, n_parallel=4)
    assert one.decode_tps == four.decode_tps
    assert 2 * one.decode_tps < four.aggregate_decode_tps <= 4 * one.decode_tps


def test_unknown_host_bandwidth_uses_the_conservative_default():
    bw, src = speed.host_bandwidth(_cpu_only(None))
    assert (bw, src) == (speed.DEFAULT_HOST_BANDWIDTH_GBPS, "default")
    assert speed.host_bandwidth(_cpu_only(26.0)) == (26.0, "profile")


def test_bench_results_replace_the_prediction(tmp_path):
    hw = _cpu_only()
    fp = speed.hardware_fingerprint(hw)
    path = tmp_path / "bench.json"
    assert speed.load_bench(path) == {}
    path.write_text(json.dumps({"llama-2-7b-chat:Q4_0": {"decode_tps": 6.5, "prompt_tps": 20.0, "fingerprint": fp},
                                "other": {"decode_tps": 9.0, "fingerprint": "another machine"}}))
    bench = speed.load_bench(path)
    rec = speed.bench_record(bench, ("llama-2-7b-chat:Q4_0",), fp)
    assert rec is not None and speed.bench_record(bench, ("other",), fp) is None
    pred = speed.SpeedPrediction(7.0, 30.0, 7.0, 16, 1, "CPU", "predicted")
    measured = speed.apply_bench(pred, rec)
    assert (measured.decode_tps, measured.prompt_tps, measured.basis) == (6.5, 20.0, "measured")
    assert speed.apply_bench(pred, None, calibration=0.5).decode_tps == 3.5
    path.write_text("{broken")
    with pytest.raises(ConfigError, match="bench results"):
        speed.load_bench(path)


def test_fingerprint_ignores_free_memory():
    a = _cpu_only()
    b = HardwareProfile("t", CPU2, 24 * GiB, 3 * GiB, memory_bandwidth_gbps=26.0)
    assert speed.hardware_fingerprint(a) == speed.hardware_fingerprint(b)
