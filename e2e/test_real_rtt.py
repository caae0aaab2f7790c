"""Round trips measured by the agents on real nodes: a delay line on one node's
link (e2e/nodes/delay.py) makes that node's measured round trip rise well above
the others', and the operator plans a model that needs two of three nodes on the
two others.

Uses the session's installation (`e2e.realcluster`), with the system node
labelled into the CPU pool for the test's time so that three agents measure each
other: with two, a slow link cannot be told from a slow peer. Its agent reads the
bandwidth figure the pool's agents cached in the shared state folder, so the
pool's serving models see an equal node and stay where they are.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from e2e.nodes.delay import DelayLine, delayed
from e2e.realcluster import (
    MODEL_POD_SECURITY,
    POOL_NODES,
    RealCluster,
    SharedRealCluster,
    example_model,
    example_pool,
)
from e2e.scenario import POOL_LABEL, SYSTEM_NODE
from e2e.waiting import wait_for
from mesh_operator.api.meshnode import MeshNodeStatus
from mesh_operator.api.meshpool import MeshPoolSpec
from mesh_operator.ledger import NodeInfo, build_pool_view

pytestmark = pytest.mark.e2e

DELAYED = "node-b"
NODES = (*POOL_NODES, SYSTEM_NODE)
# One way: a round trip through the link gains twice this.
DELAY_MS = 15.0
POOL = "rtt"
NAMESPACE = "rtt"
MODEL = "gemma-rtt"
# With this much of each node's memory the model needs two nodes (and fits on any two).
DEVICE_CAP_MIB = 300


def meshnode_statuses(mesh: RealCluster) -> dict[str, MeshNodeStatus]:
    items = (mesh.get("meshnodes") or {}).get("items", [])
    return {
        n["metadata"]["name"]: MeshNodeStatus.model_validate(n["status"])
        for n in items
        if n.get("status") and n["metadata"]["name"] in NODES
    }


def measured(mesh: RealCluster) -> dict[str, float | None]:
    """Each node's round trip as the operator's ledger makes it of the MeshNodes."""
    pool = MeshPoolSpec(node_selector={POOL_LABEL: "true"})
    nodes = [NodeInfo(n, {POOL_LABEL: "true"}) for n in NODES]
    view = build_pool_view(pool, nodes, meshnode_statuses(mesh), {}, dt.datetime.now(dt.UTC))
    return {n.name: n.rtt_ms for n in view.nodes}


def everyone_measured(mesh: RealCluster) -> dict[str, MeshNodeStatus] | None:
    statuses = meshnode_statuses(mesh)
    for node in NODES:
        peers = {t.node for t in statuses[node].round_trips} if node in statuses else set()
        if not set(NODES) - {node} <= peers:
            return None
    return statuses


@pytest.fixture
def three_agents(shared_real_cluster: SharedRealCluster) -> Iterator[RealCluster]:
    mesh = shared_real_cluster.mesh
    mesh.kubectl("label", "--overwrite", "node", SYSTEM_NODE, f"{POOL_LABEL}=true")
    try:
        wait_for("three agents measuring each other", lambda: everyone_measured(mesh), 240)
        yield mesh
    finally:
        mesh.unpool_node(SYSTEM_NODE, POOL_LABEL)


def rtt_model(shared: SharedRealCluster) -> dict[str, Any]:
    return example_model(shared, MODEL, NAMESPACE, POOL)


def planned_nodes(mesh: RealCluster) -> list[str] | None:
    obj = mesh.get("meshmodel", MODEL, "-n", NAMESPACE) or {}
    plan = (obj.get("status") or {}).get("plan")
    return sorted({d["node"] for d in plan["devices"]}) if plan else None


def test_a_delayed_node_measures_far_and_is_planned_around(
    three_agents: RealCluster, shared_real_cluster: SharedRealCluster, tmp_path: Path
) -> None:
    mesh = three_agents
    before = measured(mesh)
    assert all(before[n] is not None for n in NODES), before
    plan = mesh.nodes.plan
    index = mesh.nodes.node(DELAYED).index
    line = DelayLine(
        veth=plan.veth_host(index),
        bridge=plan.bridge,
        tap=f"mn{plan.index}d{index}",
        delay_ms=DELAY_MS,
        netns=plan.netns(DELAYED),
        node_if=plan.veth_node(index),
        log=tmp_path / "delay-line.log",
    )
    with delayed(line):

        def delayed_seen() -> dict[str, float | None] | None:
            now = measured(mesh)
            far = now[DELAYED]
            near = [now[n] for n in NODES if n != DELAYED]
            if far is None or far < 2 * DELAY_MS or any(r is None or r >= DELAY_MS for r in near):
                return None
            return now

        during = wait_for(f"{DELAYED}'s measured round trip to rise", delayed_seen, 180)
        mesh.namespace(NAMESPACE, MODEL_POD_SECURITY)
        mesh.apply(
            example_pool(POOL, deviceMemoryCapMiB=DEVICE_CAP_MIB, maxNodesPerModel=2, rpcThreads=1)
        )
        try:
            mesh.apply(rtt_model(shared_real_cluster))
            nodes = wait_for("the model's plan", lambda: planned_nodes(mesh), 180)
        finally:
            mesh.kubectl("delete", "meshmodel", MODEL, "-n", NAMESPACE, "--ignore-not-found")
            mesh.kubectl("delete", "meshpool", POOL, "--ignore-not-found")
    assert len(nodes) == 2 and DELAYED not in nodes, (nodes, before, during)
    # The round trips before, during: the delayed node far, the others near.
    print(f"measured before {before}, with {DELAY_MS} ms each way on {DELAYED}: {during}")
    log = (tmp_path / "delay-line.log").read_text()
    assert "delay line stopped" in log and "Traceback" not in log, log
