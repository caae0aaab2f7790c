"""`mesh status`: pools, models and nodes at a glance."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from typing import Any

import urllib3
from kubernetes.client import ApiException

from mesh_operator.fleet import build_status_summary, build_status_table, read_fleet
from mesh_operator.kubeclient import KubeconfigError, api_client, unreachable_reason

# Seconds for each API request: an API server that does not answer is an error.
API_TIMEOUT = 30.0


def add_parser(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "status",
        help="show pools, models and nodes",
        description="Show every MeshPool, MeshModel and MeshNode: readiness, plans, heartbeats.",
    )
    parser.add_argument("-n", "--namespace", help="only models of this namespace")
    parser.add_argument("-o", "--output", choices=["table", "json"], default="table")
    parser.add_argument(
        "--kubeconfig",
        help="kubeconfig file (default: $KUBECONFIG, in a pod its service account, ~/.kube/config)",
    )


def run(args: argparse.Namespace) -> int:
    try:
        fleet = read_fleet(api_client(args.kubeconfig, timeout=API_TIMEOUT), args.namespace)
    except KubeconfigError as exc:
        print(f"mesh status: error: {exc}", file=sys.stderr)
        return 2
    except ApiException as exc:
        print(f"mesh status: error: API server answered {exc.status} {exc.reason}", file=sys.stderr)
        return 1
    except (OSError, urllib3.exceptions.HTTPError) as exc:
        reason = unreachable_reason(exc)
        print(f"mesh status: error: cannot reach the API server: {reason}", file=sys.stderr)
        return 1
    summary = build_status_summary(fleet, dt.datetime.now(dt.UTC))
    if args.output == "json":
        print(json.dumps(summary, indent=2))
    else:
        print(build_status_table(summary))
    return 0
