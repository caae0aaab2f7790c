"""The README's main command: bring the local cluster up and show what it runs.

Test infrastructure driving a demonstration: starts the local control plane
(`e2e.cluster`), registers simulated GPU nodes and prints them.
"""

from __future__ import annotations

import sys

from e2e import parts
from e2e.cluster import ClusterError, LocalCluster, default_state_dir

DEMO_NODES = (("gpu-a", 2), ("gpu-b", 1), ("gpu-c", 1))


def main() -> int:
    cluster = LocalCluster(default_state_dir())
    try:
        cfg = cluster.up()
        for name, gpus in DEMO_NODES:
            cluster.add_kwok_node(name, gpus=gpus, labels={"mesh.dev/pool": "demo"})
        cluster.kubectl("wait", "--for=condition=Ready", "node", "--all", "--timeout=60s")
        print(f"local cluster at {cfg.server}; KUBECONFIG={cluster.kubeconfig}")
        print(cluster.kubectl("get", "--raw", "/version"))
        print(
            cluster.kubectl(
                "get",
                "nodes",
                "-o",
                "custom-columns=NAME:.metadata.name,"
                'READY:.status.conditions[?(@.type=="Ready")].status,'
                "GPUS:.status.capacity.nvidia\\.com/gpu",
            )
        )
        print("stop it with: python -m e2e.cluster down")
    except (ClusterError, parts.PartMissingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
