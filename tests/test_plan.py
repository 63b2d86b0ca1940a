"""The planner on the shipped hardware profiles: the issue's four examples, partial offload, multi-GPU, Grok-1
with experts in RAM, unified memory, --max-download, --license open, refusals, and that pruning never changes
the choice."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest

from runner.plan import select as planmod
from runner.model.catalog import load_catalog, quant_rank
from runner.core.errors import DoesNotFitError, UnknownModelError, UsageError
from runner.plan.estimate import estimate
from runner.hardware.types import CPU, GPU, HardwareProfile
from runner.hardware.profiles import load_profile
from runner.plan.select import Preferences, make_plan, require_fit
from runner.plan.fit import check_fit
from runner.plan.speed import hardware_fingerprint

GiB = 1024**3
PROFILES = ["ci-2core-24gb", "laptop-16gb", "rtx3060-12gb", "rtx4090-24gb", "2x-rtx3090", "a100-80gb",
            "3x-a100-80gb", "8x-h100-80gb", "m2-max-96gb", "workstation-256gb", "cluster-host-64gb"]


@pytest.fixture(scope="module")
def catalog():
    return load_catalog()


def _plan(profile: str, catalog, **prefs):
    return make_plan(load_profile(profile), Preferences(**prefs), catalog)


def _assert_fits(c, hw):
    """The chosen configuration fits every device, re-checked from a fresh estimate."""
    from runner.model.layout import layout_from_recipe

    mem = estimate(c.entry.shape, layout_from_recipe(c.entry.shape, c.entry.quant), c.settings,
                   gpus=len(hw.gpus), gpu_free=tuple(g.free_bytes for g in hw.gpus), cpu_flags=hw.cpu.flags,
                   unified=hw.unified_memory)
    assert mem == c.estimate
    fits, why, _ = check_fit(mem, hw)
    assert fits, why


# --------------------------------------------------------------------------------------------- the four examples
def test_this_machine_gets_a_llama2_7b_or_13b_on_cpu_with_honest_speed(catalog):
    hw = load_profile("ci-2core-24gb")
    r = make_plan(hw, Preferences(), catalog)
    c = require_fit(r)
    assert c.entry.family == "llama2" and c.entry.params_b < 14
    assert c.placement == "cpu" and c.settings.n_gpu_layers == 0
    assert c.n_ctx == 4096                       # Llama 2's training context, not reduced
    assert 2.0 <= c.speed.decode_tps <= 8.0      # a few tok/s: 7B Q4_0 measures 7.3 here
    assert c.speed.basis == "predicted"
    _assert_fits(c, hw)


def test_rtx4090_runs_13b_fully_on_gpu(catalog):
    hw = load_profile("rtx4090-24gb")
    c = require_fit(make_plan(hw, Preferences(), catalog))
    assert c.entry.model.startswith("llama-2-13b")
    assert c.placement == "gpu" and c.settings.n_gpu_layers == c.entry.shape.n_layer + 1
    assert c.speed.decode_tps > 20
    _assert_fits(c, hw)


def test_8x_h100_runs_grok1_q6k_or_better_on_gpu(catalog):
    hw = load_profile("8x-h100-80gb")
    c = require_fit(make_plan(hw, Preferences(), catalog))
    assert c.entry.family == "grok1"
    assert quant_rank(c.entry.quant) >= quant_rank("Q6_K")
    assert c.placement == "gpu" and not c.settings.experts_on_cpu
    assert len(c.settings.tensor_split) == 8
    assert sum(1 for d in c.estimate.devices if d.device.startswith("GPU") and d.weights) == 8
    assert c.n_ctx == 8192
    _assert_fits(c, hw)


def test_16gb_laptop_asking_for_grok1_is_refused_naming_at_least_112gb(catalog):
    r = _plan("laptop-16gb", catalog, family="grok1")
    assert r.chosen is None
    with pytest.raises(DoesNotFitError) as err:
        require_fit(r)
    e = err.value
    assert e.exit_code == 3
    gb = [float(x) for x in re.findall(r"([0-9.]+) GB\b", e.message)]
    assert gb and max(gb) >= 112
    assert planmod.smallest_requirement(r).need_bytes >= 112e9
    assert "more hosts" in e.hint and "grok-1" in e.message


# --------------------------------------------------------------------------------------------- placements
def test_partial_offload_places_the_most_layers_that_fit(catalog):
    hw = load_profile("rtx3060-12gb")
    hw = replace(hw, ram_available_bytes=64 * GiB, ram_total_bytes=64 * GiB)
    c = require_fit(make_plan(hw, Preferences(model="llama-2-70b-chat:Q4_K_M"), catalog))
    n = c.entry.shape.n_layer
    assert c.placement == "partial" and 0 < c.settings.n_gpu_layers < n + 1
    gpu = c.estimate.gpu(0)
    assert gpu.total <= hw.gpus[0].free_bytes
    assert c.n_ctx == 4096 and c.settings.type_k == "f16"
    # one more layer would not fit on the GPU
    from runner.model.layout import layout_from_recipe

    more = replace(c.settings, n_gpu_layers=c.settings.n_gpu_layers + 1)
    mem = estimate(c.entry.shape, layout_from_recipe(c.entry.shape, c.entry.quant), more, gpus=1,
                   gpu_free=(hw.gpus[0].free_bytes,), cpu_flags=hw.cpu.flags)
    assert mem.gpu(0).total > hw.gpus[0].free_bytes
    assert c.speed.bottleneck == "CPU"
    _assert_fits(c, hw)


def test_two_gpus_split_in_proportion_to_free_memory(catalog):
    hw = load_profile("2x-rtx3090")
    c = require_fit(make_plan(hw, Preferences(model="llama-2-70b-chat:Q4_K_M"), catalog))
    assert c.placement == "gpu"
    free = [g.free_bytes for g in hw.gpus]
    assert c.settings.tensor_split == pytest.approx([f / sum(free) for f in free], abs=1e-3)
    w0, w1 = c.estimate.gpu(0).weights, c.estimate.gpu(1).weights
    assert w0 > 15 * GiB and w1 > 15 * GiB
    _assert_fits(c, hw)


def test_grok1_with_experts_in_ram_on_one_80gb_gpu_and_256gb_ram(catalog):
    hw = load_profile("a100-80gb")
    r = make_plan(hw, Preferences(family="grok1"), catalog)
    c = require_fit(r)
    assert c.placement == "experts-in-ram" and c.settings.experts_on_cpu
    assert c.settings.n_gpu_layers == c.entry.shape.n_layer + 1
    host, gpu = c.estimate.host, c.estimate.gpu(0)
    assert host.weights > 10 * gpu.weights           # the experts (≈98% of the weights) stay in RAM
    assert gpu.weights < 16 * GiB                    # the dense layers are a few GB
    _assert_fits(c, hw)
    # full offload of any Grok-1 quant was tried first and ruled out by the GPU's memory
    full = [x for x in r.rejected if x.placement == "gpu" and not x.fits and x.estimate is not None]
    assert full and all("GPU0" in x.reason for x in full)


def test_unified_memory_counts_gpu_and_host_against_the_same_ram(catalog):
    hw = load_profile("m2-max-96gb")
    assert hw.unified_memory
    c = require_fit(make_plan(hw, Preferences(), catalog))
    assert c.placement == "gpu"
    assert c.estimate.total <= hw.ram_available_bytes
    _assert_fits(c, hw)
    # a GPU share that fits its own limit but not the shared RAM is refused, naming unified memory
    tight = replace(hw, ram_available_bytes=c.estimate.total - GiB)
    fits, why, _ = check_fit(c.estimate, tight)
    assert not fits and "unified memory" in why


# --------------------------------------------------------------------------------------------- preferences
def test_max_download_rules_out_big_files_with_the_number(catalog):
    r = _plan("a100-80gb", catalog, max_download_bytes=20 * 10**9)
    c = require_fit(r)
    assert c.entry.size_bytes <= 20e9
    too_big = [x for x in r.rejected if x.entry.size_bytes > 20e9]
    assert too_big and all(re.fullmatch(r"download [0-9.]+ GB > --max-download 20\.0 GB", x.reason)
                           for x in too_big)


def test_license_open_never_yields_a_llama2_licence_model(catalog):
    for profile in PROFILES:
        r = _plan(profile, catalog, license_open=True)
        assert r.chosen is None or r.chosen.entry.license_open, profile
        assert all(x.entry.license_open for x in r.rejected), profile
        if r.chosen is not None:
            assert r.chosen.entry.license != "llama2"
    assert _plan("8x-h100-80gb", catalog, license_open=True).chosen.entry.family == "grok1"
    r = _plan("ci-2core-24gb", catalog, license_open=True)
    assert any("left out models under llama2" in n for n in r.notes)


def test_explicit_context_is_kept_and_never_reduced(catalog):
    r = _plan("ci-2core-24gb", catalog, model="llama-2-13b-chat:Q8_0", n_ctx=2048)
    assert require_fit(r).n_ctx == 2048
    tiny = replace(load_profile("ci-2core-24gb"), ram_available_bytes=13 * GiB)
    r = make_plan(tiny, Preferences(model="llama-2-13b-chat:Q8_0", n_ctx=4096), catalog)
    assert r.chosen is None
    assert all(x.n_ctx == 4096 for x in r.rejected if x.estimate is not None)


def test_context_and_kv_cache_shrink_before_a_model_is_given_up(catalog):
    hw = replace(load_profile("ci-2core-24gb"), ram_available_bytes=15 * GiB)
    r = make_plan(hw, Preferences(model="llama-2-13b-chat:Q8_0"), catalog)
    c = require_fit(r)
    assert (c.n_ctx, c.settings.type_k) != (4096, "f16")
    assert c.n_ctx >= 2048
    if c.settings.type_k == "q8_0":
        assert c.settings.flash_attn  # llama.cpp needs flash attention for a quantized V cache
    tried = [(x.n_ctx, x.settings.type_k) for x in r.rejected if x.entry == c.entry]
    assert (4096, "f16") in tried   # the richer configuration was tried first and ruled out
    assert any("to fit" in n or "reduced" in n for n in r.notes)


def test_prefer_speed_picks_the_fastest_at_or_above_q4(catalog):
    quality = require_fit(_plan("rtx4090-24gb", catalog))
    fast = require_fit(_plan("rtx4090-24gb", catalog, prefer="speed"))
    assert quant_rank(fast.entry.quant) >= quant_rank("Q4_0")
    assert fast.speed.decode_tps > quality.speed.decode_tps
    assert fast.speed.decode_tps >= 10


def test_parallel_sequences_multiply_the_context(catalog):
    c = require_fit(_plan("rtx4090-24gb", catalog, model="llama-2-7b-chat:Q4_K_M", n_parallel=4))
    assert c.settings.n_parallel == 4 and c.settings.n_ctx == 4 * c.n_ctx
    assert c.speed.aggregate_decode_tps > c.speed.decode_tps


def test_bad_preferences_are_usage_errors(catalog):
    with pytest.raises(UsageError, match="quality or speed"):
        Preferences(prefer="fast")
    with pytest.raises(UsageError, match="--parallel"):
        Preferences(n_parallel=0)
    with pytest.raises(UsageError, match="unknown family"):
        _plan("ci-2core-24gb", catalog, family="gpt5")
    with pytest.raises(UnknownModelError):
        _plan("ci-2core-24gb", catalog, model="llama-3-8b")


def test_rejections_name_one_number(catalog):
    r = _plan("rtx4090-24gb", catalog, model="llama-2-70b-chat:Q4_K_M")
    gpu_full = [x for x in r.rejected if x.placement == "gpu" and not x.fits]
    assert gpu_full
    for x in gpu_full:
        assert re.fullmatch(r"needs [0-9.]+ GiB on GPU0, [0-9.]+ GiB free", x.reason), x.reason
    r = _plan("laptop-16gb", catalog, model="llama-2-70b-chat")
    forms = (r"needs [0-9.]+ GiB RAM, [0-9.]+ GiB available", r"weights alone need [0-9.]+ GiB, [0-9.]+ GiB RAM available",
             r"needs [0-9.]+ GiB at least, [0-9.]+ GiB RAM available")
    for x in r.rejected:
        assert any(re.fullmatch(f, x.reason) for f in forms), x.reason
    r = _plan("laptop-16gb", catalog, model="llama-2-13b-chat:Q6_K", n_ctx=4096)
    assert any(re.fullmatch(r"needs [0-9.]+ GiB RAM, [0-9.]+ GiB available", x.reason) for x in r.rejected)


# --------------------------------------------------------------------------------------------- invariants
@pytest.mark.parametrize("profile", PROFILES)
def test_pruning_never_changes_the_choice(catalog, profile):
    hw = load_profile(profile)
    fast = make_plan(hw, Preferences(), catalog)
    full = make_plan(hw, Preferences(), catalog, exhaustive=True)
    assert (fast.chosen is None) == (full.chosen is None)
    if fast.chosen is not None:
        assert (fast.chosen.name, fast.chosen.settings) == (full.chosen.name, full.chosen.settings)
        _assert_fits(fast.chosen, hw)
    # every entry appears, chosen or rejected
    names = {x.name for x in full.rejected} | ({full.chosen.name} if full.chosen else set())
    assert names == {e.name for e in catalog if e.family in planmod.DEFAULT_FAMILIES}


def test_bench_results_mark_the_speed_measured(catalog, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMRUN_HOME", str(tmp_path))
    hw = load_profile("ci-2core-24gb")
    first = require_fit(make_plan(hw, Preferences(), catalog))
    (tmp_path / "bench.json").write_text(json.dumps(
        {first.name: {"decode_tps": 1.25, "prompt_tps": 9.0, "fingerprint": hardware_fingerprint(hw)}}))
    again = require_fit(make_plan(hw, Preferences(model=first.name), catalog))
    assert again.speed.basis == "measured" and again.speed.decode_tps == 1.25


def test_json_is_serializable(catalog):
    r = _plan("a100-80gb", catalog, family="grok1")
    data = json.loads(json.dumps(r.to_dict(), default=str))
    assert data["chosen"]["experts_on_cpu"] is True
    assert data["chosen"]["memory"]["GPU0"]["total"] > 0
    assert data["chosen"]["speed"]["basis"] == "predicted"


def test_a_machine_without_enough_for_anything_gets_the_smallest_requirement(catalog):
    cpu = CPU("tiny", "x86_64", 1, 1, 1.0, frozenset())
    hw = HardwareProfile("tiny", cpu, 2 * GiB, 1 * GiB, (GPU(0, "NVIDIA GeForce RTX 3060", 2 * GiB, GiB),))
    r = make_plan(hw, Preferences(), catalog)
    with pytest.raises(DoesNotFitError) as err:
        require_fit(r)
    small = planmod.smallest_requirement(r)
    assert small.entry.model.startswith("llama-2-7b")
    assert "smaller quant" not in err.value.hint or quant_rank(small.entry.quant) > 0


def test_bench_results_calibrate_other_models_on_the_same_machine(catalog, tmp_path, monkeypatch):
    hw = load_profile("ci-2core-24gb")
    base = require_fit(make_plan(hw, Preferences(model="llama-2-13b-chat:Q4_K_M"), catalog))
    ref = require_fit(make_plan(hw, Preferences(model="llama-2-7b-chat:Q4_0"), catalog))
    monkeypatch.setenv("LLMRUN_HOME", str(tmp_path))
    (tmp_path / "bench.json").write_text(json.dumps({
        ref.name: {"decode_tps": ref.speed.decode_tps / 2, "fingerprint": hardware_fingerprint(hw)},
        "llama-2-70b-chat:Q2_K": {"decode_tps": 99.0, "fingerprint": "some other machine"}}))
    r = make_plan(hw, Preferences(model="llama-2-13b-chat:Q4_K_M"), catalog)
    c = require_fit(r)
    assert c.speed.basis == "calibrated"
    assert c.speed.decode_tps == pytest.approx(base.speed.decode_tps / 2)
    assert any("calibrated" in n for n in r.notes)


def test_grok_quantizes_only_the_k_cache(catalog):
    """llama.cpp runs grok without flash attention, and a quantized V cache needs it: q8_0 applies to K only."""
    r = make_plan(load_profile("a100-80gb"), Preferences(family="grok1"), catalog, exhaustive=True)
    grok_q8 = [c for c in (r.chosen, *r.rejected) if c and c.estimate is not None and c.settings.type_k == "q8_0"]
    assert grok_q8
    assert all(c.settings.type_v == "f16" and not c.settings.flash_attn for c in grok_q8)
    llama = require_fit(make_plan(replace(load_profile("ci-2core-24gb"), ram_available_bytes=15 * GiB),
                                  Preferences(model="llama-2-13b-chat:Q8_0"), catalog))
    if llama.settings.type_k == "q8_0":
        assert llama.settings.type_v == "q8_0" and llama.settings.flash_attn


def test_when_nothing_is_usable_the_choice_stays_near_the_fastest(catalog):
    slow = replace(load_profile("ci-2core-24gb"), memory_bandwidth_gbps=8.0)
    r = make_plan(slow, Preferences(), catalog)
    c = require_fit(r)
    assert c.speed.decode_tps < planmod.USABLE_DECODE_TPS
    assert quant_rank(c.entry.quant) >= quant_rank(planmod.QUALITY_FLOOR_QUANT)
    full = make_plan(slow, Preferences(), catalog, exhaustive=True)
    fastest = max(x.speed.decode_tps for x in (full.chosen, *full.rejected) if x.fits and x.speed
                  and quant_rank(x.entry.quant) >= quant_rank(planmod.QUALITY_FLOOR_QUANT))
    assert c.speed.decode_tps >= planmod.NEAR_FASTEST * fastest
    assert (full.chosen.name, full.chosen.settings) == (c.name, c.settings)
    assert any("best quality that fits is" in n for n in r.notes)


def test_falcon_plans_through_its_own_tensor_table_and_multi_query_kv(catalog):
    # Falcon-7B on a 24 GB GPU: the best quant, fully offloaded, at its 2048-token training context; multi-query
    # attention makes its KV cache tiny (one 64-wide head: 32 layers * 2 * 64 * 2 bytes = 8 KiB per token)
    hw = load_profile("rtx4090-24gb")
    c = require_fit(make_plan(hw, Preferences(model="falcon-7b-instruct"), catalog))
    assert c.entry.family == "falcon" and c.entry.quant == "Q8_0"
    assert c.placement == "gpu" and c.settings.n_gpu_layers == 33 and c.n_ctx == 2048
    assert c.estimate.gpu(0).kv_cache == 8 * 1024 * 2048
    _assert_fits(c, hw)
    # Falcon-40B: Q8_0 (44 GB) fits an 80 GB A100 whole; on the 24 GB card only part of it is offloaded
    hw80 = load_profile("a100-80gb")
    c40 = require_fit(make_plan(hw80, Preferences(model="falcon-40b-instruct"), catalog))
    assert c40.entry.quant == "Q8_0" and c40.placement == "gpu" and c40.settings.n_gpu_layers == 61
    assert c40.estimate.gpu(0).kv_cache == 60 * 2 * 512 * 2 * 2048     # grouped-query: 8 heads of 64
    _assert_fits(c40, hw80)
    part = require_fit(make_plan(hw, Preferences(model="falcon-40b-instruct"), catalog))
    assert part.placement == "partial" and 0 < part.settings.n_gpu_layers < 61
    _assert_fits(part, hw)
