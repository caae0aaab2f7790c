"""Two split replicas on real nodes: a MeshModel of `replicas: 2` in a pool where
each node holds only part of the model serves from two plans of two nodes each,
no node shared, every replica with its own RPC servers. One node of one replica
is lost (its link cut, `RealNodes.lose`): the other replica answers every request
sent through the gateway meanwhile, its host and workers untouched, and the lost
replica is planned again on its remaining node and the pool's fifth.

Uses the session's installation (`e2e.realcluster`), whose two pool nodes join
three more real nodes started for the test's time (`RealNodes.up` starts only the
missing ones) and removed at its end (`RealNodes.remove`). The new nodes are
labelled into the session's CPU pool too, since the agents run on its nodes;
their agents read the bandwidth figure cached in the shared state folder, so the
session's models see equal nodes and stay where they are. The lost node is
always a new one.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from typing import Any

import pytest

from e2e.realcluster import (
    MODEL_POD_SECURITY,
    POOL_NODES,
    RealCluster,
    SharedRealCluster,
    example_model,
    example_pool,
    log,
)
from e2e.scenario import POOL_LABEL
from e2e.served import (
    ChatLoop,
    delete_model,
    every_host_answers,
    host_pods,
    lose_node_while_serving,
    model_report,
    plan_nodes,
    plans,
    shared_models_serving_off,
    shared_nodes,
)
from e2e.waiting import wait_for
from mesh_operator.api.contract import COMPONENT_LABEL, MODEL_LABEL, REPLICA_LABEL, RPC_COMPONENT
from mesh_operator.manifests.workloads import host_deployment_name

pytestmark = pytest.mark.e2e

Obj = dict[str, Any]

EXTRA_NODES = ("node-c", "node-d", "node-e")
NODES = (*POOL_NODES, *EXTRA_NODES)
SPLIT_LABEL = "mesh.dev/split-pool"
POOL = "split"
NAMESPACE = "split"
MODEL = "gemma-split"
REPLICAS = 2
# With this much of each node's memory the model needs two nodes (as in test_real_rtt).
DEVICE_CAP_MIB = 300
CLIENT = "split-client"
# Two requests at a time, so that the gateway (one slot per host) sends to both.
CLIENT_THREADS = 2


def client(mesh: RealCluster) -> ChatLoop:
    return ChatLoop(mesh, CLIENT, MODEL, CLIENT_THREADS)


def rpc_pods(mesh: RealCluster, replica: int) -> list[Obj]:
    return mesh.running_pods(
        NAMESPACE,
        f"{COMPONENT_LABEL}={RPC_COMPONENT},{MODEL_LABEL}={MODEL},{REPLICA_LABEL}={replica}",
    )


def serving(mesh: RealCluster) -> Obj | None:
    """The model once both replicas are ready."""
    obj: Obj = mesh.get("meshmodel", MODEL, "-n", NAMESPACE) or {}
    status = obj.get("status") or {}
    if status.get("readyReplicas") != REPLICAS or set(plans(status)) != set(range(REPLICAS)):
        return None
    return obj


def meshnodes_with_devices(mesh: RealCluster) -> set[str]:
    return {
        n["metadata"]["name"]
        for n in (mesh.get("meshnodes") or {}).get("items", [])
        if (n.get("status") or {}).get("devices")
    }


@pytest.fixture
def five_nodes(shared_real_cluster: SharedRealCluster) -> Iterator[RealCluster]:
    """The session's pool nodes and three new real nodes, all five in the split
    pool's selector; afterwards the new nodes are gone and the session's models
    serve from the pool nodes again."""
    mesh = shared_real_cluster.mesh
    try:
        log(f"starting {', '.join(EXTRA_NODES)}")
        mesh.nodes.up({n: {POOL_LABEL: "true", SPLIT_LABEL: "true"} for n in EXTRA_NODES})
        for node in POOL_NODES:
            mesh.kubectl("label", "--overwrite", "node", node, f"{SPLIT_LABEL}=true")
        wait_for(
            "a MeshNode with devices for each of the five nodes",
            lambda: meshnodes_with_devices(mesh) >= set(NODES),
            timeout=300,
        )
        yield mesh
    finally:
        client(mesh).stop()
        delete_model(mesh, NAMESPACE, MODEL, POOL)
        for node in POOL_NODES:
            mesh.kubectl("label", "node", node, f"{SPLIT_LABEL}-", check=False)
        started = {r.name for r in mesh.nodes.nodes()}
        for node in EXTRA_NODES:
            if node in started:
                log(f"removing {node}")
                mesh.nodes.remove(node)
            mesh.kubectl("delete", "meshnode", node, "--ignore-not-found")
        wait_for(
            "the session's models serving off the removed nodes",
            lambda: shared_models_serving_off(mesh, set(EXTRA_NODES)),
            timeout=420,
        )


def test_a_split_replica_loses_a_node_while_the_other_serves(
    five_nodes: RealCluster, shared_real_cluster: SharedRealCluster
) -> None:
    mesh = five_nodes
    report = functools.partial(model_report, mesh, NAMESPACE, MODEL)
    mesh.namespace(NAMESPACE, MODEL_POD_SECURITY)
    mesh.apply(
        example_pool(
            POOL,
            nodeSelector={SPLIT_LABEL: "true"},
            deviceMemoryCapMiB=DEVICE_CAP_MIB,
            maxNodesPerModel=2,
            rpcThreads=1,
        )
    )
    mesh.apply(example_model(shared_real_cluster, MODEL, NAMESPACE, POOL, replicas=REPLICAS))
    obj = wait_for(f"{REPLICAS} split replicas ready", lambda: serving(mesh), 600, explain=report)
    before = plans(obj["status"])
    nodes = {r: plan_nodes(p) for r, p in before.items()}
    log(f"replicas ready on {nodes}")
    assert all(len(n) == 2 for n in nodes.values()), nodes
    assert not nodes[0] & nodes[1], f"the replicas share a node: {nodes}"

    # Each replica's host passes one endpoint per RPC server of its own plan, and
    # those run on its plan's nodes.
    hosts = {}
    for replica, plan in before.items():
        (host,) = host_pods(mesh, NAMESPACE, MODEL, replica)
        assert host["spec"]["nodeName"] == plan["hostNode"], (replica, host["spec"], plan)
        args = [a for c in host["spec"]["containers"] for a in c.get("args") or []]
        endpoints = args[args.index("--rpc") + 1].split(",")
        workers = sorted(p["spec"]["nodeName"] for p in rpc_pods(mesh, replica))
        assert workers == sorted(d["node"] for d in plan["devices"]), (replica, workers, plan)
        assert len(endpoints) == len(workers) == 2, (replica, endpoints, workers)
        hosts[replica] = host

    # Both hosts answer requests sent through the gateway's Service.
    client(mesh).start()
    every_host_answers(mesh, hosts)

    # The node to lose: a new one (none of the session's models is planned there).
    shared = shared_nodes(mesh)
    lost = min(n for plan in nodes.values() for n in plan if n in EXTRA_NODES and n not in shared)
    (lost_replica,) = (r for r, n in nodes.items() if lost in n)
    (survivor,) = set(range(REPLICAS)) - {lost_replica}
    (fifth,) = set(NODES) - nodes[0] - nodes[1]
    kept = mesh.get("deployment", host_deployment_name(MODEL, survivor), "-n", NAMESPACE)
    kept_pods = sorted(p["metadata"]["uid"] for p in [hosts[survivor], *rpc_pods(mesh, survivor)])

    log(f"losing {lost} (replica {lost_replica}); replica {survivor} keeps serving")

    def moved_to_the_fifth(after: Obj) -> None:
        moved = plans(after["status"])
        assert plan_nodes(moved[lost_replica]) == nodes[lost_replica] - {lost} | {fifth}, moved
        assert plan_nodes(moved[survivor]) == nodes[survivor], moved
        (new_host,) = host_pods(mesh, NAMESPACE, MODEL, lost_replica)
        workers = sorted(p["spec"]["nodeName"] for p in rpc_pods(mesh, lost_replica))
        assert workers == sorted(d["node"] for d in moved[lost_replica]["devices"]), workers
        # The replica planned again answers through the gateway too.
        every_host_answers(mesh, {lost_replica: new_host})

    loss = lose_node_while_serving(
        mesh,
        client(mesh),
        lost,
        lost_replica,
        serving=lambda: serving(mesh),
        explain=report,
        check=moved_to_the_fifth,
    )
    # The surviving replica was not touched: same Deployment and spec, same pods.
    still = mesh.get("deployment", host_deployment_name(MODEL, survivor), "-n", NAMESPACE)
    assert still["metadata"]["uid"] == kept["metadata"]["uid"]
    assert still["metadata"]["generation"] == kept["metadata"]["generation"]
    still_pods = [*host_pods(mesh, NAMESPACE, MODEL, survivor), *rpc_pods(mesh, survivor)]
    assert sorted(p["metadata"]["uid"] for p in still_pods) == kept_pods
    print(json.dumps({"split_node_loss_to_replica_serving_seconds": round(loss.outage, 1)}))
