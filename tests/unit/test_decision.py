"""The reconcile decision, outcome by outcome: one snapshot in, the whole decision out.

Each case builds the snapshot a reconcile would see and checks everything the
decision says: its reason, the status and conditions, the children that should
exist and those to apply, what to delete, create or release, the Events, the plan
claimed in the pool's ledger and when to look again.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from mesh_operator.api.contract import (
    GROUP_RESTART_ANNOTATION,
    HEADER_COMPONENT,
    HOST_COMPONENT,
    IMAGES_ANNOTATION,
    REPLICA_LABEL,
    RPC_COMPONENT,
)
from mesh_operator.api.meshmodel import MeshModelSpec, MeshModelStatus, Plan
from mesh_operator.api.meshnode import MeshNodeStatus
from mesh_operator.api.meshpool import MeshPoolSpec
from mesh_operator.demand import Demand
from mesh_operator.handlers.decision import (
    ChildRef,
    Decision,
    LookAgain,
    ModelRef,
    ModelSnapshot,
    child_digest,
    decide,
    workers_ready_message,
)
from mesh_operator.handlers.snapshot import STALE_SELECTOR, PodInfo, PoolInfo
from mesh_operator.ledger import NodeInfo, build_pool_view, capacity_steps
from mesh_operator.planner.profile_codec import encode_profile
from mesh_operator.planning import layout_of
from mesh_operator.source import SourceError, cache_key
from tests.unit.meshnodes import one_gpu_status
from tests.unit.planner.builders import synthetic_profile

pytestmark = pytest.mark.unit

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
MODEL = ModelRef(name="big", namespace="team", uid="uid-1", generation=1)
POOL = PoolInfo(spec=MeshPoolSpec.model_validate({"nodeSelector": {"pool": "p"}}), generation=1)
NODES = [NodeInfo(n, {"pool": "p"}) for n in ("a", "b", "c")]
SPEC = {"source": {"url": "http://files/big.gguf"}, "poolRef": "p"}
# 32 layers of 400 MiB: about 13 GiB, more than one 8 GiB device holds.
PROFILE = synthetic_profile(layer_mib=400.0)
SMALL = synthetic_profile(layer_mib=50.0)


def meshnode(free: int = 8000, *, total: int = 8192, age: int = 5) -> MeshNodeStatus:
    return one_gpu_status(NOW, free, total=total, age=age, bandwidth=448.0)


MESHNODES = {n.name: meshnode() for n in NODES}


def snapshot(**changes: Any) -> ModelSnapshot:
    base = ModelSnapshot(
        model=MODEL,
        spec=SPEC,
        status=MeshModelStatus(),
        now=NOW,
        pool=POOL,
        nodes=NODES,
        meshnodes=MESHNODES,
        profile=PROFILE,
    )
    return dataclasses.replace(base, **changes)


def pod(
    name: str,
    component: str,
    node: str,
    *,
    generation: int = 1,
    ready: bool = True,
    restarts: int = 0,
    phase: str = "Running",
    waiting: str | None = None,
    ip: str | None = None,
    message: str | None = None,
    source_key: str | None = None,
) -> PodInfo:
    return PodInfo(
        name=name,
        component=component,
        node=node,
        ip=ip or f"10.0.0.{ord(node[0]) - 96}",
        phase=phase,
        ready=ready,
        plan_generation=str(generation),
        waiting_reason=waiting,
        restarts=restarts,
        deleting=False,
        message=message,
        source_key=source_key,
    )


def group(
    plan: Plan, generation: int = 1, *, host_ready: bool = True, **worker: Any
) -> list[PodInfo]:
    """The pods of a serving plan: a worker per planned node and its host."""
    pods = [pod(f"w-{n}", RPC_COMPONENT, n, generation=generation, **worker) for n in plan.rpc]
    host = plan.host_node or plan.rpc[-1]
    pods.append(pod("host-0", HOST_COMPONENT, host, generation=generation, ready=host_ready))
    return pods


def existing(decision: Decision) -> dict[tuple[str, str], str]:
    """The children a decision asked for, as the next snapshot sees them."""
    return {(c["kind"], c["metadata"]["name"]): child_digest(c) for c in decision.children}


def conditions(decision: Decision) -> dict[str, tuple[str, str]]:
    return {c.type: (c.status, c.reason) for c in decision.status.conditions}


def kinds(objs: Iterable[Mapping[str, Any]]) -> list[str]:
    return sorted(o["kind"] for o in objs)


def event_reasons(decision: Decision) -> list[str]:
    return [e.reason for e in decision.events]


def host_deployment(decision: Decision) -> Mapping[str, Any]:
    return next(c for c in decision.children if c["kind"] == "Deployment")


def serving() -> tuple[ModelSnapshot, Decision]:
    """A model planned, its group up and serving, as the next snapshot sees it."""
    first = decide(snapshot())
    plan = first.status.plan
    assert plan is not None
    pods = group(plan)
    up = decide(snapshot(status=first.status, pods=pods, children=existing(first)))
    steady = snapshot(status=up.status, pods=pods, children=existing(up), others={})
    view = build_pool_view(POOL.spec, NODES, MESHNODES, {}, NOW)
    steps = capacity_steps(view)
    return dataclasses.replace(steady, capacity=steps, capacity_seen=steps), up


def nodes_of(plan: Plan | None) -> set[str]:
    assert plan is not None
    return {d.node for d in plan.devices}


# -- the table --------------------------------------------------------------------


def test_first_plan() -> None:
    d = decide(snapshot())
    assert d.reason == "Initial" and d.outcome == "ok"
    plan = d.status.plan
    assert plan is not None and len(nodes_of(plan)) == 2, "13 GiB needs two 8 GiB devices"
    assert d.status.plan_generation == 1 and d.status.planned_for_generation == 1
    assert d.status.nodes == ",".join(dict.fromkeys(x.node for x in plan.devices))
    assert d.status.model_size_bytes == PROFILE.file_bytes
    assert conditions(d) == {
        "Planned": ("True", "Initial"),
        "WorkersReady": ("False", "WorkersStarting"),
        "Ready": ("False", "WaitingForWorkers"),
        "Degraded": ("False", "AsPlanned"),
    }
    assert kinds(d.children) == ["DaemonSet", "Deployment", "NetworkPolicy", "Service"]
    assert d.apply == d.children, "nothing exists yet"
    assert host_deployment(d)["spec"]["replicas"] == 0, "the host waits for its workers"
    assert (d.delete, d.create, d.release) == ([], [], [])
    assert event_reasons(d) == ["Planned"]
    assert d.claim == plan and d.claim_changed
    assert d.look_again == LookAgain() and d.plan_outcome == "planned"


def test_the_operators_hub_mirror_is_the_fetchers() -> None:
    d = decide(snapshot(hf_endpoint="http://hub.mirror:8080"))
    init = host_deployment(d)["spec"]["template"]["spec"]["initContainers"]
    fetch = next(c for c in init if c["name"] == "fetch")
    assert {"name": "HF_ENDPOINT", "value": "http://hub.mirror:8080"} in fetch["env"]


def test_plan_kept_and_serving() -> None:
    steady, up = serving()
    assert up.reason == "PlanKept"
    assert conditions(up)["Ready"] == ("True", "Serving")
    assert host_deployment(up)["spec"]["replicas"] == 1
    assert kinds(up.apply) == ["Deployment"], "only the host changed: it may start now"
    assert event_reasons(up) == ["Ready"]
    d = decide(steady)
    assert d.reason == "PlanKept" and d.outcome == "ok"
    assert d.status == steady.status, "nothing to change"
    assert d.apply == [] and d.delete == [] and d.events == []
    assert not d.claim_changed and d.claim == steady.status.plan
    assert d.plan_seconds is None, "a kept plan is not planned again"
    assert d.look_again == LookAgain()


def test_node_lost() -> None:
    steady, _ = serving()
    before = steady.status.plan
    lost = sorted(nodes_of(before))[0]
    meshnodes = {**MESHNODES, lost: meshnode(age=600)}
    d = decide(dataclasses.replace(steady, meshnodes=meshnodes))
    assert d.reason == "NodeLost"
    assert lost not in nodes_of(d.status.plan)
    assert d.status.plan_generation == 2 and d.status.worker_restarts == {}
    assert conditions(d)["Degraded"] == ("True", "NodeLost")
    assert conditions(d)["Planned"] == ("True", "NodeLost")
    assert conditions(d)["WorkersReady"][1] == "WorkersStarting", "the new group's pods"
    assert event_reasons(d) == ["Replanned"]
    assert {p.name for p in d.release} == {p.name for p in steady.pods if p.node == lost}
    assert "Deployment" in kinds(d.apply), "the host follows the new plan"
    assert d.claim == d.status.plan and d.claim_changed and d.plan_outcome == "replanned"


def test_worker_failed_crash_looping_is_planned_around() -> None:
    steady, _ = serving()
    plan = steady.status.plan
    assert plan is not None
    bad = plan.rpc[0]

    def crashing(restarts: int) -> list[PodInfo]:
        return [
            dataclasses.replace(
                p, waiting_reason="CrashLoopBackOff", ready=False, restarts=restarts
            )
            if p.node == bad and p.component == RPC_COMPONENT
            else p
            for p in steady.pods
        ]

    # One crash is the kubelet's to restart: the host waits for the worker.
    once = decide(dataclasses.replace(steady, pods=crashing(1)))
    assert once.reason == "WorkerRestarted" and kept(once.status.plan, plan)
    assert host_deployment(once)["spec"]["replicas"] == 0
    assert conditions(once)["WorkersReady"] == ("False", "WorkersStarting")
    # Crashing again and again, it is lost: the model is planned around it.
    d = decide(dataclasses.replace(steady, pods=crashing(3)))
    assert d.reason == "WorkerFailed"
    assert bad not in nodes_of(d.status.plan)
    assert conditions(d)["Degraded"] == ("True", "WorkerFailed")
    assert d.status.plan_generation == 2
    assert event_reasons(d) == ["Replanned"]
    assert f"worker w-{bad} CrashLoopBackOff" in d.events[0].message
    assert d.claim_changed and d.release == []


def test_worker_restarted_restarts_the_host_with_its_group() -> None:
    steady, _ = serving()
    plan = steady.status.plan
    assert plan is not None
    assert steady.status.worker_restarts == {f"w-{n}": 0 for n in plan.rpc}
    assert host_deployment_annotation(steady) == "0"
    worker = f"w-{plan.rpc[0]}"
    pods = [dataclasses.replace(p, restarts=1) if p.name == worker else p for p in steady.pods]
    d = decide(dataclasses.replace(steady, pods=pods))
    assert d.reason == "WorkerRestarted" and d.outcome == "ok"
    assert kept(d.status.plan, plan) and d.status.plan_generation == 1, "the plan is kept"
    assert d.status.plan is not None and d.status.plan.group_restarts == 1
    assert d.status.group_restarts == 1
    assert d.status.worker_restarts[worker] == 1, "the restart acted on is remembered"
    assert kinds(d.apply) == ["Deployment"]
    host = host_deployment(d)
    assert host["spec"]["template"]["metadata"]["annotations"][GROUP_RESTART_ANNOTATION] == "1"
    assert conditions(d)["Degraded"] == ("True", "WorkerRestarted")
    assert event_reasons(d) == ["WorkerRestarted"] and d.events[0].type == "Warning"
    assert not d.claim_changed
    # The next decision sees the count acted on: nothing more to do.
    again = decide(dataclasses.replace(steady, status=d.status, pods=pods, children=existing(d)))
    assert again.reason == "PlanKept" and again.apply == [] and again.events == []
    assert again.status.group_restarts == 1
    assert conditions(again)["Degraded"] == ("False", "AsPlanned")


def kept(new: Plan | None, old: Plan) -> bool:
    """`new` is `old` but for the restarts its group has been through."""
    return new is not None and new.model_copy(update={"group_restarts": None}) == (
        old.model_copy(update={"group_restarts": None})
    )


def host_deployment_annotation(s: ModelSnapshot) -> str:
    d = decide(s)
    return str(
        host_deployment(d)["spec"]["template"]["metadata"]["annotations"][GROUP_RESTART_ANNOTATION]
    )


def test_a_replaced_worker_pod_also_restarts_the_group() -> None:
    steady, _ = serving()
    plan = steady.status.plan
    assert plan is not None
    old = f"w-{plan.rpc[0]}"
    pods = [dataclasses.replace(p, name="w-new") if p.name == old else p for p in steady.pods]
    d = decide(dataclasses.replace(steady, pods=pods))
    assert d.reason == "WorkerRestarted" and d.status.group_restarts == 1
    assert "w-new" in d.status.worker_restarts and old not in d.status.worker_restarts


def test_spec_changed() -> None:
    steady, _ = serving()
    spec = {**SPEC, "contextSize": 8192}
    changed = dataclasses.replace(steady, spec=spec, model=dataclasses.replace(MODEL, generation=2))
    d = decide(changed)
    assert d.reason == "SpecChanged"
    assert d.status.planned_for_generation == 2 and d.status.observed_generation == 2
    assert conditions(d)["Planned"][1] in {"SpecChanged", "PlanKept"}
    assert "Deployment" in kinds(d.apply), "the host's arguments follow the spec"
    args = host_deployment(d)["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("-c") + 1] == "8192"
    assert d.claim_changed and d.outcome == "ok"


def test_pool_changed() -> None:
    steady, _ = serving()
    pool = PoolInfo(spec=POOL.spec.model_copy(update={"reserve_percent": 20}), generation=2)
    d = decide(dataclasses.replace(steady, pool=pool))
    assert d.reason == "PoolChanged"
    assert d.status.pool_generation == 2
    assert d.claim_changed and d.outcome == "ok"


def test_consolidation_when_the_pool_has_more_room() -> None:
    # Another model holds most of node a: the first plan spreads over b and c...
    other = decide(snapshot(profile=SMALL)).status.plan
    assert other is not None
    crowded = decide(snapshot(others={"team/other": other}))
    assert crowded.status.plan is not None
    # ...then more memory appears (bigger devices report in): one node holds it all.
    roomy = {n.name: meshnode(free=23000, total=24576) for n in NODES}
    before = capacity_steps(build_pool_view(POOL.spec, NODES, MESHNODES, {}, NOW))
    after = capacity_steps(build_pool_view(POOL.spec, NODES, roomy, {}, NOW))
    s = snapshot(
        status=crowded.status,
        meshnodes=roomy,
        children=existing(crowded),
        capacity=after,
        capacity_seen=before,
    )
    d = decide(s)
    assert d.reason == "Consolidate"
    assert len(nodes_of(d.status.plan)) == 1
    assert d.status.plan_generation == 2
    assert event_reasons(d) == ["Replanned"]
    assert d.events[0].message.startswith("Consolidate: the pool has more room")
    assert d.capacity_seen == after, "the next decision compares with this"
    assert conditions(d)["Degraded"] == ("False", "AsPlanned")
    # Looked at again with the same capacity: nothing grew, nothing moves.
    again = decide(dataclasses.replace(s, status=d.status, capacity_seen=after))
    assert again.reason == "PlanKept" and again.status.plan == d.status.plan


def test_no_capacity_names_the_numbers_and_releases_the_workloads() -> None:
    steady, _ = serving()
    huge = synthetic_profile(layer_mib=2000.0)
    d = decide(dataclasses.replace(steady, profile=huge, capacity=None))
    # A new profile alone does not re-plan a serving model; a lost node does.
    assert d.reason == "PlanKept"
    lost = {**MESHNODES, "c": meshnode(age=600)}
    first = decide(snapshot(profile=huge))
    assert first.reason == "NoCapacity" and first.outcome == "blocked"
    assert first.status.plan is None and first.children == []
    assert conditions(first)["Planned"] == ("False", "NoCapacity")
    assert conditions_message(first, "Planned").startswith("VRAM: needs 63.5 GiB")
    assert "pool has 21.6 GiB free" in conditions_message(first, "Planned")
    assert "; RAM: no node offers RAM" in conditions_message(first, "Planned")
    assert event_reasons(first) == ["NoCapacity"]
    assert first.look_again == LookAgain(backoff=True)
    assert first.claim is None and first.claim_changed
    # Retried with the same answer: no second Event; with another, one.
    again = decide(snapshot(profile=huge, status=first.status))
    assert again.reason == "NoCapacity" and again.events == []
    other = decide(snapshot(profile=huge, status=first.status, meshnodes=lost))
    assert conditions_message(other, "Planned") != conditions_message(first, "Planned")
    assert event_reasons(other) == ["NoCapacity"]
    # A serving model that loses its room gives its workloads back.
    bigger = dataclasses.replace(
        steady, meshnodes={n: meshnode(age=600) for n in ("a", "b")} | {"c": meshnode()}
    )
    lost_plan = decide(bigger)
    assert lost_plan.reason == "NoCapacity"
    assert {c.kind for c in lost_plan.delete} == {"DaemonSet", "Deployment"}
    assert event_reasons(lost_plan) == ["PlanLost", "NoCapacity"]
    assert lost_plan.status.plan is None and lost_plan.status.endpoint is None
    assert conditions(lost_plan)["Degraded"] == ("True", "NodeLost")
    assert lost_plan.claim is None and lost_plan.claim_changed


def conditions_message(decision: Decision, type_: str) -> str:
    return next(c.message for c in decision.status.conditions if c.type == type_)


def test_source_unreadable() -> None:
    error = SourceError("SourceUnreadable", "GET http://files/big.gguf: 404 Not Found")
    d = decide(snapshot(profile=error))
    assert d.reason == "SourceUnreadable" and d.outcome == "blocked"
    assert conditions(d) == {
        "Planned": ("False", "SourceUnreadable"),
        "Ready": ("False", "SourceUnreadable"),
    }
    assert conditions_message(d, "Ready") == "GET http://files/big.gguf: 404 Not Found"
    assert d.children == [] and d.apply == [] and d.delete == [] and d.events == []
    assert d.look_again == LookAgain(backoff=True)
    assert not d.claim_changed


PVC_SPEC = {"source": {"pvc": {"claimName": "models", "path": "big.gguf"}}, "poolRef": "p"}


def test_reading_header_creates_the_reader_pod_and_polls() -> None:
    d = decide(snapshot(spec=PVC_SPEC, profile=None))
    assert d.reason == "ReadingHeader" and d.outcome == "blocked"
    assert [p["metadata"]["name"] for p in d.create] == ["big-header"]
    assert conditions(d)["Planned"] == ("False", "ReadingHeader")
    assert d.look_again == LookAgain(seconds=2.0)
    assert d.children == [] and d.events == []


def test_header_read_by_its_pod_is_planned_and_learned() -> None:
    source = cache_key(MeshModelSpec.model_validate(PVC_SPEC).source)
    reader = pod(
        "big-header",
        HEADER_COMPONENT,
        "a",
        phase="Succeeded",
        message=encode_profile(SMALL),
        source_key=source,
    )
    d = decide(snapshot(spec=PVC_SPEC, profile=None, pods=[reader]))
    assert d.reason == "Initial" and d.learned_profile == SMALL
    assert d.create == [] and d.status.plan is not None
    failed = dataclasses.replace(reader, phase="Failed", message="open big.gguf: no such file")
    f = decide(snapshot(spec=PVC_SPEC, profile=None, pods=[failed]))
    assert f.reason == "SourceUnreadable"
    assert f.delete == [ChildRef("v1", "Pod", "big-header")], "a new pod reads again"
    assert "no such file" in conditions_message(f, "Ready")
    assert f.look_again == LookAgain(backoff=True)
    moved = dataclasses.replace(reader, source_key="elsewhere")
    m = decide(snapshot(spec=PVC_SPEC, profile=None, pods=[moved]))
    assert m.reason == "ReadingHeader" and m.delete == [ChildRef("v1", "Pod", "big-header")]
    assert m.create == [], "the new reader comes once the old one is gone"


def test_deletion_drops_the_claim() -> None:
    steady, _ = serving()
    d = decide(dataclasses.replace(steady, deleted=True))
    assert d.reason == "Deleted" and d.outcome == "ok"
    assert d.claim is None and d.claim_changed
    assert d.children == [] and d.apply == [] and d.delete == [] and d.events == []
    assert d.capacity_seen is None


@pytest.mark.parametrize(
    ("changes", "reason", "backoff"),
    [
        ({"spec": {**SPEC, "contextSize": 1}}, "InvalidSpec", False),
        ({"pool": None}, "PoolNotFound", True),
        (
            {"spec": {**SPEC, "apiKeySecretRef": {"name": "keys", "key": "k"}}},
            "SecretNotFound",
            True,
        ),
    ],
)
def test_blocked_before_planning(changes: dict[str, Any], reason: str, backoff: bool) -> None:
    d = decide(snapshot(**changes))
    assert d.reason == reason and d.outcome == "blocked"
    assert conditions(d)["Planned"] == ("False", reason)
    assert conditions(d)["Ready"] == ("False", reason)
    assert d.children == [] and d.events == [] and not d.claim_changed
    assert d.look_again == LookAgain(backoff=backoff)


def test_rpc_version_mismatch_keeps_the_host_stopped() -> None:
    steady, up = serving()
    annotations = host_deployment(up)["spec"]["template"]["metadata"]["annotations"]
    worker_image = next(
        c["spec"]["template"]["spec"]["containers"][0]["image"]
        for c in up.children
        if c["kind"] == "DaemonSet"
    )
    workers = {p.node: p for p in steady.pods if p.component == RPC_COMPONENT}
    refused = next(iter(workers.values()))
    # The host's real log of a refused handshake, naming this group's worker.
    refusal = (FIXTURES / "handshake" / "rpc-version-mismatch.log").read_text()
    refusal = refusal.replace("172.20.1.6:50052", f"{refused.ip}:50052")
    host_exit = {"exits": (refusal,), "images_key": annotations[IMAGES_ANNOTATION]}
    pods: Sequence[PodInfo] = [
        dataclasses.replace(p, ready=False, **host_exit)
        if p.component == HOST_COMPONENT
        else dataclasses.replace(p, image=worker_image)
        for p in steady.pods
    ]
    d = decide(dataclasses.replace(steady, pods=pods))
    assert d.reason == "PlanKept" and d.outcome == "blocked"
    assert d.status.version_mismatch is not None
    assert conditions(d)["Ready"] == ("False", "RpcVersionMismatch")
    assert host_deployment(d)["spec"]["replicas"] == 0
    assert event_reasons(d) == ["RpcVersionMismatch"]
    assert d.status.version_mismatch.nodes == [refused.node]
    assert not d.claim_changed


def test_a_draft_model_is_planned_on_the_host_and_claimed() -> None:
    spec = {**SPEC, "draft": {"source": {"url": "http://files/small.gguf"}}}
    roomy = {
        n.name: one_gpu_status(NOW, 8000, total=8192, bandwidth=448.0, hostMemoryFreeMiB=8192)
        for n in NODES
    }
    d = decide(snapshot(spec=spec, draft_profile=SMALL, meshnodes=roomy))
    plan = d.status.plan
    assert plan is not None and plan.draft is not None
    assert plan.draft.node == plan.host_node
    assert plan.draft.memory_mib >= plan.draft.weights_mib + plan.draft.kv_mib > 0
    assert d.claim == plan and d.claim_changed
    server = host_deployment(d)["spec"]["template"]["spec"]["containers"][0]
    assert server["resources"]["requests"]["memory"] == f"{plan.draft.memory_mib}Mi"


def test_an_unreadable_draft_model_blocks_the_plan() -> None:
    spec = {**SPEC, "draft": {"source": {"url": "http://files/small.gguf"}}}
    error = SourceError("SourceNotFound", "GET http://files/small.gguf: 404 Not Found")
    d = decide(snapshot(spec=spec, draft_profile=error))
    assert d.reason == "SourceNotFound" and d.outcome == "blocked"
    assert conditions_message(d, "Ready") == f"draft model: {error}"
    assert d.status.plan is None and not d.claim_changed


def test_a_draft_model_without_room_on_the_host_is_not_planned() -> None:
    spec = {**SPEC, "draft": {"source": {"url": "http://files/small.gguf"}}}
    # The nodes offer no RAM beside their GPUs (hostMemoryFreeMiB 0).
    d = decide(snapshot(spec=spec, draft_profile=SMALL))
    assert d.status.plan is None
    assert d.reason == "NoCapacity" and d.outcome == "blocked"
    assert conditions_message(d, "Planned").startswith("the draft model needs "), d.status


def test_a_draft_model_moves_the_host_to_a_node_of_the_plan_with_room() -> None:
    spec = {**SPEC, "draft": {"source": {"url": "http://files/small.gguf"}}}
    plain = decide(snapshot()).status.plan
    assert plain is not None and plain.host_node is not None
    other = next(n for n in nodes_of(plain) if n != plain.host_node)
    # Only the plan's other node offers RAM for the draft.
    meshnodes = {
        **MESHNODES,
        other: one_gpu_status(NOW, 8000, total=8192, bandwidth=448.0, hostMemoryFreeMiB=4096),
    }
    d = decide(snapshot(spec=spec, draft_profile=SMALL, meshnodes=meshnodes))
    plan = d.status.plan
    assert d.reason == "Initial" and plan is not None, d.status.conditions
    assert plan.host_node == other and plan.draft is not None and plan.draft.node == other
    # The same devices and layers: only the host moved.
    assert [(x.node, x.device, x.layers) for x in plan.devices] == [
        (x.node, x.device, x.layers) for x in plain.devices
    ]
    assert d.claim == plan and d.claim_changed


# -- replicas ---------------------------------------------------------------------

FIVE = [NodeInfo(n, {"pool": "p"}) for n in ("a", "b", "c", "d", "e")]
FIVE_MESHNODES = {n.name: meshnode() for n in FIVE}
TWO = {**SPEC, "replicas": 2}


def replica_snapshot(**changes: Any) -> ModelSnapshot:
    """Five nodes of one 8 GiB GPU: two replicas of the 13 GiB model fit, not three."""
    return snapshot(**{"nodes": FIVE, "meshnodes": FIVE_MESHNODES, "spec": TWO, **changes})


def replica_pods(plans: Sequence[Plan], *, host_ready: bool = True) -> list[PodInfo]:
    """The pods of serving replicas, each labelled with its replica."""
    pods = []
    for plan in plans:
        suffix = "" if plan.replica == 0 else f"-r{plan.replica}"
        generation = plan.generation or 1
        for node in plan.rpc:
            worker = pod(f"big-rpc{suffix}-{node}", RPC_COMPONENT, node, generation=generation)
            pods.append(dataclasses.replace(worker, replica=plan.replica))
        host = pod(
            f"big-host{suffix}-0",
            HOST_COMPONENT,
            plan.host_node or plan.rpc[-1],
            generation=generation,
            ready=host_ready,
        )
        pods.append(dataclasses.replace(host, replica=plan.replica))
    return pods


def all_plans(decision: Decision) -> list[Plan]:
    status = decision.status
    return ([status.plan] if status.plan else []) + list(status.replica_plans)


def named(decision: Decision, kind: str) -> dict[str, Mapping[str, Any]]:
    return {c["metadata"]["name"]: c for c in decision.children if c["kind"] == kind}


def serving_replicas(**changes: Any) -> tuple[ModelSnapshot, Decision]:
    """Two replicas planned, up and serving, as the next snapshot sees them."""
    first = decide(replica_snapshot(**changes))
    pods = replica_pods(all_plans(first))
    up = decide(replica_snapshot(status=first.status, pods=pods, children=existing(first)))
    return replica_snapshot(status=up.status, pods=pods, children=existing(up), **changes), up


def test_two_replicas_are_planned_on_disjoint_nodes_with_their_own_children() -> None:
    d = decide(replica_snapshot())
    assert d.reason == "Initial" and d.outcome == "ok"
    plans = all_plans(d)
    assert [p.replica for p in plans] == [0, 1]
    assert all(len(nodes_of(p)) == 2 for p in plans)
    assert not nodes_of(plans[0]) & nodes_of(plans[1]), "an RPC server serves one client"
    assert d.status.replicas == 2 and d.status.ready_replicas == 0
    assert d.status.nodes is not None and len(d.status.nodes.split(",")) == 4
    assert conditions(d)["ReplicasAvailable"] == ("True", "AllPlanned")
    assert conditions(d)["Ready"] == ("False", "WaitingForWorkers")
    # Every replica's devices are claimed in the pool's ledger.
    assert d.claim is not None and d.claim_changed
    assert {(x.node, x.device) for x in d.claim.devices} == {
        (x.node, x.device) for p in plans for x in p.devices
    }
    daemonsets, hosts = named(d, "DaemonSet"), named(d, "Deployment")
    assert sorted(daemonsets) == ["big-rpc", "big-rpc-r1"]
    assert sorted(hosts) == ["big-host", "big-host-r1"]
    for name, replica in (("big-rpc", "0"), ("big-rpc-r1", "1")):
        ds = daemonsets[name]
        assert ds["spec"]["selector"]["matchLabels"][REPLICA_LABEL] == replica
        assert ds["spec"]["template"]["metadata"]["labels"][REPLICA_LABEL] == replica
    for name, plan in (("big-host", plans[0]), ("big-host-r1", plans[1])):
        host = hosts[name]
        assert host["spec"]["selector"]["matchLabels"][REPLICA_LABEL] == str(plan.replica)
        pinned = host["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]
        assert plan.host_node is not None and plan.host_node in str(pinned)
        assert host["spec"]["replicas"] == 0, "each host waits for its own workers"
    service = next(c for c in d.children if c["kind"] == "Service")
    assert REPLICA_LABEL not in service["spec"]["selector"], "the Service fronts every replica"
    assert event_reasons(d) == ["Planned"]


def test_two_replicas_serving() -> None:
    steady, up = serving_replicas()
    assert conditions(up)["Ready"] == ("True", "Serving")
    assert up.status.ready_replicas == 2 and up.status.replicas == 2
    assert [h["spec"]["replicas"] for h in named(up, "Deployment").values()] == [1, 1]
    d = decide(steady)
    assert d.reason == "PlanKept" and d.apply == [] and d.delete == [] and d.events == []
    assert d.status == steady.status and not d.claim_changed
    assert conditions(d)["Degraded"] == ("False", "AsPlanned")


def test_one_replica_lost_is_replanned_alone_while_the_other_serves() -> None:
    steady, up = serving_replicas()
    first, second = all_plans(up)
    lost = sorted(nodes_of(second))[0]
    meshnodes = {**FIVE_MESHNODES, lost: meshnode(age=600)}
    d = decide(dataclasses.replace(steady, meshnodes=meshnodes))
    assert d.reason == "NodeLost"
    assert d.status.plan == first, "the serving replica is untouched"
    moved = d.status.replica_plans[0]
    assert moved.replica == 1 and lost not in nodes_of(moved)
    assert not nodes_of(moved) & nodes_of(first)
    assert moved.generation == 2 and first.generation == 1
    assert d.status.plan_generation == 2
    changed = {c["metadata"]["name"] for c in d.apply}
    assert "big-rpc" not in changed and "big-host" not in changed
    assert {"big-rpc-r1", "big-host-r1"} <= changed
    assert conditions(d)["Ready"] == ("True", "Serving"), "replica 0 still serves"
    assert conditions(d)["Degraded"] == ("True", "NodeLost")
    assert "replica 1" in conditions_message(d, "Degraded")
    assert d.status.ready_replicas == 1
    assert {p.name for p in d.release} == {p.name for p in steady.pods if p.node == lost}
    assert d.claim is not None and {x.node for x in d.claim.devices} == (
        nodes_of(first) | nodes_of(moved)
    )
    # Its new group comes up: both serve again, the first never restarted.
    pods = replica_pods([first, moved])
    again = decide(dataclasses.replace(d_snapshot(steady, d), pods=pods, meshnodes=meshnodes))
    assert again.reason == "PlanKept" and again.status.ready_replicas == 2
    assert conditions(again)["Degraded"] == ("False", "AsPlanned")
    assert "big-rpc" not in {c["metadata"]["name"] for c in again.apply}


def d_snapshot(before: ModelSnapshot, d: Decision) -> ModelSnapshot:
    """The snapshot after `d` was applied (children and status)."""
    return dataclasses.replace(before, status=d.status, children=existing(d))


def test_a_failed_worker_replans_only_its_replica() -> None:
    steady, up = serving_replicas()
    first, second = all_plans(up)
    bad = second.rpc[0]
    pods = [
        dataclasses.replace(p, phase="Failed", ready=False)
        if p.node == bad and p.component == RPC_COMPONENT
        else p
        for p in steady.pods
    ]
    d = decide(dataclasses.replace(steady, pods=pods))
    assert d.reason == "WorkerFailed"
    assert d.status.plan == first
    assert bad not in nodes_of(d.status.replica_plans[0])
    assert conditions(d)["Ready"] == ("True", "Serving")


def test_a_restarted_worker_restarts_only_its_replicas_host() -> None:
    steady, _ = serving_replicas()
    worker = next(p for p in steady.pods if p.component == RPC_COMPONENT and p.replica == 1)
    pods = [dataclasses.replace(p, restarts=1) if p == worker else p for p in steady.pods]
    d = decide(dataclasses.replace(steady, pods=pods))
    assert d.reason == "WorkerRestarted"
    assert [c["metadata"]["name"] for c in d.apply] == ["big-host-r1"]
    assert d.status.replica_plans[0].group_restarts == 1
    assert d.status.plan is not None and d.status.plan.group_restarts == 0
    assert d.status.worker_restarts[f"1/{worker.name}"] == 1


def test_when_only_some_replicas_fit_those_run_and_the_condition_says_how_many() -> None:
    d = decide(replica_snapshot(spec={**SPEC, "replicas": 3}))
    assert d.reason == "Initial"
    assert [p.replica for p in all_plans(d)] == [0, 1]
    assert d.status.replicas == 2
    assert conditions(d)["ReplicasAvailable"] == ("False", "NoCapacity")
    message = conditions_message(d, "ReplicasAvailable")
    assert message.startswith("2 of 3 replicas fit: VRAM: needs "), message
    assert conditions(d)["Planned"] == ("True", "Initial")
    assert sorted(named(d, "Deployment")) == ["big-host", "big-host-r1"]
    assert d.look_again == LookAgain(backoff=True), "retried as capacity may come"
    assert sorted(event_reasons(d)) == ["NoCapacity", "Planned"]
    # Retried, the same two keep serving and nothing is said twice.
    pods = replica_pods(all_plans(d))
    up = decide(replica_snapshot(spec={**SPEC, "replicas": 3}, status=d.status, pods=pods))
    assert up.reason == "ScaleUp" and all_plans(up) == all_plans(d)
    assert "NoCapacity" not in event_reasons(up) and "Planned" not in event_reasons(up)
    assert conditions(up)["Ready"] == ("True", "Serving")
    assert conditions(up)["Degraded"] == ("True", "ReplicasUnavailable")
    # A node joins: the third replica is planned, the two serving ones stay.
    six = [*FIVE, NodeInfo("f", {"pool": "p"})]
    grown = decide(
        replica_snapshot(
            spec={**SPEC, "replicas": 3},
            nodes=six,
            meshnodes={**FIVE_MESHNODES, "f": meshnode()},
            status=up.status,
            pods=pods,
        )
    )
    assert [p.replica for p in all_plans(grown)] == [0, 1, 2]
    assert all_plans(grown)[:2] == all_plans(d)
    assert conditions(grown)["ReplicasAvailable"] == ("True", "AllPlanned")


def test_no_replica_fitting_is_no_capacity() -> None:
    d = decide(replica_snapshot(nodes=FIVE[:1]))
    assert d.reason == "NoCapacity" and d.outcome == "blocked"
    assert d.status.plan is None and d.status.replica_plans == []
    assert conditions_message(d, "Planned").startswith("0 of 2 replicas fit")


def test_scaling_down_removes_the_highest_replicas_children_and_claim() -> None:
    steady, up = serving_replicas()
    first = all_plans(up)[0]
    down = dataclasses.replace(steady, spec=SPEC, model=dataclasses.replace(MODEL, generation=2))
    d = decide(down)
    assert d.reason == "SpecChanged"
    assert d.status.plan is not None and layout_of(d.status.plan) == layout_of(first)
    assert d.status.plan.generation == first.generation and d.status.replica_plans == []
    assert d.status.replicas == 1
    assert sorted((c.kind, c.name) for c in d.delete) == [
        ("DaemonSet", "big-rpc-r1"),
        ("Deployment", "big-host-r1"),
    ]
    assert d.claim == d.status.plan and d.claim_changed
    assert d.apply == [], "the replica left serves on as it was"
    assert "ScaledDown" in event_reasons(d)


def test_scaling_up_does_not_move_the_serving_replica() -> None:
    steady, up = serving()
    plan = up.status.plan
    assert plan is not None
    more = dataclasses.replace(
        steady,
        spec=TWO,
        nodes=FIVE,
        meshnodes=FIVE_MESHNODES,
        model=dataclasses.replace(MODEL, generation=2),
    )
    d = decide(more)
    assert d.reason == "SpecChanged"
    assert kept(d.status.plan, plan) and d.status.plan is not None
    assert d.status.plan.generation == 1
    assert [p.replica for p in all_plans(d)] == [0, 1]
    assert {c["metadata"]["name"] for c in d.apply} == {"big-rpc-r1", "big-host-r1"}


def test_a_child_whose_selector_lacks_the_replica_is_made_again() -> None:
    steady, up = serving()
    old = {**existing(up)}
    for key in (("DaemonSet", "big-rpc"), ("Deployment", "big-host")):
        old[key] = STALE_SELECTOR
    d = decide(dataclasses.replace(steady, children=old))
    assert d.reason == "PlanKept"
    assert sorted((c.kind, c.name) for c in d.delete) == [
        ("DaemonSet", "big-rpc"),
        ("Deployment", "big-host"),
    ]
    assert d.apply == [], "deleted first: a selector cannot change"
    assert d.status.worker_restarts == {}, "its new pods replace the old ones"
    assert d.status.plan_generation == 1 and not d.claim_changed
    # Once gone, they are made again with the replica in their selectors.
    gone = {k: v for k, v in old.items() if v != STALE_SELECTOR}
    again = decide(dataclasses.replace(steady, status=d.status, children=gone))
    assert sorted(c["metadata"]["name"] for c in again.apply) == ["big-host", "big-rpc"]
    assert again.delete == []
    for child in again.apply:
        assert child["spec"]["selector"]["matchLabels"][REPLICA_LABEL] == "0"


def test_a_plan_from_before_replicas_keeps_its_pods() -> None:
    steady, up = serving()
    assert up.status.plan is not None
    legacy = up.status.model_copy(deep=True)
    assert legacy.plan is not None
    legacy.plan.generation = None
    legacy.plan.group_restarts = None
    d = decide(dataclasses.replace(steady, status=legacy))
    assert d.reason == "PlanKept" and d.apply == [], "its pods' template is unchanged"
    assert d.status.plan is not None and d.status.plan.generation == 1


def test_a_replica_needing_more_nodes_than_the_pool_allows_does_not_fit() -> None:
    pool = PoolInfo(
        spec=MeshPoolSpec.model_validate({"nodeSelector": {"pool": "p"}, "maxNodesPerModel": 1}),
        generation=1,
    )
    d = decide(replica_snapshot(pool=pool))
    assert d.reason == "NoCapacity" and d.status.plan is None
    assert conditions_message(d, "Planned") == (
        "0 of 2 replicas fit: needs 2 nodes; the pool allows 1 per model (maxNodesPerModel)"
    )
    assert d.delete == [] and d.children == []


def test_a_lost_replica_without_room_leaves_the_other_serving_under_its_own_name() -> None:
    steady, up = serving_replicas()
    first, second = all_plans(up)
    (spare,) = {n.name for n in FIVE} - nodes_of(first) - nodes_of(second)
    lost = sorted(nodes_of(first))[0]
    meshnodes = {**FIVE_MESHNODES, lost: meshnode(age=600), spare: meshnode(age=600)}
    d = decide(dataclasses.replace(steady, meshnodes=meshnodes))
    assert d.reason == "NodeLost"
    assert all_plans(d) == [second], "replica 1 serves on, replica 0 has no room"
    assert d.status.replicas == 1 and d.status.replica_plans == []
    assert sorted((c.kind, c.name) for c in d.delete) == [
        ("DaemonSet", "big-rpc"),
        ("Deployment", "big-host"),
    ]
    assert d.apply == [], "replica 1's children stay as they are"
    assert conditions(d)["Ready"] == ("True", "Serving")
    assert conditions(d)["ReplicasAvailable"] == ("False", "NoCapacity")
    assert conditions_message(d, "ReplicasAvailable").startswith("1 of 2 replicas fit: ")
    assert d.claim == second and d.look_again == LookAgain(backoff=True)
    assert "PlanLost" in event_reasons(d)
    # The nodes come back: replica 0 is planned again, replica 1 untouched.
    back = decide(dataclasses.replace(d_snapshot(steady, d), meshnodes=FIVE_MESHNODES))
    assert back.reason == "ScaleUp"
    assert [p.replica for p in all_plans(back)] == [0, 1] and all_plans(back)[1] == second
    assert sorted(c["metadata"]["name"] for c in back.apply) == ["big-host", "big-rpc"]
    assert conditions(back)["ReplicasAvailable"] == ("True", "AllPlanned")


# -- scale to zero ------------------------------------------------------------------

ZERO_SPEC = {**SPEC, "scaleToZeroAfter": "10m"}


def idle(seconds: float, *, load: int = 0, complete: bool = True) -> Demand:
    """Demand of a model whose last request was `seconds` before NOW."""
    since = NOW - dt.timedelta(seconds=seconds)
    return Demand(
        waiting=load, busy=0, last_active=since, history=((since, load),), complete=complete
    )


def serving_zero(**changes: Any) -> ModelSnapshot:
    """A model serving for an hour, with scaleToZeroAfter 10m."""
    steady, _ = serving()
    status = steady.status.model_copy(deep=True)
    for c in status.conditions:
        if c.type == "Ready":
            c.last_transition_time = "2026-12-01T11:00:00Z"
    return dataclasses.replace(steady, spec=ZERO_SPEC, status=status, **changes)


def test_an_idle_model_scales_to_zero_releasing_workload_and_claim() -> None:
    steady = serving_zero(demand=idle(601))
    held = steady.status.plan
    d = decide(steady)
    assert d.reason == "ScaledToZero" and d.outcome == "ok" and d.scaling == "to_zero"
    assert d.replicas_wanted == 0, "nothing served at zero"
    assert d.status.plan is None and d.status.replicas == 0 and d.status.endpoint is None
    assert d.claim is None and d.claim_changed, "the ledger releases its memory"
    assert sorted(c.kind for c in d.delete) == ["DaemonSet", "Deployment"]
    assert d.apply == [] and d.children == [], "the Service and policy stay with the model"
    assert d.status.scaled_to_zero_time == "2026-12-01T12:00:00Z"
    assert conditions(d) == {
        "Planned": ("False", "ScaledToZero"),
        "WorkersReady": ("False", "ScaledToZero"),
        "Ready": ("False", "ScaledToZero"),
        "Degraded": ("False", "AsPlanned"),
    }
    message = conditions_message(d, "Ready")
    assert "no request at any gateway for 10m1s" in message and "next request" in message
    assert event_reasons(d) == ["ScaledToZero"]
    assert held is not None and steady.status.plan == held, "the snapshot is not changed"


@pytest.mark.parametrize(
    ("demand", "why"),
    [
        (None, "no gateway reports the model"),
        (idle(599), "idle for less than scaleToZeroAfter"),
        (idle(3600, load=1), "a request is held"),
        (idle(3600, complete=False), "a gateway did not answer"),
        (dataclasses.replace(idle(3600), last_active=NOW), "a request just came"),
    ],
)
def test_a_model_stays_up_unless_every_gateway_saw_it_idle_long_enough(
    demand: Demand | None, why: str
) -> None:
    d = decide(serving_zero(demand=demand))
    assert d.reason == "PlanKept", why
    assert d.status.scaled_to_zero_time is None and d.status.plan is not None, why
    assert d.scaling is None, why


def test_without_scale_to_zero_after_an_idle_model_stays() -> None:
    steady, _ = serving()
    d = decide(dataclasses.replace(steady, demand=idle(10**6)))
    assert d.reason == "PlanKept" and d.status.plan is not None and d.replicas_wanted == 1


def at_zero(demand: Demand | None, spec: Mapping[str, Any] = ZERO_SPEC) -> Decision:
    """The decision at NOW for a model that went to zero 5 minutes before."""
    gone = decide(serving_zero(demand=idle(901), now=NOW - dt.timedelta(minutes=5)))
    assert gone.status.scaled_to_zero_time == "2026-12-01T11:55:00Z"
    return decide(snapshot(spec=spec, status=gone.status, demand=demand, children={}, pods=[]))


def test_a_model_at_zero_stays_there_while_no_request_comes() -> None:
    d = at_zero(idle(901))
    assert d.reason == "ScaledToZero" and d.scaling is None and d.replicas_wanted == 0
    assert d.status.plan is None and not d.claim_changed and d.claim is None
    assert d.children == [] and d.delete == [] and d.events == []
    assert d.plan_seconds is None, "nothing is planned at zero"
    assert conditions(d)["Ready"] == ("False", "ScaledToZero")


@pytest.mark.parametrize(
    ("demand", "spec", "message"),
    [
        (idle(0, load=1), ZERO_SPEC, "1 requests at the gateways"),
        # A request came and went (it timed out at its gateway) between two reads,
        # after the model went to zero (5 minutes before the decision).
        (idle(60), ZERO_SPEC, "requests arrived at the gateways"),
        (None, SPEC, "scaleToZeroAfter was removed"),
    ],
)
def test_a_model_at_zero_is_planned_again_when_asked_for(
    demand: Demand | None, spec: Mapping[str, Any], message: str
) -> None:
    d = at_zero(demand, spec)
    assert d.reason == "ScaleFromZero" and d.scaling == "from_zero"
    assert d.status.scaled_to_zero_time is None
    assert d.status.plan is not None and d.claim_changed and d.claim == d.status.plan
    assert conditions(d)["Planned"] == ("True", "ScaleFromZero")
    assert kinds(d.apply) == ["DaemonSet", "Deployment", "NetworkPolicy", "Service"]
    planned = next(e for e in d.events if e.reason == "Planned")
    assert planned.message.startswith(f"ScaleFromZero: {message}")


def test_a_model_at_zero_without_room_is_no_capacity_until_it_serves_again() -> None:
    huge = synthetic_profile(layer_mib=2000.0)
    gone = decide(serving_zero(demand=idle(601)))
    d = decide(snapshot(spec=ZERO_SPEC, status=gone.status, profile=huge, demand=idle(0, load=1)))
    assert d.reason == "NoCapacity" and d.status.scaled_to_zero_time is None
    # Not serving, it holds nothing: it does not go to zero again, however idle.
    again = decide(snapshot(spec=ZERO_SPEC, status=d.status, profile=huge, demand=idle(7000)))
    assert again.reason == "NoCapacity" and again.status.scaled_to_zero_time is None


def test_a_model_goes_to_zero_only_once_it_served_for_scale_to_zero_after() -> None:
    steady, _ = serving()  # Ready since NOW
    d = decide(dataclasses.replace(steady, spec=ZERO_SPEC, demand=idle(3600)))
    assert d.reason == "PlanKept", "it has served for no time yet"
    loading = decide(snapshot(spec=ZERO_SPEC, demand=idle(3600)))
    assert loading.reason == "Initial", "a model being planned is not idle"


# -- autoscaling --------------------------------------------------------------------

AUTOSCALING: dict[str, Any] = {"minReplicas": 1, "maxReplicas": 2, "scaleDownAfter": "1m"}
AUTO = {**SPEC, "autoscaling": AUTOSCALING}


def serving_auto(spec: Mapping[str, Any] = AUTO) -> ModelSnapshot:
    """An autoscaled model at its minimum of one replica, serving."""
    first = decide(replica_snapshot(spec=spec))
    pods = replica_pods(all_plans(first))
    up = decide(
        replica_snapshot(spec=spec, status=first.status, pods=pods, children=existing(first))
    )
    return replica_snapshot(spec=spec, status=up.status, pods=pods, children=existing(up))


def loaded(load: int, *, seconds: float = 3600, peak: int | None = None) -> Demand:
    """`load` held now; `peak` (default: `load`) held `seconds` before NOW until now."""
    start = NOW - dt.timedelta(seconds=seconds)
    history = ((start, peak if peak is not None else load), (NOW, load))
    return Demand(waiting=load, busy=0, last_active=NOW, history=history)


def test_load_beyond_the_target_adds_a_replica() -> None:
    steady = serving_auto()
    assert steady.status.replicas == 1 and steady.status.desired_replicas == 1
    d = decide(dataclasses.replace(steady, demand=loaded(2)))
    assert d.status.desired_replicas == 2 and d.scaling == "up"
    assert d.reason == "ScaleUp" and len(all_plans(d)) == 2 and d.replicas_wanted == 2
    assert d.status.last_scale_time == "2026-12-01T12:00:00Z"
    up = next(e for e in d.events if e.reason == "ScaledUp")
    assert (
        up.message == "load 2 (0 in flight, 2 held) over 1 busy slots per replica: 1 -> 2 replicas"
    )


def test_the_autoscaler_stays_within_its_bounds() -> None:
    steady = serving_auto()
    d = decide(dataclasses.replace(steady, demand=loaded(40)))
    assert d.status.desired_replicas == 2, "maxReplicas"
    idle_model = decide(dataclasses.replace(steady, demand=loaded(0)))
    assert idle_model.status.desired_replicas == 1, "minReplicas"
    target = {**AUTO, "autoscaling": {**AUTOSCALING, "targetBusySlots": 3}}
    steady3 = serving_auto(target)
    assert decide(dataclasses.replace(steady3, demand=loaded(3))).status.desired_replicas == 1
    assert decide(dataclasses.replace(steady3, demand=loaded(4))).status.desired_replicas == 2


def two_serving(**changes: Any) -> ModelSnapshot:
    """AUTO scaled up to two replicas (at NOW - 1 h), both serving."""
    steady = serving_auto()
    status = steady.status.model_copy(deep=True)
    status.desired_replicas = 2
    status.last_scale_time = "2026-12-01T11:00:00Z"
    first = decide(dataclasses.replace(steady, status=status))
    pods = replica_pods(all_plans(first))
    up = decide(
        dataclasses.replace(steady, status=first.status, pods=pods, children=existing(first))
    )
    assert up.status.ready_replicas == 2
    return dataclasses.replace(
        steady, status=up.status, pods=pods, children=existing(up), **changes
    )


def test_a_replica_is_removed_only_after_the_load_stayed_low_for_scale_down_after() -> None:
    # The load fell 30 s ago: within the one-minute window it was still 2.
    d = decide(two_serving(demand=loaded(0, seconds=30, peak=2)))
    assert d.status.desired_replicas == 2 and d.scaling is None and len(all_plans(d)) == 2
    # Low for the whole window: one replica goes.
    d = decide(two_serving(demand=loaded(0, seconds=3600, peak=0)))
    assert d.status.desired_replicas == 1 and d.scaling == "down" and d.replicas_wanted == 1
    assert [p.replica for p in all_plans(d)] == [0]
    (down,) = [e for e in d.events if e.reason == "ScaledDown"]
    assert down.message == "peak load 0 over the last 1m, 1 busy slots per replica: 2 -> 1 replicas"
    assert any(c.name.endswith("-r1") for c in d.delete), "the second replica's children go"


def test_no_scale_down_right_after_a_change_or_on_a_short_history() -> None:
    recent = two_serving()
    recent.status.last_scale_time = "2026-12-01T11:59:30Z"
    d = decide(dataclasses.replace(recent, demand=loaded(0, peak=0)))
    assert d.status.desired_replicas == 2, "the last change was 30 s ago"
    # An operator watching for 10 s only cannot know the load of the last minute.
    short = Demand(
        waiting=0, busy=0, last_active=NOW, history=((NOW - dt.timedelta(seconds=10), 0),)
    )
    assert decide(two_serving(demand=short)).status.desired_replicas == 2
    incomplete = dataclasses.replace(loaded(0, peak=0), complete=False)
    assert decide(two_serving(demand=incomplete)).status.desired_replicas == 2


def test_no_scale_up_while_an_added_replica_is_still_starting() -> None:
    steady = serving_auto()
    first = decide(dataclasses.replace(steady, demand=loaded(2)))
    assert first.status.desired_replicas == 2 and first.status.ready_replicas == 1
    wider = {**AUTO, "autoscaling": {**AUTOSCALING, "maxReplicas": 3}}
    again = decide(dataclasses.replace(steady, spec=wider, status=first.status, demand=loaded(9)))
    assert again.status.desired_replicas == 2, "replica 1 has not served yet"


def test_autoscaling_past_what_fits_says_how_many_fit() -> None:
    many = {**SPEC, "autoscaling": {"minReplicas": 3, "maxReplicas": 4}}
    d = decide(replica_snapshot(spec=many))
    assert d.status.desired_replicas == 3
    assert conditions(d)["ReplicasAvailable"] == ("False", "NoCapacity")
    assert conditions_message(d, "ReplicasAvailable").startswith("2 of 3 replicas fit")


# -- rolling updates of replicas ---------------------------------------------------


def workloads_of(children: Mapping[tuple[str, str], str]) -> frozenset[tuple[str, str]]:
    return frozenset(k for k in children if k[0] in {"DaemonSet", "Deployment"})


def test_a_spec_change_restarts_serving_replicas_one_at_a_time() -> None:
    steady, _ = serving_replicas()
    steady = dataclasses.replace(steady, settled=workloads_of(steady.children))
    changed = {**TWO, "extraArgs": ["--temp", "0.5"]}
    model = dataclasses.replace(MODEL, generation=2)
    d = decide(dataclasses.replace(steady, spec=changed, model=model))
    assert d.reason == "SpecChanged"
    assert [c["metadata"]["name"] for c in d.apply] == ["big-host"], "replica 0 first"
    assert ChildRef("apps/v1", "Deployment", "big-host-r1") in d.deferred
    assert d.status.rolling_replicas == [1]
    assert d.delete == [], "a waiting replica's workloads stay as they are"
    (rolling,) = [e for e in d.events if e.reason == "RollingUpdate"]
    assert rolling.message == "replica 0: new workloads; replicas [1] follow one at a time"
    assert conditions(d)["Ready"] == ("True", "Serving")

    # Replica 0's host runs the new template but has not rolled out: 1 waits.
    children = {**steady.children, **existing(d)}
    children[("Deployment", "big-host-r1")] = steady.children[("Deployment", "big-host-r1")]
    rolling_0 = dataclasses.replace(
        steady,
        spec=changed,
        model=model,
        status=d.status,
        children=children,
        settled=workloads_of(children) - {("Deployment", "big-host")},
    )
    again = decide(rolling_0)
    assert again.apply == [] and again.status.rolling_replicas == [1]
    assert "RollingUpdate" not in event_reasons(again)
    # Replica 0 serving again, rolled out: now replica 1.
    done_0 = dataclasses.replace(rolling_0, settled=workloads_of(children))
    last = decide(done_0)
    assert [c["metadata"]["name"] for c in last.apply] == ["big-host-r1"]
    assert last.deferred == [] and last.status.rolling_replicas == []
    (rolling,) = [e for e in last.events if e.reason == "RollingUpdate"]
    assert rolling.message == "replica 1: new workloads"


def test_a_replica_that_is_not_serving_is_changed_at_once_and_the_serving_one_waits() -> None:
    steady, _ = serving_replicas()
    steady = dataclasses.replace(steady, settled=workloads_of(steady.children))
    # Replica 1's host is down: changing it loses nothing. Replica 0, the one
    # serving, waits until replica 1 serves again.
    pods = [p for p in steady.pods if not (p.component == HOST_COMPONENT and p.replica == 1)]
    changed = {**TWO, "extraArgs": ["--temp", "0.5"]}
    model = dataclasses.replace(MODEL, generation=2)
    d = decide(dataclasses.replace(steady, spec=changed, model=model, pods=pods))
    assert [c["metadata"]["name"] for c in d.apply] == ["big-host-r1"]
    assert ChildRef("apps/v1", "Deployment", "big-host") in d.deferred
    assert d.status.rolling_replicas == [0]
    assert "RollingUpdate" not in event_reasons(d)


@pytest.mark.parametrize(
    ("servers", "message"),
    [
        (0, "no RPC servers: each host runs every layer itself"),
        (1, "1 RPC server ready"),
        (4, "4 RPC servers ready"),
    ],
)
def test_workers_ready_message(servers: int, message: str) -> None:
    assert workers_ready_message(servers) == message
