"""kopf registrations: indices, and handlers that only put keys in the work queue.

Importing this module registers the handlers with kopf's default registry. The
indices keep what the reconcilers need in memory (nodes, MeshNodes, pools, plans,
mesh's pods and children), updated by watches, so a reconcile reads no lists.
Every reconcile runs in the queue (`handlers.queue`) on a snapshot of them.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Mapping
from typing import Any

import kopf

from mesh_operator.api.base import (
    FINALIZER,
    GROUP,
    MESHMODEL_PLURAL,
    MESHNODE_PLURAL,
    MESHPOOL_PLURAL,
    VERSION,
)
from mesh_operator.api.contract import (
    APP_NAME,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    MODEL_LABEL,
    NAME_LABEL,
    SPEC_HASH_ANNOTATION,
)
from mesh_operator.handlers import metrics
from mesh_operator.handlers.demand import DEFAULT_INTERVAL as DEMAND_INTERVAL
from mesh_operator.handlers.demand import DemandPoller, GatewaySource
from mesh_operator.handlers.kube import Kube
from mesh_operator.handlers.models import ModelReconciler
from mesh_operator.handlers.pools import reconcile_pool
from mesh_operator.handlers.queue import WorkQueue
from mesh_operator.handlers.snapshot import (
    STALE_SELECTOR,
    Snapshot,
    meshnode_status,
    model_key,
    model_plan,
    node_info,
    pod_info,
    pod_model_key,
    pool_info,
    rolled_out,
    stale_selector,
)
from mesh_operator.kubeclient import follow_kubeconfig_env
from mesh_operator.manifests.workloads import PolicyPeers
from mesh_operator.source import ProfileCache

log = logging.getLogger(__name__)

MODEL_INTERVAL = float(os.environ.get("MESH_MODEL_INTERVAL", "5"))
POOL_INTERVAL = float(os.environ.get("MESH_POOL_INTERVAL", "10"))
# Reconciles run at once (threads of the work queue).
WORKERS = int(os.environ.get("MESH_WORKERS", "8"))
OWNED = {NAME_LABEL: APP_NAME, MANAGED_BY_LABEL: MANAGED_BY}
MODEL_PREFIX, POOL_PREFIX = "model:", "pool:"


def policy_peers() -> PolicyPeers:
    """Who the models' NetworkPolicies admit, as the chart tells the operator: the
    release's agent and gateway namespaces and the scrapers' namespaces, each
    defaulting to the operator's own namespace (MESH_SCRAPER_NAMESPACES set but
    empty: no scraper)."""
    own = os.environ.get("POD_NAMESPACE") or "default"
    scrapers = os.environ.get("MESH_SCRAPER_NAMESPACES", own)
    return PolicyPeers(
        agent_namespace=os.environ.get("MESH_AGENT_NAMESPACE") or own,
        gateway_namespace=os.environ.get("MESH_GATEWAY_NAMESPACE") or own,
        scraper_namespaces=tuple(n.strip() for n in scrapers.split(",") if n.strip()),
    )


class _State:
    """Process-wide objects, created at startup.

    Only keys that kopf's handlers put in reach the queue, and kopf runs them only
    once its indices are filled: a reconcile on half-filled indices would see a
    serving model's workers missing and stop its host.
    """

    kube: Kube | None = None
    models: ModelReconciler | None = None
    queue: WorkQueue | None = None
    demand: DemandPoller | None = None


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **kwargs: Any) -> None:
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING
    # The resources are known; scanning CRDs would need list/watch on them.
    settings.scanning.disabled = True
    settings.watching.server_timeout = 300
    settings.execution.max_workers = WORKERS
    _State.kube = Kube()
    source = GatewaySource.from_env()
    if source is not None:
        _State.demand = DemandPoller(
            source,
            list_pods=_State.kube.ready_pod_ips,
            on_waiting=_waiting,
            # Seconds between two reads of every gateway's /demand.
            interval=float(os.environ.get("MESH_DEMAND_INTERVAL", DEMAND_INTERVAL)),
        )
    _State.models = ModelReconciler(
        _State.kube,
        ProfileCache(),
        policy_peers(),
        interval=MODEL_INTERVAL,
        demand=_State.demand.demand if _State.demand is not None else None,
    )
    _State.queue = WorkQueue(_Work(kwargs), workers=WORKERS)
    _State.queue.start()
    if _State.demand is not None:
        _State.demand.start()


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    follow_kubeconfig_env()
    return kopf.login_via_client(**kwargs)


def _plans(index: Mapping[str, Any]) -> dict[str, Any]:
    """Every plan the index holds. A model deleted and made again under its name
    has two objects for a moment: both plans count (the older under
    `<key>@<n>`, which `pool_claims` leaves out for the model itself)."""
    plans: dict[str, Any] = {}
    for key, store in index.items():
        for n, value in enumerate(store):
            plans[key if n == 0 else f"{key}@{n}"] = value
    return plans


def _newest(store: Any) -> Any:
    """Of the objects a name stands for, the one made last (a model deleted and
    made again has two for a moment; only the new one is reconciled)."""
    bodies = list(store)
    if not bodies:
        return None
    return max(bodies, key=lambda b: str(b["metadata"].get("creationTimestamp") or ""))


def _one(store: Any) -> Any:
    for value in store:
        return value
    return None


def _snapshot(indices: Mapping[str, Any]) -> Snapshot:
    children: dict[str, dict[tuple[str, str], str]] = {}
    settled: dict[str, set[tuple[str, str]]] = {}
    for idx in ("daemonset_index", "deployment_index", "service_index", "policy_index"):
        for key, store in indices[idx].items():
            for kind, name, digest, done in store:
                children.setdefault(key, {})[(kind, name)] = digest
                if done:
                    settled.setdefault(key, set()).add((kind, name))
    return Snapshot(
        pools={k: v for k, s in indices["pool_index"].items() if (v := _one(s)) is not None},
        nodes=[v for s in indices["node_index"].values() if (v := _one(s)) is not None],
        meshnodes={
            k: v for k, s in indices["meshnode_index"].items() if (v := _one(s)) is not None
        },
        plans=_plans(indices["plan_index"]),
        pods={k: list(s) for k, s in indices["pod_index"].items()},
        children=children,
        settled={key: frozenset(found) for key, found in settled.items()},
    )


# -- indices --------------------------------------------------------------------------
# An indexer returns {} (not None) for an object that no longer has a value: kopf
# keeps an object's previous entry when its indexer returns None, so a model that
# released its plan (NoCapacity, ScaledToZero) would go on holding it in the ledger.


@kopf.index("", "v1", "nodes")
def node_index(body: kopf.Body, name: str, **_: Any) -> dict[str, Any]:
    return {name: node_info(body)}


@kopf.index(GROUP, VERSION, MESHNODE_PLURAL)
def meshnode_index(body: kopf.Body, name: str, **_: Any) -> dict[str, Any]:
    status = meshnode_status(body)
    return {name: status} if status is not None else {}


@kopf.index(GROUP, VERSION, MESHPOOL_PLURAL)
def pool_index(body: kopf.Body, name: str, **_: Any) -> dict[str, Any]:
    info = pool_info(body)
    return {name: info} if info is not None else {}


@kopf.index(GROUP, VERSION, MESHMODEL_PLURAL)
def plan_index(body: kopf.Body, namespace: str | None, name: str, **_: Any) -> dict[str, Any]:
    plan = model_plan(body)
    return {model_key(namespace or "", name): plan} if plan is not None else {}


@kopf.index("", "v1", "pods", labels=OWNED)
def pod_index(body: kopf.Body, **_: Any) -> dict[str, Any]:
    key = pod_model_key(body)
    return {key: pod_info(body)} if key else {}


def _child(body: kopf.Body, kind: str) -> dict[str, Any]:
    meta = body.get("metadata", {})
    model = (meta.get("labels") or {}).get(MODEL_LABEL)
    if not model:
        return {}
    digest = (meta.get("annotations") or {}).get(SPEC_HASH_ANNOTATION, "")
    workload = kind in {"DaemonSet", "Deployment"}
    if workload and stale_selector(body):
        digest = STALE_SELECTOR
    done = workload and rolled_out(body, kind)
    key = model_key(meta.get("namespace", ""), model)
    return {key: (kind, meta.get("name", ""), digest, done)}


@kopf.index("apps", "v1", "daemonsets", labels=OWNED)
def daemonset_index(body: kopf.Body, **_: Any) -> dict[str, Any]:
    return _child(body, "DaemonSet")


@kopf.index("apps", "v1", "deployments", labels=OWNED)
def deployment_index(body: kopf.Body, **_: Any) -> dict[str, Any]:
    return _child(body, "Deployment")


@kopf.index("", "v1", "services", labels=OWNED)
def service_index(body: kopf.Body, **_: Any) -> dict[str, Any]:
    return _child(body, "Service")


@kopf.index("networking.k8s.io", "v1", "networkpolicies", labels=OWNED)
def policy_index(body: kopf.Body, **_: Any) -> dict[str, Any]:
    return _child(body, "NetworkPolicy")


# -- MeshModel ------------------------------------------------------------------------


@kopf.index(GROUP, VERSION, MESHMODEL_PLURAL)
def model_index(body: kopf.Body, namespace: str | None, name: str, **_: Any) -> dict[str, Any]:
    return {model_key(namespace or "", name): dict(body)}


@kopf.index(GROUP, VERSION, MESHPOOL_PLURAL)
def pool_body_index(body: kopf.Body, name: str, **_: Any) -> dict[str, Any]:
    return {name: dict(body)}


# kopf's handlers only put keys in the queue: every reconcile runs there, through
# one path, whether an object changed or its periodic look came due.


@kopf.on.resume(GROUP, VERSION, MESHMODEL_PLURAL)
@kopf.on.create(GROUP, VERSION, MESHMODEL_PLURAL)
@kopf.on.update(GROUP, VERSION, MESHMODEL_PLURAL, field="spec")
@kopf.on.delete(GROUP, VERSION, MESHMODEL_PLURAL, optional=True)
def model_changed(namespace: str | None, name: str, **_: Any) -> None:
    _trigger(MODEL_PREFIX + model_key(namespace or "", name))


@kopf.on.resume(GROUP, VERSION, MESHPOOL_PLURAL)
@kopf.on.create(GROUP, VERSION, MESHPOOL_PLURAL)
@kopf.on.update(GROUP, VERSION, MESHPOOL_PLURAL, field="spec")
def pool_changed(name: str, **kwargs: Any) -> None:
    _trigger(POOL_PREFIX + name)
    # Its models see the change at once (PoolChanged) rather than at their next look.
    for store in list(kwargs["model_index"].values()):
        body = _one(store)
        if body is not None and (body.get("spec") or {}).get("poolRef") == name:
            meta = body["metadata"]
            _trigger(MODEL_PREFIX + model_key(meta["namespace"], meta["name"]))


def _trigger(key: str) -> None:
    if _State.queue is not None:
        _State.queue.trigger(key)


def _waiting(model: str) -> None:
    """Requests started waiting for `model` at a gateway: look at it at once (it
    may be scaled to zero). Only a model kopf already put in the queue."""
    key = MODEL_PREFIX + model
    if _State.queue is not None and key in _State.queue:
        _State.queue.trigger(key)


class _Work:
    """What the queue runs for a key: one MeshModel's or one MeshPool's reconcile
    on a snapshot of the indices taken then."""

    def __init__(self, indices: Mapping[str, Any]) -> None:
        self.indices = indices

    def __call__(self, key: str) -> float | None:
        model = key.startswith(MODEL_PREFIX)
        try:
            if model:
                return self.model(key.removeprefix(MODEL_PREFIX))
            return self.pool(key.removeprefix(POOL_PREFIX))
        except Exception:
            # Counted here, logged and retried by the queue: an API write refused,
            # a bug. Reconciles that end deliberately count as ok or blocked.
            kind = "MeshModel" if model else "MeshPool"
            metrics.RECONCILES.labels(kind=kind, outcome="error").inc()
            raise

    def model(self, key: str) -> float | None:
        assert _State.models is not None
        body = _newest(self.indices["model_index"].get(key, ()))
        delay = _State.models.reconcile(key, body, _snapshot(self.indices), dt.datetime.now(dt.UTC))
        metrics.PLANNED_MODELS.set(len(self.indices["plan_index"]))
        return delay

    def pool(self, name: str) -> float | None:
        assert _State.kube is not None
        body = _one(self.indices["pool_body_index"].get(name, ()))
        if body is None:
            return None
        reconcile_pool(_State.kube, body, _snapshot(self.indices), dt.datetime.now(dt.UTC))
        return POOL_INTERVAL


@kopf.on.cleanup()
def stop_queue(**_: Any) -> None:
    if _State.demand is not None:
        _State.demand.stop()
    if _State.queue is not None:
        _State.queue.stop()
