"""The simulated node's Node object and its Lease in kube-node-lease.

Test infrastructure. Registration creates the Node with labels, capacity,
addresses, node info and a Ready condition (or refreshes them when it exists);
then the Lease is renewed every `lease_renew_seconds` (10 s, a quarter of its
40 s duration, as the kubelet does) and the Ready condition re-asserted every
minute, or at once when the node lifecycle controller has set it to Unknown
(after a restart of this node, for instance). When the process dies, nothing
renews the Lease: the real controller-manager marks the node NotReady after its
node-monitor-grace-period, then taints and evicts, exactly as for a lost node.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import platform
import uuid
from typing import Any

from e2e.cluster import K8S_VERSION
from e2e.nodesim.config import NodeConfig
from e2e.nodesim.kubeapi import ApiError, KubeClient, path_of

Obj = dict[str, Any]
log = logging.getLogger("nodesim.heartbeat")

LEASE_NAMESPACE = "kube-node-lease"
STATUS_REPORT_SECONDS = 60.0
BOOT_ID = str(uuid.uuid4())
ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _rfc3339(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _micro(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def build_labels(cfg: NodeConfig) -> dict[str, str]:
    return {
        "kubernetes.io/hostname": cfg.name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": ARCH,
        "beta.kubernetes.io/os": "linux",
        "beta.kubernetes.io/arch": ARCH,
        **cfg.labels,
    }


def build_conditions(previous: list[Obj]) -> list[Obj]:
    """The node's conditions, all healthy; a transition time moves only on a flip."""
    now = _rfc3339(_now())
    old = {c.get("type"): c for c in previous}

    def since(kind: str, status: str) -> str:
        before = old.get(kind)
        if before and before.get("status") == status and before.get("lastTransitionTime"):
            return str(before["lastTransitionTime"])
        return now

    healthy = [
        ("MemoryPressure", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
        ("DiskPressure", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
        ("PIDPressure", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
    ]
    conditions = [
        {
            "type": kind,
            "status": "False",
            "reason": reason,
            "message": message,
            "lastHeartbeatTime": now,
            "lastTransitionTime": since(kind, "False"),
        }
        for kind, reason, message in healthy
    ]
    conditions.append(
        {
            "type": "Ready",
            "status": "True",
            "reason": "KubeletReady",
            "message": "simulated kubelet is posting ready status",
            "lastHeartbeatTime": now,
            "lastTransitionTime": since("Ready", "True"),
        }
    )
    return conditions


def build_status(cfg: NodeConfig, previous: list[Obj]) -> Obj:
    capacity = {
        "cpu": cfg.cpu,
        "memory": cfg.memory,
        "pods": str(cfg.pods),
        "ephemeral-storage": "100Gi",
    }
    return {
        "capacity": capacity,
        "allocatable": dict(capacity),
        "addresses": [
            {"type": "InternalIP", "address": cfg.address},
            {"type": "Hostname", "address": cfg.name},
        ],
        "conditions": build_conditions(previous),
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
        "nodeInfo": {
            "machineID": uuid.uuid5(uuid.NAMESPACE_DNS, cfg.name).hex,
            "systemUUID": str(uuid.uuid5(uuid.NAMESPACE_DNS, cfg.name)),
            "bootID": BOOT_ID,
            "kernelVersion": platform.release(),
            "osImage": "mesh node simulator",
            "containerRuntimeVersion": "nodesim://0.1",
            "kubeletVersion": K8S_VERSION,
            "kubeProxyVersion": K8S_VERSION,
            "operatingSystem": "linux",
            "architecture": ARCH,
        },
    }


def build_node(cfg: NodeConfig) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": cfg.name,
            "labels": build_labels(cfg),
            "annotations": {"node.alpha.kubernetes.io/ttl": "0"},
        },
        "spec": {"taints": list(cfg.taints)} if cfg.taints else {},
        "status": build_status(cfg, []),
    }


async def register(client: KubeClient, cfg: NodeConfig) -> Obj:
    """Create the Node, or bring an existing one up to date and Ready."""
    node_path = path_of("nodes", cfg.name)
    try:
        return await client.create(path_of("nodes"), build_node(cfg))
    except ApiError as exc:
        if exc.status != 409:
            raise
    node = await client.merge_patch(node_path, {"metadata": {"labels": build_labels(cfg)}})
    return await report_status(client, cfg, node)


async def report_status(client: KubeClient, cfg: NodeConfig, node: Obj | None) -> Obj:
    previous = ((node or {}).get("status") or {}).get("conditions") or []
    return await client.merge_patch(
        path_of("nodes", cfg.name, subresource="status"),
        {"status": build_status(cfg, previous)},
    )


def _lease(cfg: NodeConfig, node_uid: str) -> Obj:
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": cfg.name,
            "namespace": LEASE_NAMESPACE,
            "ownerReferences": [
                {"apiVersion": "v1", "kind": "Node", "name": cfg.name, "uid": node_uid}
            ],
        },
        "spec": {
            "holderIdentity": cfg.name,
            "leaseDurationSeconds": cfg.lease_duration_seconds,
            "renewTime": _micro(_now()),
        },
    }


async def renew_lease(client: KubeClient, cfg: NodeConfig, node_uid: str) -> None:
    path = path_of("leases", cfg.name, namespace=LEASE_NAMESPACE, group="coordination.k8s.io")
    current = await client.get_or_none(path)
    if current is None:
        await client.create(
            path_of("leases", namespace=LEASE_NAMESPACE, group="coordination.k8s.io"),
            _lease(cfg, node_uid),
        )
        return
    current["spec"]["holderIdentity"] = cfg.name
    current["spec"]["leaseDurationSeconds"] = cfg.lease_duration_seconds
    current["spec"]["renewTime"] = _micro(_now())
    await client.replace(path, current)


def _ready(node: Obj | None) -> bool:
    for cond in ((node or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return bool(cond.get("status") == "True")
    return False


async def keep_alive(client: KubeClient, cfg: NodeConfig, node_uid: str) -> None:
    """Renew the Lease and keep the Ready condition true, forever."""
    last_report = asyncio.get_running_loop().time()
    while True:
        try:
            await renew_lease(client, cfg, node_uid)
            node = await client.get_or_none(path_of("nodes", cfg.name))
            if node is None:
                node = await register(client, cfg)
                node_uid = node["metadata"]["uid"]
                last_report = asyncio.get_running_loop().time()
            elif (
                not _ready(node)
                or asyncio.get_running_loop().time() - last_report > STATUS_REPORT_SECONDS
            ):
                await report_status(client, cfg, node)
                last_report = asyncio.get_running_loop().time()
            delay = cfg.lease_renew_seconds
        except (ApiError, OSError, TimeoutError) as exc:
            log.warning("heartbeat of %s failed: %s", cfg.name, exc)
            delay = 1.0
        except Exception as exc:
            log.warning("heartbeat of %s failed: %r", cfg.name, exc)
            delay = 1.0
        await asyncio.sleep(delay)
