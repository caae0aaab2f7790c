"""Reconcile one MeshPool: its memory ledger and readiness in status."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from mesh_operator.api.base import API_VERSION
from mesh_operator.api.conditions import ConditionState, set_condition
from mesh_operator.api.meshpool import MeshPoolSpec, MeshPoolStatus
from mesh_operator.handlers import metrics
from mesh_operator.handlers.kube import Kube
from mesh_operator.handlers.snapshot import Snapshot
from mesh_operator.ledger import build_ledger_rows, build_pool_view


def build_pool_status(
    *,
    name: str,
    spec: MeshPoolSpec,
    generation: int,
    previous: MeshPoolStatus,
    snapshot: Snapshot,
    now: dt.datetime,
) -> MeshPoolStatus:
    """The pool's status from the snapshot. Pure."""
    view = build_pool_view(spec, snapshot.nodes, snapshot.meshnodes, snapshot.claims(name), now)
    rows = build_ledger_rows(view, snapshot.meshnodes)
    usable = view.usable_nodes()
    status = MeshPoolStatus(
        nodes=len(view.nodes),
        ready_nodes=len(usable),
        devices=sum(len(n.devices) for n in usable),
        memory_total_mib=sum(r.memory_total_mib for r in rows),
        memory_free_mib=sum(r.memory_free_mib for r in rows if not r.stale),
        memory_claimed_mib=sum(r.memory_claimed_mib for r in rows),
        ledger=rows,
        observed_generation=generation,
        conditions=previous.conditions,
    )
    state: ConditionState
    if usable:
        state, reason = "True", "NodesReady"
        message = f"{len(usable)} of {len(view.nodes)} nodes report fresh, healthy devices"
    elif view.nodes:
        state, reason = "False", "NoUsableNodes"
        message = "; ".join(f"{n.name}: {n.problem}" for n in view.nodes[:5])
    else:
        state, reason = "False", "NoNodes"
        message = f"no node matches nodeSelector {dict(spec.node_selector) or '{}'}"
    status.conditions = set_condition(
        status.conditions, "Ready", state, reason, message, observed_generation=generation, now=now
    )
    return status


def reconcile_pool(
    kube: Kube, body: Mapping[str, Any], snapshot: Snapshot, now: dt.datetime
) -> None:
    started = time.perf_counter()
    meta = body["metadata"]
    outcome = "ok"
    try:
        spec = MeshPoolSpec.model_validate(body.get("spec") or {})
    except ValidationError:
        outcome = "blocked"
        metrics.RECONCILES.labels(kind="MeshPool", outcome=outcome).inc()
        return
    try:
        previous = MeshPoolStatus.model_validate(body.get("status") or {})
    except ValidationError:
        previous = MeshPoolStatus()
    status = build_pool_status(
        name=meta["name"],
        spec=spec,
        generation=int(meta.get("generation", 1)),
        previous=previous,
        snapshot=snapshot,
        now=now,
    )
    for state, mib in (
        ("total", status.memory_total_mib),
        ("free", status.memory_free_mib),
        ("claimed", status.memory_claimed_mib),
    ):
        metrics.POOL_MEMORY.labels(pool=meta["name"], state=state).set(mib * 1024 * 1024)
    if status.to_wire() != previous.to_wire():
        kube.patch_status(API_VERSION, "MeshPool", meta["name"], None, status.to_wire())
    metrics.RECONCILES.labels(kind="MeshPool", outcome=outcome).inc()
    metrics.RECONCILE_SECONDS.labels(kind="MeshPool").observe(time.perf_counter() - started)
