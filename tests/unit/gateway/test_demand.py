"""`GET /demand` (what the operator polls to scale models) and models scaled to zero.

The pure part (`demand.demand` over a `Router`) is tested with gates driven by
hand; the endpoint, the request counter and the holding of a model scaled to zero
through a gateway served on loopback in front of `FakeHost`s.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from mesh_operator.gateway.admission import Backend, Router
from mesh_operator.gateway.auth import KeyReloader, KeyRing
from mesh_operator.gateway.demand import demand
from mesh_operator.gateway.routing import RouteTable
from tests.unit.gateway.fakes import (
    SettableSource,
    gateway,
    hosts,
    record,
    run,
    wait_for,
)

pytestmark = pytest.mark.unit

CHAT = {"model": "gemma", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
FAR = 1e9


async def healthy(url: str) -> bool:
    return True


async def demand_of(client: aiohttp.ClientSession) -> dict[str, Any]:
    async with client.get("/demand") as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        body: dict[str, Any] = await resp.json()
        return body


def counts(waiting: int = 0, busy: int = 0, requests: int = 0) -> dict[str, int]:
    return {"waiting": waiting, "busy": busy, "requests": requests}


# -- the pure part --------------------------------------------------------------------


def test_no_router_yet_means_no_models() -> None:
    assert demand(None) == {"models": {}}


def test_every_known_model_is_listed_with_zeros() -> None:
    async def scenario() -> None:
        router = Router(healthy, max_queue=8)
        router.apply(
            [
                record("gemma", ["http://127.0.0.1:9"], namespace="a"),
                record("gemma", [], namespace="b", ready=False, scaled_to_zero=True),
                record("qwen", [], namespace="b", ready=False),
            ]
        )
        assert demand(router) == {
            "models": {"a/gemma": counts(), "b/gemma": counts(), "b/qwen": counts()}
        }
        await router.close()

    run(scenario())


def test_waiting_and_busy_are_read_from_the_gates() -> None:
    async def scenario() -> None:
        router = Router(healthy, max_queue=8)
        router.apply(
            [
                record("gemma", ["http://127.0.0.1:9"], namespace="a", slots=1),
                record("qwen", [], namespace="a", ready=False, scaled_to_zero=True),
            ]
        )
        gemma, qwen = router.gates["a/gemma"], router.gates["a/qwen"]
        await wait_for(gemma.dispatchable)
        taken = await gemma.acquire(FAR)
        # One more for gemma waits for the slot; two for qwen wait for it to be Ready.
        held = [
            asyncio.create_task(gemma.acquire(FAR)),
            asyncio.create_task(qwen.acquire(FAR)),
            asyncio.create_task(qwen.acquire(FAR)),
        ]
        await wait_for(lambda: len(gemma.waiters) == 1 and len(qwen.waiters) == 2)
        gemma.requests, qwen.requests = 2, 2
        assert demand(router)["models"] == {
            "a/gemma": counts(waiting=1, busy=1, requests=2),
            "a/qwen": counts(waiting=2, busy=0, requests=2),
        }

        gemma.release(taken)
        second: Backend = await held[0]
        assert demand(router)["models"]["a/gemma"] == counts(waiting=0, busy=1, requests=2)
        gemma.release(second)
        for task in held[1:]:
            task.cancel()
        await asyncio.gather(*held[1:], return_exceptions=True)
        assert demand(router)["models"] == {
            "a/gemma": counts(requests=2),
            "a/qwen": counts(requests=2),
        }
        await router.close()

    run(scenario())


def test_the_counter_survives_snapshots_and_goes_with_the_model() -> None:
    async def scenario() -> None:
        router = Router(healthy, max_queue=8)
        scaled = record("gemma", [], namespace="a", ready=False, scaled_to_zero=True)
        router.apply([scaled, record("qwen", [], namespace="a")])
        router.gates["a/gemma"].requests = 5
        # Scaled back up: new hosts, Ready; the same model, so the count goes on.
        router.apply([record("gemma", ["http://127.0.0.1:9"], namespace="a", slots=2)])
        assert demand(router)["models"] == {"a/gemma": counts(requests=5)}
        router.apply([])
        assert demand(router) == {"models": {}}
        # Created again: a new model, counted from zero.
        router.apply([scaled])
        assert demand(router)["models"] == {"a/gemma": counts()}
        await router.close()

    run(scenario())


# -- listing a model scaled to zero ------------------------------------------------------


def test_a_model_scaled_to_zero_is_listed_and_a_merely_unready_one_is_not() -> None:
    table = RouteTable(
        [
            record("gemma", ["http://127.0.0.1:9"], namespace="a"),
            record("llama", [], namespace="a", ready=False, scaled_to_zero=True),
            record("qwen", [], namespace="a", ready=False),
        ]
    )
    assert [e.id for e in table.names(listed_only=True)] == ["gemma", "llama"]
    assert [e.id for e in table.names()] == ["gemma", "llama", "qwen"]
    assert table.resolve("llama").key == "a/llama"


def test_models_endpoints_list_a_model_scaled_to_zero() -> None:
    async def scenario() -> None:
        source = SettableSource(
            [
                record("gemma", [], namespace="a", ready=False, scaled_to_zero=True),
                record("qwen", ["http://127.0.0.1:9"], namespace="a", ready=False),
            ]
        )
        async with gateway(source) as (_, client):
            async with client.get("/v1/models") as resp:
                assert resp.status == 200
                body = await resp.json()
            assert [(m["id"], m["owned_by"]) for m in body["data"]] == [("gemma", "a")]
            async with client.get("/v1/models/gemma") as resp:
                assert resp.status == 200
                assert (await resp.json())["id"] == "gemma"
            async with client.get("/v1/models/qwen") as resp:
                assert resp.status == 404

    run(scenario())


# -- holding requests for a model scaled to zero --------------------------------------


def test_a_request_for_a_model_scaled_to_zero_is_held_until_it_is_ready() -> None:
    async def scenario() -> None:
        async with hosts() as [host]:
            source = SettableSource(
                [record("gemma", [], namespace="a", ready=False, scaled_to_zero=True)]
            )
            async with gateway(source) as (gw, client):
                assert gw.router is not None
                gate = gw.router.gates["a/gemma"]
                request = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
                await wait_for(lambda: len(gate.waiters) == 1)
                assert (await demand_of(client))["models"] == {
                    "a/gemma": counts(waiting=1, requests=1)
                }
                assert not request.done()
                assert host.requests == 0
                # The operator scales it up: a host appears and the model is Ready.
                source.set([record("gemma", [host.url], namespace="a")])
                resp = await request
                assert resp.status == 200
                resp.release()
                assert host.requests == 1
                assert (await demand_of(client))["models"] == {"a/gemma": counts(requests=1)}

    run(scenario())


def test_a_model_still_scaled_to_zero_after_the_hold_is_503_with_retry_after() -> None:
    async def scenario() -> None:
        source = SettableSource(
            [record("gemma", [], namespace="a", ready=False, scaled_to_zero=True)]
        )
        async with gateway(source, hold_timeout=0.3, retry_after=7) as (_, client):
            async with client.post("/v1/chat/completions", json=CHAT) as resp:
                assert resp.status == 503
                assert resp.headers["Retry-After"] == "7"
                body = await resp.json()
            assert body["error"]["code"] == "model_not_ready"
            assert body["error"]["type"] == "server_error"
            # A request that timed out was still demand for the model.
            assert (await demand_of(client))["models"] == {"a/gemma": counts(requests=1)}

    run(scenario())


# -- the endpoint ---------------------------------------------------------------------------


def test_requests_are_counted_once_each_retries_included() -> None:
    async def scenario() -> None:
        # The host answers 503 ("loading") once: the gateway sends the request again.
        async with hosts(behaviour="loading", misbehave_times=1) as [host]:
            source = SettableSource(
                [
                    record("gemma", [host.url], namespace="a"),
                    record("qwen", [], namespace="b", ready=False),
                ]
            )
            async with gateway(source) as (_, client):
                assert await demand_of(client) == {
                    "models": {"a/gemma": counts(), "b/qwen": counts()}
                }
                async with client.post("/v1/chat/completions", json=CHAT) as resp:
                    assert resp.status == 200
                assert host.requests == 2
                async with client.post("/v1/chat/completions", json=CHAT) as resp:
                    assert resp.status == 200
                # A name no model serves is nobody's demand.
                async with client.post(
                    "/v1/chat/completions", json={**CHAT, "model": "nope"}
                ) as resp:
                    assert resp.status == 404
                assert await demand_of(client) == {
                    "models": {"a/gemma": counts(requests=2), "b/qwen": counts()}
                }

    run(scenario())


def test_busy_counts_requests_at_the_hosts() -> None:
    async def scenario() -> None:
        async with hosts(answer_delay=0.5) as [host]:
            source = SettableSource([record("gemma", [host.url], namespace="a", slots=1)])
            async with gateway(source) as (_, client):
                first = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
                await wait_for(lambda: host.in_flight == 1)
                second = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))

                async def both_counted() -> dict[str, Any]:
                    while True:
                        now = await demand_of(client)
                        if now["models"]["a/gemma"]["requests"] == 2:
                            return now
                        await asyncio.sleep(0.01)

                now = await asyncio.wait_for(both_counted(), 5)
                assert now["models"]["a/gemma"] == counts(waiting=1, busy=1, requests=2)
                for task in (first, second):
                    resp = await task
                    assert resp.status == 200
                    resp.release()
                assert (await demand_of(client))["models"]["a/gemma"] == counts(requests=2)

    run(scenario())


def test_demand_needs_no_key() -> None:
    async def scenario() -> None:
        keys = KeyReloader(KeyRing(), lambda: {"team-a": "sk-team-a-0123456789"})
        source = SettableSource([record("gemma", [], namespace="a", ready=False)])
        async with gateway(source, keys=keys) as (_, client):
            async with client.get("/v1/models") as resp:
                assert resp.status == 401
            assert await demand_of(client) == {"models": {"a/gemma": counts()}}

    run(scenario())
