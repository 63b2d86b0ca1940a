"""Why each configuration was not chosen, as typed values: every kind the planner produces, its numbers, the
sentence printed from them, the --json object, and the CLI rows built from the kinds."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from click.testing import CliRunner

from runner.cli import cli
from runner.cli.plan import summarize
from runner.core.errors import DoesNotFitError
from runner.core.run_settings import RunSettings
from runner.hardware.profiles import load_profile
from runner.model.catalog import Catalog, load_catalog
from runner.plan import select as planmod
from runner.plan.fit import Candidate, capacities, capacity_total, check_fit, check_memory
from runner.plan.ruled_out import (BelowQualityFloor, CannotEstimate, MachineTooSmall, Memory, NotEstimated,
                                   OverDownloadLimit, RankedLower, RuledOut, RuledOutKind, Slower, TooBig,
                                   TooBigForUnifiedMemory, TooSlow, TooSlowNotEstimated, WeightsTooBig)
from runner.plan.select import Preferences, make_plan, require_fit

GiB = 1024**3
NOT_ESTIMATED_KINDS = {RuledOutKind.WEIGHTS_TOO_BIG, RuledOutKind.OVER_DOWNLOAD_LIMIT, RuledOutKind.CANNOT_ESTIMATE,
                       RuledOutKind.TOO_SLOW_NOT_ESTIMATED, RuledOutKind.NOT_ESTIMATED}
FIT_KINDS = {RuledOutKind.TOO_SLOW, RuledOutKind.SLOWER, RuledOutKind.BELOW_QUALITY_FLOOR, RuledOutKind.RANKED_LOWER}


@pytest.fixture(scope="module")
def catalog():
    return load_catalog()


def _plan(profile: str, catalog, **prefs):
    return make_plan(load_profile(profile), Preferences(**prefs), catalog)


def _of(result, cls):
    return [c for c in result.rejected if isinstance(c.ruled_out, cls)]


@pytest.mark.parametrize("profile,prefs", [
    ("rtx4090-24gb", {}), ("rtx4090-24gb", {"prefer": "speed"}), ("2x-rtx3090", {"n_ctx": 100000}),
    ("m2-max-96gb", {"n_ctx": 100000}), ("a100-80gb", {"max_download_bytes": 20 * 10**9}),
    ("ci-2core-24gb", {"family": "grok1"}), ("ci-2core-24gb", {"family": "any"})])
def test_every_candidate_not_chosen_says_why_with_a_kind_that_matches_it(catalog, profile, prefs):
    r = _plan(profile, catalog, **prefs)
    assert r.chosen is None or r.chosen.ruled_out is None
    for c in r.rejected:
        why = c.ruled_out
        assert isinstance(why, RuledOut), c.name
        assert c.reason == why.reason and c.reason
        assert c.fits == (why.kind in FIT_KINDS), (c.name, why)
        # never placed nor estimated exactly when ruled out before estimating: no dummy placement or figures
        assert (c.estimate is None) == (why.kind in NOT_ESTIMATED_KINDS) == (c.placement is None), (c.name, why)
        if c.estimate is not None:
            assert c.need_bytes == c.estimate.total and c.shortfall is not None
        elif why.kind is not RuledOutKind.WEIGHTS_TOO_BIG:
            assert c.need_bytes is None and c.shortfall is None
        if why.kind in FIT_KINDS:
            assert r.chosen is not None and getattr(why, "than") == r.chosen.name
        assert why.to_dict()["kind"] == why.kind.value


def test_too_big_names_the_device_and_its_figures(catalog):
    hw = load_profile("rtx4090-24gb")
    r = make_plan(hw, Preferences(model="llama-2-70b-chat:Q4_K_M"), catalog)
    gpu_full = [c for c in r.rejected if c.placement == "gpu"]
    assert gpu_full
    for c in gpu_full:
        why = c.ruled_out
        assert isinstance(why, TooBig) and why.kind is RuledOutKind.TOO_BIG
        assert why.device == "GPU0" and not why.unified
        assert why.available == hw.gpus[0].free_bytes == capacities(hw)["GPU0"]
        assert why.needed == next(d.needed for d in c.estimate.devices if d.device == "GPU0") > why.available
        assert c.shortfall == pytest.approx(why.needed / why.available)
        assert why.reason.startswith("needs ") and why.reason.endswith(" free") and "on GPU0" in why.reason
    host = TooBig("CPU", 30 * GiB, 27 * GiB)
    assert host.reason == "needs 30.0 GiB RAM, 27.0 GiB available"
    assert TooBig("CPU", 30 * GiB, 27 * GiB, unified=True).reason == "needs 30.0 GiB unified memory, 27.0 GiB available"


def test_unified_memory_shortfall_is_its_own_kind(catalog):
    hw = load_profile("m2-max-96gb")
    c = require_fit(make_plan(hw, Preferences(), catalog))
    tight = replace(hw, ram_available_bytes=c.estimate.total - GiB)
    check = check_memory(c.estimate, tight)
    assert not check.fits and isinstance(check.short, TooBigForUnifiedMemory)
    assert check.short.needed == sum(d.needed for d in c.estimate.devices)
    assert check.short.available == tight.ram_available_bytes
    assert check_fit(c.estimate, tight) == (False, check.short.reason, check.shortfall)
    assert check.short.reason.startswith("needs ") and " of unified memory, " in check.short.reason
    r = _plan("m2-max-96gb", catalog, n_ctx=100000)
    assert _of(r, TooBigForUnifiedMemory)
    for x in _of(r, TooBigForUnifiedMemory):
        assert x.ruled_out.available == hw.ram_available_bytes < x.ruled_out.needed


def test_over_the_download_limit_has_the_size_and_the_limit(catalog):
    r = _plan("a100-80gb", catalog, max_download_bytes=20 * 10**9)
    over = _of(r, OverDownloadLimit)
    assert over and {c.entry.name for c in over} == {c.entry.name for c in r.rejected if c.entry.size_bytes > 20e9}
    for c in over:
        assert (c.ruled_out.size, c.ruled_out.limit) == (c.entry.size_bytes, 20 * 10**9)
        assert c.ruled_out.to_dict() == {"kind": "over_download_limit", "size": c.entry.size_bytes,
                                         "limit": 20 * 10**9}
    assert OverDownloadLimit(41_400_000_000, 20 * 10**9).reason == "download 41.4 GB > --max-download 20.0 GB"


def test_weights_too_big_and_machine_too_small_carry_what_all_memory_holds(catalog):
    hw = load_profile("ci-2core-24gb")
    r = make_plan(hw, Preferences(family="grok1"), catalog)
    assert r.chosen is None
    big = _of(r, WeightsTooBig)
    assert big
    for c in big:
        why = c.ruled_out
        assert why.needed == int(c.entry.size_bytes * planmod.SIZE_FLOOR_SHARE) == c.need_bytes
        assert why.available == capacity_total(hw) and why.memory is Memory.RAM
        assert why.reason.startswith("weights alone need ") and why.reason.endswith(" RAM available")
    small = _of(r, MachineTooSmall)
    assert len(small) == 1 and small[0].estimate is not None
    why = small[0].ruled_out
    assert why.needed == small[0].estimate.total and why.available == capacity_total(hw)
    assert why.to_dict()["memory"] == "ram"
    assert planmod.smallest_requirement(r) is small[0]
    assert MachineTooSmall(2 * GiB, GiB, Memory.RAM_AND_VRAM).reason == \
        "needs 2.0 GiB at least, 1.0 GiB in RAM and VRAM together"
    assert WeightsTooBig(2 * GiB, GiB, Memory.UNIFIED).reason == \
        "weights alone need 2.0 GiB, 1.0 GiB of unified memory available"


def test_an_entry_the_estimate_cannot_size_is_ruled_out_with_the_estimators_message(catalog):
    base = catalog.get("llama-2-7b-chat:Q4_0")
    odd = replace(base, name="llama-2-7b-chat:IQ3_XXS", quant="IQ3_XXS")   # no tensor recipe for IQ3_XXS
    r = make_plan(load_profile("ci-2core-24gb"), Preferences(), Catalog([odd]))
    [c] = r.rejected
    assert isinstance(c.ruled_out, CannotEstimate) and "IQ3_XXS" in c.ruled_out.message
    assert c.reason == f"cannot estimate: {c.ruled_out.message}"
    with pytest.raises(DoesNotFitError) as err:
        require_fit(r)
    assert "the memory estimate does not cover this model yet" in err.value.hint


def test_too_slow_kinds_carry_the_speed_and_the_threshold(catalog):
    r = _plan("a100-80gb", catalog, family="grok1")
    slow = _of(r, TooSlow)
    assert slow and r.chosen is not None
    for c in slow:
        why = c.ruled_out
        assert why.decode_tps == c.speed.decode_tps < why.threshold_tps == planmod.USABLE_DECODE_TPS
        assert why.placement == c.placement and why.than == r.chosen.name
    unestimated = _of(_plan("rtx4090-24gb", catalog), TooSlowNotEstimated)
    assert unestimated
    for c in unestimated:
        assert c.ruled_out.bound_tps < c.ruled_out.threshold_tps == planmod.USABLE_DECODE_TPS
    assert TooSlowNotEstimated(1.234, 3.0).reason == "too slow here: at most 1.2 tok/s (< 3), not estimated"


def test_ranked_lower_kinds_name_the_choice(catalog):
    quality = _plan("rtx4090-24gb", catalog)
    assert _of(quality, RankedLower) and _of(quality, NotEstimated)
    for c in _of(quality, NotEstimated):
        assert c.ruled_out.than == quality.chosen.name
        assert c.reason == f"ranked below {quality.chosen.name}; not estimated (--all)"
    speed = _plan("rtx4090-24gb", catalog, prefer="speed")
    slower, floor = _of(speed, Slower), _of(speed, BelowQualityFloor)
    assert slower and floor
    for c in slower:
        assert c.ruled_out.decode_tps < c.ruled_out.than_tps == speed.chosen.speed.decode_tps
    for c in floor:
        assert c.ruled_out.floor == planmod.QUALITY_FLOOR_QUANT and c.entry.quant != speed.chosen.entry.quant
    assert RankedLower("x:Q4_0", "partial", None).reason == "fits (partial GPU offload, ?), ranked below x:Q4_0"
    assert NotEstimated(None).reason == "ranked below the choice; not estimated (--all)"


def test_the_cli_rows_come_from_the_kinds_not_the_words(catalog):
    """Two never-estimated kinds are listed apart, whatever their sentences say; the closest to fitting is
    the smallest need/capacity ratio, and configurations never sized come last."""
    entries = [catalog.get(f"llama-2-70b-chat:{q}") for q in ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M")]

    def unsized(entry, why):
        return Candidate(entry, RunSettings(), None, None, False, ruled_out=why)

    rows = summarize([
        unsized(entries[0], NotEstimated("x")), unsized(entries[1], TooSlowNotEstimated(1.0, 3.0)),
        unsized(entries[2], NotEstimated("x")), unsized(entries[3], OverDownloadLimit(1, 0))])
    assert [r[0] for r in rows] == ["llama-2-70b-chat:Q4_K_M", "llama-2-70b-chat: Q8_0…Q5_K_M",
                                    "llama-2-70b-chat:Q6_K"]
    assert rows[1][2] == "ranked below x; not estimated (--all)" and rows[2][2].startswith("too slow here")
    near = Candidate(entries[1], RunSettings(), None, None, False, shortfall=1.5, need_bytes=3,
                     ruled_out=WeightsTooBig(3, 2, Memory.RAM))
    rows = summarize([unsized(entries[0], OverDownloadLimit(1, 0)), near])
    assert rows[0][0] == "llama-2-70b-chat:Q6_K (+1 more)"


def test_json_has_a_ruled_out_object_per_candidate():
    r = CliRunner().invoke(cli, ["plan", "--hardware", "rtx3060-12gb", "--max-download", "20GB", "--all", "--json"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["chosen"]["ruled_out"] is None
    kinds = {k.value for k in RuledOutKind}
    for c in data["rejected"]:
        assert c["ruled_out"]["kind"] in kinds
    over = [c for c in data["rejected"] if c["ruled_out"]["kind"] == "over_download_limit"]
    assert over and all(c["ruled_out"]["size"] == c["download_bytes"] > c["ruled_out"]["limit"] == 20 * 10**9
                        for c in over)
    big = [c["ruled_out"] for c in data["rejected"] if c["ruled_out"]["kind"] == "too_big"]
    assert big and all(set(b) == {"kind", "device", "needed", "available", "unified"} for b in big)
