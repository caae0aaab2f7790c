"""Command line of the real test nodes (test infrastructure).

    python -m e2e.nodes up [--nodes 3] [--label k=v] [--push LOCAL=PATH] [--containerd2]
                                        # default push: the chart's images built here
    python -m e2e.nodes status
    python -m e2e.nodes lose NODE       # cut the node's link (a lost node)
    python -m e2e.nodes restore NODE
    python -m e2e.nodes remove NODE     # take one node out for good, the others running on
    python -m e2e.nodes down            # stop everything by pid, remove the nodes

`up` starts the local control plane too when it is not running (`--cluster-dir`,
default as `python -m e2e.cluster`); the nodes' state is kept in `--state-dir`
(default `$MESH_NODES_DIR` or `.mesh/nodes`). Nodes are named node-0, node-1, ...
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from e2e import parts
from e2e.cluster import ClusterError, LocalCluster
from e2e.cluster import default_state_dir as default_cluster_dir
from e2e.nodes.addresses import AddressError
from e2e.nodes.harness import NodesError, RealNodes, default_state_dir, require_root
from e2e.nodes.images import ImageError, chart_images
from e2e.nodes.images import exists as image_exists
from e2e.waiting import WaitTimeoutError


def _pairs(values: list[str], what: str) -> dict[str, str]:
    out = {}
    for pair in values:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"{what} wants key=value, got {pair!r}")
        out[key] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m e2e.nodes",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--cluster-dir", type=Path, default=default_cluster_dir())
    parser.add_argument("--state-dir", type=Path, default=default_state_dir())
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the control plane (if needed) and the nodes")
    up.add_argument("--nodes", type=int, default=3)
    up.add_argument("--label", action="append", default=[], help="key=value on every node")
    up.add_argument(
        "--push",
        action="append",
        default=[],
        help="LOCAL_IMAGE=REGISTRY_PATH (default: the chart's images that `make images` built)",
    )
    up.add_argument(
        "--containerd2",
        action="store_true",
        help="run containerd 2 (scripts/build-containerd.sh) instead of Debian's 1.6",
    )
    sub.add_parser("status", help="the programs and whether each is running")
    for name in ("lose", "restore", "remove"):
        cmd = sub.add_parser(name)
        cmd.add_argument("node")
    sub.add_parser("down", help="stop everything by pid and remove the nodes")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cluster = LocalCluster(args.cluster_dir)
    nodes = RealNodes(cluster, args.state_dir, containerd2=getattr(args, "containerd2", False))
    try:
        if args.command == "up":
            require_root()
            started = time.monotonic()
            cluster.up()
            labels = _pairs(args.label, "--label")
            wanted = {f"node-{i}": labels for i in range(args.nodes)}
            push = _pairs(args.push, "--push") or {
                local: path for local, path in chart_images().items() if image_exists(local)
            }
            nodes.up(wanted, push=push)
            print(
                f"{args.nodes} nodes Ready in {time.monotonic() - started:.1f}s\n"
                f"export KUBECONFIG={cluster.kubeconfig}"
            )
        elif args.command == "status":
            table = nodes.procs.recorded()
            for record in nodes.nodes():
                states = [
                    f"{p}={'up' if f'{p}-{record.name}' in table else 'down'}"
                    for p in ("containerd", "kubelet", "kube-proxy", "kube-router")
                ]
                print(f"{record.name:12} {' '.join(states)}")
            for shared in ("registry", "apiserver-forward"):
                print(f"{shared:12} {'up' if shared in table else 'down'}")
        elif args.command == "lose":
            nodes.lose(args.node)
        elif args.command == "restore":
            nodes.restore(args.node)
        elif args.command == "remove":
            nodes.remove(args.node)
        else:
            stopped = nodes.down()
            print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    except (
        AddressError,
        ClusterError,
        ImageError,
        NodesError,
        WaitTimeoutError,
        parts.PartMissingError,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
