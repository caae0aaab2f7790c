"""Replicas on real nodes: a MeshModel of `replicas: 2` serves from two hosts on
two nodes of three; one replica's node is lost (its link cut, `RealNodes.lose`)
and that replica is planned again on the third node while the other keeps
answering every request through the gateway, its host Deployment untouched.
Then a change of llama-server's flags (`extraArgs`) rolls over the two replicas
one at a time (the second host's template changes only once the first has rolled
out on the new one), and again every request is answered.

Uses the session's installation (`e2e.realcluster`), with the system node
labelled into the CPU pool for the test's time (as e2e/test_real_rtt.py does)
so that a pool of its own has three nodes. The lost node is always a pool node:
the system node runs the operator and the gateway. The session's models on that
node are planned again too; the test waits for them to serve again, off the
system node, before it ends.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from e2e.realcluster import (
    MODEL_POD_SECURITY,
    ONE_NODE_PER_MODEL,
    POOL_NODES,
    RealCluster,
    SharedRealCluster,
    example_model,
    example_pool,
    log,
)
from e2e.scenario import POOL_LABEL, SYSTEM_NODE
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
from mesh_operator.manifests.workloads import host_deployment_name

pytestmark = pytest.mark.e2e

Obj = dict[str, Any]

NODES = (*POOL_NODES, SYSTEM_NODE)
POOL = "replicas"
NAMESPACE = "replicas"
MODEL = "gemma-replicas"
REPLICAS = 2
CLIENT = "replicas-client"
# Two requests at a time, so that the gateway (one slot per host) sends to both
# hosts: with one at a time the first free host could answer them all.
CLIENT_THREADS = 2


def client(mesh: RealCluster) -> ChatLoop:
    return ChatLoop(mesh, CLIENT, MODEL, CLIENT_THREADS)


def model_obj(mesh: RealCluster) -> Obj:
    obj: Obj = mesh.get("meshmodel", MODEL, "-n", NAMESPACE) or {}
    return obj


def replica_plans(obj: Obj) -> dict[int, Obj]:
    return plans(obj.get("status") or {})


def serving(mesh: RealCluster) -> Obj | None:
    """The model once every replica is ready, each on one node no other uses."""
    obj = model_obj(mesh)
    by_replica = replica_plans(obj)
    if (obj.get("status") or {}).get("readyReplicas") != REPLICAS or set(by_replica) != set(
        range(REPLICAS)
    ):
        return None
    return obj


@pytest.fixture
def three_nodes(shared_real_cluster: SharedRealCluster) -> Iterator[RealCluster]:
    """The system node in the CPU pool (its agent running) for the test's time;
    afterwards the session's models serve from the pool nodes again."""
    mesh = shared_real_cluster.mesh
    mesh.kubectl("label", "--overwrite", "node", SYSTEM_NODE, f"{POOL_LABEL}=true")
    try:
        wait_for(
            "a MeshNode with devices for each of the three nodes",
            lambda: (
                {
                    n["metadata"]["name"]
                    for n in (mesh.get("meshnodes") or {}).get("items", [])
                    if (n.get("status") or {}).get("devices")
                }
                >= set(NODES)
            ),
            timeout=240,
        )
        yield mesh
    finally:
        client(mesh).stop()
        delete_model(mesh, NAMESPACE, MODEL, POOL)
        mesh.unpool_node(SYSTEM_NODE, POOL_LABEL)
        wait_for(
            f"the session's models serving off {SYSTEM_NODE}",
            lambda: shared_models_serving_off(mesh, {SYSTEM_NODE}),
            timeout=420,
        )


def replicas_model(shared: SharedRealCluster) -> Obj:
    return example_model(shared, MODEL, NAMESPACE, POOL, replicas=REPLICAS)


def test_a_lost_replica_is_planned_again_while_the_other_serves_then_a_change_rolls(
    three_nodes: RealCluster, shared_real_cluster: SharedRealCluster
) -> None:
    mesh = three_nodes
    mesh.namespace(NAMESPACE, MODEL_POD_SECURITY)
    mesh.apply(example_pool(POOL, **ONE_NODE_PER_MODEL))
    mesh.apply(replicas_model(shared_real_cluster))
    obj = wait_for(
        f"{REPLICAS} replicas ready",
        lambda: serving(mesh),
        timeout=600,
        explain=lambda: model_report(mesh, NAMESPACE, MODEL),
    )
    before = replica_plans(obj)
    nodes = {r: plan_nodes(p) for r, p in before.items()}
    log(f"replicas ready on {nodes}")
    assert all(len(n) == 1 for n in nodes.values()), nodes
    assert not nodes[0] & nodes[1], f"the replicas share a node: {nodes}"
    hosts = {r: host_pods(mesh, NAMESPACE, MODEL, r) for r in range(REPLICAS)}
    assert all(len(h) == 1 for h in hosts.values()), hosts
    for replica, (host,) in hosts.items():
        assert host["spec"]["nodeName"] in nodes[replica], (replica, host["spec"]["nodeName"])

    # Both hosts answer requests sent through the gateway's Service.
    client(mesh).start()
    every_host_answers(mesh, {r: h[0] for r, h in hosts.items()})

    # The replica to lose: one on a pool node (the system node runs the operator),
    # where none of the session's models serve if there is such a node.
    shared = shared_nodes(mesh)
    lost_replica = min(
        (r for r in range(REPLICAS) if SYSTEM_NODE not in nodes[r]),
        key=lambda r: (bool(nodes[r] & shared), -r),
    )
    (survivor,) = set(range(REPLICAS)) - {lost_replica}
    (lost,) = nodes[lost_replica]
    (third,) = set(NODES) - nodes[0] - nodes[1]
    kept = mesh.get("deployment", host_deployment_name(MODEL, survivor), "-n", NAMESPACE)
    kept_host = hosts[survivor][0]["metadata"]["uid"]

    log(f"losing {lost} (replica {lost_replica}); replica {survivor} keeps serving")

    def moved_to_the_third(after: Obj) -> None:
        moved = replica_plans(after)
        assert plan_nodes(moved[lost_replica]) == {third}, moved
        assert plan_nodes(moved[survivor]) == nodes[survivor], moved
        (new_host,) = host_pods(mesh, NAMESPACE, MODEL, lost_replica)
        assert new_host["spec"]["nodeName"] == third, new_host["spec"]["nodeName"]
        # The replica planned again answers through the gateway too.
        every_host_answers(mesh, {lost_replica: new_host})

    loss = lose_node_while_serving(
        mesh,
        client(mesh),
        lost,
        lost_replica,
        serving=lambda: serving(mesh),
        explain=lambda: model_report(mesh, NAMESPACE, MODEL),
        check=moved_to_the_third,
    )
    # The surviving replica was not touched: same Deployment, same spec, same pod.
    still = mesh.get("deployment", host_deployment_name(MODEL, survivor), "-n", NAMESPACE)
    assert still["metadata"]["uid"] == kept["metadata"]["uid"]
    assert still["metadata"]["generation"] == kept["metadata"]["generation"], (
        kept["metadata"]["generation"],
        still["metadata"]["generation"],
    )
    survivor_hosts = host_pods(mesh, NAMESPACE, MODEL, survivor)
    assert [h["metadata"]["uid"] for h in survivor_hosts] == [kept_host]
    wait_for(
        f"{lost} Ready again",
        lambda: any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in (mesh.get("node", lost) or {}).get("status", {}).get("conditions", [])
        ),
        timeout=180,
    )
    roll_seconds = roll_through_a_spec_change(mesh, shared_real_cluster)
    print(
        json.dumps(
            {
                "node_loss_to_replica_serving_seconds": round(loss.outage, 1),
                "rolling_update_seconds": round(roll_seconds, 1),
            }
        )
    )


def roll_through_a_spec_change(mesh: RealCluster, shared: SharedRealCluster) -> float:
    """A change of llama-server's flags while the client sends requests: replica 1's
    host takes the new template only once replica 0's has rolled out on it, and
    every request is answered meanwhile. Returns the seconds from the change to
    both rolled out."""
    before = {
        r: mesh.get("deployment", name, "-n", NAMESPACE)["metadata"]["generation"]
        for r in range(REPLICAS)
        for name in [host_deployment_name(MODEL, r)]
    }
    client(mesh).start()
    wait_for("the client's first answers", lambda: client(mesh).answered_since(0.0), timeout=180)
    changed_wall = time.time()
    changed_at = time.monotonic()
    model = replicas_model(shared)
    model["spec"]["extraArgs"] = ["--temp", "0.5"]
    mesh.apply(model)
    changed: dict[int, float] = {}  # when each host's template changed
    rolled: dict[int, float] = {}  # when it had rolled out on the new template

    def both_rolled() -> bool:
        now = time.monotonic()
        for r in range(REPLICAS):
            obj = mesh.get("deployment", host_deployment_name(MODEL, r), "-n", NAMESPACE)
            meta, st = obj["metadata"], obj.get("status") or {}
            if meta["generation"] > before[r]:
                changed.setdefault(r, now)
                if (
                    st.get("observedGeneration") == meta["generation"]
                    and st.get("updatedReplicas") == st.get("availableReplicas") == 1
                    and st.get("replicas") == 1
                ):
                    rolled.setdefault(r, now)
        return len(rolled) == REPLICAS

    wait_for("both replicas' hosts rolled out on the new flags", both_rolled, timeout=600)
    took = time.monotonic() - changed_at
    serving_again = wait_for("both replicas ready again", lambda: serving(mesh), timeout=300)
    assert not serving_again["status"].get("rollingReplicas"), serving_again["status"]
    done_wall = time.time()
    try:
        answers = wait_for(
            "an answer to every request sent during the rolling update",
            lambda: client(mesh).answered_since(done_wall),
            timeout=360,
        )
    finally:
        client(mesh).stop()
    first, second = sorted(changed, key=lambda r: changed[r])
    assert changed[second] >= rolled[first], (changed, rolled)
    for r in range(REPLICAS):
        (host,) = host_pods(mesh, NAMESPACE, MODEL, r)
        args = " ".join(a for c in host["spec"]["containers"] for a in c.get("args") or [])
        assert "--temp 0.5" in args, (r, args)
    events = mesh.get(
        "events", "-n", NAMESPACE, "--field-selector",
        f"involvedObject.name={MODEL},reason=RollingUpdate",
    )  # fmt: skip
    messages = sorted(e["message"] for e in events["items"])
    assert messages == [
        f"replica {first}: new workloads; replicas [{second}] follow one at a time",
        f"replica {second}: new workloads",
    ], messages
    during = client(mesh).all_answered(answers, changed_wall, done_wall, "the update")
    log(
        f"rolling update: {took:.1f} s from the change to both hosts rolled out; "
        f"{len(during)} requests meanwhile, none failed, slowest "
        f"{max(a.seconds for a in during):.1f} s"
    )
    return took
