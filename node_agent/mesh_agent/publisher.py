"""Writes this node's MeshNode to the API server: the agent's only API writes.

Server-side apply under the agent's own field manager: once on the object (which
creates it and sets `spec.nodeName`), then every cycle on the status subresource.
A field another manager has taken (a person's `kubectl apply --server-side`, an
old agent) answers 409: the agent logs who holds it and applies again with
`force`, since it is the authority on its own node's inventory. A MeshNode deleted
under a running agent is created again. Every call is blocking: the agent calls
`publish` from a worker thread. Failures are raised as `PublishError` with a kind
the agent's backoff and logs use.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from mesh_agent.report import build_object_body, build_status_body
from mesh_operator.api.base import GROUP, MESHNODE_PLURAL, VERSION
from mesh_operator.api.meshnode import MeshNodeStatus
from mesh_operator.kubeclient import unreachable_reason

log = logging.getLogger(__name__)

# Not the operator's manager: the operator writes status conditions of the same
# object, and one manager applying without them would delete them.
AGENT_FIELD_MANAGER = "mesh-agent"
APPLY = "application/apply-patch+yaml"


class PublishError(Exception):
    """The MeshNode could not be written; `kind` names why, for logs and metrics."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _conflict_managers(exc: ApiException) -> str:
    try:
        details = json.loads(exc.body or "{}").get("details", {})
        causes = details.get("causes", [])
        return "; ".join(str(c.get("message", "")) for c in causes) or str(exc.reason)
    except (ValueError, AttributeError):
        return str(exc.reason)


def classify(exc: BaseException) -> PublishError:
    """Turn what the client raised into a `PublishError` kind."""
    if isinstance(exc, ApiException):
        kinds = {
            401: "unauthorized",
            403: "forbidden",
            404: "notfound",
            409: "conflict",
            422: "invalid",
            429: "throttled",
        }
        kind = kinds.get(exc.status or 0, "server" if (exc.status or 0) >= 500 else "rejected")
        return PublishError(kind, f"HTTP {exc.status} {exc.reason}: {_short_body(exc)}")
    if isinstance(exc, urllib3.exceptions.HTTPError | OSError):
        return PublishError(
            "unreachable", f"API server unreachable: {unreachable_reason(exc)}"[:300]
        )
    return PublishError("error", f"{type(exc).__name__}: {exc}")


def _short_body(exc: ApiException) -> str:
    try:
        message = json.loads(exc.body or "{}").get("message", "")
    except ValueError:
        message = ""
    return str(message or exc.body or "")[:300]


class MeshNodePublisher:
    """Applies one node's MeshNode and its status."""

    def __init__(
        self,
        api: client.ApiClient,
        node_name: str,
        *,
        field_manager: str = AGENT_FIELD_MANAGER,
        request_timeout: tuple[float, float] = (3.0, 10.0),
    ) -> None:
        self._api = client.CustomObjectsApi(api)
        self._node = node_name
        self._manager = field_manager
        self._timeout = request_timeout
        self._object_applied = False
        self.forced_conflicts = 0

    def _apply_object(self) -> None:
        self._api.patch_cluster_custom_object(
            GROUP,
            VERSION,
            MESHNODE_PLURAL,
            self._node,
            build_object_body(self._node),
            field_manager=self._manager,
            force=True,
            _content_type=APPLY,
            _request_timeout=self._timeout,
        )
        self._object_applied = True

    def _apply_status(self, body: dict[str, Any], force: bool) -> None:
        self._api.patch_cluster_custom_object_status(
            GROUP,
            VERSION,
            MESHNODE_PLURAL,
            self._node,
            body,
            field_manager=self._manager,
            force=force,
            _content_type=APPLY,
            _request_timeout=self._timeout,
        )

    def publish(self, status: MeshNodeStatus) -> None:
        """Apply the status (creating the MeshNode first if needed); raise PublishError."""
        body = build_status_body(self._node, status)
        try:
            if not self._object_applied:
                self._apply_object()
            try:
                self._apply_status(body, force=False)
            except ApiException as exc:
                if exc.status == 404:
                    # Deleted under us: create it again, then write the status.
                    self._object_applied = False
                    self._apply_object()
                    self._apply_status(body, force=False)
                elif exc.status == 409:
                    log.warning(
                        "status fields held by another manager (%s); taking them back",
                        _conflict_managers(exc),
                    )
                    self.forced_conflicts += 1
                    self._apply_status(body, force=True)
                else:
                    raise
        except PublishError:
            raise
        except Exception as exc:  # every client failure becomes a PublishError
            raise classify(exc) from exc
