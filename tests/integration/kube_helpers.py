"""Helpers for integration tests against the local control plane: apply objects,
wait on conditions, and write MeshNodes the way node agents do on simulated GPU
nodes (which have no agent process of their own).
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any, TypeVar

from e2e.cluster import LocalCluster

T = TypeVar("T")


# Lets a pod (or a pool's workers) onto kwok's simulated nodes.
KWOK_TOLERATION = {"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}


def apply(cluster: LocalCluster, obj: dict[str, Any]) -> None:
    cluster.kubectl(
        "apply", "--server-side", "--force-conflicts", "-f", "-", input_text=json.dumps(obj)
    )


def get(cluster: LocalCluster, *args: str) -> Any:
    out = cluster.kubectl("get", *args, "-o", "json", check=False)
    return json.loads(out) if out.strip() else None


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any] | None:
    if not obj:
        return None
    for cond in (obj.get("status") or {}).get("conditions", []) or []:
        if cond.get("type") == type_:
            return dict(cond)
    return None


def now_rfc3339(offset_seconds: float = 0.0) -> str:
    moment = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=offset_seconds)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def gpu_device(
    index: int, total_mib: int, free_mib: int, bandwidth_gbps: float, name: str
) -> dict[str, Any]:
    return {
        "id": f"CUDA{index}",
        "index": index,
        "backend": "cuda",
        "name": name,
        "uuid": f"GPU-{name.replace(' ', '-').lower()}-{index}",
        "memoryTotalMiB": total_mib,
        "memoryFreeMiB": free_mib,
        "bandwidthGBps": bandwidth_gbps,
    }


def put_meshnode(
    cluster: LocalCluster,
    name: str,
    devices: list[dict[str, Any]],
    *,
    heartbeat: str | None = None,
    interval_seconds: int = 3600,
    cached_models: list[str] | None = None,
    **status_fields: Any,
) -> None:
    """Create or update a MeshNode and its status, as the node's agent would
    (`status_fields`: more status fields, camelCase)."""
    apply(
        cluster,
        {
            "apiVersion": "mesh.dev/v1alpha1",
            "kind": "MeshNode",
            "metadata": {"name": name},
            "spec": {"nodeName": name},
        },
    )
    status = {
        "heartbeatTime": heartbeat or now_rfc3339(),
        "intervalSeconds": interval_seconds,
        "health": {"state": "Healthy", "reason": "AsExpected", "message": ""},
        "devices": devices,
        "cachedModels": [{"file": f, "sizeBytes": 1} for f in cached_models or []],
        **status_fields,
    }
    cluster.kubectl(
        "patch", "meshnode", name, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": status}),
    )  # fmt: skip


def apply_pool_and_model(
    cluster: LocalCluster,
    *,
    pool: str,
    node_selector: dict[str, str],
    namespace: str,
    model: str,
    url: str,
    context_size: int,
) -> None:
    """A cuda MeshPool on the kwok nodes `node_selector` picks, and a MeshModel from `url`."""
    apply(cluster, {
        "apiVersion": "mesh.dev/v1alpha1", "kind": "MeshPool", "metadata": {"name": pool},
        "spec": {"backend": "cuda", "nodeSelector": node_selector,
                 "tolerations": [KWOK_TOLERATION]},
    })  # fmt: skip
    apply(cluster, {
        "apiVersion": "mesh.dev/v1alpha1", "kind": "MeshModel",
        "metadata": {"name": model, "namespace": namespace},
        "spec": {"poolRef": pool, "contextSize": context_size, "source": {"url": url}},
    })  # fmt: skip
