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
from dataclasses import dataclass
from typing import Any

import pytest

from e2e.realcluster import (
    MODEL_POD_SECURITY,
    MODELS,
    ONE_NODE_PER_MODEL,
    OUTSIDE,
    POOL_NODES,
    RealCluster,
    SharedRealCluster,
    example_model,
    example_pool,
    log,
    mesh_image,
    restricted_pod,
)
from e2e.scenario import POOL_LABEL, SYSTEM_NODE
from e2e.served import (
    delete_model,
    gateway_base,
    model_report,
    plan_nodes,
    plans,
    predicted,
)
from e2e.waiting import wait_for

pytestmark = pytest.mark.e2e

Obj = dict[str, Any]

NODES = (*POOL_NODES, SYSTEM_NODE)
POOL = "replicas"
NAMESPACE = "replicas"
MODEL = "gemma-replicas"
REPLICAS = 2
CLIENT = "replicas-client"
REPLICA_LABEL = "mesh.dev/replica"
# Two requests at a time, so that the gateway (one slot per host) sends to both
# hosts: with one at a time the first free host could answer them all.
CLIENT_THREADS = 2

# Chat completions through the gateway until the pod is deleted, one line per
# answer: `ok <thread> <unix time sent> <seconds>` or the same with `fail` and
# the error. Each thread sends one request after the other.
CLIENT_SCRIPT = """
import json, sys, threading, time, urllib.request
url, model, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
lock = threading.Lock()
def loop(thread):
    while True:
        started = time.time()
        body = {'model': model, 'max_tokens': 4,
                'messages': [{'role': 'user', 'content': 'Say yes.'}]}
        request = urllib.request.Request(url, json.dumps(body).encode(),
                                         {'Content-Type': 'application/json'})
        try:
            with urllib.request.urlopen(request, timeout=300) as answer:
                json.loads(answer.read())['choices'][0]['message']['content']
            line = f'ok {thread} {started:.3f} {time.time() - started:.3f}'
        except Exception as exc:
            took = time.time() - started
            line = f'fail {thread} {started:.3f} {took:.3f} {type(exc).__name__}: {exc}'
        with lock:
            print(line, flush=True)
        time.sleep(0.2)
for thread in range(threads):
    threading.Thread(target=loop, args=(thread,), daemon=True).start()
while True:
    time.sleep(60)
"""


def model_obj(mesh: RealCluster) -> Obj:
    obj: Obj = mesh.get("meshmodel", MODEL, "-n", NAMESPACE) or {}
    return obj


def replica_plans(obj: Obj) -> dict[int, Obj]:
    return plans(obj.get("status") or {})


def host_deployment(replica: int) -> str:
    return f"{MODEL}-host" if replica == 0 else f"{MODEL}-host-r{replica}"


def host_pods(mesh: RealCluster, replica: int) -> list[Obj]:
    return mesh.running_pods(
        NAMESPACE,
        f"app.kubernetes.io/component=host,mesh.dev/model={MODEL},{REPLICA_LABEL}={replica}",
    )


def serving(mesh: RealCluster) -> Obj | None:
    """The model once every replica is ready, each on one node no other uses."""
    obj = model_obj(mesh)
    by_replica = replica_plans(obj)
    if (obj.get("status") or {}).get("readyReplicas") != REPLICAS or set(by_replica) != set(
        range(REPLICAS)
    ):
        return None
    return obj


@dataclass(frozen=True)
class Answer:
    """One request of the client pod and how it ended."""

    ok: bool
    thread: int
    sent: float  # unix time
    seconds: float
    error: str


def client_answers(mesh: RealCluster) -> list[Answer]:
    out = mesh.kubectl("logs", "-n", OUTSIDE, CLIENT, check=False)
    answers = []
    for line in out.splitlines():
        fields = line.split(" ", 4)
        if fields[0] in ("ok", "fail") and len(fields) >= 4:
            error = fields[4] if len(fields) > 4 else ""
            answers.append(
                Answer(fields[0] == "ok", int(fields[1]), float(fields[2]), float(fields[3]), error)
            )
    return answers


def answered_since(mesh: RealCluster, since: float) -> list[Answer] | None:
    """The client's answers once each thread has one to a request sent after
    `since`: every request a thread sent before then has been answered."""
    answers = client_answers(mesh)
    latest = {a.thread: a.sent for a in answers}
    if len(latest) < CLIENT_THREADS or min(latest.values()) < since:
        return None
    return answers


def all_answered(answers: list[Answer], start: float, end: float, what: str) -> list[Answer]:
    """Checks that every request was answered and that each client thread sent
    some between `start` and `end` (unix times); returns those."""
    failed = [a for a in answers if not a.ok]
    during = [a for a in answers if start <= a.sent < end]
    assert not failed, f"{len(failed)} of {len(answers)} requests failed: {failed[:5]}"
    assert len(during) >= CLIENT_THREADS, f"{len(during)} requests sent during {what}"
    return during


def shared_models_serving_off(mesh: RealCluster, node: str) -> bool:
    """The session's models Ready, each planned on nodes other than `node`."""
    for model in MODELS:
        obj = mesh.ready(model)
        if obj is None or any(node in plan_nodes(p) for p in replica_plans(obj).values()):
            return False
    return True


def shared_nodes(mesh: RealCluster) -> set[str]:
    """The nodes the session's models are planned on."""
    found: set[str] = set()
    for model in MODELS:
        obj = mesh.get("meshmodel", model.name, "-n", model.namespace) or {}
        for plan in replica_plans(obj).values():
            found |= plan_nodes(plan)
    return found


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
        mesh.kubectl("delete", "pod", CLIENT, "-n", OUTSIDE, "--ignore-not-found", check=False)
        delete_model(mesh, NAMESPACE, MODEL, POOL)
        mesh.unpool_node(SYSTEM_NODE, POOL_LABEL)
        wait_for(
            f"the session's models serving off {SYSTEM_NODE}",
            lambda: shared_models_serving_off(mesh, SYSTEM_NODE),
            timeout=420,
        )


def replicas_model(shared: SharedRealCluster) -> Obj:
    return example_model(shared, MODEL, NAMESPACE, POOL, replicas=REPLICAS)


def start_client(mesh: RealCluster) -> None:
    """The client pod, on the system node (never the lost one)."""
    pod = restricted_pod(
        CLIENT,
        OUTSIDE,
        {"app": "probe"},
        [
            "python3",
            "-c",
            CLIENT_SCRIPT,
            f"{gateway_base(mesh)}/v1/chat/completions",
            MODEL,
            str(CLIENT_THREADS),
        ],
        image=mesh_image(),
    )
    pod["spec"]["nodeName"] = SYSTEM_NODE
    mesh.kubectl("delete", "pod", CLIENT, "-n", OUTSIDE, "--ignore-not-found", "--wait=true")
    mesh.apply(pod)


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
    hosts = {r: host_pods(mesh, r) for r in range(REPLICAS)}
    assert all(len(h) == 1 for h in hosts.values()), hosts
    for replica, (host,) in hosts.items():
        assert host["spec"]["nodeName"] in nodes[replica], (replica, host["spec"]["nodeName"])

    # Both hosts answer requests sent through the gateway's Service.
    start_client(mesh)
    counted = {r: predicted(mesh, h[0]) for r, h in hosts.items()}

    def both_served() -> dict[int, float] | None:
        now = {r: predicted(mesh, h[0]) for r, h in hosts.items()}
        return now if all(now[r] > counted[r] for r in now) else None

    served = wait_for("both hosts to answer through the gateway", both_served, timeout=180)
    log(f"tokens generated by each replica's host: {counted} -> {served}")

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
    kept = mesh.get("deployment", host_deployment(survivor), "-n", NAMESPACE)
    kept_host = hosts[survivor][0]["metadata"]["uid"]

    log(f"losing {lost} (replica {lost_replica}); replica {survivor} keeps serving")
    lost_at_wall = time.time()
    lost_at = time.monotonic()
    mesh.nodes.lose(lost)
    try:

        def replanned() -> Obj | None:
            obj = serving(mesh)
            if obj is None or lost in plan_nodes(replica_plans(obj)[lost_replica]):
                return None
            return obj

        after = wait_for(
            f"replica {lost_replica} serving again without {lost}",
            replanned,
            timeout=600,
            explain=lambda: model_report(mesh, NAMESPACE, MODEL),
        )
        outage = time.monotonic() - lost_at
        back_wall = time.time()
        log(f"replica {lost_replica} serving again {outage:.1f} s after {lost} was lost")
        moved = replica_plans(after)
        assert plan_nodes(moved[lost_replica]) == {third}, moved
        assert plan_nodes(moved[survivor]) == nodes[survivor], moved
        (new_host,) = host_pods(mesh, lost_replica)
        assert new_host["spec"]["nodeName"] == third, new_host["spec"]["nodeName"]
        # The replica planned again answers through the gateway too.
        fresh = predicted(mesh, new_host)
        wait_for(
            f"replica {lost_replica}'s new host to answer through the gateway",
            lambda: predicted(mesh, new_host) > fresh or None,
            timeout=120,
        )
        answers = wait_for(
            "an answer to every request sent during the loss",
            lambda: answered_since(mesh, back_wall),
            timeout=360,
        )
    finally:
        mesh.kubectl("delete", "pod", CLIENT, "-n", OUTSIDE, "--ignore-not-found", check=False)
        log(f"giving {lost} back")
        mesh.nodes.restore(lost)

    # Every request was answered, those sent while the replica was lost included.
    during = all_answered(answers, lost_at_wall, back_wall, "the loss")
    slowest = max(a.seconds for a in during)
    log(
        f"{len(during)} requests while {lost} was lost, none failed, slowest {slowest:.1f} s; "
        f"node loss to replica {lost_replica} serving on {third}: {outage:.1f} s"
    )
    # The surviving replica was not touched: same Deployment, same spec, same pod.
    still = mesh.get("deployment", host_deployment(survivor), "-n", NAMESPACE)
    assert still["metadata"]["uid"] == kept["metadata"]["uid"]
    assert still["metadata"]["generation"] == kept["metadata"]["generation"], (
        kept["metadata"]["generation"],
        still["metadata"]["generation"],
    )
    assert [h["metadata"]["uid"] for h in host_pods(mesh, survivor)] == [kept_host]
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
                "node_loss_to_replica_serving_seconds": round(outage, 1),
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
        r: mesh.get("deployment", host_deployment(r), "-n", NAMESPACE)["metadata"]["generation"]
        for r in range(REPLICAS)
    }
    start_client(mesh)
    wait_for("the client's first answers", lambda: answered_since(mesh, 0.0), timeout=180)
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
            obj = mesh.get("deployment", host_deployment(r), "-n", NAMESPACE)
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
            lambda: answered_since(mesh, done_wall),
            timeout=360,
        )
    finally:
        mesh.kubectl("delete", "pod", CLIENT, "-n", OUTSIDE, "--ignore-not-found", check=False)
    first, second = sorted(changed, key=lambda r: changed[r])
    assert changed[second] >= rolled[first], (changed, rolled)
    for r in range(REPLICAS):
        (host,) = host_pods(mesh, r)
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
    during = all_answered(answers, changed_wall, done_wall, "the update")
    log(
        f"rolling update: {took:.1f} s from the change to both hosts rolled out; "
        f"{len(during)} requests meanwhile, none failed, slowest "
        f"{max(a.seconds for a in during):.1f} s"
    )
    return took
