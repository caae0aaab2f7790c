"""The agent loop with a recorded GPU node (NVML double at the seam) against the real
API server: its MeshNode, a 409 from another field manager, the operator's
conditions left alone, a deleted MeshNode recreated, and a GPU lost mid-run."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from e2e.cluster import LocalCluster
from mesh_agent.agent import Agent, AgentConfig
from mesh_agent.inventory import CollectorConfig
from mesh_agent.publisher import AGENT_FIELD_MANAGER, APPLY
from mesh_operator.api.base import API_VERSION, GROUP, MESHNODE_PLURAL, VERSION
from mesh_operator.kubeclient import api_client
from tests.fixtures.nvml.double import FakeNvml, load_fixture
from tests.integration.agent_support import get_meshnode, install_meshnode_crd

pytestmark = pytest.mark.integration


def apply_status_as(cluster: LocalCluster, name: str, manager: str, status: dict[str, Any]) -> None:
    api = client.CustomObjectsApi(api_client(cluster.kubeconfig))
    body = {
        "apiVersion": API_VERSION,
        "kind": "MeshNode",
        "metadata": {"name": name},
        "status": status,
    }
    api.patch_cluster_custom_object_status(
        GROUP,
        VERSION,
        MESHNODE_PLURAL,
        name,
        body,
        field_manager=manager,
        force=True,
        _content_type=APPLY,
    )


def managers_of(obj: dict[str, Any], path: str) -> set[str]:
    """Field managers whose managedFields mention the given `f:` path fragment."""
    return {
        entry["manager"]
        for entry in obj["metadata"].get("managedFields", [])
        if path in json.dumps(entry.get("fieldsV1", {}))
    }


def test_gpu_node_publishes_resolves_conflicts_and_reports_a_lost_gpu(
    cluster: LocalCluster, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    install_meshnode_crd(cluster)
    node = f"gpu-{uuid.uuid4().hex[:8]}"
    fake = FakeNvml.from_fixtures("a100-sxm4-40gb", "rtx-3060-12gb")
    config = AgentConfig(
        node_name=node,
        interval_seconds=1,
        listen_host="127.0.0.1",
        listen_port=0,
        kubeconfig=cluster.kubeconfig,
        collector=CollectorConfig(bandwidth_cache=tmp_path / "bw.json"),
    )
    agent = Agent(config, nvml_factory=lambda: fake)

    async def cycle() -> bool:
        return await agent.cycle()

    with caplog.at_level(logging.INFO, logger="mesh_agent"):
        assert asyncio.run(cycle())
        obj = get_meshnode(cluster, node)
        assert obj is not None
        devices = obj["status"]["devices"]
        assert [d["name"] for d in devices] == [
            load_fixture("a100-sxm4-40gb")["model"],
            load_fixture("rtx-3060-12gb")["model"],
        ]
        assert devices[0]["bandwidthGBps"] == pytest.approx(1555, rel=0.01)
        assert obj["status"]["system"]["driverVersion"] == "580.126.09"
        assert AGENT_FIELD_MANAGER in managers_of(obj, "f:devices")

        # Someone else takes a status field; the operator writes a condition.
        apply_status_as(
            cluster, node, "intruder", {"system": {"cpuCores": 999, "memoryTotalMiB": 1}}
        )
        condition = {
            "type": "Stale",
            "status": "False",
            "reason": "HeartbeatFresh",
            "message": "",
            "lastTransitionTime": "2025-01-01T00:00:00Z",
        }
        apply_status_as(cluster, node, "mesh-operator", {"conditions": [condition]})
        assert asyncio.run(cycle())
        obj = get_meshnode(cluster, node)
        assert obj is not None
        assert obj["status"]["system"]["cpuCores"] != 999
        assert agent._publisher is not None and agent._publisher.forced_conflicts == 1
        assert obj["status"]["conditions"] == [condition]
        assert "intruder" not in managers_of(obj, "f:cpuCores")

        # Deleted under the running agent: created again on the next cycle.
        cluster.kubectl("delete", "meshnode", node)
        assert asyncio.run(cycle())
        assert get_meshnode(cluster, node) is not None

        # GPU 0 falls off the bus: reported, never a crash.
        fake.lose(0)
        assert asyncio.run(cycle())
        obj = get_meshnode(cluster, node)
        assert obj is not None
        lost, alive = obj["status"]["devices"]
        assert lost["health"]["reason"] == "GpuLost"
        assert lost["uuid"] == load_fixture("a100-sxm4-40gb")["uuid"]
        assert lost["memoryFreeMiB"] == 0
        assert alive["health"]["state"] == "Healthy"
        assert obj["status"]["health"] == {
            "state": "Unhealthy",
            "reason": "GpuLost",
            "message": lost["health"]["message"],
        }
        assert "mesh_gpu_health_state" in agent.metrics.render().decode()
        assert asyncio.run(cycle())  # steady state: nothing new to log
    messages = [r.getMessage() for r in caplog.records]
    assert sum("taking them back" in m for m in messages) == 1
    assert sum("GPU 0:" in m and "lost" in m.lower() for m in messages) == 1
    assert sum("node health Unhealthy (GpuLost)" in m for m in messages) == 1
    agent.collector.close()
    agent.metrics.shutdown()
    cluster.kubectl("delete", "meshnode", node, "--wait=false")
