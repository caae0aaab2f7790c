"""What the operator knows of the cluster at one moment, read from kopf's indices.

The index functions in `registration` turn watched objects into the small
records below; a reconcile takes one `Snapshot` and decides from it alone.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from mesh_operator.api.contract import (
    COMPONENT_LABEL,
    IMAGES_ANNOTATION,
    MAX_RTT_MS,
    MODEL_LABEL,
    PLAN_ANNOTATION,
    REPLICA_LABEL,
    RTT_ANNOTATION,
    SOURCE_ANNOTATION,
)
from mesh_operator.api.meshmodel import Plan
from mesh_operator.api.meshnode import MeshNodeStatus
from mesh_operator.api.meshpool import MeshPoolSpec
from mesh_operator.ledger import NodeInfo
from mesh_operator.planning import combined_claim

_warned_rtt: set[tuple[str, str]] = set()

# The digest recorded for a child whose selector lacks REPLICA_LABEL.
STALE_SELECTOR = "stale-selector"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PodInfo:
    name: str
    component: str
    node: str | None
    ip: str | None
    phase: str
    ready: bool
    plan_generation: str | None
    waiting_reason: str | None
    restarts: int
    deleting: bool
    # The first container's termination message, else why the pod is not running.
    message: str | None = None
    source_key: str | None = None  # the model source a header pod reads
    # Termination messages of its containers, the current state's before the last
    # state's: what a crashed host said on its way out.
    exits: tuple[str, ...] = ()
    images_key: str | None = None  # the host's group of images (IMAGES_ANNOTATION)
    image: str | None = None  # its first container's image, as the pod spec names it
    replica: int = 0  # the replica it serves (REPLICA_LABEL; absent: 0)


@dataclass(frozen=True)
class PoolInfo:
    spec: MeshPoolSpec
    generation: int


@dataclass
class Snapshot:
    pools: Mapping[str, PoolInfo] = field(default_factory=dict)
    nodes: Sequence[NodeInfo] = ()
    meshnodes: Mapping[str, MeshNodeStatus] = field(default_factory=dict)
    # "namespace/name" of a MeshModel -> (pool name, its current plan)
    plans: Mapping[str, tuple[str, Plan]] = field(default_factory=dict)
    # "namespace/name" -> pods of its workers and host
    pods: Mapping[str, Sequence[PodInfo]] = field(default_factory=dict)
    # "namespace/name" -> {(kind, name): spec hash annotation}
    children: Mapping[str, Mapping[tuple[str, str], str]] = field(default_factory=dict)
    # "namespace/name" -> the (kind, name) of its DaemonSets and Deployments that
    # run their current template everywhere, available (`rolled_out`)
    settled: Mapping[str, frozenset[tuple[str, str]]] = field(default_factory=dict)

    def claims(self, pool: str, exclude: str | None = None) -> dict[str, Plan]:
        return pool_claims(self.plans, pool, exclude)


def pool_claims(
    plans: Mapping[str, tuple[str, Plan]], pool: str, exclude: str | None = None
) -> dict[str, Plan]:
    """The plans of `pool`'s models (but `exclude`, and any earlier object of its
    name, `<exclude>@<n>`), by model key."""
    return {
        k: p
        for k, (pl, p) in plans.items()
        if pl == pool and k != exclude and not (exclude and k.startswith(f"{exclude}@"))
    }


def model_key(namespace: str, name: str) -> str:
    return f"{namespace}/{name}"


def node_rtt_ms(name: str, annotations: Mapping[str, str]) -> float | None:
    """The node's declared round trip (`mesh.dev/rtt-ms`); None when absent or bad."""
    text = annotations.get(RTT_ANNOTATION)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= MAX_RTT_MS:
        if (name, text) not in _warned_rtt:
            _warned_rtt.add((name, text))
            log.warning(
                "node %s: annotation %s=%r is not a number of milliseconds in [0, %d]; ignored",
                name, RTT_ANNOTATION, text, MAX_RTT_MS,
            )  # fmt: skip
        return None
    return value


def node_info(body: Mapping[str, Any]) -> NodeInfo:
    meta = body.get("metadata", {})
    spec = body.get("spec", {}) or {}
    conditions = (body.get("status", {}) or {}).get("conditions", []) or []
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
    name = meta.get("name", "")
    return NodeInfo(
        name=name,
        labels=dict(meta.get("labels", {}) or {}),
        ready=ready,
        unschedulable=bool(spec.get("unschedulable", False)),
        rtt_ms=node_rtt_ms(name, meta.get("annotations", {}) or {}),
    )


def meshnode_status(body: Mapping[str, Any]) -> MeshNodeStatus | None:
    status = body.get("status")
    if not status:
        return None
    try:
        return MeshNodeStatus.model_validate(status)
    except ValidationError:
        return None


def pool_info(body: Mapping[str, Any]) -> PoolInfo | None:
    try:
        spec = MeshPoolSpec.model_validate(body.get("spec", {}) or {})
    except ValidationError:
        return None
    return PoolInfo(spec=spec, generation=int(body.get("metadata", {}).get("generation", 0)))


def model_plan(body: Mapping[str, Any]) -> tuple[str, Plan] | None:
    """The model's pool and what it holds there: every replica's devices."""
    pool = (body.get("spec", {}) or {}).get("poolRef")
    status = body.get("status", {}) or {}
    plan = status.get("plan")
    if not pool or not plan:
        return None
    try:
        first = Plan.model_validate(plan)
        others = [Plan.model_validate(p) for p in status.get("replicaPlans") or []]
    except ValidationError:
        return None
    claim = combined_claim([first, *others])
    return (pool, claim) if claim is not None else (pool, first)


def pod_info(body: Mapping[str, Any]) -> PodInfo:
    meta = body.get("metadata", {})
    status = body.get("status", {}) or {}
    conditions = status.get("conditions", []) or []
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
    waiting = None
    restarts = 0
    message = next(
        (c.get("message") for c in conditions if c.get("status") == "False" and c.get("message")),
        None,
    )
    containers = (body.get("spec", {}) or {}).get("containers") or []
    exits: list[str] = []
    for cs in status.get("containerStatuses", []) or []:
        restarts += int(cs.get("restartCount", 0) or 0)
        state = cs.get("state", {}) or {}
        if "waiting" in state:
            waiting = (state.get("waiting") or {}).get("reason")
            message = (state.get("waiting") or {}).get("message") or message
        if "terminated" in state:
            message = (state.get("terminated") or {}).get("message") or message
        for terminated in (state, cs.get("lastState") or {}):
            exit_message = (terminated.get("terminated") or {}).get("message")
            if exit_message:
                exits.append(exit_message)
    return PodInfo(
        name=meta.get("name", ""),
        component=(meta.get("labels", {}) or {}).get(COMPONENT_LABEL, ""),
        node=(body.get("spec", {}) or {}).get("nodeName"),
        ip=status.get("podIP"),
        phase=status.get("phase", "Pending"),
        ready=ready,
        plan_generation=(meta.get("annotations", {}) or {}).get(PLAN_ANNOTATION),
        waiting_reason=waiting,
        restarts=restarts,
        deleting=meta.get("deletionTimestamp") is not None,
        message=message,
        source_key=(meta.get("annotations", {}) or {}).get(SOURCE_ANNOTATION),
        exits=tuple(exits),
        images_key=(meta.get("annotations", {}) or {}).get(IMAGES_ANNOTATION),
        image=containers[0].get("image") if containers else None,
        replica=_replica(meta.get("labels", {}) or {}),
    )


def _replica(labels: Mapping[str, str]) -> int:
    try:
        return int(labels.get(REPLICA_LABEL, "0"))
    except ValueError:
        return 0


def rolled_out(body: Mapping[str, Any], kind: str) -> bool:
    """Whether a Deployment or DaemonSet runs its current template on every pod it
    wants, each available: what `kubectl rollout status` waits for."""
    meta = body.get("metadata") or {}
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    if int(status.get("observedGeneration") or 0) < int(meta.get("generation") or 0):
        return False
    if kind == "DaemonSet":
        want = int(status.get("desiredNumberScheduled") or 0)
        updated = int(status.get("updatedNumberScheduled") or 0)
        return updated == want and int(status.get("numberAvailable") or 0) == want
    want = int(spec.get("replicas", 1))
    return (
        int(status.get("updatedReplicas") or 0) == want
        and int(status.get("availableReplicas") or 0) == want
        and int(status.get("replicas") or 0) == want
    )


def stale_selector(body: Mapping[str, Any]) -> bool:
    """Whether a DaemonSet or Deployment selects its pods without REPLICA_LABEL, as
    an operator before replicas made them. A selector cannot change: such a child
    is deleted and made again (`STALE_SELECTOR` stands for its digest)."""
    selector = ((body.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
    return REPLICA_LABEL not in selector


def pod_model_key(body: Mapping[str, Any]) -> str | None:
    meta = body.get("metadata", {})
    model = (meta.get("labels", {}) or {}).get(MODEL_LABEL)
    return model_key(meta.get("namespace", ""), model) if model else None
