"""`mesh doctor` on real nodes, where kube-router enforces NetworkPolicies: its probe
pod is refused by a model's policy as it stands, and connects once another policy
of the namespace lets every pod in (policies add up), which the policy's rules
alone do not show. Also: the operator's Lease names the version the CRDs carry.

Runs on the session's installation of mesh on real nodes (`e2e.realcluster`). With
MESH_STATUS_RECORD=<file>, the text of `mesh status` and `mesh doctor` there is
written to that file (the README shows such a run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from e2e.realcluster import MODEL, POOL, RELEASE, RealCluster
from e2e.scenario import NAMESPACE, REPO
from mesh_operator import __version__

pytestmark = pytest.mark.e2e

OPEN_POLICY = "doctor-test-open"


def mesh_cli(mesh: RealCluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mesh_operator.cli.main", *args],
        capture_output=True, text=True, timeout=600, cwd=REPO, check=False,
        env={**os.environ, "KUBECONFIG": str(mesh.cluster.kubeconfig)},
    )  # fmt: skip


def doctor(mesh: RealCluster, *args: str) -> tuple[int, list[dict[str, Any]]]:
    done = mesh_cli(mesh, "doctor", "-o", "json", "--pool", POOL, "--probe-timeout", "120", *args)
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout)


def policy_findings(findings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    subject = f"model {MODEL.namespace}/{MODEL.name}"
    return [f for f in findings if f["subject"] == subject and f["check"] == "network-policy"]


@pytest.fixture
def open_policy(real_mesh: RealCluster) -> Iterator[None]:
    """A second NetworkPolicy in the model's namespace admitting every pod."""
    real_mesh.apply({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": OPEN_POLICY, "namespace": MODEL.namespace},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{}]},
    })  # fmt: skip
    try:
        yield
    finally:
        real_mesh.kubectl(
            "delete", "networkpolicy", OPEN_POLICY, "-n", MODEL.namespace, "--ignore-not-found"
        )


def test_doctor_probes_the_policy_and_names_the_running_operators_version(
    real_mesh: RealCluster,
) -> None:
    code, findings = doctor(real_mesh)
    (operator,) = [f for f in findings if f["check"] == "operator"]
    assert operator["level"] == "ok", operator
    assert operator["subject"] == f"Lease {NAMESPACE}/{RELEASE}-operator"
    assert operator["problem"].endswith(f"mesh {__version__}")
    assert {f["level"] for f in findings if f["check"] == "crds"} == {"ok"}
    rules, probe = policy_findings(findings)
    assert rules["level"] == "ok"
    assert probe["level"] == "ok", probe
    assert "tried TCP to RPC port" in probe["problem"]
    assert "refused as the policy wants" in probe["problem"]
    assert "ConnectionRefusedError" in probe["problem"] or "timed out" in probe["problem"]
    assert code == 0, findings
    record = os.environ.get("MESH_STATUS_RECORD")
    if record:
        status = mesh_cli(real_mesh, "status")
        text = mesh_cli(real_mesh, "doctor", "--probe-timeout", "120")
        assert status.returncode == 0, status.stderr
        Path(record).write_text(
            f"$ mesh status\n{status.stdout}\n$ mesh doctor\n{text.stdout}"
            f"(exit status {text.returncode})\n"
        )


def test_doctor_finds_a_policy_that_does_not_hold(
    real_mesh: RealCluster, open_policy: None
) -> None:
    code, findings = doctor(real_mesh)
    rules, probe = policy_findings(findings)
    # The model's own policy is as the operator wrote it ...
    assert rules["level"] == "ok"
    # ... but the network lets the probe in.
    assert code == 1
    assert probe["level"] == "fail", probe
    assert probe["problem"].startswith("the NetworkPolicy does not hold: pod ")
    assert "connected" in probe["problem"]
    assert f"policies add up: look for another one in {MODEL.namespace}" in probe["fix"]
    assert "does not enforce NetworkPolicy" in probe["fix"]
