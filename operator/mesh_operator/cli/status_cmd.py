"""`mesh status`: pools, nodes and models on one screen, as a table or as JSON."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from typing import Any

from mesh_operator.cli.reach import KUBECONFIG_HELP, read_cluster
from mesh_operator.fleet import build_status_report, build_status_table, read_fleet
from mesh_operator.usage import read_gateway_usage


def add_parser(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "status",
        help="show pools, nodes and models",
        description="Show every MeshPool, the nodes it picks (devices, free memory, "
        "agent heartbeat and health) and every MeshModel (plan: nodes, split, predicted "
        "ms/token; replicas; readiness) and the tokens used per model, API key and node, "
        "read from the gateway pods' metrics. --output json follows the schema of "
        "docs/status.md.",
        epilog="Exit status: 0 shown; 1 the API server answered an error; 2 the cluster "
        "cannot be reached (no usable kubeconfig, no answer, credentials refused).",
    )
    parser.add_argument("-n", "--namespace", help="only the models of this namespace")
    parser.add_argument("-o", "--output", choices=["table", "json"], default="table")
    parser.add_argument("--kubeconfig", help=KUBECONFIG_HELP)


def run(args: argparse.Namespace) -> int:
    read = read_cluster(
        f"{args.prog} status",
        args.kubeconfig,
        lambda api: (read_fleet(api, args.namespace), read_gateway_usage(api, args.namespace)),
        not_found="the cluster has no mesh resources (404): are the CRDs installed? "
        f"({args.prog} doctor checks)",
    )
    if read.value is None:
        return read.exit_code
    fleet, usage = read.value
    report = build_status_report(fleet, dt.datetime.now(dt.UTC), usage)
    if args.output == "json":
        print(json.dumps(report.model_dump(mode="json", by_alias=True), indent=2))
    else:
        print(build_status_table(report))
    return 0
