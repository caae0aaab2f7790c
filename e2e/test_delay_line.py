"""The delay line of e2e/nodes/delay.py on a link like a real node's: two network
namespaces joined to a bridge by veth pairs. With the line on one link, a TCP
round trip between them gains twice the delay; off, the link is as before."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e import parts
from e2e.nodes.delay import DelayLine, delayed
from tests.conftest import require_part

pytestmark = pytest.mark.e2e

DELAY_MS = 15.0
PORT = 9797
# TEST-NET-1: never a route of this machine.
NET = "192.0.2"

SERVER = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(4)
    print("listening", flush=True)
    while True:
        c, _ = s.accept()
        while data := c.recv(64):
            c.sendall(data)
        c.close()
    """
)
CLIENT = textwrap.dedent(
    """
    import socket, sys, time, statistics
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times = []
    for _ in range(9):
        t = time.perf_counter(); c.sendall(b"x"); c.recv(64)
        times.append((time.perf_counter() - t) * 1000)
    print(statistics.median(times))
    """
)


def _root() -> Path:
    if os.geteuid() != 0:
        raise parts.PartMissingError("network namespaces need root")
    return Path("/")


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def link(tmp_path: Path) -> Iterator[dict[str, str]]:
    require_part(_root)
    n = os.getpid() % 10000
    names = {
        "bridge": f"mdl{n}b",
        "a": f"mdl{n}-a",
        "b": f"mdl{n}-b",
        "veth_a": f"mdl{n}ha",
        "veth_b": f"mdl{n}hb",
        "tap": f"mdl{n}t",
    }
    server: subprocess.Popen[str] | None = None
    try:
        ip("link", "add", names["bridge"], "type", "bridge")
        ip("link", "set", names["bridge"], "up")
        for side, address in (("a", f"{NET}.11"), ("b", f"{NET}.12")):
            ip("netns", "add", names[side])
            ip("link", "add", names[f"veth_{side}"], "type", "veth", "peer", "name", "eth0",
               "netns", names[side])  # fmt: skip
            ip("link", "set", names[f"veth_{side}"], "master", names["bridge"], "up")
            ip("-n", names[side], "addr", "add", f"{address}/24", "dev", "eth0")
            ip("-n", names[side], "link", "set", "eth0", "up")
            ip("-n", names[side], "link", "set", "lo", "up")
        server = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{names['b']}", "--", sys.executable, "-c", SERVER,
             f"{NET}.12", str(PORT)],
            stdout=subprocess.PIPE, text=True, start_new_session=True,
        )  # fmt: skip
        assert server.stdout is not None and server.stdout.readline().strip() == "listening"
        yield names
    finally:
        if server is not None:
            os.killpg(server.pid, 9)
            server.wait(timeout=10)
        for side in ("a", "b"):
            # Deleting the machine's end removes the pair at once; a namespace
            # may outlive its name a while.
            for argv in (["link", "del", names[f"veth_{side}"]], ["netns", "del", names[side]]):
                subprocess.run(["ip", *argv], check=False, capture_output=True)
        subprocess.run(["ip", "link", "del", names["bridge"]], check=False, capture_output=True)


def round_trip_ms(names: dict[str, str]) -> float:
    out = subprocess.run(
        ["nsenter", f"--net=/run/netns/{names['a']}", "--", sys.executable, "-c", CLIENT,
         f"{NET}.12", str(PORT)],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    return float(out.strip())


def test_a_delayed_link_adds_twice_the_delay_to_a_round_trip(
    link: dict[str, str], tmp_path: Path
) -> None:
    before = statistics.median(round_trip_ms(link) for _ in range(3))
    line = DelayLine(
        veth=link["veth_b"],
        bridge=link["bridge"],
        tap=link["tap"],
        delay_ms=DELAY_MS,
        netns=link["b"],
        node_if="eth0",
        log=tmp_path / "delay.log",
    )
    with delayed(line):
        during = round_trip_ms(link)
    after = round_trip_ms(link)
    assert during >= 2 * DELAY_MS > before, (before, during)
    assert after < 2 * DELAY_MS, (before, during, after)
    log = (tmp_path / "delay.log").read_text()
    assert "delay line stopped" in log and "Traceback" not in log, log
