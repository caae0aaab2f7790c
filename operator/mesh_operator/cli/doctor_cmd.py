"""`mesh doctor`: check an installation, and say what is wrong and what to do."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
from typing import Any

from kubernetes.client import ApiClient

from mesh_operator.cli.reach import KUBECONFIG_HELP, read_cluster
from mesh_operator.diagnosis import Checkup, Finding, build_findings, only_pool, read_checkup
from mesh_operator.policy_probe import run_probe

MARKS = {"ok": "ok", "warn": "warn", "fail": "FAIL"}
EXIT_PROBLEMS = 1


def add_parser(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "doctor",
        help="check the installation and say what to fix",
        description="Check the operator (its Lease), the CRDs (installed, Established, of "
        "the running operator's version), every pool node's agent (present, heartbeat "
        "fresh, healthy, devices of the pool's backend), every model (no capacity and who "
        "holds the memory, host and workers of different llama.cpp builds, a source that "
        "cannot be read, ...) and every planned model's NetworkPolicy: its rules, and a "
        "probe pod that tries the model's RPC servers from outside the policy. Each "
        "problem says what is wrong and what to do.",
        epilog="Exit status: 0 no problem (warnings allowed); 1 problems found; 2 the "
        "cluster cannot be reached (no usable kubeconfig, no answer, credentials refused).",
    )
    parser.add_argument("--kubeconfig", help=KUBECONFIG_HELP)
    parser.add_argument("-o", "--output", choices=["text", "json"], default="text")
    parser.add_argument(
        "--pool", help="check only this MeshPool's nodes and models (and the CRDs and operator)"
    )
    parser.add_argument(
        "--no-probe",
        dest="probe",
        action="store_false",
        help="do not start probe pods to test the models' NetworkPolicies",
    )
    parser.add_argument(
        "--probe-timeout",
        type=_seconds,
        default=30.0,
        metavar="SECONDS",
        help="how long a probe pod may take to run (default 30)",
    )


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text}")
    return value


def _probe_findings(api: ApiClient, checkup: Checkup, timeout: float) -> list[Finding]:
    pools = {p["metadata"]["name"]: p for p in checkup.fleet.pools}
    out = []
    for model in checkup.fleet.models:
        meta = model["metadata"]
        if checkup.policies.get((meta["namespace"], meta["name"])) is None:
            continue  # no plan, or no policy: reported by the policy check
        pool = pools.get((model.get("spec") or {}).get("poolRef", ""), {})
        outcome = run_probe(api, model, pool, timeout)
        out.append(
            Finding(
                outcome.level,
                "network-policy",
                f"model {meta['namespace']}/{meta['name']}",
                outcome.problem,
                outcome.fix,
            )
        )
    return out


def render(findings: list[Finding]) -> str:
    width = max((len(f.check) for f in findings), default=0)
    lines = []
    for f in findings:
        lines.append(f"{MARKS[f.level]:<4}  {f.check:<{width}}  {f.subject}: {f.problem}")
        if f.fix and f.level != "ok":
            lines.append(f"{'':<4}  {'':<{width}}  -> {f.fix}")
    fails = sum(f.level == "fail" for f in findings)
    warns = sum(f.level == "warn" for f in findings)
    lines.append(
        f"{fails} problem{'s' * (fails != 1)}, {warns} warning{'s' * (warns != 1)}"
        if fails or warns
        else "no problem found"
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    def check(api: ApiClient) -> list[Finding]:
        checkup = read_checkup(api)
        if args.pool is not None:
            checkup = only_pool(checkup, args.pool)
        findings = build_findings(checkup, dt.datetime.now(dt.UTC))
        if args.pool is not None and not checkup.fleet.pools and all(checkup.crds.values()):
            findings.append(
                Finding("fail", "pools", f"pool {args.pool}", "no such MeshPool",
                        "kubectl get meshpools")
            )  # fmt: skip
        if args.probe:
            findings += _probe_findings(api, checkup, args.probe_timeout)
        return findings

    read = read_cluster(f"{args.prog} doctor", args.kubeconfig, check)
    if read.value is None:
        return read.exit_code
    findings = read.value
    if args.output == "json":
        print(json.dumps([dataclasses.asdict(f) for f in findings], indent=2))
    else:
        print(render(findings))
    return EXIT_PROBLEMS if any(f.level == "fail" for f in findings) else 0
