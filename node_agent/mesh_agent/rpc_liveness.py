"""Whether the node's ggml-rpc-server processes answer, told apart from the kernel.

A TCP connect proves nothing: the kernel completes the handshake from the listen
backlog whether or not the server will ever call accept(). The probe reads the
kernel's socket tables (/proc/<pid>/net/tcp{,6}) of this agent and of the server
processes it can see (all of them with hostPID): a connection on the server's port
that a process has accept()ed has an inode, one still in the backlog has inode 0.
A server holding an accepted client is busy with its one client (Serving, the
normal state of a worker while its host runs). Otherwise the probe connects, waits
until the server accepts it, and speaks the server's own protocol (ggml-rpc.cpp):
a HELLO command (byte 14, a u64 size, the request) answered by the protocol
version (Ready). A listener that never accepts is Hung; a refused port is Down.
"""

from __future__ import annotations

import enum
import ipaddress
import select
import socket
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from mesh_agent.inventory.cpu import processes_named

RPC_CMD_HELLO = 14
# Protocol 3.x and later send a 24-byte capability block with HELLO and get
# major, minor, patch, padding and the server's 24-byte block back.
HELLO_REQUEST_CAPS = 24
HELLO_RESPONSE_SIZE = 4 + HELLO_REQUEST_CAPS
# Earlier servers take an empty HELLO and answer three bytes.
LEGACY_RESPONSE_SIZE = 3

TCP_ESTABLISHED = "01"
TCP_LISTEN = "0A"


class RpcState(enum.StrEnum):
    READY = "Ready"  # answered HELLO: idle, will take the next client
    SERVING = "Serving"  # silent, but a client connection has been accepted
    HUNG = "Hung"  # listening, silent, no client accepted
    DOWN = "Down"  # refused, reset or unreachable
    UNKNOWN = "Unknown"  # silent, and its socket table is not visible here


@dataclass(frozen=True)
class RpcTarget:
    model: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> RpcTarget:
        """`namespace/model=host:port`, or `host:port` for a server of no known model."""
        model, sep, address = text.strip().rpartition("=")
        if not sep:
            model, address = "", text.strip()
        host, colon, port = address.rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"RPC server {text!r}: expected [namespace/model=]host:port")
        return cls(model=model, host=host.strip("[]"), port=int(port))


@dataclass(frozen=True)
class RpcProbe:
    target: RpcTarget
    state: RpcState
    version: str | None = None
    detail: str = ""

    @property
    def answering(self) -> bool:
        return self.state in (RpcState.READY, RpcState.SERVING)


@dataclass(frozen=True)
class SocketRow:
    local_ip: str
    local_port: int
    remote_ip: str
    remote_port: int
    state: str
    inode: int


def _decode_address(text: str) -> tuple[str, int]:
    address, port = text.split(":")
    raw = bytes.fromhex(address)
    # The kernel prints each 32-bit word of the address in host (little-endian) order.
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(words)), int(port, 16)


def parse_socket_table(text: str) -> list[SocketRow]:
    rows: list[SocketRow] = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10:
            continue
        try:
            local_ip, local_port = _decode_address(fields[1])
            remote_ip, remote_port = _decode_address(fields[2])
            rows.append(
                SocketRow(local_ip, local_port, remote_ip, remote_port, fields[3], int(fields[9]))
            )
        except ValueError:
            continue
    return rows


def socket_sources(proc: Path, server_names: Iterable[str]) -> list[Path]:
    """The /proc/<pid> folders whose socket tables can show our servers: this
    agent's own and every visible process named like a server (all of the node's
    when the agent runs with hostPID)."""
    return [proc / "self", *processes_named(proc, server_names)]


def read_socket_rows(folders: Iterable[Path]) -> list[SocketRow] | None:
    """TCP rows of those folders' network namespaces; None when none was readable."""
    rows: set[SocketRow] = set()
    read_any = False
    for folder in folders:
        for table in ("tcp", "tcp6"):
            try:
                text = (folder / "net" / table).read_text()
            except OSError:
                continue
            read_any = True
            rows.update(parse_socket_table(text))
    return sorted(rows, key=lambda r: (r.local_port, r.remote_port)) if read_any else None


def visible_socket_rows(proc: Path, server_names: Iterable[str]) -> list[SocketRow] | None:
    return read_socket_rows(socket_sources(proc, server_names))


def _matches(ip: str, host: str) -> bool:
    wildcard = ip in ("0.0.0.0", "::")
    if wildcard:
        return True
    try:
        return ipaddress.ip_address(ip) == ipaddress.ip_address(host)
    except ValueError:
        return True  # a host name: the port alone has to do


def _server_rows(rows: list[SocketRow], target: RpcTarget) -> list[SocketRow]:
    return [r for r in rows if r.local_port == target.port and _matches(r.local_ip, target.host)]


def listening(rows: list[SocketRow] | None, target: RpcTarget) -> bool:
    """Whether a process holds a listening socket on the target's port."""
    return rows is not None and any(
        r.state == TCP_LISTEN and r.inode != 0 for r in _server_rows(rows, target)
    )


def accepted_clients(
    rows: list[SocketRow], target: RpcTarget, *, excluding_port: int | None = None
) -> list[SocketRow]:
    """Server-side sockets of connections the server has accept()ed."""
    return [
        r
        for r in _server_rows(rows, target)
        if r.state == TCP_ESTABLISHED and r.inode != 0 and r.remote_port != excluding_port
    ]


def classify_silence(rows: list[SocketRow] | None, target: RpcTarget) -> RpcState:
    """State of a server that has not taken our connection."""
    if rows is None or not listening(rows, target):
        return RpcState.UNKNOWN
    return RpcState.SERVING if accepted_clients(rows, target) else RpcState.HUNG


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionResetError("closed by the server")
        data += chunk
    return data


def _hello(sock: socket.socket, legacy: bool) -> str:
    """Send HELLO on an accepted connection and return the server's protocol version."""
    payload = b"" if legacy else bytes(HELLO_REQUEST_CAPS)
    sock.sendall(bytes([RPC_CMD_HELLO]) + struct.pack("<Q", len(payload)) + payload)
    (size,) = struct.unpack("<Q", _recv_exact(sock, 8))
    if size not in (HELLO_RESPONSE_SIZE, LEGACY_RESPONSE_SIZE):
        raise ConnectionResetError(f"unexpected HELLO answer of {size} bytes")
    body = _recv_exact(sock, size)
    return f"{body[0]}.{body[1]}.{body[2]}"


def _wait_accepted(
    sock: socket.socket,
    target: RpcTarget,
    rows: Callable[[], list[SocketRow] | None],
    timeout: float,
) -> bool:
    """Whether the server accept()ed our connection within `timeout`.

    Raises ConnectionResetError when the peer closed it: something accepted and
    hung up before a word was said, which is no RPC server.
    """
    ours = sock.getsockname()[1]
    deadline = time.monotonic() + timeout
    while True:
        # Readable before we said anything can only mean end-of-stream.
        readable, _, _ = select.select([sock], [], [], 0)
        if readable and sock.recv(1, socket.MSG_PEEK) == b"":
            raise ConnectionResetError("closed by the peer before HELLO")
        table = rows() or []
        if any(r.remote_port == ours and r.inode != 0 for r in _server_rows(table, target)):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


def probe(
    target: RpcTarget,
    *,
    timeout: float = 1.0,
    socket_rows: Callable[[], list[SocketRow] | None] = lambda: None,
) -> RpcProbe:
    """Ask one RPC server whether it answers; never raises.

    HELLO is sent only once the server has accept()ed our connection, as seen in
    its socket table. A HELLO left in the backlog of a busy server would be read
    and answered after we gave up and closed, and ggml-rpc-server dies of SIGPIPE
    writing that answer (observed with v7.0.0). With no visible table, the probe
    only connects and reports Unknown rather than risk it.
    """
    rows = socket_rows()
    visible = listening(rows, target)
    if visible and rows is not None and accepted_clients(rows, target):
        return RpcProbe(target, RpcState.SERVING, detail=_SILENCE[RpcState.SERVING])
    try:
        with socket.create_connection((target.host, target.port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            if not visible:
                return RpcProbe(target, RpcState.UNKNOWN, detail=_SILENCE[RpcState.UNKNOWN])
            try:
                accepted = _wait_accepted(sock, target, socket_rows, timeout)
            except ConnectionResetError as exc:
                return RpcProbe(target, RpcState.DOWN, detail=f"closed without answering: {exc}")
            if not accepted:
                # Closed with nothing sent: the server, once it takes this
                # connection, reads end-of-stream and moves on.
                again = socket_rows()
                mine = sock.getsockname()[1]
                busy = again is not None and accepted_clients(again, target, excluding_port=mine)
                state = RpcState.SERVING if busy else RpcState.HUNG
                return RpcProbe(target, state, detail=_SILENCE[state])
            try:
                version = _hello(sock, legacy=False)
                return RpcProbe(target, RpcState.READY, version, "answered HELLO")
            except TimeoutError:
                return RpcProbe(target, RpcState.HUNG, detail="accepted but did not answer HELLO")
            except (ConnectionResetError, BrokenPipeError):
                pass  # maybe an older protocol: ask again below
    except ConnectionRefusedError as exc:
        return RpcProbe(target, RpcState.DOWN, detail=f"connection refused: {exc.strerror}")
    except OSError as exc:
        return RpcProbe(target, RpcState.DOWN, detail=f"unreachable: {exc}")
    return _legacy_probe(target, timeout, socket_rows)


def _legacy_probe(
    target: RpcTarget, timeout: float, socket_rows: Callable[[], list[SocketRow] | None]
) -> RpcProbe:
    """Servers older than protocol 3 take an empty HELLO and drop a longer one."""
    try:
        with socket.create_connection((target.host, target.port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            if not _wait_accepted(sock, target, socket_rows, timeout):
                return RpcProbe(target, RpcState.HUNG, detail=_SILENCE[RpcState.HUNG])
            version = _hello(sock, legacy=True)
            return RpcProbe(target, RpcState.READY, version, "answered legacy HELLO")
    except OSError as exc:
        return RpcProbe(target, RpcState.DOWN, detail=f"closed without answering HELLO: {exc}")


_SILENCE = {
    RpcState.SERVING: "busy with its client (an accepted connection; ours waits in the backlog)",
    RpcState.HUNG: "listening but accepts nothing: no client, no answer",
    RpcState.UNKNOWN: "accepts TCP, but its sockets are not visible from this agent "
    "(needs hostPID or the same network namespace)",
}
