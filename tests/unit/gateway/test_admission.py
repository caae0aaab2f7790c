"""Admission: slots per host, the FIFO queue, bounded waits, health and snapshots."""

from __future__ import annotations

import asyncio

import pytest

from mesh_operator.gateway.admission import (
    HoldTimeoutError,
    ModelGate,
    ModelGoneError,
    QueueFullError,
    Router,
)
from tests.unit.gateway.fakes import record, run, wait_for

pytestmark = pytest.mark.unit


class Probe:
    """Health answers per URL, settable by the test; counts the probes."""

    def __init__(self, healthy: bool = True) -> None:
        self.default = healthy
        self.answers: dict[str, bool] = {}
        self.calls = 0

    async def __call__(self, url: str) -> bool:
        self.calls += 1
        return self.answers.get(url, self.default)


def later(seconds: float) -> float:
    return asyncio.get_running_loop().time() + seconds


async def router_with(*records_: object, probe: Probe | None = None, max_queue: int = 8) -> Router:
    router = Router(probe or Probe(), max_queue=max_queue)
    router.apply(records_)  # type: ignore[arg-type]
    await wait_for(
        lambda: all(
            b.healthy or b.probe_task is not None
            for g in router.gates.values()
            for b in g.backends.values()
        )
    )
    return router


def test_in_flight_is_capped_at_slots_and_waiters_are_served_in_order() -> None:
    async def scenario() -> None:
        router = await router_with(record("m", ["http://a"], slots=2))
        gate = router.resolve("m")
        await wait_for(gate.dispatchable)
        first = await gate.acquire(later(1))
        second = await gate.acquire(later(1))
        assert first is second and first.in_flight == 2
        order: list[int] = []

        async def wait(n: int) -> None:
            backend = await gate.acquire(later(5))
            order.append(n)
            gate.release(backend)

        waiters = [asyncio.create_task(wait(n)) for n in range(3)]
        await asyncio.sleep(0.05)
        assert (len(gate.waiters), order) == (3, [])
        gate.release(first)
        await asyncio.gather(*waiters)
        assert order == [0, 1, 2]
        assert first.in_flight == 1
        await router.close()

    run(scenario())


def test_a_model_that_is_not_ready_holds_until_the_deadline() -> None:
    async def scenario() -> None:
        router = await router_with(record("m", ["http://a"], ready=False))
        gate = router.resolve("m")
        with pytest.raises(HoldTimeoutError) as caught:
            await gate.acquire(later(0.2))
        assert caught.value.not_ready is True
        assert not gate.waiters
        await router.close()

    run(scenario())


def test_busy_slots_time_out_as_busy_not_as_not_ready() -> None:
    async def scenario() -> None:
        router = await router_with(record("m", ["http://a"], slots=1))
        gate = router.resolve("m")
        await wait_for(gate.dispatchable)
        await gate.acquire(later(1))
        with pytest.raises(HoldTimeoutError) as caught:
            await gate.acquire(later(0.1))
        assert caught.value.not_ready is False
        await router.close()

    run(scenario())


def test_held_requests_go_when_the_model_becomes_ready() -> None:
    async def scenario() -> None:
        router = await router_with(record("m", ["http://a"], ready=False))
        gate = router.resolve("m")
        waiting = asyncio.create_task(gate.acquire(later(5)))
        await asyncio.sleep(0.1)
        assert not waiting.done()
        router.apply([record("m", ["http://a"], ready=True)])
        backend = await asyncio.wait_for(waiting, 2)
        assert backend.url == "http://a"
        await router.close()

    run(scenario())


def test_queue_is_bounded() -> None:
    async def scenario() -> None:
        router = await router_with(record("m", ["http://a"], ready=False), max_queue=2)
        gate = router.resolve("m")
        held = [asyncio.create_task(gate.acquire(later(5))) for _ in range(2)]
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFullError):
            await gate.acquire(later(5))
        for task in held:
            task.cancel()
        await asyncio.gather(*held, return_exceptions=True)
        assert not gate.waiters
        await router.close()

    run(scenario())


def test_a_cancelled_waiter_handed_a_slot_gives_it_back() -> None:
    async def scenario() -> None:
        router = await router_with(record("m", ["http://a"], slots=1))
        gate = router.resolve("m")
        await wait_for(gate.dispatchable)
        held = await gate.acquire(later(1))
        waiter = asyncio.create_task(gate.acquire(later(5)))
        await asyncio.sleep(0.01)
        # The slot is handed over and the waiter cancelled in the same loop turn.
        gate.release(held)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert held.in_flight == 0
        assert (await gate.acquire(later(1))) is held
        await router.close()

    run(scenario())


def test_unhealthy_hosts_are_skipped_and_probed_back() -> None:
    async def scenario() -> None:
        probe = Probe()
        probe.answers["http://b"] = False
        router = await router_with(record("m", ["http://a", "http://b"], slots=1), probe=probe)
        gate = router.resolve("m")
        await wait_for(lambda: gate.backends["http://a"].healthy)
        assert (await gate.acquire(later(1))).url == "http://a"
        waiting = asyncio.create_task(gate.acquire(later(5)))
        await asyncio.sleep(0.15)
        assert not waiting.done()
        probe.answers["http://b"] = True
        assert (await asyncio.wait_for(waiting, 3)).url == "http://b"
        await router.close()

    run(scenario())


def test_mark_down_stops_traffic_until_health_returns() -> None:
    async def scenario() -> None:
        probe = Probe()
        router = await router_with(record("m", ["http://a"], slots=4), probe=probe)
        gate = router.resolve("m")
        await wait_for(gate.dispatchable)
        backend = await gate.acquire(later(1))
        probe.answers["http://a"] = False
        router.mark_down(gate, backend)
        gate.release(backend)
        assert not gate.dispatchable()
        waiting = asyncio.create_task(gate.acquire(later(5)))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        probe.answers["http://a"] = True
        assert (await asyncio.wait_for(waiting, 3)) is backend
        await router.close()

    run(scenario())


def test_snapshots_keep_requests_in_flight_and_update_slots() -> None:
    async def scenario() -> None:
        router = await router_with(record("m", ["http://a"], slots=1))
        gate = router.resolve("m")
        await wait_for(gate.dispatchable)
        old = await gate.acquire(later(1))
        router.apply([record("m", ["http://b"], slots=3)])
        assert router.resolve("m") is gate
        assert old.removed and list(gate.backends) == ["http://b"]
        new = gate.backends["http://b"]
        await wait_for(lambda: new.healthy)
        taken = [await gate.acquire(later(1)) for _ in range(3)]
        assert all(b is new for b in taken) and new.in_flight == 3
        gate.release(old)
        assert old.in_flight == 0
        await router.close()

    run(scenario())


def test_a_deleted_model_fails_its_waiters() -> None:
    async def scenario() -> None:
        router = await router_with(record("m", ["http://a"], ready=False))
        gate = router.resolve("m")
        waiting = asyncio.create_task(gate.acquire(later(5)))
        await asyncio.sleep(0.01)
        router.apply([])
        with pytest.raises(ModelGoneError):
            await waiting
        with pytest.raises(ModelGoneError):
            await gate.acquire(later(1))
        await router.close()

    run(scenario())


def test_least_loaded_host_first() -> None:
    async def scenario() -> None:
        router = await router_with(record("m", ["http://a", "http://b"], slots=4))
        gate = router.resolve("m")
        await wait_for(gate.dispatchable)
        await wait_for(lambda: all(b.healthy for b in gate.backends.values()))
        taken = [await gate.acquire(later(1)) for _ in range(6)]
        assert sorted(b.in_flight for b in gate.backends.values()) == [3, 3]
        assert {b.url for b in taken} == {"http://a", "http://b"}
        await router.close()

    run(scenario())


def test_gate_without_hosts_is_not_dispatchable() -> None:
    assert not ModelGate(record("m", []), max_queue=1).dispatchable()
