"""Pod status from the state of its containers: phase, conditions and
container statuses, as the kubelet reports them.

Test infrastructure. Pure: the node's pod worker keeps one `ContainerView` per
container and calls `build_pod_status` whenever one changes.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

Obj = dict[str, Any]

# Conditions this node owns; others (PodScheduled, DisruptionTarget, readiness
# gates) are kept as the API server has them.
OWNED_CONDITIONS = ("PodReadyToStartContainers", "Initialized", "ContainersReady", "Ready")


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class ContainerView:
    """What the node knows about one container right now."""

    name: str
    image: str
    init: bool = False
    # An init container with restartPolicy Always (a sidecar).
    sidecar: bool = False
    state: str = "waiting"
    reason: str | None = "ContainerCreating"
    message: str | None = None
    exit_code: int | None = None
    signal: int | None = None
    started_at: str | None = None
    finished_at: str | None = None
    container_id: str | None = None
    image_id: str = ""
    last_state: Obj | None = None
    restart_count: int = 0
    started: bool = False
    ready: bool = False
    # Will never run again: a completed init container, or one not restarted.
    done: bool = False

    def terminated_state(self) -> Obj:
        term: Obj = {
            "exitCode": self.exit_code if self.exit_code is not None else 0,
            "reason": self.reason or ("Completed" if not self.exit_code else "Error"),
            "startedAt": self.started_at,
            "finishedAt": self.finished_at,
        }
        if self.signal:
            term["signal"] = self.signal
        if self.message:
            term["message"] = self.message
        if self.container_id:
            term["containerID"] = self.container_id
        return term


def build_container_status(view: ContainerView) -> Obj:
    state: Obj
    if view.state == "running":
        state = {"running": {"startedAt": view.started_at}}
    elif view.state == "terminated":
        state = {"terminated": view.terminated_state()}
    else:
        waiting: Obj = {"reason": view.reason or "ContainerCreating"}
        if view.message:
            waiting["message"] = view.message
        state = {"waiting": waiting}
    status: Obj = {
        "name": view.name,
        "image": view.image,
        "imageID": view.image_id,
        "ready": view.ready,
        "restartCount": view.restart_count,
        "started": view.started,
        "state": state,
        "lastState": view.last_state or {},
    }
    if view.container_id:
        status["containerID"] = view.container_id
    return status


def pod_phase(inits: Sequence[ContainerView], mains: Sequence[ContainerView]) -> str:
    if any(c.done and c.exit_code not in (0, None) for c in inits if not c.sidecar):
        return "Failed"
    if not all(c.done for c in inits if not c.sidecar):
        return "Pending"
    if any(c.state == "running" for c in mains):
        return "Running"
    if mains and all(c.done for c in mains):
        return "Succeeded" if all(c.exit_code == 0 for c in mains) else "Failed"
    if any(c.restart_count > 0 or c.done for c in mains):
        # Some finished for good or are in back-off between restarts.
        return "Running"
    return "Pending"


def _condition(
    previous: Sequence[Obj], kind: str, ok: bool, reason: str | None, message: str | None
) -> Obj:
    status = "True" if ok else "False"
    old = next((c for c in previous if c.get("type") == kind), None)
    since = old.get("lastTransitionTime") if old and old.get("status") == status else None
    cond: Obj = {
        "type": kind,
        "status": status,
        "lastProbeTime": None,
        "lastTransitionTime": since or now_rfc3339(),
    }
    if not ok and reason:
        cond["reason"] = reason
        if message:
            cond["message"] = message
    return cond


def build_conditions(
    previous: Sequence[Obj],
    inits: Sequence[ContainerView],
    mains: Sequence[ContainerView],
    phase: str,
    *,
    sandbox_ready: bool,
    readiness_gates: Sequence[str] = (),
) -> list[Obj]:
    """All of the pod's conditions: the ones this node owns, the others kept."""
    pending_inits = [c.name for c in inits if not (c.done if not c.sidecar else c.started)]
    initialized = not pending_inits
    finished = phase in ("Succeeded", "Failed")
    unready = [c.name for c in [*mains, *(i for i in inits if i.sidecar)] if not c.ready]
    containers_ready = not unready and not finished
    gates_ok = all(
        any(c.get("type") == g and c.get("status") == "True" for c in previous)
        for g in readiness_gates
    )
    ready_reason = "PodCompleted" if finished else "ContainersNotReady"
    names = " ".join(unready)
    owned = [
        _condition(
            previous, "PodReadyToStartContainers", sandbox_ready and not finished, None, None
        ),
        _condition(
            previous,
            "Initialized",
            initialized,
            "ContainersNotInitialized",
            f"containers with incomplete status: [{' '.join(pending_inits)}]",
        ),
        _condition(
            previous,
            "ContainersReady",
            containers_ready,
            ready_reason,
            f"containers with unready status: [{names}]" if not finished else None,
        ),
        _condition(
            previous,
            "Ready",
            containers_ready and gates_ok,
            ready_reason if not containers_ready else "ReadinessGatesNotReady",
            f"containers with unready status: [{names}]" if not finished and unready else None,
        ),
    ]
    kept = [c for c in previous if c.get("type") not in OWNED_CONDITIONS]
    return kept + owned


def build_pod_status(
    previous: Obj,
    inits: Sequence[ContainerView],
    mains: Sequence[ContainerView],
    *,
    pod_ip: str | None,
    host_ip: str,
    start_time: str,
    readiness_gates: Sequence[str] = (),
) -> Obj:
    """The status to write: `previous` (the API's copy) with this node's fields set."""
    phase = pod_phase(inits, mains)
    status = dict(previous)
    status["phase"] = phase
    status["hostIP"] = host_ip
    status["hostIPs"] = [{"ip": host_ip}]
    if pod_ip:
        status["podIP"] = pod_ip
        status["podIPs"] = [{"ip": pod_ip}]
    status["startTime"] = previous.get("startTime") or start_time
    status["conditions"] = build_conditions(
        previous.get("conditions") or [],
        inits,
        mains,
        phase,
        sandbox_ready=pod_ip is not None,
        readiness_gates=readiness_gates,
    )
    if inits:
        status["initContainerStatuses"] = [build_container_status(c) for c in inits]
    status["containerStatuses"] = [build_container_status(c) for c in mains]
    return status
