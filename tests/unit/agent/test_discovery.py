"""The agent finds the operator's RPC server pods on its node."""

from __future__ import annotations

from typing import Any

import pytest

from mesh_agent.discovery import target_of
from mesh_agent.rpc_liveness import RpcTarget

pytestmark = pytest.mark.unit


def pod(
    phase: str = "Running", ip: str | None = "10.1.2.3", port: int | None = 50100
) -> dict[str, Any]:
    ports = [{"name": "rpc", "containerPort": port}] if port else []
    return {
        "metadata": {"namespace": "ai", "labels": {"mesh.dev/model": "gemma"}},
        "spec": {"containers": [{"name": "rpc-server", "ports": ports}]},
        "status": {"phase": phase, "podIP": ip},
    }


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (pod(), RpcTarget(model="ai/gemma", host="10.1.2.3", port=50100)),
        (pod(port=None), RpcTarget(model="ai/gemma", host="10.1.2.3", port=50052)),
        (pod(phase="Pending"), None),
        (pod(ip=None), None),
    ],
)
def test_target_of_a_worker_pod(body: dict[str, Any], expected: RpcTarget | None) -> None:
    assert target_of(body) == expected
