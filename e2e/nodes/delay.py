"""A delay line on one node's link: every frame to and from the node waits.

Test infrastructure. This kernel has no `netem` qdisc, so the delay is made in
user space. The machine's end of the node's veth pair leaves the bridge; a TAP
device takes its place there; one forwarder process passes every frame between
the two, read from the veth through a packet socket and from the TAP through its
file descriptor, each after holding it `delay_ms` (so a round trip through the
link gains twice that). The node's namespace keeps its address and routes; its
veth end only stops offloading checksums and segmentation, since a frame taken
from a packet socket before the kernel fills its checksum in would arrive broken.

    python -m e2e.nodes.delay --netns NS --node-if IF --veth IF --bridge BR \
        --tap NAME --delay-ms 15

runs until SIGTERM or SIGINT, then puts the veth back on the bridge (closing the
TAP removes it). `DelayLine` starts and stops it by pid for tests.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import fcntl
import heapq
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
SIOCETHTOOL = 0x8946
# ethtool "set" commands of the offloads a packet socket must not see.
ETHTOOL_STXCSUM = 0x17
ETHTOOL_SSG = 0x19
ETHTOOL_STSO = 0x1F
ETHTOOL_SGSO = 0x24
ETHTOOL_SGRO = 0x2C
MODULE = "e2e.nodes.delay"
FRAME_MAX = 65536
# Frames held at most, per direction: beyond, new ones are dropped (a full link).
QUEUE_MAX = 20000


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def disable_offloads(ifname: str) -> None:
    """Checksums and segmentation done by the kernel before the frame leaves
    `ifname` (in the current network namespace)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for command in (ETHTOOL_STSO, ETHTOOL_SGSO, ETHTOOL_SGRO, ETHTOOL_SSG, ETHTOOL_STXCSUM):
            value = ctypes.create_string_buffer(struct.pack("II", command, 0))
            request = struct.pack("16sP", ifname.encode(), ctypes.addressof(value))
            request += bytes(40 - len(request))
            with contextlib.suppress(OSError):  # a feature the device cannot change
                fcntl.ioctl(sock.fileno(), SIOCETHTOOL, request)


def open_tap(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    return fd


class Forwarder:
    """Frames between a packet socket and a TAP, each held `delay` seconds."""

    def __init__(self, packet: socket.socket, tap: int, delay: float) -> None:
        self.packet = packet
        self.tap = tap
        self.delay = delay
        # (due, sequence, to_tap, frame): one heap keeps both directions in order.
        self.pending: list[tuple[float, int, bool, bytes]] = []
        self.count = collections.Counter[str]()
        self._sequence = 0

    def _hold(self, frame: bytes, to_tap: bool) -> None:
        if len(self.pending) >= QUEUE_MAX:
            self.count["dropped"] += 1
            return
        self._sequence += 1
        heapq.heappush(self.pending, (time.monotonic() + self.delay, self._sequence, to_tap, frame))

    def _from_node(self) -> None:
        while True:
            try:
                frame, address = self.packet.recvfrom(FRAME_MAX)
            except BlockingIOError:
                return
            if address[2] != PACKET_OUTGOING:  # not our own writes
                self._hold(frame, to_tap=True)

    def _from_bridge(self) -> None:
        while True:
            try:
                frame = os.read(self.tap, FRAME_MAX)
            except BlockingIOError:
                return
            self._hold(frame, to_tap=False)

    def _release(self) -> None:
        now = time.monotonic()
        while self.pending and self.pending[0][0] <= now:
            _, _, to_tap, frame = heapq.heappop(self.pending)
            try:
                if to_tap:
                    os.write(self.tap, frame)
                else:
                    self.packet.send(frame)
                self.count["to_bridge" if to_tap else "to_node"] += 1
            except OSError:
                self.count["failed"] += 1

    def run(self, stop: list[bool]) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self.packet, selectors.EVENT_READ, self._from_node)
        selector.register(self.tap, selectors.EVENT_READ, self._from_bridge)
        while not stop:
            timeout = None
            if self.pending:
                timeout = max(0.0, self.pending[0][0] - time.monotonic())
            for key, _ in selector.select(timeout if timeout is not None else 1.0):
                key.data()
            self._release()


def run(args: argparse.Namespace) -> int:
    if args.netns:
        # The node's end, inside its namespace: a child process enters it.
        subprocess.run(
            ["nsenter", f"--net=/run/netns/{args.netns}", "--", sys.executable, "-m", MODULE,
             "no-offload", args.node_if],
            check=True,
        )  # fmt: skip
    tap = open_tap(args.tap)
    packet = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    packet.bind((args.veth, ETH_P_ALL))
    packet.setblocking(False)
    stop: list[bool] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(True))
    try:
        _ip("link", "set", args.tap, "master", args.bridge, "up")
        _ip("link", "set", args.veth, "nomaster")
        _ip("link", "set", args.veth, "up")
        print(f"delay line {args.delay_ms} ms on {args.veth} via {args.tap}", flush=True)
        forwarder = Forwarder(packet, tap, args.delay_ms / 1000.0)
        forwarder.run(stop)
        print(f"delay line stopped: {dict(forwarder.count)}", flush=True)
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("link", "set", args.veth, "master", args.bridge, "up")
        packet.close()
        os.close(tap)
    return 0


@dataclass
class DelayLine:
    """The forwarder process of one link, started and stopped by pid."""

    veth: str
    bridge: str
    tap: str
    delay_ms: float
    netns: str = ""
    node_if: str = ""
    log: Path | None = None
    _proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        argv = [
            sys.executable, "-m", MODULE, "--veth", self.veth, "--bridge", self.bridge,
            "--tap", self.tap, "--delay-ms", str(self.delay_ms),
        ]  # fmt: skip
        if self.netns:
            argv += ["--netns", self.netns, "--node-if", self.node_if]
        out = self.log.open("ab") if self.log else subprocess.DEVNULL
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
        deadline = time.monotonic() + timeout
        while not self._on_bridge():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"delay line on {self.veth} did not start (log: {self.log})")
            time.sleep(0.1)

    def _on_bridge(self) -> bool:
        shown = subprocess.run(
            ["ip", "-o", "link", "show", self.veth], capture_output=True, text=True, check=False
        ).stdout
        tap = subprocess.run(
            ["ip", "-o", "link", "show", self.tap], capture_output=True, text=True, check=False
        ).stdout
        return f"master {self.bridge}" not in shown and f"master {self.bridge}" in tap

    def stop(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait(timeout=20)
        self._proc = None
        # Whatever happened to the forwarder, the link goes back on the bridge.
        subprocess.run(
            ["ip", "link", "set", self.veth, "master", self.bridge, "up"],
            capture_output=True,
            check=False,
        )


@contextlib.contextmanager
def delayed(line: DelayLine) -> Iterator[DelayLine]:
    line.start()
    try:
        yield line
    finally:
        line.stop()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["no-offload"]:
        for name in argv[1:]:
            disable_offloads(name)
        return 0
    parser = argparse.ArgumentParser(prog="python -m e2e.nodes.delay", description=__doc__)
    parser.add_argument("--veth", required=True, help="the machine's end of the node's link")
    parser.add_argument("--bridge", required=True)
    parser.add_argument("--tap", required=True, help="name of the TAP put on the bridge")
    parser.add_argument("--delay-ms", type=float, required=True, help="one way, per frame")
    parser.add_argument("--netns", default="", help="the node's network namespace")
    parser.add_argument("--node-if", default="", help="the node's end of the link")
    args = parser.parse_args(argv)
    if args.netns and not args.node_if:
        parser.error("--netns needs --node-if")
    if not 0 <= args.delay_ms <= 10_000:
        parser.error("--delay-ms must be between 0 and 10000")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
