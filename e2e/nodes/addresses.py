"""The address plan of one set of real test nodes, and its claim on the machine.

Test infrastructure. Each set of nodes claims an index N (a file created with
O_EXCL in a machine-wide folder, naming the owning state folder) and with it:

* the node network 172.30.N.0/24 on a bridge `meshnodeN` in the machine's own
  namespace: the machine is 172.30.N.1 (the API server's forwarder and the image
  registry listen there), node k is 172.30.N.(11+k) in a network namespace of its
  own, joined to the bridge by a veth pair;
* the pod network 172.(20+N).0.0/16: node k's pods get 172.(20+N).(k+1).0/24 from
  the CNI bridge plugin inside that node's namespace; every node and the machine
  route each other node's pod block through that node's address.

No default route leaves these networks: nothing outside them is reachable.
A claim whose owner folder is gone is stale and is taken over.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

MAX_SETS = 10
MAX_NODES = 200
CLUSTER_DOMAIN = "cluster.local"


class AddressError(RuntimeError):
    """No free address block, or the machine's routes could not be read."""


@dataclass(frozen=True)
class AddressPlan:
    index: int

    @property
    def bridge(self) -> str:
        return f"meshnode{self.index}"

    @property
    def node_network(self) -> str:
        return f"172.30.{self.index}.0/24"

    @property
    def host_address(self) -> str:
        """The machine, as the nodes and pods see it."""
        return f"172.30.{self.index}.1"

    def node_address(self, k: int) -> str:
        return f"172.30.{self.index}.{11 + k}"

    @property
    def pod_network(self) -> str:
        return f"172.{20 + self.index}.0.0/16"

    def pod_subnet(self, k: int) -> str:
        return f"172.{20 + self.index}.{k + 1}.0/24"

    def netns(self, node: str) -> str:
        return f"meshnode{self.index}-{node}"

    def veth_host(self, k: int) -> str:
        # Interface names are at most 15 bytes.
        return f"mn{self.index}h{k}"

    def veth_node(self, k: int) -> str:
        return f"mn{self.index}n{k}"


def claims_dir() -> Path:
    return Path(tempfile.gettempdir()) / "mesh-realnodes-claims"


def _routes() -> list[tuple[ipaddress.IPv4Network, str]]:
    result = subprocess.run(
        ["ip", "-j", "-4", "route", "show", "table", "all"],
        capture_output=True,
        text=True,
        check=False,
    )
    found = []
    with contextlib.suppress(ValueError):
        for route in json.loads(result.stdout or "[]"):
            dst = route.get("dst", "")
            if dst in ("", "default") or ":" in dst:
                continue
            with contextlib.suppress(ValueError):
                found.append((ipaddress.IPv4Network(dst, strict=False), route.get("dev", "")))
    return found


def _owner(claim: Path) -> str | None:
    try:
        return str(json.loads(claim.read_text())["owner"])
    except (OSError, ValueError, KeyError):
        return None


def claim(state_dir: Path) -> AddressPlan:
    """The plan recorded in `state_dir`, or a newly claimed free block."""
    owner = str(state_dir.resolve())
    record = state_dir / "addresses.json"
    claims_dir().mkdir(parents=True, exist_ok=True)
    if record.exists():
        plan = AddressPlan(**json.loads(record.read_text()))
        path = claims_dir() / f"set-{plan.index}.json"
        if _owner(path) in (owner, None):
            path.write_text(json.dumps({"owner": owner}))
            return plan
    routes = _routes()
    for index in range(MAX_SETS):
        plan = AddressPlan(index)
        path = claims_dir() / f"set-{index}.json"
        holder = _owner(path)
        if holder is not None and holder != owner and Path(holder).is_dir():
            continue
        blocks = [ipaddress.IPv4Network(b) for b in (plan.node_network, plan.pod_network)]
        # Routes through this block's own bridge, left by an earlier run, are not
        # a conflict: `up` deletes that bridge first.
        if any(b.overlaps(r) for b in blocks for r, dev in routes if dev != plan.bridge):
            continue
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        with os.fdopen(fd, "w") as out:
            out.write(json.dumps({"owner": owner}))
        state_dir.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(asdict(plan)))
        return plan
    raise AddressError(f"no free address block among {MAX_SETS} (claims in {claims_dir()})")


def release(state_dir: Path, plan: AddressPlan) -> None:
    path = claims_dir() / f"set-{plan.index}.json"
    if _owner(path) == str(state_dir.resolve()):
        path.unlink(missing_ok=True)
