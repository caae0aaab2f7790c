"""kopf registrations: thin functions that gather a snapshot and call the reconcilers.

Importing this module registers the handlers with kopf's default registry. The
indices keep what the reconcilers need in memory (nodes, MeshNodes, pools, plans,
mesh's pods and children), updated by watches, so a reconcile reads no lists.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
from collections.abc import Mapping
from typing import Any, ClassVar

import kopf

from mesh_operator.api.base import (
    FINALIZER,
    GROUP,
    MESHMODEL_PLURAL,
    MESHNODE_PLURAL,
    MESHPOOL_PLURAL,
    VERSION,
)
from mesh_operator.gateway.contract import APP_NAME, MODEL_LABEL, NAME_LABEL
from mesh_operator.handlers import metrics
from mesh_operator.handlers.kube import Kube, follow_kubeconfig_env
from mesh_operator.handlers.models import ModelReconciler
from mesh_operator.handlers.pools import reconcile_pool
from mesh_operator.handlers.snapshot import (
    SPEC_HASH_ANNOTATION,
    Snapshot,
    meshnode_status,
    model_key,
    model_plan,
    node_info,
    pod_info,
    pod_model_key,
    pool_info,
)
from mesh_operator.manifests.labels import MANAGED_BY, MANAGED_BY_LABEL
from mesh_operator.manifests.workloads import PolicyPeers
from mesh_operator.source import ProfileCache

log = logging.getLogger(__name__)

MODEL_INTERVAL = float(os.environ.get("MESH_MODEL_INTERVAL", "5"))
POOL_INTERVAL = float(os.environ.get("MESH_POOL_INTERVAL", "10"))
OWNED = {NAME_LABEL: APP_NAME, MANAGED_BY_LABEL: MANAGED_BY}


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
    """Process-wide objects, created at startup."""

    kube: Kube | None = None
    models: ModelReconciler | None = None
    model_locks: ClassVar[dict[str, threading.Lock]] = {}
    # Objects kopf's own handlers have reconciled in this process. kopf runs them
    # only once its indices are filled; the resync loop waits for that too, or a
    # reconcile on half-filled indices would see a serving model's workers
    # missing and stop its host.
    resumed: ClassVar[set[str]] = set()
    guard = threading.Lock()

    @classmethod
    def lock_for(cls, key: str) -> threading.Lock:
        with cls.guard:
            return cls.model_locks.setdefault(key, threading.Lock())


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
    settings.execution.max_workers = int(os.environ.get("MESH_WORKERS", "8"))
    _State.kube = Kube()
    _State.models = ModelReconciler(_State.kube, ProfileCache(), policy_peers())
    resync = _Resync(kwargs)
    memo["resync"] = resync
    resync.thread.start()


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    follow_kubeconfig_env()
    return kopf.login_via_client(**kwargs)


def _one(store: Any) -> Any:
    for value in store:
        return value
    return None


def _snapshot(indices: Mapping[str, Any]) -> Snapshot:
    children: dict[str, dict[tuple[str, str], str]] = {}
    for idx in ("daemonset_index", "deployment_index", "service_index", "policy_index"):
        for key, store in indices[idx].items():
            for kind, name, digest in store:
                children.setdefault(key, {})[(kind, name)] = digest
    return Snapshot(
        pools={k: v for k, s in indices["pool_index"].items() if (v := _one(s)) is not None},
        nodes=[v for s in indices["node_index"].values() if (v := _one(s)) is not None],
        meshnodes={
            k: v for k, s in indices["meshnode_index"].items() if (v := _one(s)) is not None
        },
        plans={k: v for k, s in indices["plan_index"].items() if (v := _one(s)) is not None},
        pods={k: list(s) for k, s in indices["pod_index"].items()},
        children=children,
    )


# -- indices --------------------------------------------------------------------------


@kopf.index("", "v1", "nodes")
def node_index(body: kopf.Body, name: str, **_: Any) -> dict[str, Any]:
    return {name: node_info(body)}


@kopf.index(GROUP, VERSION, MESHNODE_PLURAL)
def meshnode_index(body: kopf.Body, name: str, **_: Any) -> dict[str, Any] | None:
    status = meshnode_status(body)
    return {name: status} if status is not None else None


@kopf.index(GROUP, VERSION, MESHPOOL_PLURAL)
def pool_index(body: kopf.Body, name: str, **_: Any) -> dict[str, Any] | None:
    info = pool_info(body)
    return {name: info} if info is not None else None


@kopf.index(GROUP, VERSION, MESHMODEL_PLURAL)
def plan_index(
    body: kopf.Body, namespace: str | None, name: str, **_: Any
) -> dict[str, Any] | None:
    plan = model_plan(body)
    return {model_key(namespace or "", name): plan} if plan is not None else None


@kopf.index("", "v1", "pods", labels=OWNED)
def pod_index(body: kopf.Body, **_: Any) -> dict[str, Any] | None:
    key = pod_model_key(body)
    return {key: pod_info(body)} if key else None


def _child(body: kopf.Body, kind: str) -> dict[str, Any] | None:
    meta = body.get("metadata", {})
    model = (meta.get("labels") or {}).get(MODEL_LABEL)
    if not model:
        return None
    digest = (meta.get("annotations") or {}).get(SPEC_HASH_ANNOTATION, "")
    return {model_key(meta.get("namespace", ""), model): (kind, meta.get("name", ""), digest)}


@kopf.index("apps", "v1", "daemonsets", labels=OWNED)
def daemonset_index(body: kopf.Body, **_: Any) -> dict[str, Any] | None:
    return _child(body, "DaemonSet")


@kopf.index("apps", "v1", "deployments", labels=OWNED)
def deployment_index(body: kopf.Body, **_: Any) -> dict[str, Any] | None:
    return _child(body, "Deployment")


@kopf.index("", "v1", "services", labels=OWNED)
def service_index(body: kopf.Body, **_: Any) -> dict[str, Any] | None:
    return _child(body, "Service")


@kopf.index("networking.k8s.io", "v1", "networkpolicies", labels=OWNED)
def policy_index(body: kopf.Body, **_: Any) -> dict[str, Any] | None:
    return _child(body, "NetworkPolicy")


# -- MeshModel ------------------------------------------------------------------------


@kopf.index(GROUP, VERSION, MESHMODEL_PLURAL)
def model_index(body: kopf.Body, namespace: str | None, name: str, **_: Any) -> dict[str, Any]:
    return {model_key(namespace or "", name): dict(body)}


@kopf.index(GROUP, VERSION, MESHPOOL_PLURAL)
def pool_body_index(body: kopf.Body, name: str, **_: Any) -> dict[str, Any]:
    return {name: dict(body)}


def _reconcile_model(body: Mapping[str, Any], indices: Mapping[str, Any]) -> None:
    assert _State.models is not None
    key = model_key(body["metadata"]["namespace"], body["metadata"]["name"])
    with _State.lock_for(key):
        _State.models.reconcile(body, _snapshot(indices), dt.datetime.now(dt.UTC))


@kopf.on.resume(GROUP, VERSION, MESHMODEL_PLURAL)
@kopf.on.create(GROUP, VERSION, MESHMODEL_PLURAL)
@kopf.on.update(GROUP, VERSION, MESHMODEL_PLURAL, field="spec")
def model_changed(body: kopf.Body, **kwargs: Any) -> None:
    _State.resumed.add(model_key(body["metadata"]["namespace"], body["metadata"]["name"]))
    _reconcile_model(body, kwargs)


@kopf.on.delete(GROUP, VERSION, MESHMODEL_PLURAL, optional=True)
def model_deleted(namespace: str | None, name: str, **_: Any) -> None:
    # Children go with the model through their ownerReferences; only the
    # in-memory claim on the pool's memory is ours to drop.
    if _State.models is not None:
        _State.models.forget(namespace or "", name)


# -- MeshPool ---------------------------------------------------------------------------


def _reconcile_pool(body: Mapping[str, Any], indices: Mapping[str, Any]) -> None:
    assert _State.kube is not None
    reconcile_pool(_State.kube, body, _snapshot(indices), dt.datetime.now(dt.UTC))


@kopf.on.resume(GROUP, VERSION, MESHPOOL_PLURAL)
@kopf.on.create(GROUP, VERSION, MESHPOOL_PLURAL)
@kopf.on.update(GROUP, VERSION, MESHPOOL_PLURAL, field="spec")
def pool_changed(body: kopf.Body, **kwargs: Any) -> None:
    _State.resumed.add(f"pool/{body['metadata']['name']}")
    _reconcile_pool(body, kwargs)


# -- periodic resync -------------------------------------------------------------------
#
# Level-based reconciliation also needs to run when nothing about the model itself
# changed (a node went stale, a worker died). kopf's per-object timers would do it,
# but kopf guards every object with a timer by a finalizer, and a finalizer makes
# deletion hang whenever the operator is down. One loop over the indices instead.


class _Resync:
    def __init__(self, indices: Mapping[str, Any]) -> None:
        self.indices = indices
        self.stop = threading.Event()
        self.not_before: dict[str, float] = {}
        self.thread = threading.Thread(target=self.run, name="mesh-resync", daemon=True)

    def run(self) -> None:
        # Let the indices fill before the first pass (a missing pool would be
        # reported as absent otherwise).
        next_pools = time.monotonic() + POOL_INTERVAL
        if self.stop.wait(MODEL_INTERVAL):
            return
        while not self.stop.is_set():
            started = time.monotonic()
            self.models_once()
            if started >= next_pools:
                self.pools_once()
                next_pools = started + POOL_INTERVAL
            self.stop.wait(max(0.1, MODEL_INTERVAL - (time.monotonic() - started)))

    def models_once(self) -> None:
        bodies = [b for s in list(self.indices["model_index"].values()) if (b := _one(s))]
        now = time.monotonic()
        for body in bodies:
            if self.stop.is_set():
                return
            if body["metadata"].get("deletionTimestamp"):
                continue
            key = model_key(body["metadata"]["namespace"], body["metadata"]["name"])
            if key not in _State.resumed or self.not_before.get(key, 0.0) > now:
                continue
            try:
                _reconcile_model(body, self.indices)
                self.not_before.pop(key, None)
            except kopf.TemporaryError as exc:
                self.not_before[key] = time.monotonic() + (exc.delay or MODEL_INTERVAL)
            except Exception:  # one bad model must not stop the loop for the others
                log.exception("reconcile of MeshModel %s failed", key)
                self.not_before[key] = time.monotonic() + 30
        metrics.PLANNED_MODELS.set(len(self.indices["plan_index"]))

    def pools_once(self) -> None:
        for store in list(self.indices["pool_body_index"].values()):
            body = _one(store)
            if body is None or f"pool/{body['metadata']['name']}" not in _State.resumed:
                continue
            try:
                _reconcile_pool(body, self.indices)
            except Exception:
                log.exception("reconcile of MeshPool %s failed", body["metadata"]["name"])


@kopf.on.cleanup()
def stop_resync(memo: kopf.Memo, **_: Any) -> None:
    resync = memo.get("resync")
    if isinstance(resync, _Resync):
        resync.stop.set()
        resync.thread.join(timeout=30)
