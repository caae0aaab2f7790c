"""Helpers of the agent's integration tests: the MeshNode CRD and reading MeshNodes."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from e2e.cluster import LocalCluster

REPO = Path(__file__).resolve().parents[2]
MESHNODE_CRD = REPO / "crds" / "mesh.dev_meshnodes.yaml"

T = TypeVar("T")


def install_meshnode_crd(cluster: LocalCluster) -> None:
    """The generated MeshNode CRD from crds/, established."""
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(MESHNODE_CRD))
    cluster.kubectl(
        "wait", "--for=condition=Established", "crd/meshnodes.mesh.dev", "--timeout=60s"
    )


def get_meshnode(cluster: LocalCluster, name: str) -> dict[str, Any] | None:
    out = cluster.kubectl(
        "get", "meshnode", name, "-o", "json", "--ignore-not-found", "--show-managed-fields"
    )
    return json.loads(out) if out.strip() else None


def wait_for(what: str, check: Callable[[], T | None], timeout: float = 30.0) -> T:
    """Poll `check` until it returns something truthy; fail naming `what`."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
