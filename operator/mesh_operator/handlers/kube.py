"""Talking to the API server: server-side apply under one field manager, deletes,
status patches, Events and Secrets. The only module that builds API requests.

Sync, for kopf's sync handlers (kopf runs them in threads).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any, cast

import kubernetes
from kubernetes.client import ApiClient, ApiException

from mesh_operator.api.base import FIELD_MANAGER, GROUP, MESHMODEL_PLURAL, MESHPOOL_PLURAL, VERSION
from mesh_operator.api.conditions import rfc3339
from mesh_operator.kubeclient import api_client

log = logging.getLogger(__name__)

Obj = dict[str, Any]


class Kube:
    """A thin client over the parts of the API mesh uses."""

    def __init__(self, api: ApiClient | None = None) -> None:
        self.api = api or api_client()
        self.core = kubernetes.client.CoreV1Api(self.api)
        self.apps = kubernetes.client.AppsV1Api(self.api)
        self.net = kubernetes.client.NetworkingV1Api(self.api)
        self.custom = kubernetes.client.CustomObjectsApi(self.api)
        # apiVersion/kind -> (patch, delete) of every namespaced kind mesh owns.
        self._namespaced: Mapping[
            tuple[str, str], tuple[Callable[..., Any], Callable[..., Any]]
        ] = {
            ("apps/v1", "DaemonSet"): (
                self.apps.patch_namespaced_daemon_set,
                self.apps.delete_namespaced_daemon_set,
            ),
            ("apps/v1", "Deployment"): (
                self.apps.patch_namespaced_deployment,
                self.apps.delete_namespaced_deployment,
            ),
            ("v1", "Service"): (
                self.core.patch_namespaced_service,
                self.core.delete_namespaced_service,
            ),
            ("networking.k8s.io/v1", "NetworkPolicy"): (
                self.net.patch_namespaced_network_policy,
                self.net.delete_namespaced_network_policy,
            ),
            # Header-reader pods are created, never applied (no patch on pods).
            ("v1", "Pod"): (
                self.core.patch_namespaced_pod,
                self.core.delete_namespaced_pod,
            ),
        }

    def apply(self, obj: Obj) -> None:
        """Server-side apply `obj` as mesh's field manager, taking over conflicts."""
        meta = obj["metadata"]
        patch, _ = self._namespaced[(obj["apiVersion"], obj["kind"])]
        _drain(
            patch(
                meta["name"],
                meta["namespace"],
                obj,
                field_manager=FIELD_MANAGER,
                force=True,
                _content_type="application/apply-patch+yaml",
                _preload_content=False,
            )
        )

    def create_pod(self, obj: Obj) -> bool:
        """Create a pod; False when one of that name exists already."""
        try:
            _drain(
                self.core.create_namespaced_pod(
                    obj["metadata"]["namespace"],
                    cast(Any, obj),  # a dict body is sent as it is
                    field_manager=FIELD_MANAGER,
                    _preload_content=False,
                )
            )
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def delete(self, api_version: str, kind: str, name: str, namespace: str) -> bool:
        """Delete one object (dependents in the background); False when already gone."""
        _, delete = self._namespaced[(api_version, kind)]
        try:
            _drain(delete(name, namespace, propagation_policy="Background", _preload_content=False))
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def force_delete_pod(self, namespace: str, name: str) -> bool:
        """Delete a pod without waiting for its kubelet (which is gone); False if absent."""
        try:
            _drain(
                self.core.delete_namespaced_pod(
                    name, namespace, grace_period_seconds=0, _preload_content=False
                )
            )
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def patch_status(
        self, api_version: str, kind: str, name: str, namespace: str | None, status: Obj
    ) -> None:
        """Merge-patch the status subresource of a mesh resource."""
        group, version = api_version.split("/")
        plural = {"MeshModel": MESHMODEL_PLURAL, "MeshPool": MESHPOOL_PLURAL}[kind]
        try:
            if namespace:
                _drain(self.custom.patch_namespaced_custom_object_status(
                    group, version, namespace, plural, name, {"status": status},
                    _content_type="application/merge-patch+json", _preload_content=False,
                ))  # fmt: skip
            else:
                _drain(self.custom.patch_cluster_custom_object_status(
                    group, version, plural, name, {"status": status},
                    _content_type="application/merge-patch+json", _preload_content=False,
                ))  # fmt: skip
        except ApiException as exc:
            if exc.status != 404:  # deleted meanwhile: nothing to report on
                raise

    def replace_model_status(self, name: str, namespace: str, uid: str, status: Obj) -> bool:
        """Set a MeshModel's whole status, only if `name` still stands for the object
        `uid` (a JSON patch whose first operation tests the uid): a decision about a
        deleted model must never land on the one made after it. False when the model
        is gone or was replaced."""
        patch: list[dict[str, Any]] = [
            {"op": "test", "path": "/metadata/uid", "value": uid},
            {"op": "add", "path": "/status", "value": status},
        ]
        try:
            _drain(self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, MESHMODEL_PLURAL, name, patch,
                _content_type="application/json-patch+json", _preload_content=False,
            ))  # fmt: skip
        except ApiException as exc:
            if exc.status in (404, 409, 422):  # gone, or the test failed: another object
                return False
            raise
        return True

    # -- specific reads -------------------------------------------------------------

    def ready_pod_ips(self, namespace: str, selector: str) -> list[str]:
        """The IPs of the running, ready pods that `selector` picks in `namespace`."""
        pods = self.core.list_namespaced_pod(namespace, label_selector=selector)
        ips = []
        for pod in pods.items:
            status = pod.status
            if status is None or status.phase != "Running" or not status.pod_ip:
                continue
            conditions = status.conditions or []
            if any(c.type == "Ready" and c.status == "True" for c in conditions):
                ips.append(str(status.pod_ip))
        return sorted(ips)

    def read_secret_value(self, namespace: str, name: str, key: str) -> str | None:
        """A Secret's value, or None when the Secret or the key does not exist."""
        try:
            secret = self.core.read_namespaced_secret(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        raw = (secret.data or {}).get(key)
        if raw is None:
            return None
        return base64.b64decode(raw).decode().strip()

    def event(
        self,
        involved: Mapping[str, Any],
        reason: str,
        message: str,
        type_: str = "Normal",
    ) -> None:
        """Record a Kubernetes Event on `involved` (a MeshModel or MeshPool body)."""
        meta = involved["metadata"]
        namespace = meta.get("namespace") or "default"
        now = rfc3339(dt.datetime.now(dt.UTC))
        body = {
            "metadata": {"generateName": f"{meta['name']}.", "namespace": namespace},
            "involvedObject": {
                "apiVersion": involved.get("apiVersion"),
                "kind": involved.get("kind"),
                "name": meta["name"],
                "namespace": meta.get("namespace"),
                "uid": meta.get("uid"),
            },
            "reason": reason,
            "message": message[:1024],
            "type": type_,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
            "source": {"component": FIELD_MANAGER},
            "reportingComponent": FIELD_MANAGER,
            "reportingInstance": os.environ.get("POD_NAME", FIELD_MANAGER),
        }
        try:
            # A plain dict is what the API takes; the typed model would only copy it.
            _drain(
                self.core.create_namespaced_event(
                    namespace,
                    body,  # type: ignore[arg-type]
                    _preload_content=False,
                )
            )
        except ApiException as exc:  # an Event is best effort: never fail a reconcile on it
            log.warning("could not record event %s on %s: %s", reason, meta["name"], exc.reason)


def _drain(response: Any) -> None:
    """Read a raw response to its end and hand its connection back to the pool.

    Unread, a `_preload_content=False` response keeps its connection, and every
    next request pays a new TLS handshake.
    """
    response.read()
    response.release_conn()


def api_message(exc: ApiException) -> str:
    """The API server's one-line message from an error response."""
    try:
        body = json.loads(exc.body or "{}")
    except (TypeError, ValueError):
        body = {}
    message = body.get("message") if isinstance(body, dict) else None
    return f"{exc.status} {message or exc.reason}"
