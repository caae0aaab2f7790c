"""The bench's delay proxy: the round trip it adds, and changing it on an open connection."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from bench.planner.delay_proxy import proxied

pytestmark = pytest.mark.unit


def _echo_server() -> tuple[socket.socket, threading.Thread]:
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            while data := conn.recv(1024):
                conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


def _round_trip_ms(conn: socket.socket) -> float:
    started = time.perf_counter()
    conn.sendall(b"ping")
    got = 0
    while got < 4:
        got += len(conn.recv(64))
    return (time.perf_counter() - started) * 1000


def test_the_added_round_trip_follows_set_rtt_on_an_open_connection() -> None:
    listener, thread = _echo_server()
    target = listener.getsockname()
    with (
        proxied([target], 0.0) as proxies,
        socket.create_connection(("127.0.0.1", proxies.routes[0].port)) as conn,
    ):
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        proxies.set_rtt(20.0)
        first = min(_round_trip_ms(conn) for _ in range(3))
        proxies.set_rtt(60.0)
        second = min(_round_trip_ms(conn) for _ in range(3))
    thread.join(5)
    listener.close()
    # The proxy sleeps half the round trip each way (minus a wake-up margin of
    # 0.5 ms per direction): no round trip can be quicker than that. Lower
    # bounds only: a busy machine makes them longer, never shorter.
    assert first >= 19.0, first
    assert second >= 59.0, second
