"""Admission: whether a request may go to a host now, which host, or how long it waits.

Owns the live state behind the routing table: per model a `ModelGate` with its
hosts (`Backend`), each capped at its slot count of in-flight requests, and one
FIFO queue of waiting requests, bounded in length and in time. A request waits
while the model is not Ready, has no healthy host, or every slot is taken; it is
handed a host the moment one frees up. A host that fails is marked down and probed
(`/health`) until it answers 200 again. `Router` applies discovery snapshots to
this state without disturbing requests in flight.

Which host, among those with a free slot (`ModelGate._pick`), is the routing rule:
`prefix` (the default) gives a request the host its prompt's prefix hashes to
(`gateway.affinity`) when that host has a free slot, else the least busy one;
`least-busy` always the one with the fewest requests in flight; `round-robin`
the next one in turn. Either way the queue is one FIFO per model: the oldest
waiter gets the next free slot, on its preferred host if that is the one free.

Runs on the event loop only; the health probe is injected so this module does no
network I/O itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from mesh_operator.gateway.affinity import PREFIX_CHARS, Routing, preferred, prefix_key
from mesh_operator.gateway.routing import ModelRecord, RouteTable

log = logging.getLogger(__name__)

HealthProbe = Callable[[str], Awaitable[bool]]

PROBE_FIRST_DELAY = 0.1
PROBE_MAX_DELAY = 2.0


class AdmissionError(Exception):
    """A request could not be given a host."""


class QueueFullError(AdmissionError):
    """The model's queue already holds as many requests as allowed."""


class HoldTimeoutError(AdmissionError):
    """The bounded wait ran out; `not_ready` tells a model that is down from a busy one."""

    def __init__(self, not_ready: bool) -> None:
        super().__init__("model not ready" if not_ready else "model busy")
        self.not_ready = not_ready


class ModelGoneError(AdmissionError):
    """The model was deleted while the request waited."""


class Backend:
    """One host (llama-server) of one model."""

    __slots__ = ("healthy", "in_flight", "on_retire", "probe_task", "removed", "slots", "url")

    def __init__(self, url: str, slots: int) -> None:
        self.url = url
        self.slots = slots
        self.in_flight = 0
        # Unknown until the first probe answers: a fresh or restarted host may
        # still be loading its model (/health 503).
        self.healthy = False
        self.removed = False
        # Called when discovery drops the host: requests still waiting for its
        # answer give up on it (a host on a lost node may never answer).
        self.on_retire: set[Callable[[], None]] = set()
        self.probe_task: asyncio.Task[None] | None = None

    def has_room(self) -> bool:
        return self.healthy and not self.removed and self.in_flight < self.slots

    def __repr__(self) -> str:
        return f"Backend({self.url}, {self.in_flight}/{self.slots}, healthy={self.healthy})"


class Waiter:
    """A request waiting for a slot, with the affinity key of its prompt."""

    __slots__ = ("future", "key")

    def __init__(self, future: asyncio.Future[Backend], key: bytes | None) -> None:
        self.future = future
        self.key = key


class ModelGate:
    """The hosts and the queue of one model."""

    def __init__(self, record: ModelRecord, max_queue: int, routing: Routing = "prefix") -> None:
        self.record = record
        self.max_queue = max_queue
        self.routing: Routing = routing
        self.backends: dict[str, Backend] = {}
        self.waiters: deque[Waiter] = deque()
        self.gone = False
        # Client requests resolved to this model since the gateway started
        # (retries not counted again); kept across snapshots with the gate.
        self.requests = 0
        self._turn = 0

    @property
    def key(self) -> str:
        return self.record.key

    def dispatchable(self) -> bool:
        """Ready and at least one host answering: a request here will not wait forever."""
        return self.record.ready and any(
            b.healthy and not b.removed for b in self.backends.values()
        )

    def in_flight(self) -> int:
        return sum(b.in_flight for b in self.backends.values())

    async def acquire(self, deadline: float, key: bytes | None = None) -> Backend:
        """A host with a free slot, waiting (FIFO) until `deadline` (loop time) at most.

        `key` is the request's affinity key (`Router.affinity`): under `prefix`
        routing its host is taken when it has a free slot.
        """
        if self.gone:
            raise ModelGoneError(self.key)
        if not self.waiters:
            backend = self._pick(key)
            if backend is not None:
                backend.in_flight += 1
                return backend
        if len(self.waiters) >= self.max_queue:
            raise QueueFullError(self.key)
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Backend] = loop.create_future()
        entry = Waiter(waiter, key)
        self.waiters.append(entry)
        try:
            async with asyncio.timeout_at(deadline):
                return await asyncio.shield(waiter)
        except TimeoutError:
            # The slot may have been handed over in the same loop turn the timer
            # fired: take it rather than refuse a request that can now be served.
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                return waiter.result()
            waiter.cancel()
            raise HoldTimeoutError(not_ready=not self.dispatchable()) from None
        except BaseException:
            # Cancelled (the client went away) or the model was removed: give back
            # a slot handed to us meanwhile, so it goes to the next in line.
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.release(waiter.result())
            else:
                waiter.cancel()
            raise
        finally:
            with contextlib.suppress(ValueError):
                self.waiters.remove(entry)

    def release(self, backend: Backend) -> None:
        backend.in_flight -= 1
        self.pump()

    def pump(self) -> None:
        """Hand free slots to waiters, oldest first."""
        while self.waiters:
            head = self.waiters[0]
            if head.future.done():
                self.waiters.popleft()
                continue
            backend = self._pick(head.key)
            if backend is None:
                return
            self.waiters.popleft()
            backend.in_flight += 1
            head.future.set_result(backend)

    def close(self) -> None:
        """The model is gone: fail everything still waiting."""
        self.gone = True
        while self.waiters:
            waiter = self.waiters.popleft().future
            if not waiter.done():
                waiter.set_exception(ModelGoneError(self.key))

    def preferred(self, key: bytes) -> Backend | None:
        """The host `key` hashes to among the hosts in service (full or not)."""
        return preferred(
            key,
            (b for b in self.backends.values() if b.healthy and not b.removed),
            _url,
        )

    def _pick(self, key: bytes | None = None) -> Backend | None:
        if not self.record.ready:
            return None
        if self.routing == "round-robin":
            return self._next_in_turn()
        if key is not None and self.routing == "prefix":
            # A full preferred host is not waited for: the request goes to the
            # least busy host instead (a cache miss costs less than a queue).
            choice = self.preferred(key)
            if choice is not None and choice.has_room():
                return choice
        return self._least_busy()

    def _least_busy(self) -> Backend | None:
        best: Backend | None = None
        candidates = list(self.backends.values())
        # Least in flight first; ties rotate so equal hosts share the load.
        count = len(candidates)
        for offset in range(count):
            backend = candidates[(self._turn + offset) % count]
            if backend.has_room() and (best is None or backend.in_flight < best.in_flight):
                best = backend
        if best is not None:
            self._turn += 1
        return best

    def _next_in_turn(self) -> Backend | None:
        """The next host in a fixed rotation that has a free slot, whatever its load."""
        candidates = list(self.backends.values())
        count = len(candidates)
        for offset in range(count):
            index = (self._turn + offset) % count
            if candidates[index].has_room():
                self._turn = index + 1
                return candidates[index]
        return None


def _url(backend: Backend) -> str:
    return backend.url


class Router:
    """Routing table plus the gates behind it; applies snapshots from discovery."""

    def __init__(
        self,
        probe: HealthProbe,
        *,
        max_queue: int,
        routing: Routing = "prefix",
        prefix_chars: int = PREFIX_CHARS,
    ) -> None:
        self._probe = probe
        self._max_queue = max_queue
        self.routing: Routing = routing
        self.prefix_chars = prefix_chars
        self.table = RouteTable()
        self.gates: dict[str, ModelGate] = {}
        self.snapshots = 0
        self._closed = False

    def apply(self, records: Iterable[ModelRecord]) -> None:
        """Converge on a full snapshot of every model; runs on the loop."""
        table = RouteTable(records)
        for key in list(self.gates):
            if key not in table.records:
                gate = self.gates.pop(key)
                for backend in gate.backends.values():
                    self._retire(backend)
                gate.close()
        for key, record in table.records.items():
            gate = self.gates.get(key) or ModelGate(record, self._max_queue, self.routing)
            self.gates[key] = gate
            gate.record = record
            wanted = dict.fromkeys(record.backends)
            for url in list(gate.backends):
                if url not in wanted:
                    # Requests whose answer has started reaching their client
                    # finish on it; the others are sent again (see proxy).
                    self._retire(gate.backends.pop(url))
            for url in wanted:
                known = gate.backends.get(url)
                if known is None:
                    known = gate.backends[url] = Backend(url, record.slots)
                    self._start_probe(gate, known)
                known.slots = record.slots
            gate.pump()
        self.table = table
        self.snapshots += 1

    def affinity(self, path: str, payload: dict[str, Any]) -> bytes | None:
        """The affinity key of a request (None unless routing is `prefix`)."""
        if self.routing != "prefix":
            return None
        return prefix_key(path, payload, self.prefix_chars)

    def resolve(self, requested: str) -> ModelGate:
        """The gate of the model `requested` names (raises `ResolveError`)."""
        return self.gates[self.table.resolve(requested).key]

    def mark_down(self, gate: ModelGate, backend: Backend) -> None:
        """The host failed a request: stop sending to it until /health answers 200."""
        if backend.healthy:
            log.warning("host %s of %s marked down; probing /health", backend.url, gate.key)
        backend.healthy = False
        self._start_probe(gate, backend)

    async def close(self) -> None:
        self._closed = True
        tasks = [
            b.probe_task
            for gate in self.gates.values()
            for b in gate.backends.values()
            if b.probe_task is not None
        ]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _retire(self, backend: Backend) -> None:
        backend.removed = True
        for abandon in list(backend.on_retire):
            abandon()
        if backend.probe_task is not None:
            backend.probe_task.cancel()

    def _start_probe(self, gate: ModelGate, backend: Backend) -> None:
        if self._closed or backend.removed:
            return
        if backend.probe_task is not None and not backend.probe_task.done():
            return
        backend.probe_task = asyncio.get_running_loop().create_task(
            self._probe_until_healthy(gate, backend), name=f"probe {backend.url}"
        )

    async def _probe_until_healthy(self, gate: ModelGate, backend: Backend) -> None:
        delay = PROBE_FIRST_DELAY
        while not backend.removed:
            try:
                answered = await self._probe(backend.url)
            except Exception:  # a probe must never kill its own loop
                log.exception("health probe of %s failed", backend.url)
                answered = False
            if answered:
                if not backend.removed:
                    backend.healthy = True
                    log.info("host %s of %s healthy", backend.url, gate.key)
                    gate.pump()
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, PROBE_MAX_DELAY)
