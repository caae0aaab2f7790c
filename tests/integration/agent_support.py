"""Helpers of the agent's integration tests: the MeshNode CRD and reading MeshNodes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from e2e.cluster import LocalCluster
from e2e.waiting import free_port, wait_for

REPO = Path(__file__).resolve().parents[2]
MESHNODE_CRD = REPO / "crds" / "mesh.dev_meshnodes.yaml"


def install_meshnode_crd(cluster: LocalCluster) -> None:
    """The generated MeshNode CRD from crds/, established."""
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(MESHNODE_CRD))
    cluster.wait_established("meshnodes.mesh.dev")


def get_meshnode(cluster: LocalCluster, name: str) -> dict[str, Any] | None:
    out = cluster.kubectl(
        "get", "meshnode", name, "-o", "json", "--ignore-not-found", "--show-managed-fields"
    )
    return json.loads(out) if out.strip() else None


__all__ = ["free_port", "get_meshnode", "wait_for"]
