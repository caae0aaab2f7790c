"""Routing across a model's hosts: prompt-prefix affinity by rendezvous hashing,
least busy when the preferred host is full, round robin; keys from each endpoint."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from mesh_operator.cli import gateway_cmd
from mesh_operator.cli.main import build_parser
from mesh_operator.gateway.admission import Backend, ModelGate, Router
from mesh_operator.gateway.affinity import Routing, preferred, prefix_key, prompt_prefix
from tests.unit.gateway.fakes import SettableSource, gateway, hosts, record, run, wait_for

pytestmark = pytest.mark.unit

URLS = tuple(f"http://10.0.0.{n}:8080" for n in range(1, 5))
CHAT = "/v1/chat/completions"


def chat(text: str, question: str = "What is it?") -> dict[str, object]:
    return {
        "model": "m",
        "messages": [
            {"role": "system", "content": text},
            {"role": "user", "content": question},
        ],
    }


def key_of(text: str, question: str = "What is it?") -> bytes:
    key = prefix_key(CHAT, chat(text, question))
    assert key is not None
    return key


def gate_with(urls: tuple[str, ...], *, slots: int, routing: Routing = "prefix") -> ModelGate:
    """A gate whose hosts are all healthy, as after their first probe."""
    gate = ModelGate(record("m", urls, slots=slots), max_queue=64, routing=routing)
    for url in urls:
        backend = gate.backends[url] = Backend(url, slots)
        backend.healthy = True
    return gate


def take(gate: ModelGate, key: bytes | None) -> Backend:
    async def acquire() -> Backend:
        return await gate.acquire(asyncio.get_running_loop().time() + 1, key)

    backend: Backend = run(acquire())
    return backend


# -- keys ------------------------------------------------------------------------


def test_the_key_is_the_start_of_the_prompt_only() -> None:
    document = "A long shared document. " * 40
    assert key_of(document, "first question") == key_of(document, "second question")
    assert key_of(document) != key_of("Another document. " * 40)
    # Within the first characters, the question is part of the key.
    assert key_of("Be brief.", "first question") != key_of("Be brief.", "second question")


def test_every_prompt_endpoint_has_a_key_and_embeddings_none() -> None:
    text = "Once upon a time " * 30
    assert prefix_key("/v1/completions", {"prompt": text}) is not None
    assert prefix_key("/v1/completions", {"prompt": [text, "other"]}) == prefix_key(
        "/v1/completions", {"prompt": text}
    )
    assert prefix_key("/v1/completions", {"prompt": [1, 2, 3]}) is not None
    assert prefix_key("/v1/responses", {"input": text}) is not None
    assert (
        prefix_key("/v1/responses", {"input": [{"role": "user", "content": [{"text": text}]}]})
        is not None
    )
    assert prefix_key("/v1/embeddings", {"input": text}) is None
    assert prefix_key(CHAT, {"messages": []}) is None
    assert prefix_key(CHAT, {"messages": "not a list"}) is None
    assert prefix_key(CHAT, chat(text), chars=0) is None


def test_the_prefix_is_bounded_and_reads_message_parts() -> None:
    payload = {
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "x" * 1000}]},
            {"role": "user", "content": "never reached"},
        ]
    }
    text = prompt_prefix(payload, 256)
    assert len(text) == 256
    assert text.startswith("system") and "never" not in text


# -- rendezvous hashing ------------------------------------------------------------


def test_a_key_prefers_the_same_host_whatever_the_order() -> None:
    key = key_of("Document one. " * 50)
    first = preferred(key, URLS, str)
    assert first is not None
    assert preferred(key, reversed(URLS), str) == first
    assert preferred(key, (), str) is None


def test_removing_a_host_moves_only_its_keys() -> None:
    keys = [key_of(f"Document {n}. " * 30) for n in range(400)]
    before = {key: preferred(key, URLS, str) for key in keys}
    gone = URLS[1]
    after = {key: preferred(key, [u for u in URLS if u != gone], str) for key in keys}
    moved = [key for key in keys if before[key] != after[key]]
    assert moved and all(before[key] == gone for key in moved)
    assert len(moved) == sum(1 for key in keys if before[key] == gone)
    # And adding it back returns exactly those keys.
    assert {key: preferred(key, URLS, str) for key in keys} == before


def test_keys_spread_over_the_hosts() -> None:
    keys = [key_of(f"Document {n}. " * 30) for n in range(400)]
    counts = Counter(preferred(key, URLS, str) for key in keys)
    assert set(counts) == set(URLS)
    # 100 expected per host; binomial sd is about 8.7.
    assert all(60 <= count <= 140 for count in counts.values()), counts


# -- the choice a gate makes ---------------------------------------------------------


def test_same_prefix_same_host_while_it_has_room() -> None:
    gate = gate_with(URLS[:2], slots=3)
    key = key_of("Shared document. " * 60)
    home = gate.preferred(key)
    assert home is not None
    assert [take(gate, key) for _ in range(3)] == [home, home, home]
    # Full now: the next one goes to the least busy host.
    other = take(gate, key)
    assert other is not home and other.in_flight == 1
    # A slot frees on the preferred host: it is taken again.
    gate.release(home)
    assert take(gate, key) is home


def test_full_preferred_host_falls_back_to_the_least_busy() -> None:
    gate = gate_with(URLS[:3], slots=2)
    key = key_of("Shared document. " * 60)
    home = gate.preferred(key)
    assert home is not None
    home.in_flight = 2
    busy, idle = (b for b in gate.backends.values() if b is not home)
    busy.in_flight = 1
    assert take(gate, key) is idle


def test_an_unhealthy_preferred_host_hands_its_keys_to_another() -> None:
    gate = gate_with(URLS[:3], slots=4)
    key = key_of("Shared document. " * 60)
    home = gate.preferred(key)
    assert home is not None
    home.healthy = False
    stand_in = gate.preferred(key)
    assert stand_in is not None and stand_in is not home
    assert {take(gate, key) for _ in range(3)} == {stand_in}
    home.healthy = True
    assert gate.preferred(key) is home


def test_no_key_or_least_busy_routing_takes_the_least_busy() -> None:
    cases: tuple[tuple[Routing, bytes | None], ...] = (
        ("prefix", None),
        ("least-busy", key_of("Doc. " * 80)),
    )
    for routing, key in cases:
        gate = gate_with(URLS[:2], slots=4, routing=routing)
        taken = [take(gate, key) for _ in range(4)]
        assert sorted(b.in_flight for b in gate.backends.values()) == [2, 2], taken


def test_round_robin_alternates_and_skips_full_hosts() -> None:
    gate = gate_with(URLS[:2], slots=3, routing="round-robin")
    a, b = gate.backends.values()
    key = key_of("Doc. " * 80)
    assert [take(gate, key) for _ in range(4)] == [a, b, a, b]
    a.in_flight = 3
    assert take(gate, key) is b


def test_a_waiter_gets_its_preferred_host_when_that_frees_first() -> None:
    async def scenario() -> None:
        gate = gate_with(URLS[:2], slots=1)
        key = key_of("Shared document. " * 60)
        home = gate.preferred(key)
        assert home is not None
        deadline = asyncio.get_running_loop().time() + 5
        held = [await gate.acquire(deadline, key) for _ in range(2)]
        assert {b.url for b in held} == set(URLS[:2])
        waiting = asyncio.create_task(gate.acquire(deadline, key))
        await asyncio.sleep(0.01)
        assert len(gate.waiters) == 1
        # The other host frees first: the oldest waiter takes it (FIFO, no waiting
        # for the preferred host).
        other = next(b for b in held if b is not home)
        gate.release(other)
        assert await waiting is other
        # Both full again; now the preferred host frees first and is taken.
        waiting = asyncio.create_task(gate.acquire(deadline, key))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        gate.release(home)
        assert await waiting is home

    run(scenario())


def test_the_router_keys_requests_only_under_prefix_routing() -> None:
    async def probe(url: str) -> bool:
        return True

    payload = chat("Doc. " * 80)
    assert Router(probe, max_queue=1).affinity(CHAT, payload) == prefix_key(CHAT, payload)
    assert Router(probe, max_queue=1, prefix_chars=16).affinity(CHAT, payload) == prefix_key(
        CHAT, payload, 16
    )
    others: tuple[Routing, ...] = ("least-busy", "round-robin")
    for routing in others:
        router = Router(probe, max_queue=1, routing=routing)
        assert router.affinity(CHAT, payload) is None


def test_the_routing_flags_reach_the_settings() -> None:
    parser, _ = build_parser()
    default = gateway_cmd._settings(parser.parse_args(["gateway"]))
    assert (default.routing, default.prefix_chars) == ("prefix", 256)
    args = parser.parse_args(["gateway", "--routing", "round-robin", "--prefix-chars", "64"])
    settings = gateway_cmd._settings(args)
    assert (settings.routing, settings.prefix_chars) == ("round-robin", 64)
    with pytest.raises(SystemExit):
        parser.parse_args(["gateway", "--routing", "random"])


def test_a_retry_does_not_stick_to_the_preferred_host_that_failed_it() -> None:
    """A preferred host that closes connections (not marked down: it may only have
    dropped an idle keep-alive one) must not get every attempt of the request."""

    async def scenario() -> None:
        async with hosts(2) as [dropper, alive]:
            source = SettableSource([record("gemma", [dropper.url, alive.url], slots=1)])
            async with gateway(source) as (gw, client):
                assert gw.router is not None
                gate = gw.router.resolve("gemma")
                await wait_for(lambda: all(b.healthy for b in gate.backends.values()))
                body = next(
                    b
                    for b in ({**chat(f"Document {n}."), "model": "gemma"} for n in range(1000))
                    if gate.preferred(prefix_key(CHAT, b) or b"") is gate.backends[dropper.url]
                )
                dropper.behaviour = "drop"
                async with client.post(CHAT, json=body) as resp:
                    assert resp.status == 200
                assert alive.requests == 1
                # Without the fallback every attempt (3) would go to the dropper.
                assert 1 <= dropper.requests < 3

    run(scenario())
