"""The model pool's policy (runner/app/pool.py) with a FAKE loader (tests/fake_pool.py): load on demand, one
load per model however many requests wait, eviction of idle models least recently used first, never a busy
one, never past the budget, keep_alive, and the errors (507 never fits, 503 busy). The real loader and engine
are tested end to end in test_server_models.py."""

from __future__ import annotations

import asyncio
import math
import threading
import time

import pytest

from fake_engine import FakeEngine
from fake_pool import MiB, FakeLoader, fake_pool
from runner.app.models import ModelCard
from runner.app.pool_values import State
from runner.core.errors import CapacityError, DoesNotFitError, EngineError, UnknownModelError
from runner.core.units import FOREVER


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def loaded(pool) -> list[str]:
    return sorted(s.name for s in pool.status() if s.state is State.LOADED)


async def use(pool, name, keep_alive=None):
    lease = await pool.acquire(name, keep_alive)
    lease.release()
    return lease


def test_loads_on_demand_once_and_keeps_it(tmp_path):
    loader = FakeLoader({"a": 100 * MiB})

    async def main():
        pool = fake_pool(tmp_path, loader, budget=1000 * MiB)
        await pool.start()
        assert loaded(pool) == []
        lease = await pool.acquire("a")
        assert lease.engine.model_name == "a" and lease.card.name == "a"
        s = pool.status()[0]                            # in use: it expires keep_alive after its last request
        assert s.in_flight == 1 and s.expires_at - time.time() == pytest.approx(300, abs=2)
        lease.release()
        lease.release()                                 # idempotent: released exactly once
        s = pool.status()[0]
        assert s.in_flight == 0 and s.expires_at - time.time() == pytest.approx(300, abs=2)
        await use(pool, "a")
        assert loader.loads == ["a"] and loaded(pool) == ["a"]
        assert pool.counters["a"].loads == 1 and pool.counters["a"].load_seconds >= 0
        await pool.aclose()
        assert loader.closes == ["a"]

    run(main())


def test_concurrent_requests_for_a_loading_model_wait_for_that_one_load(tmp_path):
    loader = FakeLoader({"a": 100 * MiB}, load_s=0.3)

    async def main():
        pool = fake_pool(tmp_path, loader, budget=1000 * MiB)
        await pool.start()
        leases = await asyncio.gather(*(pool.acquire("a") for _ in range(8)))
        assert {id(lease.engine) for lease in leases} == {id(leases[0].engine)}
        assert loader.loads == ["a"] and loader.prepares == ["a"] and not loader.double_loads
        assert pool.status()[0].in_flight == 8
        for lease in leases:
            lease.release()
        assert pool.status()[0].in_flight == 0
        await pool.aclose()

    run(main())


def test_a_budget_for_one_swaps_idle_models_and_one_for_two_keeps_both(tmp_path):
    async def main(budget):
        loader = FakeLoader({"a": 300 * MiB, "b": 300 * MiB})
        pool = fake_pool(tmp_path, loader, budget=budget, process=100 * MiB)
        await pool.start()
        for name in ["a", "b", "a", "b"]:
            lease = await pool.acquire(name)
            assert loaded(pool) == ([name] if budget < 700 * MiB else sorted({"a", "b"} & set(loader.loads)))
            assert pool.used()["CPU"] <= budget
            lease.release()
        await pool.aclose()
        return loader, pool

    loader, pool = run(main(600 * MiB))        # 100 process + 300 + 300 > 600: one at a time
    assert loader.loads == ["a", "b", "a", "b"] and loader.peak == 300 * MiB
    assert pool.counters["a"].evictions == 2 and pool.counters["b"].evictions == 1
    loader, pool = run(main(700 * MiB))        # both fit: no swap
    assert loader.loads == ["a", "b"] and loader.peak == 600 * MiB
    assert pool.counters["a"].evictions == 0


def test_least_recently_used_idle_model_is_evicted_first(tmp_path):
    loader = FakeLoader({"a": 100 * MiB, "b": 100 * MiB, "c": 100 * MiB})

    async def main():
        pool = fake_pool(tmp_path, loader, budget=200 * MiB)
        await pool.start()
        await use(pool, "a")
        await use(pool, "b")
        await use(pool, "a")          # b is now the least recently used
        await use(pool, "c")
        assert loaded(pool) == ["a", "c"] and loader.closes == ["b"]
        await pool.aclose()

    run(main())


def test_a_model_that_can_never_fit_is_refused_with_the_numbers_and_the_pool_goes_on(tmp_path):
    loader = FakeLoader({"small": 100 * MiB, "huge": 900 * MiB})

    async def main():
        pool = fake_pool(tmp_path, loader, budget=600 * MiB, process=50 * MiB)
        await pool.start()
        await use(pool, "small")
        with pytest.raises(DoesNotFitError) as e:
            await pool.acquire("huge")
        assert "needs 900.0 MiB RAM" in e.value.message and "550.0 MiB" in e.value.message
        assert "the test budget" in e.value.message and e.value.hint == "a smaller fake"
        assert loaded(pool) == ["small"], "nothing was evicted for a model that cannot fit anyway"
        assert "huge" not in loader.loads and pool.counters["huge"].load_failures == 1
        await use(pool, "small")
        await pool.aclose()

    run(main())


def test_a_busy_model_is_never_evicted_the_load_waits_for_it(tmp_path):
    loader = FakeLoader({"a": 300 * MiB, "b": 300 * MiB})

    async def main():
        pool = fake_pool(tmp_path, loader, budget=500 * MiB, wait_s=10)
        await pool.start()
        held = await pool.acquire("a")
        waiting = asyncio.ensure_future(pool.acquire("b"))
        await asyncio.sleep(0.3)
        assert not waiting.done() and loaded(pool) == ["a"] and loader.closes == []
        other = await asyncio.wait_for(pool.acquire("a"), 1)   # the loaded model still serves meanwhile
        other.release()
        held.release()                                            # now idle: evicted for b
        lease_b = await asyncio.wait_for(waiting, 5)
        assert loaded(pool) == ["b"] and loader.closes == ["a"] and loader.peak == 300 * MiB
        lease_b.release()
        await pool.aclose()

    run(main())


def test_a_model_just_loaded_is_not_evicted_before_the_requests_that_waited_for_it(tmp_path):
    release = threading.Event()
    loader = FakeLoader({"a": 300 * MiB, "b": 300 * MiB}, hold={"b": release})

    async def main():
        pool = fake_pool(tmp_path, loader, budget=500 * MiB, wait_s=2)
        await pool.start()
        want_b = asyncio.ensure_future(pool.acquire("b"))
        await asyncio.sleep(0.1)
        want_a = asyncio.ensure_future(pool.acquire("a"))      # waits: b's load holds the room
        await asyncio.sleep(0.1)
        release.set()
        lease_b = await asyncio.wait_for(want_b, 5)
        assert lease_b.engine.model_name == "b" and not want_a.done()
        lease_b.release()
        (await asyncio.wait_for(want_a, 5)).release()
        assert loader.loads == ["b", "a"], "b was loaded once and served before it made room for a"
        # the rule itself: a loaded model that requests are still waiting for is not a victim
        lease_b = await pool.acquire("b")
        lease_b.release()
        pool.models["b"].waiting = 1
        with pytest.raises(CapacityError):
            await pool.acquire("a")
        pool.models["b"].waiting = 0
        await use(pool, "a")
        await pool.aclose()

    run(main())


def test_busy_beyond_the_wait_is_capacity_error_with_retry_after(tmp_path):
    loader = FakeLoader({"a": 300 * MiB, "b": 300 * MiB})

    async def main():
        pool = fake_pool(tmp_path, loader, budget=500 * MiB, wait_s=0.3, retry_after_s=7)
        await pool.start()
        held = await pool.acquire("a")
        with pytest.raises(CapacityError) as e:
            await pool.acquire("b")
        assert e.value.retry_after_s == 7 and "busy (a)" in e.value.message
        assert loaded(pool) == ["a"]
        held.release()
        await use(pool, "b")                        # room now: a is idle and evicted
        assert loaded(pool) == ["b"]
        await pool.aclose()

    run(main())


def test_loaded_models_are_accounted_by_what_they_measured_not_the_estimate(tmp_path):
    # a's estimate says 200 MiB but it holds 350: b (200) no longer fits beside it in 500
    loader = FakeLoader({"a": 200 * MiB, "b": 200 * MiB}, measured={"a": 350 * MiB})

    async def main():
        pool = fake_pool(tmp_path, loader, budget=500 * MiB)
        await pool.start()
        await use(pool, "a")
        assert pool.used()["CPU"] == 350 * MiB and pool.status()[0].resident == {"CPU": 350 * MiB}
        await use(pool, "b")
        assert loaded(pool) == ["b"] and loader.closes == ["a"]
        await pool.aclose()

    run(main())


def test_keep_alive_zero_unloads_after_the_reply_a_duration_expires_forever_stays(tmp_path):
    loader = FakeLoader({"a": 10 * MiB, "b": 10 * MiB, "c": 10 * MiB})

    async def main():
        pool = fake_pool(tmp_path, loader, budget=None)
        await pool.start()
        lease = await pool.acquire("a", keep_alive=0)
        assert loaded(pool) == ["a"]
        lease.release()
        await asyncio.sleep(0.1)
        assert "a" not in loaded(pool) and loader.closes == ["a"]
        await use(pool, "b", keep_alive=0.5)
        await use(pool, "c", keep_alive=FOREVER)
        assert loaded(pool) == ["b", "c"]
        expires = {s.name: s.expires_at for s in pool.status()}
        assert expires["b"] - time.time() == pytest.approx(0.5, abs=0.2) and math.isinf(expires["c"])
        await asyncio.sleep(1.0)
        assert loaded(pool) == ["c"] and loader.closes == ["a", "b"]
        assert pool.counters["b"].unloads == 1 and pool.counters["b"].evictions == 0
        await pool.aclose()

    run(main())


def test_the_latest_request_sets_keep_alive_and_busy_models_do_not_expire(tmp_path):
    loader = FakeLoader({"a": 10 * MiB})

    async def main():
        pool = fake_pool(tmp_path, loader, budget=None)
        await pool.start()
        first = await pool.acquire("a", keep_alive=0.2)
        second = await pool.acquire("a", keep_alive=FOREVER)
        first.release()
        await asyncio.sleep(0.5)
        assert loaded(pool) == ["a"], "a busy model never expires"
        second.release()
        await asyncio.sleep(0.5)
        assert loaded(pool) == ["a"], "the latest request said forever"
        await pool.aclose()

    run(main())


def test_unload_now_and_after_the_last_request(tmp_path):
    loader = FakeLoader({"a": 10 * MiB})

    async def main():
        pool = fake_pool(tmp_path, loader, budget=None)
        await pool.start()
        assert await pool.unload("a") is False           # not loaded: nothing to do
        await use(pool, "a")
        assert await pool.unload("a") is True and loaded(pool) == []
        lease = await pool.acquire("a")
        assert await pool.unload("a") is True and loaded(pool) == ["a"]
        lease.release()
        await asyncio.sleep(0.1)
        assert loaded(pool) == [] and loader.closes == ["a", "a"]
        await pool.aclose()

    run(main())


def test_a_failed_load_fails_every_waiter_and_the_next_request_tries_again(tmp_path):
    loader = FakeLoader({"a": 10 * MiB}, load_s=0.2, fail={"a"})

    async def main():
        pool = fake_pool(tmp_path, loader, budget=None)
        await pool.start()
        results = await asyncio.gather(*(pool.acquire("a") for _ in range(4)), return_exceptions=True)
        assert all(isinstance(r, EngineError) for r in results) and loader.loads == ["a"]
        loader.fail.clear()
        await use(pool, "a")
        assert loader.loads == ["a", "a"] and pool.counters["a"].load_failures == 1
        await pool.aclose()

    run(main())


def test_a_loaded_model_is_not_held_up_by_another_models_load(tmp_path):
    release = threading.Event()
    loader = FakeLoader({"a": 10 * MiB, "b": 10 * MiB}, hold={"b": release})

    async def main():
        pool = fake_pool(tmp_path, loader, budget=None)
        await pool.start()
        await use(pool, "a")
        loading_b = asyncio.ensure_future(pool.acquire("b"))
        await asyncio.sleep(0.1)
        t0 = time.monotonic()
        await use(pool, "a")
        assert time.monotonic() - t0 < 0.1 and not loading_b.done()
        release.set()
        (await loading_b).release()
        await pool.aclose()

    run(main())


def test_unknown_names_and_pinned_engines(tmp_path):
    loader = FakeLoader({"alpha": 10 * MiB})

    async def main():
        pool = fake_pool(tmp_path, loader, budget=20 * MiB)
        engine = FakeEngine(model_name="given")
        pool.adopt(engine, ModelCard(name="given"))
        await pool.start()
        with pytest.raises(UnknownModelError) as e:
            await pool.acquire("alpah")
        assert "alpha" in e.value.close_matches
        await use(pool, "alpha", keep_alive=0)
        await use(pool, "given", keep_alive=0)            # pinned: keep_alive does not unload it
        assert await pool.unload("given") is False and loaded(pool) == ["given"]
        await pool.aclose(close_engines=False)
        assert not engine.closed

    run(main())


def test_the_first_embedding_request_makes_room_for_the_embedding_context_once(tmp_path):
    """A model's embedding context (Prepared.embedding) is held from its first embedding request on: idle models
    are evicted for it like for a load, concurrent first requests count it once, generation requests never."""
    loader = FakeLoader({"a": 300 * MiB, "b": 300 * MiB}, embedding={"a": 200 * MiB})

    async def main():
        pool = fake_pool(tmp_path, loader, budget=750 * MiB)
        await pool.start()
        await use(pool, "b")
        await use(pool, "a")
        assert loaded(pool) == ["a", "b"]
        assert pool.used()["CPU"] == 600 * MiB, "generation alone: no embedding context counted"
        leases = await asyncio.gather(*(pool.acquire("a", embeddings=True) for _ in range(4)))
        for lease in leases:
            lease.release()
        assert loaded(pool) == ["a"], "b (idle) was evicted to make room for a's embedding context"
        assert pool.used()["CPU"] == 500 * MiB, "held once, however many first requests came together"
        await use(pool, "b")                  # b needs 300 MiB beside a's 500: a is evicted for it, and with it
        assert loaded(pool) == ["b"]          # its embedding context
        assert pool.used()["CPU"] == 300 * MiB
        lease = await pool.acquire("a", embeddings=True)     # loaded again: held again on its first embedding
        assert pool.used()["CPU"] == 500 * MiB and loaded(pool) == ["a"]
        lease.release()
        await pool.aclose()

    run(main())


def test_an_embedding_context_that_can_never_fit_is_refused_with_the_numbers(tmp_path):
    loader = FakeLoader({"a": 300 * MiB}, embedding={"a": 400 * MiB})

    async def main():
        pool = fake_pool(tmp_path, loader, budget=600 * MiB)
        await pool.start()
        await use(pool, "a")
        with pytest.raises(DoesNotFitError) as e:
            await pool.acquire("a", embeddings=True)
        assert "embedding context needs 400.0 MiB" in e.value.message and "--max-memory" in e.value.hint
        assert pool.status()[0].in_flight == 0, "the refused request's lease was released"
        await use(pool, "a")                  # generation goes on
        await pool.aclose()

    run(main())
