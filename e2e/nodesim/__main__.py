"""Command line of the node simulator (test infrastructure).

    python -m e2e.nodesim up [--nodes 3] [--label k=v] [--cpu 4] [--memory 8Gi]
    python -m e2e.nodesim status
    python -m e2e.nodesim add-node NAME [--label k=v] ...
    python -m e2e.nodesim stop-node NAME        # lose it: SIGKILL node and containers
    python -m e2e.nodesim start-node NAME
    python -m e2e.nodesim logs NAMESPACE POD [-c CONTAINER] [--previous]
    python -m e2e.nodesim down [--keep-nodes]
    python -m e2e.nodesim node --config FILE    # one node's process (started by the above)

`up` starts the local control plane too when it is not running
(`--cluster-dir`, default as `python -m e2e.cluster`); the simulator's state is
kept in `--state-dir` (default `$MESH_NODESIM_DIR` or `.mesh/nodesim`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from e2e import parts
from e2e.cluster import ClusterError, LocalCluster
from e2e.cluster import default_state_dir as default_cluster_dir
from e2e.nodesim.harness import NodeSimError, SimulatedCluster, default_state_dir
from e2e.nodesim.kubelet import run_node
from e2e.nodesim.network import NetworkError


def _labels(pairs: list[str]) -> dict[str, str]:
    labels = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--label wants key=value, got {pair!r}")
        labels[key] = value
    return labels


def _node_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--label", action="append", default=[], help="key=value (repeatable)")
    parser.add_argument("--cpu", default="4", help="CPU capacity (default 4)")
    parser.add_argument("--memory", default="8Gi", help="memory capacity (default 8Gi)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m e2e.nodesim",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--cluster-dir", type=Path, default=default_cluster_dir())
    parser.add_argument("--state-dir", type=Path, default=default_state_dir())
    parser.add_argument(
        "--network", choices=["auto", "bridge", "loopback"], default="auto",
        help="bridge: a network namespace per pod (root); loopback: 127.x addresses",
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the control plane if needed and N nodes")
    up.add_argument("--nodes", type=int, default=3)
    up.add_argument("--prefix", default="sim-", help="node names: <prefix>1..N")
    _node_options(up)
    add = sub.add_parser("add-node", help="register and start one node")
    add.add_argument("name")
    _node_options(add)
    for name in ("stop-node", "start-node", "delete-node"):
        sub.add_parser(name).add_argument("name")
    logs = sub.add_parser("logs", help="a container's output")
    logs.add_argument("namespace")
    logs.add_argument("pod")
    logs.add_argument("-c", "--container")
    logs.add_argument("--previous", action="store_true")
    down = sub.add_parser("down", help="stop every node and container, release addresses")
    down.add_argument("--keep-nodes", action="store_true", help="leave the Node objects")
    sub.add_parser("status")
    node = sub.add_parser("node", help="run one node (used by the commands above)")
    node.add_argument("--config", type=Path, required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "node":
        return run_node(args.config)
    cluster = LocalCluster(args.cluster_dir)
    try:
        sim = SimulatedCluster(cluster, args.state_dir, network_mode=args.network)
        if args.command == "up":
            started = time.monotonic()
            cluster.up()
            for i in range(1, args.nodes + 1):
                node = sim.add_node(
                    f"{args.prefix}{i}",
                    labels=_labels(args.label),
                    cpu=args.cpu,
                    memory=args.memory,
                )
                print(f"{node.name:16} {node.address:15} pid {node.pid}")
            print(
                f"{args.nodes} simulated nodes Ready in {time.monotonic() - started:.1f}s "
                f"({sim.network_mode} network; pods reach the machine at {sim.host_address})\n"
                f"export KUBECONFIG={cluster.kubeconfig}"
            )
        elif args.command == "add-node":
            node = sim.add_node(
                args.name, labels=_labels(args.label), cpu=args.cpu, memory=args.memory
            )
            print(f"{node.name} Ready at {node.address} (pid {node.pid})")
        elif args.command == "start-node":
            node = sim.start_node(args.name)
            print(f"{node.name} Ready at {node.address} (pid {node.pid})")
        elif args.command == "stop-node":
            killed = sim.stop_node(args.name)
            print(f"{args.name} lost: killed pids {' '.join(map(str, killed)) or 'none'}")
        elif args.command == "delete-node":
            sim.delete_node(args.name)
            print(f"{args.name} stopped and deleted")
        elif args.command == "logs":
            sys.stdout.write(
                sim.pod_log(args.namespace, args.pod, args.container, previous=args.previous)
            )
        elif args.command == "down":
            stopped = sim.down(delete_nodes=not args.keep_nodes)
            print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
        else:
            nodes = sim.nodes()
            for node in nodes:
                state = f"running (pid {node.pid})" if node.running else "stopped"
                ready = sim.node_ready(node.name) if cluster.status() else "?"
                print(f"{node.name:16} {node.address:15} {state:22} Ready={ready or '-'}")
            return 0 if nodes and all(n.running for n in nodes) else 1
    except (NodeSimError, NetworkError, ClusterError, parts.PartMissingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
