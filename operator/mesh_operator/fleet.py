"""The fleet as a person reads it: pools, models and nodes, for `mesh status` and
`mesh doctor`.

`read_fleet` does the I/O (lists the three resources); `build_*` render it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import kubernetes
from kubernetes.client import ApiClient

from mesh_operator.api.base import (
    GROUP,
    MESHMODEL_PLURAL,
    MESHNODE_PLURAL,
    MESHPOOL_PLURAL,
    VERSION,
)
from mesh_operator.api.heartbeat import heartbeat_age, is_stale

Obj = dict[str, Any]


@dataclass
class Fleet:
    pools: list[Obj] = field(default_factory=list)
    models: list[Obj] = field(default_factory=list)
    nodes: list[Obj] = field(default_factory=list)


def read_fleet(api: ApiClient, namespace: str | None = None) -> Fleet:
    custom = kubernetes.client.CustomObjectsApi(api)
    pools = custom.list_cluster_custom_object(GROUP, VERSION, MESHPOOL_PLURAL)
    nodes = custom.list_cluster_custom_object(GROUP, VERSION, MESHNODE_PLURAL)
    if namespace:
        models = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, MESHMODEL_PLURAL)
    else:
        models = custom.list_cluster_custom_object(GROUP, VERSION, MESHMODEL_PLURAL)
    return Fleet(pools=_items(pools), models=_items(models), nodes=_items(nodes))


def _items(listing: object) -> list[Obj]:
    items = listing.get("items", []) if isinstance(listing, dict) else []
    return [i for i in items if isinstance(i, dict)]


def _cond(obj: Obj, type_: str) -> Obj:
    for cond in (obj.get("status") or {}).get("conditions", []) or []:
        if cond.get("type") == type_:
            return dict(cond)
    return {}


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def build_status_summary(fleet: Fleet, now: dt.datetime) -> dict[str, list[Obj]]:
    """The JSON form of `mesh status`."""
    models = []
    for m in fleet.models:
        status = m.get("status") or {}
        ready = _cond(m, "Ready")
        plan = status.get("plan") or {}
        models.append(
            {
                "namespace": m["metadata"]["namespace"],
                "name": m["metadata"]["name"],
                "pool": (m.get("spec") or {}).get("poolRef"),
                "ready": ready.get("status", "Unknown"),
                "reason": ready.get("reason", ""),
                "message": ready.get("message", ""),
                "nodes": status.get("nodes") or "",
                "split": status.get("split") or "",
                "predictedTokenMs": (plan.get("predictedTokenMicros") or 0) / 1000,
                "endpoint": status.get("endpoint") or "",
            }
        )
    pools = []
    for p in fleet.pools:
        status = p.get("status") or {}
        pools.append(
            {
                "name": p["metadata"]["name"],
                "backend": (p.get("spec") or {}).get("backend", "cuda"),
                "readyNodes": status.get("readyNodes", 0),
                "nodes": status.get("nodes", 0),
                "memoryFreeMiB": status.get("memoryFreeMiB", 0),
                "memoryClaimedMiB": status.get("memoryClaimedMiB", 0),
                "ready": _cond(p, "Ready").get("status", "Unknown"),
                "message": _cond(p, "Ready").get("message", ""),
            }
        )
    nodes = []
    for n in fleet.nodes:
        status = n.get("status") or {}
        age = heartbeat_age(status, now)
        devices = status.get("devices") or []
        nodes.append(
            {
                "name": n["metadata"]["name"],
                "health": (status.get("health") or {}).get("state", "Unknown"),
                "reason": (status.get("health") or {}).get("reason", ""),
                "stale": is_stale(status, now),
                "heartbeatAgeSeconds": None if age is None else round(age),
                "devices": [d.get("id") for d in devices],
                "memoryFreeMiB": sum(int(d.get("memoryFreeMiB", 0)) for d in devices),
                "memoryTotalMiB": sum(int(d.get("memoryTotalMiB", 0)) for d in devices),
            }
        )
    return {"pools": pools, "models": models, "nodes": nodes}


def build_status_table(summary: dict[str, list[Obj]]) -> str:
    pools = _table(
        ["POOL", "BACKEND", "READY", "NODES", "FREE MiB", "CLAIMED MiB"],
        [
            [p["name"], p["backend"], p["ready"], f"{p['readyNodes']}/{p['nodes']}",
             str(p["memoryFreeMiB"]), str(p["memoryClaimedMiB"])]
            for p in summary["pools"]
        ],
    )  # fmt: skip
    models = _table(
        ["NAMESPACE", "MODEL", "POOL", "READY", "REASON", "NODES", "SPLIT", "MS/TOKEN", "ENDPOINT"],
        [
            [m["namespace"], m["name"], m["pool"] or "", m["ready"], m["reason"], m["nodes"],
             m["split"], f"{m['predictedTokenMs']:.1f}" if m["predictedTokenMs"] else "",
             m["endpoint"]]
            for m in summary["models"]
        ],
    )  # fmt: skip
    nodes = _table(
        ["NODE", "HEALTH", "REASON", "HEARTBEAT", "DEVICES", "FREE/TOTAL MiB"],
        [
            [n["name"], n["health"], n["reason"],
             "stale" if n["stale"] else f"{n['heartbeatAgeSeconds']}s ago",
             ",".join(n["devices"]), f"{n['memoryFreeMiB']}/{n['memoryTotalMiB']}"]
            for n in summary["nodes"]
        ],
    )  # fmt: skip
    return f"{pools}\n\n{models}\n\n{nodes}"


@dataclass(frozen=True)
class Finding:
    level: str  # "ok", "warn" or "fail"
    what: str
    hint: str = ""


def _describe(cond: Obj) -> str:
    return f"{cond.get('reason', 'NotReconciled')} {cond.get('message', '')}".rstrip()


def _without_defaults(schema: object) -> object:
    """A schema without its `default`s: the chart may set image defaults of its own."""
    if isinstance(schema, dict):
        return {k: _without_defaults(v) for k, v in schema.items() if k != "default"}
    if isinstance(schema, list):
        return [_without_defaults(v) for v in schema]
    return schema


def _crd_findings(crds: dict[str, Obj | None], expected: dict[str, Obj]) -> list[Finding]:
    out = []
    for name, want in expected.items():
        have = crds.get(name)
        if have is None:
            out.append(
                Finding("fail", f"CRD {name} is not installed", "helm install mesh charts/mesh")
            )
            continue
        conditions = (have.get("status") or {}).get("conditions", [])
        if not any(
            c.get("type") == "Established" and c.get("status") == "True" for c in conditions
        ):
            out.append(Finding("fail", f"CRD {name} is not Established"))
        elif _without_defaults(have["spec"].get("versions")) != _without_defaults(
            want["spec"]["versions"]
        ):
            out.append(
                Finding("warn", f"CRD {name} differs from this mesh version", "helm upgrade mesh")
            )
        else:
            out.append(Finding("ok", f"CRD {name}"))
    return out


def _node_findings(nodes: list[Obj], now: dt.datetime) -> list[Finding]:
    if not nodes:
        return [
            Finding(
                "fail",
                "no MeshNode: no node agent has reported",
                "check the mesh agent DaemonSet and the pool's nodeSelector",
            )
        ]
    out = []
    for n in nodes:
        status = n.get("status") or {}
        name = n["metadata"]["name"]
        health = status.get("health") or {}
        if is_stale(status, now):
            age = heartbeat_age(status, now)
            when = "never" if age is None else f"{round(age)}s ago"
            out.append(
                Finding(
                    "fail",
                    f"MeshNode {name} is stale (last heartbeat {when})",
                    "is its agent running?",
                )
            )
        elif health.get("state") not in (None, "Healthy"):
            out.append(
                Finding("warn", f"MeshNode {name} is {health.get('state')}: {_describe(health)}")
            )
        else:
            out.append(
                Finding("ok", f"MeshNode {name}: {len(status.get('devices') or [])} device(s)")
            )
    return out


# Reasons of a model that is on its way to Ready rather than stuck.
_PROGRESSING = {"Fetching", "Loading", "WaitingForWorkers", "HostStarting"}


def build_findings(
    fleet: Fleet, crds: dict[str, Obj | None], expected: dict[str, Obj], now: dt.datetime
) -> list[Finding]:
    """What `mesh doctor` reports, from the fleet and the installed CRDs. Pure."""
    out = _crd_findings(crds, expected) + _node_findings(fleet.nodes, now)
    for p in fleet.pools:
        cond = _cond(p, "Ready")
        name = p["metadata"]["name"]
        if cond.get("status") == "True":
            out.append(Finding("ok", f"MeshPool {name}: {cond.get('message', '')}"))
        else:
            hint = "" if cond else "is the operator running?"
            out.append(Finding("fail", f"MeshPool {name}: {_describe(cond)}", hint))
    for m in fleet.models:
        cond = _cond(m, "Ready")
        name = f"{m['metadata']['namespace']}/{m['metadata']['name']}"
        if cond.get("status") == "True":
            nodes = (m.get("status") or {}).get("nodes")
            out.append(Finding("ok", f"MeshModel {name} serving on {nodes}"))
        elif cond.get("reason") in _PROGRESSING:
            out.append(Finding("warn", f"MeshModel {name}: {_describe(cond)}"))
        else:
            out.append(
                Finding(
                    "fail", f"MeshModel {name}: {_describe(cond)}", "kubectl describe meshmodel"
                )
            )
    return out
