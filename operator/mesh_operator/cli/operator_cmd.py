"""`mesh operator`: run the kopf operator that reconciles MeshPools and MeshModels."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any


def add_parser(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "operator",
        help="run the operator (reconciles MeshPool and MeshModel)",
        description="Reconcile MeshPools and MeshModels cluster-wide: plan each model over "
        "the pool's devices and run its RPC servers and llama-server host.",
    )
    parser.add_argument(
        "--health-address",
        default="0.0.0.0:8080",
        help="host:port of the liveness endpoint /healthz (%(default)s)",
    )
    parser.add_argument(
        "--metrics-address",
        default="0.0.0.0:9090",
        help="host:port of Prometheus /metrics (%(default)s)",
    )
    parser.add_argument(
        "--lease",
        default="mesh-operator",
        help="name of the coordination Lease its replicas elect a leader on, in the "
        "namespace $POD_NAMESPACE (%(default)s)",
    )
    parser.add_argument(
        "--no-leader-election",
        action="store_true",
        help="act at once, without a Lease (only ever run one replica so)",
    )
    parser.add_argument("--verbose", action="store_true", help="log every handler call")


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host or "0.0.0.0", int(port)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        health_host, health_port = _split(args.health_address)
        metrics_host, metrics_port = _split(args.metrics_address)
    except ValueError:
        print("mesh operator: error: addresses must be host:port", file=sys.stderr)
        return 2
    # Imported only here: other subcommands do not pay for kopf and the handlers.
    from mesh_operator.handlers import runner  # noqa: PLC0415

    election = None if args.no_leader_election else runner.default_election(args.lease)
    return runner.run((health_host, health_port), (metrics_host, metrics_port), election)
