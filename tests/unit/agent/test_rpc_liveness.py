"""RPC liveness: the socket table reading and the probe's verdicts on real sockets."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from e2e.waiting import free_port
from mesh_agent.rpc_liveness import (
    RpcState,
    RpcTarget,
    classify_silence,
    parse_socket_table,
    probe,
    visible_socket_rows,
)

pytestmark = pytest.mark.unit

# Recorded from /proc/net/tcp while a real ggml-rpc-server (v7.0.0) on
# 127.0.0.1:50999 served one client and a second connection waited in its backlog
# (columns after the inode trimmed).
RECORDED_TABLE = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt uid timeout inode
   0: 0100007F:C737 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 78109
   1: 0100007F:8816 0100007F:C737 01 00000000:00000000 00:00000000 00000000 0 0 78545
   2: 0100007F:881E 0100007F:C737 01 00000000:00000000 00:00000000 00000000 0 0 78546
   3: 0100007F:C737 0100007F:881E 01 00000000:00000000 00:00000000 00000000 0 0 0
   4: 0100007F:C737 0100007F:8816 01 00000000:00000000 00:00000000 00000000 0 0 78397
"""
TARGET = RpcTarget("ns/gemma", "127.0.0.1", 50999)


def test_recorded_table_decodes() -> None:
    rows = parse_socket_table(RECORDED_TABLE)
    assert rows[0].local_ip == "127.0.0.1"
    assert rows[0].local_port == 50999
    assert rows[0].state == "0A"
    assert {r.inode for r in rows if r.local_port == 50999 and r.state == "01"} == {0, 78397}


def test_busy_server_is_serving_not_hung() -> None:
    assert classify_silence(parse_socket_table(RECORDED_TABLE), TARGET) is RpcState.SERVING


def test_only_backlogged_connections_mean_hung() -> None:
    # Drop the accepted server-side socket: only the backlog (inode 0) is left.
    lines = [line for line in RECORDED_TABLE.splitlines() if "78397" not in line]
    rows = parse_socket_table("\n".join(lines))
    assert classify_silence(rows, TARGET) is RpcState.HUNG


def test_invisible_tables_are_unknown() -> None:
    assert classify_silence(None, TARGET) is RpcState.UNKNOWN
    assert classify_silence([], TARGET) is RpcState.UNKNOWN


def test_ipv6_table_decodes() -> None:
    line = (
        "   0: 00000000000000000000000001000000:C350 00000000000000000000000000000000:0000"
        " 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0 100 0 0 10 0"
    )
    (row,) = parse_socket_table("header\n" + line)
    assert (row.local_ip, row.local_port, row.inode) == ("::1", 50000, 4242)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ns/gemma=10.1.2.3:50052", RpcTarget("ns/gemma", "10.1.2.3", 50052)),
        ("10.1.2.3:50052", RpcTarget("", "10.1.2.3", 50052)),
        ("ns/m=[fd00::1]:50052", RpcTarget("ns/m", "fd00::1", 50052)),
    ],
)
def test_target_parsing(text: str, expected: RpcTarget) -> None:
    assert RpcTarget.parse(text) == expected


@pytest.mark.parametrize("text", ["", "host", "ns/m=host:", "host:99999", "ns/m=:50052"])
def test_bad_targets_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="host:port"):
        RpcTarget.parse(text)


def test_nobody_listening_is_down() -> None:
    state = probe(RpcTarget("", "127.0.0.1", free_port()), timeout=0.5).state
    assert state is RpcState.DOWN


def test_a_listener_that_never_accepts_is_hung() -> None:
    # The kernel completes the handshake from the backlog: a bare TCP probe would
    # call this server alive. Our own /proc shows the listener and no accepted client.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        target = RpcTarget("", "127.0.0.1", listener.getsockname()[1])
        result = probe(
            target, timeout=0.3, socket_rows=lambda: visible_socket_rows(Path("/proc"), ())
        )
    assert result.state is RpcState.HUNG
    assert not result.answering


def test_without_a_visible_socket_table_nothing_is_sent_and_state_is_unknown() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        result = probe(RpcTarget("", "127.0.0.1", listener.getsockname()[1]), timeout=0.3)
        listener.settimeout(1)
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(0.2)
            # Nothing waits in the connection: a busy server taking it later
            # would read end-of-stream, never a HELLO it must answer.
            assert conn.recv(64) == b""
    assert result.state is RpcState.UNKNOWN
    assert not result.answering


def test_a_server_that_accepts_and_closes_is_down() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        port = listener.getsockname()[1]

        def close_everything() -> None:
            for _ in range(2):  # the HELLO and the legacy HELLO retry
                conn, _ = listener.accept()
                conn.close()

        thread = threading.Thread(target=close_everything, daemon=True)
        thread.start()
        result = probe(
            RpcTarget("", "127.0.0.1", port),
            timeout=1.0,
            socket_rows=lambda: visible_socket_rows(Path("/proc"), ()),
        )
        thread.join(timeout=2)
    assert result.state is RpcState.DOWN
