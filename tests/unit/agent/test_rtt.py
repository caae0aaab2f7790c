"""Round-trip probing: the sample window, the choice of peers, the peer list, the
probe against the agent's real HTTP endpoint, and the bounds of a round."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import pytest

from mesh_agent.metrics import AgentMetrics
from mesh_agent.rtt import (
    Peer,
    RttProber,
    RttSettings,
    RttWindow,
    advertised_endpoint,
    choose_peers,
    format_endpoint,
    measure,
    parse_endpoint,
    peers_of,
)
from mesh_agent.server import build_app, start
from mesh_agent.transitions import TransitionLog
from mesh_operator.api.roundtrip import lower_median

pytestmark = pytest.mark.unit

T = TypeVar("T")
NOW = dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.UTC)


def test_a_peers_median_is_over_its_last_samples_only() -> None:
    window = RttWindow(samples=3, max_age_seconds=100)
    for t, ms in enumerate([50.0, 1.0, 2.0, 3.0]):
        window.add("b", ms, now=float(t))
    (trip,) = window.medians(now=4.0, limit=32)
    assert (trip.node, trip.ms, trip.samples) == ("b", 2.0, 3)


def test_samples_older_than_the_window_are_dropped() -> None:
    window = RttWindow(samples=9, max_age_seconds=60)
    window.add("old", 1.0, now=0.0)
    window.add("b", 5.0, now=0.0)
    window.add("b", 7.0, now=50.0)
    trips = window.medians(now=70.0, limit=32)
    assert [(t.node, t.ms, t.samples) for t in trips] == [("b", 7.0, 1)]


def test_only_the_peers_sampled_last_are_published_by_name() -> None:
    window = RttWindow(samples=9, max_age_seconds=1000)
    for t, node in enumerate(["d", "a", "c", "b"]):
        window.add(node, float(t), now=float(t))
    assert [t.node for t in window.medians(now=10.0, limit=2)] == ["b", "c"]


def test_peers_gone_from_the_list_are_forgotten() -> None:
    window = RttWindow(samples=9, max_age_seconds=1000)
    window.add("a", 1.0, now=0.0)
    window.add("b", 1.0, now=0.0)
    window.forget_except(["b"])
    assert [t.node for t in window.medians(now=1.0, limit=32)] == ["b"]
    assert window.last_visit("a") is None


@pytest.mark.parametrize(("peers", "per_round"), [(3, 8), (20, 8), (500, 8), (7, 1)])
def test_every_peer_is_visited_once_before_any_twice(peers: int, per_round: int) -> None:
    rng = random.Random(7)
    window = RttWindow(samples=9, max_age_seconds=10_000)
    pool = [Peer(f"n{i:03d}", "10.0.0.1", 9464) for i in range(peers)]
    visits = {p.node: 0 for p in pool}
    last = {p.node: -1 for p in pool}
    full_cover = -(-peers // per_round)
    for r in range(3 * full_cover):
        chosen = choose_peers(pool, window, per_round, rng)
        assert len(chosen) == min(per_round, peers)
        for p in chosen:
            visits[p.node] += 1
            last[p.node] = r
            window.visited(p.node, now=float(r))
        if r < full_cover - 1:
            # No peer visited twice while another waits for its first visit.
            assert max(visits.values()) == 1
        # Nobody waits longer than the rounds it takes to visit everyone.
        assert all(r - seen < full_cover for seen in last.values())
    assert min(visits.values()) >= 2


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("10.1.2.3:9464", ("10.1.2.3", 9464)), ("[fd00::1]:80", ("fd00::1", 80))],
)
def test_endpoints_round_trip_through_their_text(text: str, parsed: tuple[str, int]) -> None:
    assert parse_endpoint(text) == parsed
    assert format_endpoint(*parsed) == text


@pytest.mark.parametrize("text", ["", "host", ":80", "h:0", "h:70000", "h:x"])
def test_a_bad_endpoint_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="host:port"):
        parse_endpoint(text)


@pytest.mark.parametrize(
    ("host", "endpoint"),
    [("0.0.0.0", None), ("::", None), ("10.1.2.3", "10.1.2.3:9464"), ("fd00::1", "[fd00::1]:9464")],
)
def test_a_wildcard_listen_address_is_not_advertised(host: str, endpoint: str | None) -> None:
    assert advertised_endpoint(host, 9464) == endpoint


def meshnode(name: str, endpoint: str | None, age: int = 5) -> dict[str, Any]:
    beat = (NOW - dt.timedelta(seconds=age)).strftime("%Y-%m-%dT%H:%M:%SZ")
    status: dict[str, Any] = {"heartbeatTime": beat, "intervalSeconds": 10}
    if endpoint is not None:
        status["probeEndpoint"] = endpoint
    return {"metadata": {"name": name}, "status": status}


def test_peers_are_the_other_fresh_agents_with_an_endpoint() -> None:
    items = [
        meshnode("me", "10.0.0.1:9464"),
        meshnode("b", "10.0.0.2:9464"),
        meshnode("a", "10.0.0.3:9464"),
        meshnode("stale", "10.0.0.4:9464", age=600),
        meshnode("silent", None),
        meshnode("broken", "nowhere"),
        {"metadata": {"name": "new"}},
    ]
    assert peers_of(items, "me", NOW) == [
        Peer("a", "10.0.0.3", 9464),
        Peer("b", "10.0.0.2", 9464),
    ]


def test_lower_median_calls_a_node_with_one_far_peer_near() -> None:
    assert lower_median([0.3, 20.0]) == 0.3
    assert lower_median([20.0, 20.0]) == 20.0
    assert lower_median([5.0, 1.0, 3.0]) == 3.0
    with pytest.raises(ValueError, match="no values"):
        lower_median([])


async def _serve_agent_endpoint() -> tuple[Any, int]:
    app = build_app(
        AgentMetrics("probe-test"),
        liveness=lambda: (True, "ok"),
        readiness=lambda: (True, "ok"),
    )
    return await start(app, "127.0.0.1", 0)


def test_a_visit_times_the_agents_own_endpoint() -> None:
    asyncio.run(_test_a_visit_times_the_agents_own_endpoint())


async def _test_a_visit_times_the_agents_own_endpoint() -> None:
    runner, port = await _serve_agent_endpoint()
    try:
        ms = await measure(Peer("b", "127.0.0.1", port), timeout=5.0)
    finally:
        await runner.cleanup()
    assert ms is not None and ms > 0


def test_a_closed_port_or_a_listener_that_never_answers_gives_no_sample() -> None:
    asyncio.run(_test_a_closed_port_or_a_listener_that_never_answers_gives_no_sample())


async def _test_a_closed_port_or_a_listener_that_never_answers_gives_no_sample() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    assert await measure(Peer("b", "127.0.0.1", port), timeout=2.0) is None
    with socket.socket() as mute:  # the kernel accepts, nobody answers
        mute.bind(("127.0.0.1", 0))
        mute.listen(4)
        assert await measure(Peer("b", "127.0.0.1", mute.getsockname()[1]), timeout=0.3) is None


def test_a_port_that_answers_something_else_gives_no_sample() -> None:
    asyncio.run(_test_a_port_that_answers_something_else_gives_no_sample())


async def _test_a_port_that_answers_something_else_gives_no_sample() -> None:
    async def wrong(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(wrong, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        assert await measure(Peer("b", "127.0.0.1", port), timeout=2.0) is None
    finally:
        server.close()
        await server.wait_closed()


async def _inline(call: Callable[[], T]) -> T:
    return call()


def prober(
    peers: Sequence[Peer], answers: dict[str, float | None], **settings: Any
) -> tuple[RttProber, list[str], list[int]]:
    visited: list[str] = []
    listings: list[int] = []

    async def fake_measure(peer: Peer, timeout: float) -> float | None:
        visited.append(peer.node)
        return answers.get(peer.node)

    def listing() -> Sequence[Peer]:
        listings.append(1)
        return peers

    return (
        RttProber(
            "me",
            RttSettings(**settings),
            list_peers=listing,
            blocking=_inline,
            transitions=TransitionLog(),
            rng=random.Random(1),
            measure_peer=fake_measure,
        ),
        visited,
        listings,
    )


def test_a_round_visits_at_most_its_share_and_lists_peers_rarely() -> None:
    asyncio.run(_test_a_round_visits_at_most_its_share_and_lists_peers_rarely())


async def _test_a_round_visits_at_most_its_share_and_lists_peers_rarely() -> None:
    peers = [Peer(f"n{i:02d}", "10.0.0.1", 9464) for i in range(30)]
    rtt, visited, listings = prober(
        peers, {p.node: 1.0 for p in peers}, peers_per_round=4, refresh_rounds=3
    )
    for _ in range(3):
        await rtt.round()
    assert len(visited) == 12 and len(set(visited)) == 12
    assert len(listings) == 1
    await rtt.round()
    assert len(listings) == 2
    trips, summary = rtt.report(now=time.monotonic())
    assert len(trips) == 16 and summary == 1.0


def test_a_silent_peer_is_dropped_not_counted() -> None:
    asyncio.run(_test_a_silent_peer_is_dropped_not_counted())


async def _test_a_silent_peer_is_dropped_not_counted() -> None:
    peers = [Peer("a", "10.0.0.1", 1), Peer("b", "10.0.0.2", 1), Peer("far", "10.0.0.3", 1)]
    answers: dict[str, float | None] = {"a": 0.4, "far": 25.0, "b": 0.3}
    rtt, visited, _ = prober(peers, answers)
    await rtt.round()
    answers["b"] = None  # b stops answering: its earlier samples go
    visited.clear()
    await rtt.round()
    assert sorted(visited) == ["a", "b", "far"]
    trips, summary = rtt.report(now=time.monotonic())
    assert {t.node: t.ms for t in trips} == {"a": 0.4, "far": 25.0}
    assert summary == 0.4


def test_an_empty_pool_is_listed_again_sooner_then_less_often() -> None:
    asyncio.run(_test_an_empty_pool_is_listed_again_sooner_then_less_often())


async def _test_an_empty_pool_is_listed_again_sooner_then_less_often() -> None:
    rtt, visited, listings = prober([], {}, refresh_rounds=6)
    listed_in = []
    for r in range(20):
        before = len(listings)
        await rtt.round()
        if len(listings) > before:
            listed_in.append(r)
    # After 1, 2, 4 rounds, then every refresh_rounds.
    assert listed_in == [0, 1, 3, 7, 13, 19] and visited == []
    assert rtt.report(now=0.0) == ([], None)
