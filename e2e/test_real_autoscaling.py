"""Autoscaling on real nodes: a MeshModel of gemma-3-270m with `spec.autoscaling`
(one to two replicas, one busy slot per replica, `scaleDownAfter: 20s`) serves
one replica; a client pod in a namespace of nobody's sends chat completions
through the gateway's Service from several threads at once, so that requests wait
at the gateway for the one slot; the operator reads that demand from the gateway
and adds a second replica (`ScaledUp`), which is planned on the other node, starts
and answers requests too, while every request the client sends is answered. Once
the load stops, after `scaleDownAfter` with no more load than one replica carries
the second replica goes (`ScaledDown`): its workers and host deleted, its memory
released in the pool's ledger, the first replica untouched, and the model still
answers.

The times from the load's start to the second replica serving, and from the load
falling to one request (and from the last answer) to the second replica gone, are
logged and written to `.mesh/e2e-autoscaling.json` (`MESH_E2E_AUTOSCALING_REPORT`).

Uses the session's installation (`e2e.realcluster`) with a pool of its own over
the session's two pool nodes (one node per replica), so that the pool's ledger
holds this model's memory alone. The session's models are not touched.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from e2e import parts, served
from e2e.realcluster import (
    MODEL_POD_SECURITY,
    ONE_NODE_PER_MODEL,
    OUTSIDE,
    POOL_NODES,
    RealCluster,
    SharedRealCluster,
    example_model,
    example_pool,
    log,
)
from e2e.served import (
    CLIENT_TIMEOUT,
    Answer,
    delete_model,
    every_host_answers,
    gateway_base,
    host_pods,
    model_report,
    plan_nodes,
    plans,
)
from e2e.waiting import wait_for
from mesh_operator.api.meshpool import MeshPoolStatus

pytestmark = pytest.mark.e2e

Obj = dict[str, Any]

POOL = "autoscale"
NAMESPACE = "autoscale"
MODEL = "gemma-autoscale"
SCALE_DOWN_AFTER = "20s"
AUTOSCALING = {
    "minReplicas": 1,
    "maxReplicas": 2,
    "targetBusySlots": 1,
    "scaleDownAfter": SCALE_DOWN_AFTER,
}
REPLICA_LABEL = "mesh.dev/replica"
# One-shot pods of the test, in OUTSIDE (the gateway admits every namespace).
LOAD_CLIENT = "autoscale-load"
LAST_CLIENT = "autoscale-after"
# Requests at once: with one slot per host (parallel 1) one is in flight and the
# others wait at the gateway, a load of 3 over one busy slot per replica, which
# calls for more replicas than maxReplicas allows; with two replicas, both serve.
LOAD_THREADS = 3
# Tokens per request: long enough that a request keeps its slot a while.
MAX_TOKENS = 48
# The longest the load runs if the test never stops it (it stops it once the
# second replica has answered): a bound, not a figure.
LOAD_SECONDS_BOUND = 900
REPORT = Path(
    os.environ.get("MESH_E2E_AUTOSCALING_REPORT", str(parts.mesh_dir() / "e2e-autoscaling.json"))
)

# Chat completions through the gateway from `threads` threads, each sending one
# request after the other, until SIGUSR1 (the test sends it with kubectl exec)
# or `seconds` have passed; then each thread's last request is awaited and the
# pod ends. One line per answer: `ok <thread> <unix time sent> <seconds>
# <tokens>` or `fail <thread> <unix time sent> <seconds> <error>`, framed by
# `start <unix time>` and `stop <unix time>`.
LOAD_SCRIPT = """
import json, signal, sys, threading, time, urllib.error, urllib.request
url, model, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
seconds, timeout, max_tokens = float(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
stop = threading.Event()
signal.signal(signal.SIGUSR1, lambda *_: stop.set())
lock = threading.Lock()
def say(line):
    with lock:
        print(line, flush=True)
def loop(thread):
    number = 0
    while not stop.is_set():
        number += 1
        body = {'model': model, 'max_tokens': max_tokens, 'messages': [{'role': 'user',
                'content': f'Tell a long story about lighthouse number {thread}-{number}.'}]}
        request = urllib.request.Request(url + '/v1/chat/completions', json.dumps(body).encode(),
                                         {'Content-Type': 'application/json'})
        started = time.time()
        try:
            with urllib.request.urlopen(request, timeout=timeout) as answer:
                reply = json.loads(answer.read())
            tokens = int(reply['usage']['completion_tokens'])
            assert reply['choices'][0]['message']['content'], reply
            line = f'ok {thread} {started:.3f} {time.time() - started:.3f} {tokens}'
        except urllib.error.HTTPError as exc:
            error = exc.read().decode(errors='replace')[:300].replace(chr(10), ' ')
            line = f'fail {thread} {started:.3f} {time.time() - started:.3f} {exc.code} {error}'
        except Exception as exc:
            took = time.time() - started
            line = f'fail {thread} {started:.3f} {took:.3f} {type(exc).__name__}: {exc}'
        say(line)
say(f'start {time.time():.3f}')
workers = [threading.Thread(target=loop, args=(t,)) for t in range(threads)]
for worker in workers:
    worker.start()
stop.wait(seconds)
stop.set()
for worker in workers:
    worker.join()
say(f'stop {time.time():.3f}')
"""

# Sent inside the load client's pod: SIGUSR1 to its main process (pid 1).
STOP_SCRIPT = "import os, signal; os.kill(1, signal.SIGUSR1)"


def chat(mesh: RealCluster, name: str) -> Obj:
    """One chat completion from a pod in OUTSIDE: what its client saw."""
    return served.chat(mesh, name, MODEL, CLIENT_TIMEOUT)


def pool_status(mesh: RealCluster) -> MeshPoolStatus:
    return served.pool_status(mesh, POOL)


def model_status(mesh: RealCluster) -> Obj:
    obj: Obj = mesh.get("meshmodel", MODEL, "-n", NAMESPACE) or {}
    status: Obj = obj.get("status") or {}
    return status


def serving(mesh: RealCluster, count: int) -> Obj | None:
    """The model's status once the autoscaler wants `count` replicas and that many
    are planned and ready."""
    status = model_status(mesh)
    ready = next(
        (c for c in status.get("conditions", []) if c["type"] == "Ready" and c["status"] == "True"),
        None,
    )
    if (
        ready is None
        or status.get("desiredReplicas") != count
        or status.get("readyReplicas") != count
        or set(plans(status)) != set(range(count))
    ):
        return None
    return status


def wanting(mesh: RealCluster, count: int) -> Obj | None:
    """The model's status once the autoscaler wants `count` replicas."""
    status = model_status(mesh)
    return status if status.get("desiredReplicas") == count else None


def replica_children(mesh: RealCluster, replica: int) -> list[str]:
    """`kind/name` of the replica's workloads and pods (a pod going counts)."""
    items = (
        mesh.get(
            "daemonsets,deployments,pods",
            "-n",
            NAMESPACE,
            "-l",
            f"mesh.dev/model={MODEL},{REPLICA_LABEL}={replica}",
        )
        or {}
    ).get("items", [])
    return sorted(f"{o['kind']}/{o['metadata']['name']}" for o in items)


def events(mesh: RealCluster, reason: str) -> list[str]:
    """The messages of the model's Events of `reason`."""
    found = mesh.get(
        "events",
        "-n",
        NAMESPACE,
        "--field-selector",
        f"involvedObject.name={MODEL},involvedObject.kind=MeshModel,reason={reason}",
    )
    return [e.get("message", "") for e in (found or {}).get("items", [])]


def claimed_over(mesh: RealCluster, mib: int) -> int | None:
    """The pool's claimed memory once it is more than `mib`."""
    claimed = pool_status(mesh).memory_claimed_mib
    return claimed if claimed > mib else None


def claiming(mesh: RealCluster, mib: int) -> MeshPoolStatus | None:
    """The pool's status once its ledger claims `mib` in all."""
    status = pool_status(mesh)
    return status if status.memory_claimed_mib == mib else None


def claimed_by_node(status: MeshPoolStatus) -> dict[str, int]:
    return {row.node: row.memory_claimed_mib for row in status.ledger}


@dataclass(frozen=True)
class LoadLog:
    started: float | None  # unix time
    stopped: float | None
    answers: list[Answer]


def parse_load_log(text: str) -> LoadLog:
    started = stopped = None
    answers = []
    for line in text.splitlines():
        fields = line.split(" ", 4)
        if fields[0] == "start" and len(fields) == 2:
            started = float(fields[1])
        elif fields[0] == "stop" and len(fields) == 2:
            stopped = float(fields[1])
        elif fields[0] in ("ok", "fail") and len(fields) >= 4:
            detail = fields[4] if len(fields) > 4 else ""
            answers.append(
                Answer(
                    fields[0] == "ok", int(fields[1]), float(fields[2]), float(fields[3]), detail
                )
            )
    return LoadLog(started, stopped, answers)


def one_request_left(load: LoadLog) -> float:
    """When the client last went down to one request outstanding: all threads but
    one had their last answer (unix time)."""
    last = sorted(max(a.answered for a in load.answers if a.thread == t) for t in threads(load))
    return last[-2] if len(last) > 1 else last[-1]


def threads(load: LoadLog) -> set[int]:
    return {a.thread for a in load.answers}


def load_log(mesh: RealCluster) -> LoadLog:
    return parse_load_log(mesh.kubectl("logs", "-n", OUTSIDE, LOAD_CLIENT, check=False))


def failures(mesh: RealCluster) -> list[Answer]:
    return [a for a in load_log(mesh).answers if not a.ok]


def start_load(mesh: RealCluster) -> None:
    mesh.start_pod(
        LOAD_CLIENT,
        OUTSIDE,
        {"app": "probe"},
        [
            "python3", "-c", LOAD_SCRIPT, gateway_base(mesh), MODEL, str(LOAD_THREADS),
            str(LOAD_SECONDS_BOUND), str(CLIENT_TIMEOUT), str(MAX_TOKENS),
        ],
    )  # fmt: skip


def stop_load(mesh: RealCluster) -> LoadLog:
    """Signal the load client to stop, wait for its last answers, and read them."""
    pod = mesh.get("pod", LOAD_CLIENT, "-n", OUTSIDE)
    mesh.exec(pod, "probe", "python3", "-c", STOP_SCRIPT)
    out = mesh.pod_output(LOAD_CLIENT, OUTSIDE, timeout=CLIENT_TIMEOUT + 120)
    return parse_load_log(out)


@pytest.fixture
def autoscaled_model(shared_real_cluster: SharedRealCluster) -> Iterator[RealCluster]:
    """The pool, the namespace and the autoscaled model; all deleted afterwards."""
    mesh = shared_real_cluster.mesh
    made_namespace = mesh.get("namespace", NAMESPACE) is None
    mesh.namespace(NAMESPACE, MODEL_POD_SECURITY)
    mesh.namespace(OUTSIDE, None)
    mesh.apply(example_pool(POOL, **ONE_NODE_PER_MODEL))
    mesh.apply(example_model(shared_real_cluster, MODEL, NAMESPACE, POOL, autoscaling=AUTOSCALING))
    try:
        yield mesh
    finally:
        mesh.delete_started_pods()
        delete_model(mesh, NAMESPACE, MODEL, POOL)
        if made_namespace:
            mesh.kubectl("delete", "namespace", NAMESPACE, "--ignore-not-found", "--timeout=180s")


def test_load_adds_a_replica_and_idleness_removes_it(autoscaled_model: RealCluster) -> None:
    mesh = autoscaled_model
    started = time.monotonic()
    report = functools.partial(model_report, mesh, NAMESPACE, MODEL)
    status = wait_for(
        f"{NAMESPACE}/{MODEL} serving one replica", lambda: serving(mesh, 1), 600, explain=report
    )
    first = plans(status)[0]
    first_nodes = plan_nodes(first)
    log(f"{MODEL} Ready, one replica on {sorted(first_nodes)}")
    assert first_nodes <= set(POOL_NODES), first
    assert not status.get("lastScaleTime"), status
    (first_host,) = host_pods(mesh, NAMESPACE, MODEL, 0)
    one_claim = wait_for(
        f"MeshPool {POOL}'s ledger to hold the replica's memory",
        lambda: pool_status(mesh).memory_claimed_mib or None,
        timeout=60,
    )
    pool = pool_status(mesh)
    # Room for a second one-node replica: a pool node the first one does not use.
    others = [row for row in pool.ledger if row.node not in first_nodes]
    log(
        f"pool {POOL}: {one_claim} MiB claimed by one replica; ledger "
        + ", ".join(
            f"{r.node} {r.memory_claimed_mib}/{r.memory_total_mib} MiB claimed, "
            f"{r.memory_free_mib} MiB free"
            for r in pool.ledger
        )
    )
    assert any(r.healthy and not r.stale and r.memory_free_mib >= one_claim for r in others), (
        pool.ledger
    )

    # Load: more requests at once than one replica's slot.
    log(f"load: {LOAD_THREADS} clients at once through the gateway")
    start_load(mesh)
    load_started = wait_for("the load client to start", lambda: load_log(mesh).started, timeout=180)
    status = wait_for("the autoscaler to want two replicas", lambda: wanting(mesh, 2), 180)
    scaled_up_at = time.time()
    log(f"desiredReplicas 2, {scaled_up_at - load_started:.1f} s after the load started")
    assert status.get("lastScaleTime"), status
    up = events(mesh, "ScaledUp")
    assert up and up[0].endswith("1 -> 2 replicas"), up
    log(f"ScaledUp: {up[0]}")

    status = wait_for("two replicas serving", lambda: serving(mesh, 2), 600, explain=report)
    second_ready_at = time.time()
    both = plans(status)
    second_nodes = plan_nodes(both[1])
    log(
        f"second replica ready on {sorted(second_nodes)}, "
        f"{second_ready_at - load_started:.1f} s after the load started"
    )
    assert plan_nodes(both[0]) == first_nodes, both
    assert second_nodes <= set(POOL_NODES) and not second_nodes & first_nodes, both
    (second_host,) = host_pods(mesh, NAMESPACE, MODEL, 1)
    assert second_host["spec"]["nodeName"] in second_nodes, second_host["spec"]["nodeName"]
    two_claims = wait_for(
        f"MeshPool {POOL}'s ledger to hold both replicas' memory",
        lambda: claimed_over(mesh, one_claim),
        timeout=60,
    )

    # Both hosts answer requests sent through the gateway while the load lasts.
    hosts = {0: first_host, 1: second_host}
    every_host_answers(mesh, hosts)
    second_answered_at = time.time()
    assert not failures(mesh), failures(mesh)[:5]

    # The load stops; once the client has its last answers the model is idle.
    log("stopping the load")
    load = stop_load(mesh)
    assert load.started is not None and load.stopped is not None, load
    failed = [a for a in load.answers if not a.ok]
    assert not failed, f"{len(failed)} of {len(load.answers)} requests failed: {failed[:5]}"
    assert threads(load) == set(range(LOAD_THREADS)), load.answers
    assert all(int(a.detail) > 0 for a in load.answers), load.answers
    idle_since = max(a.answered for a in load.answers)
    # The load one replica carries (targetBusySlots 1) from when all but one of
    # the threads had their last answer: the autoscaler's window starts there.
    one_left = one_request_left(load)
    slowest = max(a.seconds for a in load.answers)
    log(
        f"{len(load.answers)} requests answered, none failed, slowest {slowest:.1f} s; "
        f"one request left {idle_since - one_left:.1f} s before the last answer"
    )

    status = wait_for(
        f"the autoscaler to want one replica again after {SCALE_DOWN_AFTER} without load",
        lambda: wanting(mesh, 1),
        timeout=300,
        explain=report,
    )
    scaled_down_at = time.time()
    log(
        f"desiredReplicas 1, {scaled_down_at - one_left:.1f} s after one request was left, "
        f"{scaled_down_at - idle_since:.1f} s after the last answer"
    )
    down = events(mesh, "ScaledDown")
    assert len(down) == 1 and down[0].endswith("2 -> 1 replicas"), down
    log(f"ScaledDown: {down[0]}")
    status = wait_for("one replica serving", lambda: serving(mesh, 1), timeout=120)
    assert not status.get("replicaPlans"), status
    assert plan_nodes(plans(status)[0]) == first_nodes, status
    wait_for(
        "the second replica's workers and host deleted",
        lambda: not replica_children(mesh, 1),
        timeout=180,
    )
    released = wait_for(
        f"MeshPool {POOL}'s ledger to release the second replica's memory",
        lambda: claiming(mesh, one_claim),
        timeout=60,
    )
    released_at = time.time()
    by_node = claimed_by_node(released)
    assert all(by_node.get(node, 0) == 0 for node in second_nodes), by_node
    log(
        f"second replica gone and its memory released "
        f"({two_claims} -> {released.memory_claimed_mib} MiB), "
        f"{released_at - idle_since:.1f} s after the last answer"
    )
    # The first replica served throughout: the same host pod.
    still = host_pods(mesh, NAMESPACE, MODEL, 0)
    assert [h["metadata"]["uid"] for h in still] == [first_host["metadata"]["uid"]]

    # The model still answers, from the replica left.
    after = chat(mesh, LAST_CLIENT)
    assert after["status"] == 200 and after["content"], after
    log(f"answered after scaling down in {after['seconds']:.1f} s: {after['content']!r}")

    figures = {
        "load_to_scaled_up_seconds": round(scaled_up_at - load_started, 1),
        "load_to_second_replica_ready_seconds": round(second_ready_at - load_started, 1),
        "load_to_second_replica_answering_seconds": round(second_answered_at - load_started, 1),
        "one_request_left_to_scaled_down_seconds": round(scaled_down_at - one_left, 1),
        "idle_to_scaled_down_seconds": round(scaled_down_at - idle_since, 1),
        "idle_to_memory_released_seconds": round(released_at - idle_since, 1),
        "scale_down_after": SCALE_DOWN_AFTER,
        "load_threads": LOAD_THREADS,
        "requests": len(load.answers),
        "failed_requests": len(failed),
        "slowest_request_seconds": round(slowest, 1),
        "test_seconds": round(time.monotonic() - started, 1),
    }
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures))
