"""The configuration of one simulated node, written by the harness and read by the
node process.

Test infrastructure. One JSON file per node (`<node state>/node.json`) holds
everything the node process needs, so `python -m e2e.nodesim node --config FILE`
restarts a lost node exactly as it was.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

# Kubelet's defaults: the Lease lasts 40 s and is renewed every quarter of that.
LEASE_DURATION_SECONDS = 40
LEASE_RENEW_SECONDS = 10.0
# Kubelet's container restart back-off: 10 s doubling up to 5 min.
BACKOFF_BASE_SECONDS = 10.0
BACKOFF_CAP_SECONDS = 300.0


@dataclass
class NodeConfig:
    """One simulated node: identity, capacity, addresses and where its state lives."""

    name: str
    kubeconfig: str
    state_dir: str
    # Shared by every node of one simulated cluster: PersistentVolumeClaim folders.
    shared_dir: str
    # "bridge": a network namespace per pod on a bridge; "loopback": 127.x addresses.
    network_mode: str
    address: str
    # The node's pods get `<pod_prefix>.<n>` (n in 2..254).
    pod_prefix: str
    # Bridge mode: netns `<netns_prefix><n>` and host-side veth `<veth_prefix><n>`
    # for the pod (or node, n=1) whose address ends in n.
    netns_prefix: str = ""
    veth_prefix: str = ""
    bridge: str = ""
    # Ports on the machine's 127.0.0.1 that pods reach at their own 127.0.0.1
    # (the API server's port at least), through the node process.
    loopback_forwards: list[int] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    taints: list[dict[str, str]] = field(default_factory=list)
    cpu: str = "4"
    memory: str = "8Gi"
    pods: int = 110
    lease_duration_seconds: int = LEASE_DURATION_SECONDS
    lease_renew_seconds: float = LEASE_RENEW_SECONDS
    backoff_base_seconds: float = BACKOFF_BASE_SECONDS
    backoff_cap_seconds: float = BACKOFF_CAP_SECONDS
    # Extra image/command names mapped to local executables (name -> path).
    executables: dict[str, str] = field(default_factory=dict)

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2, sort_keys=True))

    @classmethod
    def read(cls, path: Path) -> NodeConfig:
        known = {f.name for f in fields(cls)}
        # Keys written by another version of this file are ignored.
        return cls(**{k: v for k, v in json.loads(path.read_text()).items() if k in known})
