"""The fleet as a person reads it: pools, nodes and models, for `mesh status`.

`read_fleet` does the I/O (lists the three resources and the Kubernetes Nodes);
`build_status_report` turns what it read into a `StatusReport` (pure), whose JSON
form is `mesh status --output json` and whose JSON Schema is documented in
docs/status.md; `build_status_table` renders the same report for a terminal.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import kubernetes
from kubernetes.client import ApiClient
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from mesh_operator.api.base import (
    GROUP,
    MESHMODEL_PLURAL,
    MESHNODE_PLURAL,
    MESHPOOL_PLURAL,
    VERSION,
)
from mesh_operator.api.heartbeat import heartbeat_age, is_stale
from mesh_operator.ledger import selects
from mesh_operator.usage import GatewayUsage, Tokens

Obj = dict[str, Any]

# Bumped when a field changes meaning or goes away; new fields keep it.
SCHEMA_VERSION = 1
USAGE_SOURCE = "gateway pods' /metrics through the API server's pod proxy"


@dataclass
class Fleet:
    """What `mesh status` and `mesh doctor` read: the API's objects as dicts."""

    pools: list[Obj] = field(default_factory=list)
    models: list[Obj] = field(default_factory=list)
    meshnodes: list[Obj] = field(default_factory=list)
    # Kubernetes Nodes: name -> labels (which pools a node is in).
    nodes: dict[str, dict[str, str]] = field(default_factory=dict)


def read_fleet(api: ApiClient, namespace: str | None = None) -> Fleet:
    """List MeshPools, MeshNodes, Nodes and the MeshModels (of `namespace`, or all)."""
    custom = kubernetes.client.CustomObjectsApi(api)
    pools = custom.list_cluster_custom_object(GROUP, VERSION, MESHPOOL_PLURAL)
    meshnodes = custom.list_cluster_custom_object(GROUP, VERSION, MESHNODE_PLURAL)
    if namespace:
        models = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, MESHMODEL_PLURAL)
    else:
        models = custom.list_cluster_custom_object(GROUP, VERSION, MESHMODEL_PLURAL)
    nodes: Any = kubernetes.client.CoreV1Api(api).list_node()
    return Fleet(
        pools=_items(pools),
        models=_items(models),
        meshnodes=_items(meshnodes),
        nodes={n.metadata.name: dict(n.metadata.labels or {}) for n in nodes.items},
    )


def _items(listing: object) -> list[Obj]:
    items = listing.get("items", []) if isinstance(listing, dict) else []
    return sorted(
        (i for i in items if isinstance(i, dict)),
        key=lambda i: (i["metadata"].get("namespace", ""), i["metadata"]["name"]),
    )


def condition(obj: Mapping[str, Any], type_: str) -> Obj:
    """The condition of that type in the object's status, or {}."""
    for cond in (obj.get("status") or {}).get("conditions", []) or []:
        if cond.get("type") == type_:
            return dict(cond)
    return {}


def pool_nodes(pool: Mapping[str, Any], nodes: Mapping[str, Mapping[str, str]]) -> list[str]:
    """The Kubernetes Nodes the pool's nodeSelector picks, by name."""
    selector = (pool.get("spec") or {}).get("nodeSelector") or {}
    return sorted(name for name, labels in nodes.items() if selects(selector, labels))


def model_claims(model: Mapping[str, Any]) -> dict[tuple[str, str], int]:
    """MiB the model's current plans (every replica's) hold, per (node, device)."""
    status = model.get("status") or {}
    plans = [status.get("plan") or {}, *(status.get("replicaPlans") or [])]
    out: dict[tuple[str, str], int] = {}
    for d in (d for plan in plans for d in plan.get("devices") or []):
        key = (str(d.get("node")), str(d.get("device")))
        out[key] = out.get(key, 0) + int(d.get("totalMiB", 0))
    return out


# -- the report ---------------------------------------------------------------------


class _Report(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class PoolReport(_Report):
    name: str
    backend: str
    ready: str = Field(description="The pool's Ready condition: True, False or Unknown.")
    reason: str
    message: str
    nodes: list[str] = Field(description="Kubernetes Nodes the pool's nodeSelector picks.")
    ready_nodes: int = Field(description="Nodes with a fresh, healthy MeshNode (the operator's).")
    devices: int
    memory_total_mib: int = Field(alias="memoryTotalMiB")
    memory_free_mib: int = Field(alias="memoryFreeMiB")
    memory_claimed_mib: int = Field(
        alias="memoryClaimedMiB", description="What the models' current plans hold."
    )


class DeviceReport(_Report):
    id: str
    backend: str
    name: str
    memory_total_mib: int = Field(alias="memoryTotalMiB")
    memory_free_mib: int = Field(alias="memoryFreeMiB")
    memory_used_by_mesh_mib: int = Field(alias="memoryUsedByMeshMiB")
    memory_used_by_others_mib: int = Field(alias="memoryUsedByOthersMiB")
    utilization_percent: int | None = Field(description="As the agent last read it; null: unknown.")
    health: str


class NodeReport(_Report):
    name: str
    pools: list[str]
    agent: Literal["reporting", "stale", "missing"] = Field(
        description="missing: no MeshNode; stale: no heartbeat for 3 of its intervals."
    )
    health: str
    reason: str
    message: str
    heartbeat_time: str | None
    heartbeat_age_seconds: int | None
    agent_version: str | None
    devices: list[DeviceReport]
    memory_total_mib: int = Field(alias="memoryTotalMiB")
    memory_free_mib: int = Field(alias="memoryFreeMiB")


class PlannedDeviceReport(_Report):
    node: str
    device: str
    layers: list[int] = Field(description="[first, lastExclusive]")
    total_mib: int = Field(alias="totalMiB")


class PlanReport(_Report):
    nodes: list[str] = Field(description="Planned nodes in --rpc order.")
    host_node: str | None
    tensor_split: list[int]
    devices: list[PlannedDeviceReport]
    predicted_ms_per_token: float | None


class ReplicasReport(_Report):
    desired: int = Field(description="Replicas wanted (MeshModel spec.replicas).")
    ready: int = Field(description="Replicas whose host answers /health.")


class VersionMismatchReport(_Report):
    llama_server: str
    rpc_servers: list[str]
    nodes: list[str]
    worker_version: str | None


class ModelReport(_Report):
    namespace: str
    name: str
    pool: str
    ready: str = Field(description="The model's Ready condition: True, False or Unknown.")
    reason: str
    message: str
    endpoint: str | None
    served_names: list[str]
    plan: PlanReport | None
    replicas: ReplicasReport
    memory_claimed_mib: int = Field(alias="memoryClaimedMiB")
    version_mismatch: VersionMismatchReport | None


class TokenUsageReport(_Report):
    name: str = Field(
        description="The model (namespace/name), the API key's name (- without keys) or the node."
    )
    prompt_tokens: float = Field(
        description="Summed over the gateway replicas; a node's is its share of the "
        "layers of each model it serves, so it may be a fraction."
    )
    completion_tokens: float


class UsageReport(_Report):
    available: bool = Field(description="False: no gateway answered; the lists are empty.")
    source: str = Field(description="Where the counts come from.")
    gateways: int = Field(description="Running gateway pods found.")
    gateways_read: int = Field(description="Of those, the ones whose metrics were read.")
    problems: list[str] = Field(description="What could not be read, and why.")
    models: list[TokenUsageReport]
    keys: list[TokenUsageReport]
    nodes: list[TokenUsageReport]


class StatusReport(_Report):
    schema_version: Literal[1] = Field(alias="schemaVersion")
    time: str = Field(description="When it was read, RFC 3339 UTC.")
    pools: list[PoolReport]
    nodes: list[NodeReport]
    models: list[ModelReport]
    usage: UsageReport = Field(
        description="Tokens per model, API key and node, from the gateways' counters "
        "(since each gateway replica started)."
    )


def status_schema() -> dict[str, Any]:
    """The JSON Schema (2020-12) of `mesh status --output json`; docs/status.md
    shows it and a test keeps the two equal."""
    schema = _untitled(StatusReport.model_json_schema(by_alias=True, mode="serialization"))
    assert isinstance(schema, dict)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "mesh status --output json",
        **schema,
    }


def _untitled(schema: object) -> object:
    """pydantic's schema without the titles it derives from field names."""
    if isinstance(schema, dict):
        return {
            k: _untitled(v) for k, v in schema.items() if not (k == "title" and isinstance(v, str))
        }
    if isinstance(schema, list):
        return [_untitled(v) for v in schema]
    return schema


def _pool_report(pool: Obj, nodes: Mapping[str, Mapping[str, str]]) -> PoolReport:
    status = pool.get("status") or {}
    ready = condition(pool, "Ready")
    return PoolReport(
        name=pool["metadata"]["name"],
        backend=(pool.get("spec") or {}).get("backend", "cuda"),
        ready=ready.get("status", "Unknown"),
        reason=ready.get("reason", ""),
        message=ready.get("message", ""),
        nodes=pool_nodes(pool, nodes),
        ready_nodes=int(status.get("readyNodes", 0)),
        devices=int(status.get("devices", 0)),
        memory_total_mib=int(status.get("memoryTotalMiB", 0)),
        memory_free_mib=int(status.get("memoryFreeMiB", 0)),
        memory_claimed_mib=int(status.get("memoryClaimedMiB", 0)),
    )


def _device_report(d: Mapping[str, Any]) -> DeviceReport:
    return DeviceReport(
        id=str(d.get("id", "")),
        backend=str(d.get("backend", "")),
        name=str(d.get("name", "")),
        memory_total_mib=int(d.get("memoryTotalMiB", 0)),
        memory_free_mib=int(d.get("memoryFreeMiB", 0)),
        memory_used_by_mesh_mib=int(d.get("memoryUsedByMeshMiB", 0)),
        memory_used_by_others_mib=int(d.get("memoryUsedByOthersMiB", 0)),
        utilization_percent=d.get("utilizationPercent"),
        health=str((d.get("health") or {}).get("state", "Healthy")),
    )


def _node_report(name: str, meshnode: Obj | None, pools: list[str], now: dt.datetime) -> NodeReport:
    status = (meshnode or {}).get("status") or {}
    health = status.get("health") or {}
    age = heartbeat_age(status, now) if meshnode else None
    devices = [_device_report(d) for d in status.get("devices") or []]
    agent: Literal["reporting", "stale", "missing"] = (
        "missing" if meshnode is None else "stale" if is_stale(status, now) else "reporting"
    )
    return NodeReport(
        name=name,
        pools=pools,
        agent=agent,
        health=health.get("state", "Unknown") if meshnode else "Unknown",
        reason=health.get("reason", ""),
        message=health.get("message", ""),
        heartbeat_time=status.get("heartbeatTime"),
        heartbeat_age_seconds=None if age is None else round(age),
        agent_version=status.get("agentVersion"),
        devices=devices,
        memory_total_mib=sum(d.memory_total_mib for d in devices),
        memory_free_mib=sum(d.memory_free_mib for d in devices),
    )


def _plan_report(plan: Mapping[str, Any]) -> PlanReport:
    micros = plan.get("predictedTokenMicros")
    return PlanReport(
        nodes=list(plan.get("rpc") or []),
        host_node=plan.get("hostNode"),
        tensor_split=[int(x) for x in plan.get("tensorSplit") or []],
        devices=[
            PlannedDeviceReport(
                node=str(d.get("node")),
                device=str(d.get("device")),
                layers=list(d.get("layers") or []),
                total_mib=int(d.get("totalMiB", 0)),
            )
            for d in plan.get("devices") or []
        ],
        predicted_ms_per_token=None if micros is None else round(micros / 1000, 2),
    )


def _model_report(model: Obj) -> ModelReport:
    status = model.get("status") or {}
    ready = condition(model, "Ready")
    plan = status.get("plan")
    mismatch = status.get("versionMismatch")
    return ModelReport(
        namespace=model["metadata"]["namespace"],
        name=model["metadata"]["name"],
        pool=str((model.get("spec") or {}).get("poolRef", "")),
        ready=ready.get("status", "Unknown"),
        reason=ready.get("reason", ""),
        message=ready.get("message", ""),
        endpoint=status.get("endpoint"),
        served_names=list(status.get("servedNames") or []),
        plan=_plan_report(plan) if plan else None,
        replicas=_replicas_report(model, ready),
        memory_claimed_mib=sum(model_claims(model).values()),
        version_mismatch=(
            VersionMismatchReport(
                llama_server=str(mismatch.get("llamaServer", "")),
                rpc_servers=list(mismatch.get("rpcServers") or []),
                nodes=list(mismatch.get("nodes") or []),
                worker_version=mismatch.get("workerVersion"),
            )
            if mismatch
            else None
        ),
    )


def _replicas_report(model: Obj, ready: Mapping[str, Any]) -> ReplicasReport:
    desired = int((model.get("spec") or {}).get("replicas") or 1)
    count = (model.get("status") or {}).get("readyReplicas")
    if count is None:  # written by an operator before replicas: its one host
        count = 1 if ready.get("status") == "True" else 0
    return ReplicasReport(desired=desired, ready=int(count))


def _usage_rows(table: Mapping[str, Tokens]) -> list[TokenUsageReport]:
    return [
        TokenUsageReport(
            name=name,
            prompt_tokens=round(t.prompt, 3),
            completion_tokens=round(t.completion, 3),
        )
        for name, t in sorted(table.items())
    ]


def usage_report(usage: GatewayUsage | None) -> UsageReport:
    """The usage part of the report; `None`: the gateways were not read."""
    read = usage or GatewayUsage(problems=["the gateways were not read"])
    return UsageReport(
        available=read.available,
        source=USAGE_SOURCE,
        gateways=read.gateways,
        gateways_read=read.read,
        problems=list(read.problems),
        models=_usage_rows(read.models),
        keys=_usage_rows(read.keys),
        nodes=_usage_rows(read.nodes),
    )


def build_status_report(
    fleet: Fleet, now: dt.datetime, usage: GatewayUsage | None = None
) -> StatusReport:
    """The whole fleet, as `mesh status` shows it. Pure.

    Nodes are every Node some pool picks, and every node with a MeshNode; usage
    is what `usage.read_gateway_usage` read (None: not read).
    """
    pools = [_pool_report(p, fleet.nodes) for p in fleet.pools]
    member_of: dict[str, list[str]] = {}
    for p in pools:
        for n in p.nodes:
            member_of.setdefault(n, []).append(p.name)
    by_name = {m["metadata"]["name"]: m for m in fleet.meshnodes}
    names = sorted(set(member_of) | set(by_name))
    return StatusReport(
        schema_version=SCHEMA_VERSION,
        time=now.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        pools=pools,
        nodes=[_node_report(n, by_name.get(n), member_of.get(n, []), now) for n in names],
        models=[_model_report(m) for m in fleet.models],
        usage=usage_report(usage),
    )


# -- the table ----------------------------------------------------------------------


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    lines = [headers, *rows]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def _age(seconds: int | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def build_status_table(report: StatusReport) -> str:
    """The report as three tables: pools, nodes (one line per device), models."""
    pools = _table(
        ["POOL", "BACKEND", "READY", "NODES", "DEVICES", "FREE MiB", "CLAIMED MiB", "TOTAL MiB"],
        [
            [p.name, p.backend, p.ready if p.ready == "True" else f"{p.ready} {p.reason}",
             f"{p.ready_nodes}/{len(p.nodes)}", str(p.devices), str(p.memory_free_mib),
             str(p.memory_claimed_mib), str(p.memory_total_mib)]
            for p in report.pools
        ],
    )  # fmt: skip
    node_rows: list[list[str]] = []
    for n in report.nodes:
        beat = "missing" if n.agent == "missing" else _age(n.heartbeat_age_seconds)
        if n.agent == "stale":
            beat += " (stale)"
        health = n.health if n.health in ("Healthy", "Unknown") else f"{n.health} {n.reason}"
        first = [n.name, ",".join(n.pools) or "-", health, beat]
        if not n.devices:
            node_rows.append([*first, "-", "", ""])
        for i, d in enumerate(n.devices):
            util = "" if d.utilization_percent is None else f"{d.utilization_percent}%"
            node_rows.append(
                [*(first if i == 0 else ["", "", "", ""]),
                 f"{d.id} {d.name}".strip(), f"{d.memory_free_mib}/{d.memory_total_mib}",
                 f"{d.memory_used_by_mesh_mib} {util}".strip()]
            )  # fmt: skip
    nodes = _table(
        ["NODE", "POOLS", "HEALTH", "HEARTBEAT", "DEVICE", "FREE/TOTAL MiB", "MESH MiB UTIL"],
        node_rows,
    )
    model_rows = []
    for m in report.models:
        plan = m.plan
        ms = "" if plan is None or plan.predicted_ms_per_token is None else (
            f"{plan.predicted_ms_per_token:.1f}"
        )  # fmt: skip
        ready = m.ready if m.ready == "True" else f"{m.ready} {m.reason}".strip()
        model_rows.append(
            [f"{m.namespace}/{m.name}", m.pool, ready,
             ",".join(plan.nodes) if plan else "-",
             ",".join(str(x) for x in plan.tensor_split) if plan else "-",
             (plan.host_node or "") if plan else "", ms,
             f"{m.replicas.ready}/{m.replicas.desired}", str(m.memory_claimed_mib)]
        )  # fmt: skip
    models = _table(
        ["MODEL", "POOL", "READY", "NODES", "SPLIT", "HOST", "MS/TOKEN", "REPLICAS", "MiB"],
        model_rows,
    )
    notes = [
        f"{m.namespace}/{m.name}: {m.message}"
        for m in report.models
        if m.ready != "True" and m.message
    ]
    if not report.pools:
        pools = "no MeshPool"
    if not node_rows:
        nodes = "no node in a pool, no MeshNode"
    if not model_rows:
        models = "no MeshModel"
    out = f"{pools}\n\n{nodes}\n\n{models}"
    if notes:
        out += "\n\n" + "\n".join(notes)
    return f"{out}\n\n{_usage_table(report.usage)}"


def _tokens(value: float, exact: bool) -> str:
    return str(round(value)) if exact else f"{value:.1f}"


def _usage_table(usage: UsageReport) -> str:
    """Tokens by model, key and node, with where they come from; or why not."""
    if not usage.available:
        why = "; ".join(usage.problems) or "no gateway answered"
        return f"usage unavailable: {why}"
    rows = [
        [by, row.name, _tokens(row.prompt_tokens, by != "node"),
         _tokens(row.completion_tokens, by != "node")]
        for by, rows_of in (("model", usage.models), ("key", usage.keys), ("node", usage.nodes))
        for row in rows_of
    ]  # fmt: skip
    head = (
        f"usage: tokens counted by {usage.gateways_read} of {usage.gateways} gateway "
        "replicas since they started"
    )
    if usage.problems:
        head += "\n" + "\n".join(f"  {p}" for p in usage.problems)
    if not rows:
        return f"{head}\nno tokens counted yet"
    return head + "\n" + _table(["USAGE BY", "NAME", "PROMPT TOKENS", "COMPLETION TOKENS"], rows)
