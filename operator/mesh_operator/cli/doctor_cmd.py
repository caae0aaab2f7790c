"""`mesh doctor`: check an installation and say what to fix, one line per finding."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from typing import Any

import kubernetes
import urllib3
from kubernetes.client import ApiException

from mesh_operator.api.crdgen import build_crds
from mesh_operator.fleet import Fleet, Obj, build_findings, read_fleet
from mesh_operator.kubeclient import KubeconfigError, api_client, unreachable_reason

MARKS = {"ok": "ok  ", "warn": "warn", "fail": "FAIL"}
# Seconds for each API request: an API server that does not answer is a finding.
API_TIMEOUT = 30.0


def add_parser(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "doctor",
        help="check the installation: CRDs, agents, pools, models",
        description="Check that the CRDs are installed and current, that every node agent "
        "reports, and that pools and models are ready. Exit 1 when something fails.",
    )
    parser.add_argument(
        "--kubeconfig",
        help="kubeconfig file (default: $KUBECONFIG, in a pod its service account, ~/.kube/config)",
    )


def run(args: argparse.Namespace) -> int:
    try:
        api = api_client(args.kubeconfig, timeout=API_TIMEOUT)
        ext = kubernetes.client.ApiextensionsV1Api(api)
        expected = {doc["metadata"]["name"]: doc for doc in build_crds().values()}
        installed: dict[str, Obj | None] = {}
        for name in expected:
            try:
                raw: Any = ext.read_custom_resource_definition(name, _preload_content=False)
                installed[name] = json.loads(raw.data)
            except ApiException as exc:
                if exc.status != 404:
                    raise
                installed[name] = None
        fleet = read_fleet(api) if all(installed.values()) else None
    except KubeconfigError as exc:
        print(f"mesh doctor: error: {exc}", file=sys.stderr)
        return 2
    except ApiException as exc:
        print(f"FAIL API server answered {exc.status} {exc.reason}")
        return 1
    except (OSError, urllib3.exceptions.HTTPError) as exc:
        print(f"FAIL cannot reach the API server: {unreachable_reason(exc)}")
        return 1
    findings = build_findings(fleet or Fleet(), installed, expected, dt.datetime.now(dt.UTC))
    for f in findings:
        print(f"{MARKS[f.level]} {f.what}" + (f" -> {f.hint}" if f.hint else ""))
    return 1 if any(f.level == "fail" for f in findings) else 0
