"""A TCP proxy that adds a fixed round trip, for measuring plans over a slow network.

Owns latency injection for the real measurement. Each direction of a
connection is delayed by half the added RTT: bytes read at time t are written
at t + rtt/2, in order, without slowing the stream's throughput (reads never
wait on writes). Runs its own event loop in a thread so benchmark code stays
synchronous; stopped by closing its servers, nothing is killed by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

_CHUNK = 1 << 16
# epoll rounds timeouts up to whole milliseconds and the thread needs time to
# wake: sleep this much less than asked so the added delay lands on target.
_WAKE_EARLY = 0.0005


def _no_delay(writer: asyncio.StreamWriter) -> None:
    # Nagle's algorithm would hold small RPC messages back for the ACK of the
    # previous one: that is latency the proxy must not add on its own.
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: Callable[[], float]
) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue()

    async def pump_in() -> None:
        while True:
            data = await reader.read(_CHUNK)
            queue.put_nowait((loop.time() + delay(), data or None))
            if not data:
                return

    async def pump_out() -> None:
        while True:
            due, data = await queue.get()
            wait = due - loop.time() - _WAKE_EARLY
            if wait > 0:
                await asyncio.sleep(wait)
            if data is None:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    try:
        await asyncio.gather(pump_in(), pump_out())
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


@dataclass
class _Route:
    target: tuple[str, int]
    server: asyncio.Server | None = None
    port: int = 0


class DelayProxies:
    """One listening port per target, each adding `rtt_ms` of round trip."""

    def __init__(self, targets: Sequence[tuple[str, int]], rtt_ms: float) -> None:
        self.delay = rtt_ms / 2000.0
        self.routes = [_Route(t) for t in targets]
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def one_way(self) -> float:
        return self.delay

    def set_rtt(self, rtt_ms: float) -> None:
        """Change the added round trip; bytes already on their way keep theirs."""
        self.delay = rtt_ms / 2000.0

    async def _handle(
        self, route: _Route, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
    ) -> None:
        try:
            upstream_r, upstream_w = await asyncio.open_connection(*route.target)
        except OSError:
            client_w.close()
            return
        _no_delay(client_w)
        _no_delay(upstream_w)
        await asyncio.gather(
            _pipe(client_r, upstream_w, self.one_way), _pipe(upstream_r, client_w, self.one_way)
        )

    async def _start(self) -> None:
        for route in self.routes:

            async def handle(
                r: asyncio.StreamReader, w: asyncio.StreamWriter, route: _Route = route
            ) -> None:
                # Cancelled at shutdown: end quietly instead of reporting it.
                with contextlib.suppress(asyncio.CancelledError):
                    await self._handle(route, r, w)

            route.server = await asyncio.start_server(handle, "127.0.0.1", 0)
            route.port = route.server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        for route in self.routes:
            if route.server is not None:
                route.server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def start(self) -> list[str]:
        """Start listening; return the proxy addresses, in the order of the targets."""
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return [f"127.0.0.1:{r.port}" for r in self.routes]

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@contextlib.contextmanager
def delayed(targets: Sequence[tuple[str, int]], rtt_ms: float) -> Iterator[list[str]]:
    with proxied(targets, rtt_ms) as proxies:
        yield [f"127.0.0.1:{r.port}" for r in proxies.routes]


@contextlib.contextmanager
def proxied(targets: Sequence[tuple[str, int]], rtt_ms: float) -> Iterator[DelayProxies]:
    """Proxies whose round trip `set_rtt` changes while connections stay open."""
    proxies = DelayProxies(targets, rtt_ms)
    proxies.start()
    try:
        yield proxies
    finally:
        proxies.stop()


def measure_rtt_ms(rtt_ms: float, pings: int = 40) -> float:
    """Median round trip through a proxy to a local echo server, in ms."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def echo() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while data := conn.recv(_CHUNK):
                conn.sendall(data)

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()
    samples = []
    with delayed([("127.0.0.1", port)], rtt_ms) as (address,):
        host, proxy_port = address.rsplit(":", 1)
        with socket.create_connection((host, int(proxy_port))) as conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(pings):
                started = time.perf_counter()
                conn.sendall(b"ping")
                got = 0
                while got < 4:
                    got += len(conn.recv(64))
                samples.append((time.perf_counter() - started) * 1000)
    thread.join(5)
    listener.close()
    return statistics.median(samples)
