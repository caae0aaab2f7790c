"""Scale to zero on real nodes: a MeshModel with `scaleToZeroAfter` serves, answers
one chat completion through the gateway, then after that long without a request
gives up its workers, host and memory (Ready=False ScaledToZero) while the
gateway keeps listing it; the next chat completion, from a client pod in a
namespace of nobody's, is held by the gateway until the operator has planned the
model again (ScaleFromZero) and it serves: answered, no client error. The time
from sending that request to its answer is the cold start, logged and written to
`.mesh/e2e-scale-to-zero.json` (`MESH_E2E_ZERO_REPORT`).

Uses the session's installation (`e2e.realcluster`) with a pool of its own over
the session's pool nodes, so that the pool's ledger holds this model's memory
alone: it is empty at zero. The session's models are not touched.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Iterator
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
from e2e.served import CLIENT_TIMEOUT, delete_model, gateway_base, model_report
from e2e.waiting import wait_for
from mesh_operator.api.contract import SCALED_TO_ZERO
from mesh_operator.api.meshpool import MeshPoolStatus

pytestmark = pytest.mark.e2e

Obj = dict[str, Any]

POOL = "zero"
NAMESPACE = "zero"
MODEL = "gemma-zero"
IDLE = "20s"
SCALE_FROM_ZERO = "ScaleFromZero"
# One-shot pods of the test, in OUTSIDE (the gateway admits every namespace).
WARM_CLIENT = "zero-warm"
COLD_CLIENT = "zero-cold"
LISTING = "zero-models"
REPORT = Path(
    os.environ.get("MESH_E2E_ZERO_REPORT", str(parts.mesh_dir() / "e2e-scale-to-zero.json"))
)

# The gateway's /v1/models, as a client sees it.
LIST_SCRIPT = """
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1] + '/v1/models', timeout=30) as answer:
    print(answer.read().decode(), flush=True)
"""


def chat(mesh: RealCluster, name: str) -> Obj:
    """One chat completion from a pod in OUTSIDE: what its client saw."""
    return served.chat(mesh, name, MODEL, CLIENT_TIMEOUT)


def pool_status(mesh: RealCluster) -> MeshPoolStatus:
    return served.pool_status(mesh, POOL)


def model_obj(mesh: RealCluster) -> Obj:
    obj: Obj = mesh.get("meshmodel", MODEL, "-n", NAMESPACE) or {}
    return obj


def condition(obj: Obj, type_: str) -> Obj | None:
    return next(
        (c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == type_), None
    )


def ready(mesh: RealCluster) -> Obj | None:
    obj = model_obj(mesh)
    cond = condition(obj, "Ready")
    return obj if cond is not None and cond["status"] == "True" else None


def scaled_to_zero(mesh: RealCluster) -> Obj | None:
    obj = model_obj(mesh)
    cond = condition(obj, "Ready")
    if cond is None or (cond["status"], cond.get("reason")) != ("False", SCALED_TO_ZERO):
        return None
    return obj


def owned(mesh: RealCluster, kinds: str) -> list[str]:
    """`kind/name` of the model's objects of `kinds` (comma separated)."""
    items = (mesh.get(kinds, "-n", NAMESPACE, "-l", f"mesh.dev/model={MODEL}") or {}).get(
        "items", []
    )
    return sorted(f"{o['kind']}/{o['metadata']['name']}" for o in items)


def released(mesh: RealCluster) -> MeshPoolStatus | None:
    """The pool's status once its ledger holds no memory (it has nodes)."""
    status = pool_status(mesh)
    return status if status.nodes and status.memory_claimed_mib == 0 else None


def listed_models(mesh: RealCluster) -> list[str]:
    """The ids the gateway's /v1/models lists, fetched from a pod in OUTSIDE."""
    mesh.start_pod(
        LISTING, OUTSIDE, {"app": "probe"}, ["python3", "-c", LIST_SCRIPT, gateway_base(mesh)]
    )
    body = json.loads(mesh.pod_output(LISTING, OUTSIDE))
    return [m["id"] for m in body["data"]]


@pytest.fixture
def zero_model(shared_real_cluster: SharedRealCluster) -> Iterator[RealCluster]:
    """The pool and the model scaled to zero after IDLE; all deleted afterwards."""
    mesh = shared_real_cluster.mesh
    mesh.namespace(NAMESPACE, MODEL_POD_SECURITY)
    mesh.namespace(OUTSIDE, None)
    mesh.apply(example_pool(POOL, **ONE_NODE_PER_MODEL))
    mesh.apply(example_model(shared_real_cluster, MODEL, NAMESPACE, POOL, scaleToZeroAfter=IDLE))
    try:
        yield mesh
    finally:
        mesh.delete_started_pods()
        delete_model(mesh, NAMESPACE, MODEL, POOL)


def test_an_idle_model_scales_to_zero_and_the_next_request_starts_it(
    zero_model: RealCluster,
) -> None:
    mesh = zero_model
    started = time.monotonic()
    report = functools.partial(model_report, mesh, NAMESPACE, MODEL)
    obj = wait_for(f"{NAMESPACE}/{MODEL} Ready", lambda: ready(mesh), timeout=600, explain=report)
    plan = obj["status"]["plan"]
    log(f"{MODEL} Ready on {obj['status'].get('nodes')}")
    assert {d["node"] for d in plan["devices"]} | {plan["hostNode"]} <= set(POOL_NODES), plan
    serving_objects = owned(mesh, "deployments,daemonsets")
    kept_objects = owned(mesh, "services,networkpolicies")
    assert any(o.startswith("Deployment/") for o in serving_objects), serving_objects
    assert any(o.startswith("DaemonSet/") for o in serving_objects), serving_objects
    assert any(o.startswith("Service/") for o in kept_objects), kept_objects
    assert any(o.startswith("NetworkPolicy/") for o in kept_objects), kept_objects
    claimed = wait_for(
        f"MeshPool {POOL}'s ledger to hold the model's memory",
        lambda: pool_status(mesh).memory_claimed_mib or None,
        timeout=60,
    )
    log(f"serving: {serving_objects}; pool {POOL} claims {claimed} MiB")

    # Served through the gateway, warm.
    warm = chat(mesh, WARM_CLIENT)
    assert warm["status"] == 200 and warm["content"], warm
    log(f"warm answer in {warm['seconds']:.1f} s: {warm['content']!r}")

    # Idle: the model goes to zero and holds nothing but its Service and policy.
    obj = wait_for(
        f"{MODEL} scaled to zero after {IDLE} without a request",
        lambda: scaled_to_zero(mesh),
        timeout=240,
        explain=report,
    )
    status = obj["status"]
    log(f"{MODEL} scaled to zero at {status.get('scaledToZeroTime')}")
    assert status.get("scaledToZeroTime"), status
    assert not status.get("plan"), status
    wait_for(
        "the model's pods gone",
        lambda: not mesh.pods(NAMESPACE, f"mesh.dev/model={MODEL}"),
        timeout=180,
    )
    assert owned(mesh, "deployments,daemonsets") == []
    assert owned(mesh, "services,networkpolicies") == kept_objects
    ledger = wait_for(
        f"MeshPool {POOL}'s ledger to release the model's memory",
        lambda: released(mesh),
        timeout=60,
    )
    assert all(row.memory_claimed_mib == 0 for row in ledger.ledger), ledger.ledger
    listed = listed_models(mesh)
    assert MODEL in listed, listed
    # Still at zero: listing the models is no request for one.
    still = scaled_to_zero(mesh)
    assert still is not None and not still["status"].get("plan"), model_obj(mesh)["status"]

    # The next request is held until the model serves again, then answered.
    log(f"sending a request to {MODEL} at zero")
    cold = chat(mesh, COLD_CLIENT)
    assert cold["status"] == 200 and cold["content"], cold
    assert cold["error"] is None, cold
    seconds = float(cold["seconds"])
    log(f"cold start {seconds:.1f} s: {cold['content']!r}")

    obj = wait_for(f"{MODEL} Ready again", lambda: ready(mesh), timeout=60)
    status = obj["status"]
    assert not status.get("scaledToZeroTime"), status
    assert status.get("plan"), status
    planned = condition(obj, "Planned")
    assert planned is not None and planned["status"] == "True", planned
    assert planned.get("reason") == SCALE_FROM_ZERO, planned
    events = mesh.get(
        "events",
        "-n",
        NAMESPACE,
        "--field-selector",
        f"involvedObject.name={MODEL},reason=Planned",
    )
    messages = [e.get("message", "") for e in (events or {}).get("items", [])]
    assert any(m.startswith(f"{SCALE_FROM_ZERO}:") for m in messages), messages
    wait_for(
        f"MeshPool {POOL}'s ledger to hold the model's memory again",
        lambda: pool_status(mesh).memory_claimed_mib or None,
        timeout=60,
    )

    figures = {
        "cold_start_seconds": round(seconds, 1),
        "warm_request_seconds": round(float(warm["seconds"]), 1),
        "scale_to_zero_after": IDLE,
        "test_seconds": round(time.monotonic() - started, 1),
    }
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures))
