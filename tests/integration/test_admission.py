"""The real API server refuses bad resources at admission with a message naming
the field, and accepts the good ones (the same fixtures the models are tested with)."""

from __future__ import annotations

import json
import subprocess
import uuid
from typing import Any

import pytest

from e2e import parts
from e2e.cluster import LocalCluster
from tests.admission_cases import CASES

pytestmark = pytest.mark.integration


def _kubectl(
    cluster: LocalCluster, obj: dict[str, Any], *args: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(parts.binary("kubectl")), "--kubeconfig", str(cluster.kubeconfig), *args, "-f", "-"],
        input=json.dumps(obj),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _placed(obj: dict[str, Any], namespace: str) -> dict[str, Any]:
    placed: dict[str, Any] = json.loads(json.dumps(obj))
    if placed["kind"] == "MeshModel":
        placed["metadata"]["namespace"] = namespace
    else:
        placed["metadata"]["name"] = f"{placed['metadata']['name']}-{uuid.uuid4().hex[:6]}"
    return placed


@pytest.mark.parametrize("case", CASES["valid"], ids=lambda c: c["name"])
def test_valid_resources_are_admitted(
    crds: LocalCluster, namespace: str, case: dict[str, Any]
) -> None:
    result = _kubectl(crds, _placed(case["object"], namespace), "create", "--dry-run=server")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("case", CASES["invalid"], ids=lambda c: c["name"])
def test_invalid_resources_are_refused(
    crds: LocalCluster, namespace: str, case: dict[str, Any]
) -> None:
    result = _kubectl(crds, _placed(case["object"], namespace), "create", "--dry-run=server")
    assert result.returncode != 0, f"{case['name']} was admitted"
    assert case["expect"] in result.stderr, result.stderr
    # One line a person can read, not a dump.
    assert len(result.stderr.strip().splitlines()) <= 3, result.stderr


@pytest.mark.parametrize("case", CASES["updates"], ids=lambda c: c["name"])
def test_immutable_fields_cannot_change(
    crds: LocalCluster, namespace: str, case: dict[str, Any]
) -> None:
    before = _placed(case["before"], namespace)
    after = json.loads(json.dumps(case["after"]))
    after["metadata"] = dict(before["metadata"])
    created = _kubectl(crds, before, "create")
    assert created.returncode == 0, created.stderr
    try:
        result = _kubectl(crds, after, "apply", "--server-side", "--force-conflicts")
        assert result.returncode != 0
        assert case["expect"] in result.stderr, result.stderr
    finally:
        _kubectl(crds, before, "delete", "--wait=false")
