"""The host's own node on real nodes: a pool with `hostUsesOwnNode` serves a model
that needs both pool nodes, with the host running its own node's layers on that
node's CPU and one `ggml-rpc-server`, on the other node, for the rest.

Checked: the plan's host tier is on the host's node and names its CPU device;
the only worker runs on the other node; the host pod requests the tier's memory
and passes one RPC endpoint; the pool's ledger claims the tier on the host's
node; and the model answers a chat completion through the gateway.

Uses the session's installation (`e2e.realcluster`) with a pool of its own over
the session's pool nodes; the session's models are not touched.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import pytest

from e2e import served
from e2e.realcluster import (
    MODEL_POD_SECURITY,
    OUTSIDE,
    POOL_NODES,
    Model,
    RealCluster,
    SharedRealCluster,
    example_model,
    example_pool,
    log,
)
from e2e.served import CLIENT_TIMEOUT, delete_model, model_report
from e2e.waiting import wait_for
from mesh_operator.api.contract import COMPONENT_LABEL, HOST_COMPONENT, MODEL_LABEL, RPC_COMPONENT

pytestmark = pytest.mark.e2e

Obj = dict[str, Any]

POOL = "own"
NAMESPACE = "own"
MODEL = "gemma-own"
OWN = Model(MODEL, NAMESPACE)
CLIENT = "own-chat"
# With this much of each node's memory the model needs two nodes (as in test_real_rtt).
DEVICE_CAP_MIB = 300


def pods_of(mesh: RealCluster, component: str) -> list[Obj]:
    selector = f"{MODEL_LABEL}={MODEL},{COMPONENT_LABEL}={component}"
    return [p for p in mesh.pods(NAMESPACE, selector) if not p["metadata"].get("deletionTimestamp")]


@pytest.fixture
def own_node_model(shared_real_cluster: SharedRealCluster) -> Iterator[RealCluster]:
    mesh = shared_real_cluster.mesh
    mesh.namespace(NAMESPACE, MODEL_POD_SECURITY)
    mesh.namespace(OUTSIDE, None)
    mesh.apply(
        example_pool(
            POOL,
            hostUsesOwnNode=True,
            deviceMemoryCapMiB=DEVICE_CAP_MIB,
            maxNodesPerModel=2,
            rpcThreads=1,
        )
    )
    mesh.apply(example_model(shared_real_cluster, MODEL, NAMESPACE, POOL))
    try:
        yield mesh
    finally:
        mesh.delete_started_pods()
        delete_model(mesh, NAMESPACE, MODEL, POOL)


def test_the_host_runs_its_own_nodes_layers_and_one_worker_the_rest(
    own_node_model: RealCluster,
) -> None:
    mesh = own_node_model
    report = functools.partial(model_report, mesh, NAMESPACE, MODEL)
    obj = wait_for(f"{NAMESPACE}/{MODEL} Ready", lambda: mesh.ready(OWN), 600, explain=report)
    plan = obj["status"]["plan"]
    host_node = plan["hostNode"]
    tier = plan.get("hostTier") or {}
    workers = {d["node"] for d in plan["devices"]}
    log(f"{MODEL}: host on {host_node} with layers 0-{tier.get('cpuLayers', 0) - 1}, rpc {workers}")
    assert tier.get("node") == host_node and tier.get("device") == "CPU", plan
    assert tier["cpuLayers"] > 0 and tier["memoryMiB"] > 0, tier
    assert len(workers) == 1 and host_node not in workers, plan
    assert workers | {host_node} == set(POOL_NODES), plan

    # One worker, on the other node; none beside the host.
    rpc_nodes = [p["spec"].get("nodeName") for p in pods_of(mesh, RPC_COMPONENT)]
    assert rpc_nodes == list(workers), rpc_nodes
    (host,) = pods_of(mesh, HOST_COMPONENT)
    assert host["spec"].get("nodeName") == host_node, host["spec"]
    (server,) = host["spec"]["containers"]
    assert server["resources"]["requests"]["memory"] == f"{tier['memoryMiB']}Mi", server
    args = server["args"]
    endpoints = args[args.index("--rpc") + 1].split(",")
    assert len(endpoints) == 1, args

    # The pool's ledger holds the tier on the host's node.
    def host_row_claimed() -> int | None:
        status = served.pool_status(mesh, POOL)
        row = next((r for r in status.ledger if r.node == host_node), None)
        return row.memory_claimed_mib if row is not None and row.memory_claimed_mib else None

    claimed = wait_for(f"MeshPool {POOL}'s ledger to claim on {host_node}", host_row_claimed, 60)
    assert claimed >= tier["memoryMiB"], (claimed, tier)

    answer = served.chat(mesh, CLIENT, MODEL, CLIENT_TIMEOUT)
    assert answer["status"] == 200 and answer["content"], answer
    log(f"answered in {answer['seconds']:.1f} s: {answer['content']!r}")
