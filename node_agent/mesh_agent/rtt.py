"""Round trips to the other nodes' agents: which peers to probe, the probe, the window.

Every agent answers `GET /rtt` on its own port (server.py) and publishes where
(`status.probeEndpoint` of its MeshNode). Every `interval` it reads the pool's
MeshNodes now and then (a paged list, only name, endpoint and heartbeat kept),
picks at most `peers_per_round` peers it has not visited for the longest, and for
each opens one TCP connection and times two small HTTP requests on it: the faster
of the two is the sample. Connection setup is not counted: a sample is the
application-level round trip on an established connection, what a llama.cpp RPC
call on its open socket pays (plus the peer agent's reply, about 0.1 ms idle).
Each peer keeps its last `samples` samples no older than `max_age_seconds`; the
MeshNode lists the medians of the `max_published` peers visited last, and their
lower median as the node's own round trip to the pool (`roundTripMs`).

A peer that does not answer loses its samples. The work is bounded whatever the
pool's size: one peer list every `refresh_rounds` rounds (sooner, backing off from
every round, while none is known), `peers_per_round` probes per round, one sample
window per peer listed.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import math
import random
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from kubernetes import client

from mesh_agent.discovery import get_json
from mesh_agent.transitions import TransitionLog
from mesh_operator.api.base import GROUP, MESHNODE_PLURAL, VERSION
from mesh_operator.api.heartbeat import is_stale
from mesh_operator.api.meshnode import MAX_ROUND_TRIPS, RoundTrip
from mesh_operator.api.roundtrip import lower_median

log = logging.getLogger(__name__)

T = TypeVar("T")

ECHO_PATH = "/rtt"
ECHO_BODY = b"mesh-rtt\n"
# Requests timed on one connection; the faster one is the sample.
REQUESTS_PER_VISIT = 2
# A pool listing stops here: a bound on the agent's memory, not a pool limit.
MAX_PEERS_LISTED = 5000
LIST_PAGE = 100


@dataclass(frozen=True)
class RttSettings:
    interval_seconds: float = 20.0  # between probe rounds; 0 turns probing off
    peers_per_round: int = 8
    samples: int = 9  # per peer: the median's window
    max_age_seconds: float = 900.0
    refresh_rounds: int = 15  # rounds between two reads of the pool's MeshNodes
    timeout_seconds: float = 2.0
    max_published: int = MAX_ROUND_TRIPS

    @property
    def enabled(self) -> bool:
        return self.interval_seconds > 0


@dataclass(frozen=True)
class Peer:
    node: str
    host: str
    port: int


def format_endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_endpoint(text: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port`; ValueError when it is neither."""
    host, colon, port = text.strip().rpartition(":")
    host = host.strip("[]")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not host:port")
    return host, int(port)


def advertised_endpoint(listen_host: str, port: int) -> str | None:
    """Where peers reach this agent: its listen address, unless that is a wildcard."""
    if listen_host in ("", "0.0.0.0", "::", "[::]"):
        return None
    return format_endpoint(listen_host, port)


class RttWindow:
    """The recent samples of each peer, and when each peer was last visited."""

    def __init__(self, samples: int, max_age_seconds: float) -> None:
        self._size = samples
        self._max_age = max_age_seconds
        self._samples: dict[str, deque[tuple[float, float]]] = {}
        self._visited: dict[str, float] = {}

    def visited(self, node: str, now: float) -> None:
        self._visited[node] = now

    def last_visit(self, node: str) -> float | None:
        return self._visited.get(node)

    def drop(self, node: str, now: float) -> None:
        """A visit without an answer: the peer's samples go."""
        self._visited[node] = now
        self._samples.pop(node, None)

    def add(self, node: str, ms: float, now: float) -> None:
        self._visited[node] = now
        window = self._samples.setdefault(node, deque(maxlen=self._size))
        window.append((now, ms))

    def forget_except(self, nodes: Iterable[str]) -> None:
        """Drop peers no longer listed (a node left the cluster)."""
        keep = set(nodes)
        for table in (self._samples, self._visited):
            for gone in [n for n in table if n not in keep]:
                del table[gone]

    def _prune(self, now: float) -> None:
        for node in list(self._samples):
            window = self._samples[node]
            while window and now - window[0][0] > self._max_age:
                window.popleft()
            if not window:
                del self._samples[node]

    def medians(self, now: float, limit: int) -> list[RoundTrip]:
        """Per peer the median of its samples: the `limit` peers sampled last, by name."""
        self._prune(now)
        latest = sorted(self._samples.items(), key=lambda item: item[1][-1][0], reverse=True)
        chosen = [
            RoundTrip(
                node=node,
                ms=round(statistics.median(ms for _, ms in window), 3),
                samples=len(window),
            )
            for node, window in latest[:limit]
        ]
        return sorted(chosen, key=lambda r: r.node)


def choose_peers(
    peers: Sequence[Peer], window: RttWindow, count: int, rng: random.Random
) -> list[Peer]:
    """The `count` peers visited longest ago (never visited first), ties at random."""

    def key(peer: Peer) -> tuple[float, float]:
        last = window.last_visit(peer.node)
        return (-math.inf if last is None else last, rng.random())

    keyed = [(key(p), p) for p in peers]
    keyed.sort(key=lambda item: item[0])
    return [p for _, p in keyed[: max(0, count)]]


def peers_of(items: Iterable[Mapping[str, Any]], self_node: str, now: dt.datetime) -> list[Peer]:
    """Fresh MeshNodes of other nodes that publish a probe endpoint."""
    found = []
    for item in items:
        name = str((item.get("metadata") or {}).get("name", ""))
        status = item.get("status") or {}
        endpoint = status.get("probeEndpoint")
        if not name or name == self_node or not isinstance(endpoint, str):
            continue
        if is_stale(status, now):
            continue
        try:
            host, port = parse_endpoint(endpoint)
        except ValueError:
            continue
        found.append(Peer(node=name, host=host, port=port))
    return sorted(found, key=lambda p: p.node)


def list_peers(api: client.ApiClient, self_node: str) -> list[Peer]:
    """The other nodes' agents, from the MeshNodes (blocking: call off the loop).

    Paged, and only what a peer needs is kept of each page, so a pool of hundreds
    of nodes never sits in the agent's memory at once.
    """
    peers: list[Peer] = []
    token = ""
    listed = 0
    while True:
        query: list[tuple[str, str | int]] = [("limit", LIST_PAGE)]
        if token:
            query.append(("continue", token))
        page = get_json(api, f"/apis/{GROUP}/{VERSION}/{MESHNODE_PLURAL}", query)
        items = page.get("items", []) or []
        listed += len(items)
        peers += peers_of(items, self_node, dt.datetime.now(dt.UTC))
        token = (page.get("metadata") or {}).get("continue") or ""
        if not token or listed >= MAX_PEERS_LISTED:
            return sorted(peers, key=lambda p: p.node)


async def _read_reply(reader: asyncio.StreamReader) -> bool:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    if length:
        await reader.readexactly(length)
    return len(parts) >= 2 and parts[1] == "200"


async def measure(peer: Peer, timeout: float) -> float | None:
    """One visit: the faster of two request round trips on one connection, in ms;
    None when the peer does not answer within `timeout` or answers wrongly."""
    request = (
        f"GET {ECHO_PATH} HTTP/1.1\r\nHost: {format_endpoint(peer.host, peer.port)}\r\n"
        "User-Agent: mesh-agent\r\n\r\n"
    ).encode()
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(peer.host, peer.port)
            best = math.inf
            for _ in range(REQUESTS_PER_VISIT):
                started = time.perf_counter()
                writer.write(request)
                await writer.drain()
                if not await _read_reply(reader):
                    return None
                best = min(best, time.perf_counter() - started)
            return best * 1000.0
    except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        return None
    except ValueError:  # a Content-Length that is not a number
        return None
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await writer.wait_closed()


class RttProber:
    """Probes a bounded sample of peers every interval; `report` gives what to publish."""

    def __init__(
        self,
        node_name: str,
        settings: RttSettings,
        *,
        list_peers: Callable[[], Sequence[Peer]],
        blocking: Callable[[Callable[[], Sequence[Peer]]], Awaitable[Sequence[Peer]]],
        transitions: TransitionLog,
        rng: random.Random | None = None,
        measure_peer: Callable[[Peer, float], Awaitable[float | None]] = measure,
    ) -> None:
        self.node_name = node_name
        self.settings = settings
        self.window = RttWindow(settings.samples, settings.max_age_seconds)
        self.peers: list[Peer] = []
        self.rounds = 0
        self._list = list_peers
        self._blocking = blocking
        self._transitions = transitions
        self._rng = rng or random.Random()
        self._measure = measure_peer
        self._listed_round: int | None = None
        self._empty_lists = 0

    async def _refresh(self) -> None:
        # Every `refresh_rounds`; sooner while no peer is known (the agents of a
        # pool start together): after 1, 2, 4, 8 ... rounds.
        wait = self.settings.refresh_rounds
        if not self.peers:
            wait = min(wait, 2 ** max(0, self._empty_lists - 1))
        if self._listed_round is not None and self.rounds - self._listed_round < wait:
            return
        self._listed_round = self.rounds
        try:
            peers = list(await self._blocking(self._list))
        except Exception as exc:  # the API may be down: keep probing the known peers
            self._transitions.record("rtt-peers", "failing", f"listing peers failing: {exc}")
            return
        self._transitions.record(
            "rtt-peers", f"ok:{len(peers)}", f"round-trip peers: {len(peers)} agents"
        )
        self.peers = peers
        self._empty_lists = 0 if peers else self._empty_lists + 1
        self.window.forget_except(p.node for p in peers)

    async def round(self) -> None:
        """List peers if due, then visit the chosen ones one after the other."""
        await self._refresh()
        chosen = choose_peers(self.peers, self.window, self.settings.peers_per_round, self._rng)
        for peer in chosen:
            ms = await self._measure(peer, self.settings.timeout_seconds)
            now = time.monotonic()
            if ms is None:
                # Its old samples say nothing of a peer that stopped answering.
                self.window.drop(peer.node, now)
                self._transitions.record(
                    f"rtt/{peer.node}", "silent", f"round-trip probe of {peer.node} unanswered"
                )
            else:
                self.window.add(peer.node, ms, now)
                self._transitions.record(
                    f"rtt/{peer.node}", "ok", f"round-trip probes of {peer.node} answered"
                )
        self.rounds += 1

    async def run(self, stop: asyncio.Event) -> None:
        # A random start spreads the agents of a pool that started together.
        delay = self._rng.uniform(0, min(5.0, self.settings.interval_seconds))
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)
            if stop.is_set():
                return
            try:
                await self.round()
            except Exception:
                log.exception("round-trip probing failed")
            delay = self.settings.interval_seconds * self._rng.uniform(0.8, 1.2)

    def report(self, now: float) -> tuple[list[RoundTrip], float | None]:
        """The medians to publish, and their lower median (None before any)."""
        trips = self.window.medians(now, self.settings.max_published)
        summary = round(lower_median(t.ms for t in trips), 3) if trips else None
        return trips, summary
