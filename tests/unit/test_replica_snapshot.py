"""What the operator reads of replicas from the objects its watches bring: the
replica of a pod, a child made before replicas, every replica's claim in the
ledger."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from kopf._cogs.structs.bodies import Body
from kopf._cogs.structs.ids import HandlerId
from kopf._core.actions.execution import Outcome
from kopf._core.engines.indexing import OperatorIndexer, OperatorIndexers

from mesh_operator.api.contract import REPLICA_LABEL
from mesh_operator.handlers.registration import daemonset_index, deployment_index, plan_index
from mesh_operator.handlers.snapshot import STALE_SELECTOR, model_plan, pod_info, rolled_out
from mesh_operator.ledger import claims_by_device, claims_by_host
from mesh_operator.manifests.workloads import build_host_deployment, build_rpc_daemonsets
from tests.unit.test_manifests import workload

pytestmark = pytest.mark.unit


def plan(node: str, mib: int, replica: int = 0) -> dict[str, Any]:
    device = {"node": node, "device": "CUDA0", "layers": [0, 10], "weightsMiB": mib,
              "kvMiB": 0, "computeMiB": 0, "totalMiB": mib}  # fmt: skip
    return {"devices": [device], "rpc": [node], "hostNode": node, "replica": replica}


def test_a_pod_serves_the_replica_its_label_names_and_an_unlabelled_one_replica_zero() -> None:
    body: dict[str, Any] = {"metadata": {"name": "p", "labels": {REPLICA_LABEL: "3"}}}
    assert pod_info(body).replica == 3
    assert pod_info({"metadata": {"name": "p", "labels": {}}}).replica == 0
    assert pod_info({"metadata": {"name": "p", "labels": {REPLICA_LABEL: "x"}}}).replica == 0


def digest(index: Callable[..., Any], body: dict[str, Any]) -> str:
    """The digest a child's index records for it (kopf's decorator hides the types)."""
    return str(index(body=body)["ai/gemma"][2])


def test_a_child_selecting_without_the_replica_is_recorded_as_stale() -> None:
    w = workload()
    (ds,) = build_rpc_daemonsets(w)
    host = build_host_deployment(w)
    for obj in (ds, host):
        obj["metadata"]["annotations"] = {"mesh.dev/spec-hash": "abc"}
    assert digest(daemonset_index, ds) == digest(deployment_index, host) == "abc"
    for obj in (ds, host):
        del obj["spec"]["selector"]["matchLabels"][REPLICA_LABEL]
    assert digest(daemonset_index, ds) == digest(deployment_index, host) == STALE_SELECTOR


def test_a_models_claim_holds_every_replicas_devices() -> None:
    body = {
        "spec": {"poolRef": "gpus"},
        "status": {"plan": plan("a", 100), "replicaPlans": [plan("b", 200, 1)]},
    }
    found = model_plan(body)
    assert found is not None
    pool, claim = found
    assert pool == "gpus"
    assert [(d.node, d.total_mib) for d in claim.devices] == [("a", 100), ("b", 200)]
    one = model_plan({"spec": {"poolRef": "gpus"}, "status": {"plan": plan("a", 100)}})
    assert one is not None and [d.node for d in one[1].devices] == ["a"]


def test_every_replicas_ram_tier_and_draft_are_claimed() -> None:
    first = plan("a", 100)
    first["hostTier"] = {"node": "a", "moeLayers": 0, "cpuLayers": 2, "memoryMiB": 300}
    second = plan("b", 200, 1)
    second["hostTier"] = {"node": "b", "moeLayers": 0, "cpuLayers": 2, "memoryMiB": 400}
    second["draft"] = {
        "node": "b", "weightsMiB": 40, "kvMiB": 5, "computeMiB": 5, "memoryMiB": 50
    }  # fmt: skip
    body = {"spec": {"poolRef": "gpus"}, "status": {"plan": first, "replicaPlans": [second]}}
    found = model_plan(body)
    assert found is not None
    claims = {"ai/gemma": found[1]}
    assert claims_by_host(claims) == {"a": 300, "b": 400 + 50}
    assert claims_by_device(claims) == {("a", "CUDA0"): 100, ("b", "CUDA0"): 200, ("b", "CPU"): 50}


def test_a_model_that_gives_up_its_plan_leaves_the_pools_ledger() -> None:
    """Through kopf's own indexer: a None from an index function keeps the object's
    previous entry, so a model released or scaled to zero must say "nothing"."""
    handler = HandlerId("plan_index")
    indexers = OperatorIndexers()
    indexers[handler] = OperatorIndexer()
    # kopf's decorator and Body hide the types.
    index_fn: Callable[..., Any] = plan_index
    meta = {"name": "gemma", "namespace": "ai", "uid": "u1"}
    spec = {"poolRef": "gpus"}
    serving: Any = {"metadata": meta, "spec": spec, "status": {"plan": plan("a", 100)}}
    at_zero: Any = {"metadata": meta, "spec": spec, "status": {}}

    def index(raw: Any) -> list[str]:
        body = Body(raw)
        result = index_fn(body=body, namespace="ai", name="gemma")
        indexers.replace(body, {handler: Outcome(final=True, result=result)})
        return list(indexers[handler].index)

    assert index(serving) == ["ai/gemma"]
    assert index(at_zero) == []
    assert index(serving) == ["ai/gemma"]


@pytest.mark.parametrize(
    ("kind", "spec", "status", "done"),
    [
        ("Deployment", {"replicas": 1},
         {"observedGeneration": 2, "replicas": 1, "updatedReplicas": 1, "availableReplicas": 1},
         True),
        # The controller has not seen the new template yet.
        ("Deployment", {"replicas": 1},
         {"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1, "availableReplicas": 1},
         False),
        # The new pod is not available yet (or the old one is still there).
        ("Deployment", {"replicas": 1},
         {"observedGeneration": 2, "replicas": 1, "updatedReplicas": 1, "availableReplicas": 0},
         False),
        ("Deployment", {"replicas": 1},
         {"observedGeneration": 2, "replicas": 2, "updatedReplicas": 1, "availableReplicas": 1},
         False),
        # A stopped host has rolled out.
        ("Deployment", {"replicas": 0}, {"observedGeneration": 2}, True),
        ("DaemonSet", {},
         {"observedGeneration": 2, "desiredNumberScheduled": 2, "updatedNumberScheduled": 2,
          "numberAvailable": 2}, True),
        ("DaemonSet", {},
         {"observedGeneration": 2, "desiredNumberScheduled": 2, "updatedNumberScheduled": 1,
          "numberAvailable": 2}, False),
    ],
)  # fmt: skip
def test_rolled_out_is_what_kubectl_rollout_status_waits_for(
    kind: str, spec: dict[str, Any], status: dict[str, Any], done: bool
) -> None:
    body = {"metadata": {"generation": 2}, "spec": spec, "status": status}
    assert rolled_out(body, kind) is done
