"""Addresses of simulated nodes and pods: a network namespace per pod on a bridge,
or plain 127.x addresses where namespaces cannot be made.

Test infrastructure. Why not just 127.x: the API server refuses loopback
addresses in EndpointSlices ("may not be in the loopback range"), so Services
would have no endpoints, and every pod would share one port space (two agents
both listening on 0.0.0.0:9464 would collide). So, when running as root with
iproute2 and nsenter (the default here):

* each simulated cluster claims an index N and a bridge `meshsimN` with
  10.(200+N).0.1/16, the "host" address at which pods reach the machine;
* node k gets a network namespace with 10.(200+N).k.1 (hostNetwork pods run in
  it), and each of its pods a namespace of its own with 10.(200+N).k.n, joined to
  the bridge by a veth pair; there is no default route and no DNS (nothing
  outside the block is reachable, and lookups fail at once);
* the machine reaches every pod and node address through the bridge, so tests,
  probes and port-forward-like clients just connect to the pod IP;
* pods reach the API server (which listens on the machine's 127.0.0.1) at their
  own 127.0.0.1 and the same port: the node process listens there inside each
  namespace and forwards the bytes (TLS passes through untouched, so the
  serving certificate's 127.0.0.1 SAN still matches).

In "loopback" mode (no root) node k is 127.(200+N).k.1 and its pods 127.(200+N).k.n
in the machine's own namespace: good for single pods, not for Services.

The claim of N is a file created with O_EXCL in a machine-wide folder naming the
owning state folder, so parallel test sessions never share addresses; a claim
whose owner folder is gone is stale and reclaimed (its namespaces and bridge
deleted).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from e2e.nodesim.config import NodeConfig

FIRST_OCTET_BRIDGE = 10
FIRST_OCTET_LOOPBACK = 127
SECOND_OCTET_BASE = 200
MAX_CLUSTERS = 50
MAX_NODES = 254
FIRST_POD_HOST = 2
LAST_POD_HOST = 254
NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
STALE_CLAIM_SECONDS = 60.0


class NetworkError(RuntimeError):
    """A namespace, address or link could not be set up."""


def claims_dir() -> Path:
    default = Path(tempfile.gettempdir()) / "mesh-nodesim"
    return Path(os.environ.get("MESH_NODESIM_CLAIMS", str(default)))


def bridge_mode_available() -> tuple[bool, str]:
    """Whether namespaces can be used here, and if not why."""
    if os.geteuid() != 0:
        return False, "not root"
    for tool in ("ip", "nsenter"):
        if shutil.which(tool) is None:
            return False, f"{tool} not found"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        return False, f"ip netns: {probe.stderr.strip()}"
    return True, ""


def run_ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise NetworkError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


async def arun_ip(*args: str, check: bool = True) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "ip",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    code = proc.returncode or 0
    if check and code != 0:
        raise NetworkError(f"ip {' '.join(args)}: {err.decode(errors='replace').strip()}")
    return code, err.decode(errors="replace")


# -- the cluster's network (harness side) ---------------------------------------


@dataclass(frozen=True)
class ClusterNetwork:
    """The address block of one simulated cluster."""

    mode: str
    index: int
    owner: str

    @property
    def prefix(self) -> str:
        first = FIRST_OCTET_BRIDGE if self.mode == "bridge" else FIRST_OCTET_LOOPBACK
        return f"{first}.{SECOND_OCTET_BASE + self.index}"

    @property
    def bridge(self) -> str:
        return f"meshsim{self.index}" if self.mode == "bridge" else ""

    @property
    def host_address(self) -> str:
        """Where pods reach the machine (services bound to 0.0.0.0 or this address)."""
        return f"{self.prefix}.0.1" if self.mode == "bridge" else "127.0.0.1"

    @property
    def cidr(self) -> str:
        return f"{self.prefix}.0.0/16"

    def node_address(self, node_index: int) -> str:
        return f"{self.prefix}.{node_index}.1"

    def pod_prefix(self, node_index: int) -> str:
        return f"{self.prefix}.{node_index}"

    def netns_prefix(self, node_index: int) -> str:
        return f"meshsim{self.index}-{node_index}-" if self.mode == "bridge" else ""

    def veth_prefix(self, node_index: int) -> str:
        # Interface names are at most 15 bytes: "ms49-254-254" fits.
        return f"ms{self.index}-{node_index}-" if self.mode == "bridge" else ""

    def claim_file(self) -> Path:
        return claims_dir() / f"net-{self.index}.json"

    def setup(self) -> None:
        """Create the bridge (bridge mode); idempotent."""
        if self.mode != "bridge":
            return
        if run_ip("link", "show", self.bridge, check=False).returncode != 0:
            run_ip("link", "add", self.bridge, "type", "bridge")
        run_ip("addr", "replace", f"{self.host_address}/16", "dev", self.bridge)
        run_ip("link", "set", self.bridge, "up")

    def teardown(self) -> None:
        """Delete every namespace and link of this block, and the bridge."""
        if self.mode != "bridge":
            return
        delete_namespaces(f"meshsim{self.index}-")
        if run_ip("link", "show", self.bridge, check=False).returncode == 0:
            run_ip("link", "del", self.bridge, check=False)

    def release(self) -> None:
        self.teardown()
        with contextlib.suppress(OSError, ValueError):
            if json.loads(self.claim_file().read_text()).get("owner") == self.owner:
                self.claim_file().unlink()


def delete_namespaces(prefix: str) -> None:
    if not NETNS_DIR.is_dir():
        return
    for entry in sorted(NETNS_DIR.iterdir()):
        if entry.name.startswith(prefix):
            run_ip("netns", "del", entry.name, check=False)


def _routes() -> list[ipaddress.IPv4Network]:
    result = run_ip("-j", "-4", "route", "show", "table", "all", check=False)
    found = []
    with contextlib.suppress(ValueError):
        for route in json.loads(result.stdout or "[]"):
            dst = route.get("dst", "")
            if dst in ("", "default") or ":" in dst:
                continue
            with contextlib.suppress(ValueError):
                found.append(ipaddress.IPv4Network(dst, strict=False))
    return found


def _claim_is_stale(path: Path) -> bool:
    try:
        owner = Path(json.loads(path.read_text())["owner"])
        index = int(path.stem.split("-")[1])
    except (OSError, ValueError, KeyError, IndexError):
        return True
    if not owner.is_dir():
        return True
    try:
        return int(json.loads((owner / "network.json").read_text())["index"]) != index
    except (OSError, ValueError, KeyError):
        # The owner may be between writing its claim and its record.
        try:
            return time.time() - path.stat().st_mtime > STALE_CLAIM_SECONDS
        except OSError:
            return True


def claim_network(state_dir: Path, mode: str) -> ClusterNetwork:
    """The network recorded in `state_dir`, or a newly claimed free block."""
    record = state_dir / "network.json"
    owner = str(state_dir.resolve())
    claims_dir().mkdir(parents=True, exist_ok=True)
    if record.exists():
        net = ClusterNetwork(**{**json.loads(record.read_text()), "owner": owner})
        claim = net.claim_file()
        with contextlib.suppress(FileExistsError):
            _write_exclusive(claim, owner)
        if _owner_of(claim) == owner:
            if net.mode == mode:
                net.setup()
                return net
            net.release()
        # Otherwise another session took the block while this folder was idle.
    claims_dir().mkdir(parents=True, exist_ok=True)
    routes = _routes() if mode == "bridge" else []
    for index in range(MAX_CLUSTERS):
        net = ClusterNetwork(mode, index, owner)
        block = ipaddress.IPv4Network(net.cidr)
        if any(block.overlaps(r) for r in routes if str(r) != net.cidr):
            continue
        claim = net.claim_file()
        try:
            _write_exclusive(claim, owner)
        except FileExistsError:
            if not _claim_is_stale(claim):
                continue
            # Left by a run whose state folder is gone: take it over.
            ClusterNetwork(mode, index, "").teardown()
            claim.unlink(missing_ok=True)
            try:
                _write_exclusive(claim, owner)
            except FileExistsError:
                continue
        if mode == "bridge":
            # A bridge without a claim was left by a crash: nobody owns it.
            ClusterNetwork(mode, index, owner).teardown()
        state_dir.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(asdict(net)))
        net.setup()
        return net
    raise NetworkError(f"no free address block among {MAX_CLUSTERS} (claims in {claims_dir()})")


def _owner_of(claim: Path) -> str | None:
    try:
        owner = json.loads(claim.read_text()).get("owner")
    except (OSError, ValueError):
        return None
    return str(owner) if owner is not None else None


def _write_exclusive(path: Path, owner: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w") as out:
        out.write(json.dumps({"owner": owner}))


# -- the node's sandboxes (node process side) ------------------------------------


@dataclass(frozen=True)
class Sandbox:
    """Where a pod's processes run: its address and (bridge mode) its namespace."""

    ip: str
    netns: str | None = None

    def exec_prefix(self) -> list[str]:
        """argv prefix that runs a command inside the sandbox's network."""
        if self.netns is None:
            return []
        return ["nsenter", f"--net={NETNS_DIR / self.netns}", "--"]


class NodeNetwork:
    """The node's own sandbox and the pod sandboxes it hands out."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.bridge_mode = config.network_mode == "bridge"
        self._book = Path(config.state_dir) / "addresses.json"
        self._by_uid: dict[str, int] = {}
        if self._book.exists():
            self._by_uid = {k: int(v) for k, v in json.loads(self._book.read_text()).items()}
        self._lock = asyncio.Lock()

    @property
    def node_sandbox(self) -> Sandbox:
        return self._sandbox(1)

    def _sandbox(self, host: int) -> Sandbox:
        ip = f"{self.config.pod_prefix}.{host}"
        return Sandbox(ip, f"{self.config.netns_prefix}{host}" if self.bridge_mode else None)

    def known(self) -> dict[str, Sandbox]:
        return {uid: self._sandbox(host) for uid, host in self._by_uid.items()}

    async def setup_node(self) -> Sandbox:
        await self._ensure(1)
        return self.node_sandbox

    async def sandbox_for(self, uid: str) -> Sandbox:
        """The pod's sandbox, made on first use and kept across node restarts."""
        async with self._lock:
            host = self._by_uid.get(uid)
            if host is None:
                used = set(self._by_uid.values())
                free = [h for h in range(FIRST_POD_HOST, LAST_POD_HOST + 1) if h not in used]
                if not free:
                    raise NetworkError(f"node {self.config.name}: no free pod address")
                host = free[0]
                self._by_uid[uid] = host
                self._save()
        await self._ensure(host)
        return self._sandbox(host)

    async def release(self, uid: str) -> None:
        async with self._lock:
            host = self._by_uid.pop(uid, None)
            self._save()
        if host is not None and self.bridge_mode:
            # Deleting the host end first makes the removal synchronous, so the
            # name can be reused at once.
            await arun_ip("link", "del", f"{self.config.veth_prefix}{host}", check=False)
            await arun_ip("netns", "del", f"{self.config.netns_prefix}{host}", check=False)

    def _save(self) -> None:
        tmp = self._book.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._by_uid))
        tmp.replace(self._book)

    async def _ensure(self, host: int) -> None:
        if not self.bridge_mode:
            return
        cfg = self.config
        netns = f"{cfg.netns_prefix}{host}"
        veth = f"{cfg.veth_prefix}{host}"
        ip = f"{cfg.pod_prefix}.{host}"
        if (NETNS_DIR / netns).exists():
            code, _ = await arun_ip("-n", netns, "addr", "show", "dev", "eth0", check=False)
            if code == 0:
                return
            await arun_ip("netns", "del", netns, check=False)
        await arun_ip("link", "del", veth, check=False)
        await arun_ip("netns", "add", netns)
        await arun_ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        await arun_ip("link", "set", veth, "master", cfg.bridge, "up")
        await arun_ip("-n", netns, "link", "set", "lo", "up")
        await arun_ip("-n", netns, "addr", "add", f"{ip}/16", "dev", "eth0")
        await arun_ip("-n", netns, "link", "set", "eth0", "up")
        # No default route: nothing beyond the cluster's block is reachable (the
        # machine does not forward), and without one a DNS lookup fails at once
        # instead of timing out (Python's HTTPServer resolves its own address).


def listen_in_netns(netns: str | None, host: str, port: int) -> socket.socket:
    """A listening TCP socket bound inside `netns` (None: this namespace).

    A socket stays in the namespace it was made in, so a thread switches to the
    pod's namespace only to create it; the node process keeps serving it from
    its own namespace.
    """
    made: dict[str, socket.socket | BaseException] = {}

    def make() -> None:
        try:
            if netns is not None:
                fd = os.open(NETNS_DIR / netns, os.O_RDONLY)
                try:
                    libc = ctypes.CDLL(None, use_errno=True)
                    if libc.setns(fd, CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, f"setns {netns}: {os.strerror(err)}")
                finally:
                    os.close(fd)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(64)
            sock.setblocking(False)
            made["sock"] = sock
        except BaseException as exc:
            made["error"] = exc

    # setns changes the calling thread only; this thread ends right after.
    thread = threading.Thread(target=make, name=f"listen-{netns}")
    thread.start()
    thread.join()
    result = made.get("sock") or made.get("error")
    if isinstance(result, socket.socket):
        return result
    raise NetworkError(f"cannot listen on {host}:{port} in {netns}: {result}")
