"""Which llama.cpp RPC servers run on this node: found from the pods the operator
made for them (label `app.kubernetes.io/component=rpc-server`), so the agent
follows models as they are planned onto and off its node.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from kubernetes import client

from mesh_agent.rpc_liveness import RpcTarget
from mesh_operator.api.contract import (
    DEFAULT_RPC_PORT,
    MODEL_LABEL,
    RPC_COMPONENT,
    RPC_PORT_NAME,
    owned_selector,
)

# The labels the operator's own builders put on its worker pods.
RPC_SELECTOR = owned_selector(RPC_COMPONENT)


def target_of(pod: Mapping[str, Any]) -> RpcTarget | None:
    """The RPC endpoint of one running rpc-server pod, or None if it has none yet."""
    status = pod.get("status") or {}
    ip = status.get("podIP")
    if not ip or status.get("phase") != "Running":
        return None
    meta = pod.get("metadata") or {}
    model = (meta.get("labels") or {}).get(MODEL_LABEL, "")
    port = DEFAULT_RPC_PORT
    for container in (pod.get("spec") or {}).get("containers", []) or []:
        for p in container.get("ports", []) or []:
            if p.get("name") == RPC_PORT_NAME and p.get("containerPort"):
                port = int(p["containerPort"])
    return RpcTarget(
        model=f"{meta.get('namespace', '')}/{model}" if model else "", host=ip, port=port
    )


def get_json(
    api: client.ApiClient, path: str, query: Sequence[tuple[str, str | int]]
) -> dict[str, Any]:
    """A raw GET of the API server (blocking: call off the loop).

    Raw rather than through `CoreV1Api` or `CustomObjectsApi`: importing the
    generated APIs and their models would cost the agent about 20 MB of memory on
    every node.
    """
    method, url, headers, body, post = api.param_serialize(
        method="GET",
        resource_path=path,
        query_params=list(query),
        header_params={"Accept": "application/json"},
        auth_settings=["BearerToken"],
    )
    response = api.call_api(method, url, headers, body, post, _request_timeout=10)
    response.read()  # type: ignore[no-untyped-call]
    if not 200 <= response.status < 300:
        raise client.ApiException(http_resp=response)
    found: dict[str, Any] = json.loads(response.data or b"{}")
    return found


def discover_rpc_targets(api: client.ApiClient, node_name: str) -> tuple[RpcTarget, ...]:
    """RPC servers of mesh's worker pods bound to `node_name` (blocking: call off-loop)."""
    query = [("labelSelector", RPC_SELECTOR), ("fieldSelector", f"spec.nodeName={node_name}")]
    pods = get_json(api, "/api/v1/pods", query).get("items", [])
    found = [t for t in (target_of(p) for p in pods) if t is not None]
    return tuple(sorted(found, key=lambda t: (t.model, t.host, t.port)))
