"""What `llmrun serve` feeds the model pool (runner/app/serving.py): durations (keep_alive), the models.toml
settings file, the memory budget, what a model needs (the plan's estimate) and holds (llama.cpp's buffers), and
the real loader with the demo model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from runner.app.models import ModelIndex, ModelRef, ServedFile
from runner.app.pool_values import Budget
from runner.app.serving import (ModelSettings, PlannedLoader, budget_from, need_of, plan_profile, ram_margin,
                                read_models_config, resident_of)
from runner.core.errors import ConfigError, DoesNotFitError, UsageError
from runner.core.units import FOREVER, format_duration, parse_duration
from runner.hardware.profiles import load_profile, with_overrides
from runner.model.catalog import load_catalog
from runner.plan.estimate import HOST_OVERHEAD_BYTES

MiB, GiB = 1024 ** 2, 1024 ** 3


@pytest.mark.parametrize("value, seconds", [
    (10, 10.0), (2.5, 2.5), ("10", 10.0), ("0", 0.0), (0, 0.0), ("5m", 300.0), ("1h30m", 5400.0), ("300ms", 0.3),
    ("1.5h", 5400.0), ("10s", 10.0), ("-1", FOREVER), (-1, FOREVER), ("-5m", FOREVER), (" 2m ", 120.0)])
def test_durations_as_ollama_reads_keep_alive(value, seconds):
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["forever", "5 minutes", "m", "", "1d", True, "nan"])
def test_bad_durations_say_what_would_be_right(bad):
    with pytest.raises(UsageError) as e:
        parse_duration(bad, what="keep_alive")
    assert "keep_alive" in e.value.message


def test_format_duration():
    assert [format_duration(s) for s in (5, 300, 5400, 3661, FOREVER)] == ["5s", "5m", "1h30m", "1h1m1s", "forever"]


# ---------------------------------------------------------------------------------------------------- models.toml
def test_models_config_is_read_and_checked(tmp_path, demo_gguf):
    p = tmp_path / "models.toml"
    p.write_text(f'[models."smollm2-135m"]\nctx = 8192\nparallel = 2\nkeep_alive = "30m"\n\n'
                 f'[models.notes]\npath = "{demo_gguf}"\nkeep_alive = -1\n')
    c = read_models_config(p)
    assert c.models["smollm2-135m"] == ModelSettings(ctx=8192, parallel=2, keep_alive=1800.0)
    assert c.models["notes"].keep_alive == math.inf
    assert c.files == (ServedFile("notes", Path(demo_gguf), merge=False),)


@pytest.mark.parametrize("text, says", [
    ('[models.a]\nctx = "big"\n', 'ctx must be an integer'),
    ('[models.a]\nparallel = 0\n', 'parallel must be an integer from 1'),
    ('[models.a]\nkeep_alive = "soon"\n', 'keep_alive: cannot read'),
    ('[models.a]\ncontext = 4096\n', 'unknown key(s) context'),
    ('[models.a]\npath = "nope.gguf"\n', 'no such file'),
    ('[model.a]\nctx = 1\n', 'unknown top-level key(s) model'),
    ('[models]\na = 1\n', 'must be a table'),
    ('[models.a\n', 'not valid TOML'),
])
def test_models_config_mistakes_name_the_table_and_key(tmp_path, text, says):
    p = tmp_path / "models.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        read_models_config(p)
    assert says in e.value.message and str(p) in e.value.message


# ---------------------------------------------------------------------------------------------------- budget
def test_the_budget_from_the_probe_or_the_options():
    hw = load_profile("rtx4090-24gb")
    b = budget_from(hw, process_bytes=80 * MiB)
    assert b.limits == {"CPU": hw.ram_available_bytes - ram_margin(hw), "GPU0": hw.gpus[0].free_bytes}
    assert b.process == {"CPU": 80 * MiB} and b.for_models("CPU") == b.limits["CPU"] - 80 * MiB
    assert ram_margin(hw) == 2 * GiB, "5% of 64 GB, at most 2 GiB"
    assert ram_margin(load_profile("ci-2core-24gb")) == int(0.05 * 25276502016)
    b = budget_from(hw, max_memory=6 * GiB, max_vram=[10 * GiB])
    assert b.limits == {"CPU": 6 * GiB, "GPU0": 10 * GiB} and "--max-memory 6.0 GiB" in b.source
    two = with_overrides(hw, gpus=[24 * GiB, 12 * GiB])
    assert budget_from(two, max_vram=[20 * GiB, 8 * GiB]).limits["GPU1"] == 8 * GiB
    with pytest.raises(UsageError):
        budget_from(two, max_vram=[1, 2, 3])
    profile = plan_profile(hw, budget_from(hw, max_memory=6 * GiB, max_vram=[10 * GiB], process_bytes=80 * MiB))
    assert profile.ram_available_bytes == 6 * GiB - 80 * MiB + HOST_OVERHEAD_BYTES
    assert profile.gpus[0].free_bytes == 10 * GiB and profile.name == "the memory budget"


def test_need_is_the_estimate_and_resident_is_llama_cpps_buffers(demo_gguf):
    loader = PlannedLoader(ModelIndex(), load_profile("ci-2core-24gb"), Budget({"CPU": 4 * GiB}))
    est = loader.prepare(ModelRef("demo", Path(demo_gguf))).launch.estimate
    host = est.host
    assert need_of(est) == {"CPU": host.needed - HOST_OVERHEAD_BYTES}
    buffers = {"CPU_Mapped model": 90 * MiB, "CPU KV": 48 * MiB, "CPU compute": 100 * MiB, "CPU output": 1 * MiB}
    per_model = host.overhead - HOST_OVERHEAD_BYTES
    # the host compute buffer counts at the share a graph touches (the estimate's committed part of it)
    assert host.compute_committed is not None and host.compute_committed < host.compute
    compute = round(100 * MiB * host.compute_committed / host.compute)
    assert resident_of(buffers, est) == {"CPU": 139 * MiB + compute + per_model - host.reclaimable}
    assert resident_of({}, est) == need_of(est), "no buffers logged: the estimate stands in"


# ---------------------------------------------------------------------------------------------------- the loader
def test_settings_per_model_over_the_defaults(tmp_path, demo_local):
    p = tmp_path / "models.toml"
    p.write_text('[models."smollm2-135m"]\nctx = 2048\nkeep_alive = "1h"\n')
    index = ModelIndex(catalog=load_catalog())
    loader = PlannedLoader(index, load_profile("ci-2core-24gb"), Budget({"CPU": 4 * GiB}),
                           defaults=ModelSettings(ctx=1024, parallel=3, keep_alive=300.0), config=read_models_config(p))
    ref = index.resolve("smollm2-135m:Q4_1")
    assert loader.settings(ref) == ModelSettings(ctx=2048, parallel=3, keep_alive=3600.0)
    assert loader.keep_alive(ModelRef("other", demo_local)) == 300.0
    loader.keep_forever(ModelRef("other", demo_local))
    assert loader.keep_alive(ModelRef("other", demo_local)) == FOREVER
    prepared = loader.prepare(ref)
    assert prepared.launch.settings.n_ctx == 2048 * 3 and prepared.launch.settings.n_parallel == 3
    assert prepared.card.quantization == "Q4_1" and prepared.card.name == "smollm2-135m:Q4_1"
    assert prepared.need["CPU"] > 100 * MiB and prepared.launch.summary.startswith("plan: smollm2-135m:Q4_1")


def test_a_catalog_model_that_never_fits_the_budget_gets_the_plans_numbers_and_advice(demo_local):
    index = ModelIndex(catalog=load_catalog())
    loader = PlannedLoader(index, load_profile("ci-2core-24gb"), Budget({"CPU": 100 * MiB}, {"CPU": 60 * MiB}))
    with pytest.raises(DoesNotFitError) as e:
        loader.prepare(index.resolve("smollm2-135m"))
    assert "can never fit the memory budget" in e.value.message and "needs" in e.value.message
    assert "MiB" in e.value.message and e.value.hint.startswith("ways out")


@pytest.mark.llama
def test_the_real_loader_measures_what_the_model_holds(demo_gguf):
    loader = PlannedLoader(ModelIndex(), load_profile("ci-2core-24gb"), Budget({"CPU": 4 * GiB}),
                           defaults=ModelSettings(ctx=1024, parallel=2), threads=1)
    prepared = loader.prepare(ModelRef("demo", Path(demo_gguf)))
    started = loader.load(prepared)
    try:
        assert started.engine.model_name == "demo" and started.engine.n_ctx == 1024
        assert started.resident == resident_of(started.engine.buffers, prepared.launch.estimate)
        # the embedding context the first embedding request creates: estimated, held by the pool on that request
        assert prepared.embedding["CPU"] > 150 * MiB, "the demo's embedding context: about 207 MiB"
        # measured and estimated agree to within the compute buffer's committed share (a few tens of MiB)
        assert abs(started.resident["CPU"] - prepared.need["CPU"]) < 64 * MiB
    finally:
        started.engine.close()


def test_serve_options_are_checked(tmp_path, demo_gguf):
    from runner.cli import cli

    r = CliRunner().invoke(cli, ["serve", "-m", str(demo_gguf), "-m", str(demo_gguf), "--name", "x"])
    assert r.exit_code == 2 and "--name names the one --model" in r.output
    r = CliRunner().invoke(cli, ["serve", "--keep-alive", "soon"])
    assert r.exit_code == 2 and "--keep-alive" in r.output
    r = CliRunner().invoke(cli, ["serve", "-m", str(demo_gguf), "--max-memory", "lots"])
    assert r.exit_code == 2 and "--max-memory" in r.output
    bad = tmp_path / "m.toml"
    bad.write_text("[models.a]\nctx = 0\n")
    r = CliRunner().invoke(cli, ["serve", "--config", str(bad)])
    assert r.exit_code == 2 and "ctx must be an integer" in r.output and "Traceback" not in r.output


def test_a_model_whose_weights_are_repacked_loads_without_mmap_so_rss_is_what_the_budget_counts(demo_gguf):
    from dataclasses import replace

    from runner.model.synth import ensure_synth

    entry = load_catalog().get("smollm2-135m")
    path = ensure_synth(entry.shape, "Q4_0", name=entry.model)        # Q4_0 is repacked on AVX2
    hw = load_profile("ci-2core-24gb")
    assert "avx2" in hw.cpu.flags
    loader = PlannedLoader(ModelIndex(), hw, Budget({"CPU": 4 * GiB}), defaults=ModelSettings(ctx=1024, parallel=1))
    prepared = loader.prepare(ModelRef("q4", path))
    est = prepared.launch.estimate
    assert prepared.launch.settings.use_mmap is False and est.host.repack > 0 and est.host.reclaimable == 0
    with_mmap = loader._estimate(*_shape_layout(path), replace(prepared.launch.settings, use_mmap=True))
    assert with_mmap.host.reclaimable > 0, "with mmap, the repacked tensors' file pages would stay in RSS"
    assert need_of(est) == need_of(with_mmap), "the same bytes must fit either way"
    kept = loader.prepare(ModelRef("demo", Path(demo_gguf)))           # Q4_1: nothing repacked, mmap kept
    assert kept.launch.settings.use_mmap is True and kept.launch.estimate.host.reclaimable == 0


@pytest.mark.llama
def test_loaded_without_mmap_llama_cpp_holds_no_mapped_weights():
    from runner.model.synth import ensure_synth

    entry = load_catalog().get("smollm2-135m")
    path = ensure_synth(entry.shape, "Q4_0", name=entry.model)
    loader = PlannedLoader(ModelIndex(), load_profile("ci-2core-24gb"), Budget({"CPU": 4 * GiB}),
                           defaults=ModelSettings(ctx=1024, parallel=1), threads=1)
    prepared = loader.prepare(ModelRef("q4", path))
    started = loader.load(prepared)
    try:
        buffers = dict(started.engine.buffers)
        assert "CPU_Mapped model" not in buffers and buffers["CPU model"] > 0 and buffers["CPU_REPACK model"] > 0
        assert abs(started.resident["CPU"] - prepared.need["CPU"]) < 64 * MiB
    finally:
        started.engine.close()


def _shape_layout(path):
    from runner.model.gguf import read_header
    from runner.model.layout import layout_from_header

    header = read_header(path, require_shape=True)
    return header.shape, layout_from_header(header)
