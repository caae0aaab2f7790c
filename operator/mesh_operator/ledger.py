"""The pool's memory ledger: what each device can still take, and who holds what.

Pure. A device's capacity for a new plan is its total memory (capped by the pool)
minus what other models' current plans claim on it, minus what processes that are
not mesh's use; the planner then holds back the pool's reserve. Free memory as the device reports
it is not enough: two models planned at the same moment would both see the same
free memory. In `exclusive` pools a device claimed by another model is not
offered at all. The same holds for a node's system RAM (the RAM tier): what the
agent offers (`hostMemoryFreeMiB`) less other models' RAM-tier claims.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from pydantic import Field

from mesh_operator.api.heartbeat import is_stale
from mesh_operator.api.meshmodel import Plan
from mesh_operator.api.meshnode import Backend, MeshNodeStatus
from mesh_operator.api.meshpool import MeshPoolSpec, NodeLedger
from mesh_operator.api.roundtrip import node_round_trips
from mesh_operator.planner.inventory import Inventory, InventoryDevice, InventoryNode


@dataclass(frozen=True)
class NodeInfo:
    """What the operator knows of a Kubernetes Node."""

    name: str
    labels: Mapping[str, str]
    ready: bool = True
    unschedulable: bool = False
    # Round trip to the rest of the pool, declared on the Node (RTT_ANNOTATION):
    # it overrides the round trips the agents measure.
    rtt_ms: float | None = None


@dataclass(frozen=True)
class DeviceCapacity:
    node: str
    device: str
    backend: Backend
    total_mib: int
    capacity_mib: int
    claimed_mib: int
    bandwidth_gbps: float


@dataclass(frozen=True)
class NodeCapacity:
    name: str
    fresh: bool
    healthy: bool
    devices: tuple[DeviceCapacity, ...]
    cached_models: tuple[str, ...] = ()
    rtt_ms: float | None = None  # unknown: the planner assumes a LAN round trip
    problem: str = ""
    # System RAM a plan may still put layers or experts in, after other models'
    # RAM-tier claims, and its bandwidth.
    host_memory_mib: int = 0
    host_bandwidth_gbps: float = 0.0

    @property
    def usable(self) -> bool:
        return self.fresh and self.healthy


@dataclass
class PoolView:
    """The pool as one model's planner sees it."""

    nodes: list[NodeCapacity] = field(default_factory=list)

    def usable_nodes(self) -> list[NodeCapacity]:
        return [n for n in self.nodes if n.usable]

    def by_name(self) -> dict[str, NodeCapacity]:
        return {n.name: n for n in self.nodes}


def selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def pool_members(pool: MeshPoolSpec, nodes: Iterable[NodeInfo]) -> list[NodeInfo]:
    return sorted((n for n in nodes if selects(pool.node_selector, n.labels)), key=lambda n: n.name)


class ModelClaim(Plan):
    """What a model of several replicas holds in its pool: every replica's devices
    (`devices`), and the replicas' plans, whose RAM tiers and draft models the
    ledger counts one by one (the model's own fields hold none). Made by
    `planning.combined_claim`; never written to the API."""

    replicas: list[Plan] = Field(default_factory=list)


def claim_parts(claims: Mapping[str, Plan]) -> list[Plan]:
    """The plans that hold memory: a model's, or each of its replicas'."""
    return [
        part
        for plan in claims.values()
        for part in (plan.replicas if isinstance(plan, ModelClaim) else [plan])
    ]


def claims_by_device(claims: Mapping[str, Plan]) -> dict[tuple[str, str], int]:
    """MiB claimed per (node, device) by the given plans."""
    out: dict[tuple[str, str], int] = {}
    for plan in claim_parts(claims):
        for dev in plan.devices:
            key = (dev.node, dev.device)
            out[key] = out.get(key, 0) + dev.total_mib
        if plan.draft is not None:
            # A draft runs in its host's RAM: on a CPU-only node, its CPU device.
            key = (plan.draft.node, "CPU")
            out[key] = out.get(key, 0) + plan.draft.memory_mib
        own = plan.own_node_tier()
        if own is not None and own.device is not None:
            # Layers the host runs on its own node's device: that device's memory.
            key = (own.node, own.device)
            out[key] = out.get(key, 0) + own.memory_mib
    return out


def claims_by_host(claims: Mapping[str, Plan]) -> dict[str, int]:
    """RAM claimed per node by the given plans: RAM tiers and draft models (a tier
    on the host's own device is that device's, `claims_by_device`)."""
    out: dict[str, int] = {}
    for plan in claim_parts(claims):
        if plan.host_tier is not None and plan.host_tier.device is None:
            node = plan.host_tier.node
            out[node] = out.get(node, 0) + plan.host_tier.memory_mib
        if plan.draft is not None:
            out[plan.draft.node] = out.get(plan.draft.node, 0) + plan.draft.memory_mib
    return out


def build_pool_view(
    pool: MeshPoolSpec,
    nodes: Iterable[NodeInfo],
    meshnodes: Mapping[str, MeshNodeStatus],
    other_claims: Mapping[str, Plan],
    now: dt.datetime,
    *,
    only: Iterable[str] | None = None,
) -> PoolView:
    """Capacity of every device of the pool (or of the `only` nodes) for a plan,
    with `other_claims` held."""
    claimed = claims_by_device(other_claims)
    claimed_ram = claims_by_host(other_claims)
    view = PoolView()
    keep = set(only) if only is not None else None
    members = pool_members(pool, nodes)
    # Measured among the pool's own nodes (the peers a plan can pair it with),
    # by agents still reporting.
    reporting = {
        n.name: s for n in members if (s := meshnodes.get(n.name)) and not is_stale(s, now)
    }
    measured = node_round_trips(reporting, reporting)
    for node in members:
        if keep is not None and node.name not in keep:
            continue
        status = meshnodes.get(node.name)
        if status is None:
            view.nodes.append(
                NodeCapacity(node.name, False, False, (), problem="no MeshNode (agent not running)")
            )
            continue
        fresh = not is_stale(status, now)
        healthy = status.health.state != "Unhealthy" and node.ready and not node.unschedulable
        problem = ""
        if not fresh:
            problem = f"heartbeat stale (last {status.heartbeat_time or 'never'})"
        elif not healthy:
            problem = (
                f"{status.health.reason}: {status.health.message}".rstrip(": ")
                if status.health.state == "Unhealthy"
                else "node not ready or cordoned"
            )
        devices = []
        for dev in status.devices:
            held = claimed.get((node.name, dev.id), 0)
            available = dev.memory_total_mib - held - dev.memory_used_by_others_mib
            total = dev.memory_total_mib
            if pool.device_memory_cap_mib is not None:
                # The cap bounds what the pool plans on the device; what others
                # use counts only against the memory beyond the cap.
                total = min(total, pool.device_memory_cap_mib)
                available = min(available, total - held)
            if dev.health.state == "Unhealthy" or (pool.sharing == "exclusive" and held > 0):
                capacity = 0
            else:
                capacity = max(0, available)
            devices.append(
                DeviceCapacity(
                    node=node.name,
                    device=dev.id,
                    backend=dev.backend,
                    total_mib=total,
                    capacity_mib=capacity,
                    claimed_mib=held,
                    bandwidth_gbps=dev.bandwidth_gbps,
                )
            )
        view.nodes.append(
            NodeCapacity(
                name=node.name,
                fresh=fresh,
                healthy=healthy,
                devices=tuple(devices),
                cached_models=tuple(
                    sorted(c.file.rsplit("/", 1)[-1] for c in status.cached_models)
                ),
                rtt_ms=node.rtt_ms if node.rtt_ms is not None else measured.get(node.name),
                problem=problem,
                host_memory_mib=_host_memory(pool, status, claimed_ram.get(node.name, 0)),
                host_bandwidth_gbps=status.host_memory_bandwidth_gbps,
            )
        )
    return view


def _host_memory(pool: MeshPoolSpec, status: MeshNodeStatus, held: int) -> int:
    """RAM left for a plan's tier on a node: what the agent offers less other plans'."""
    if pool.sharing == "exclusive" and held > 0:
        return 0
    return max(0, status.host_memory_free_mib - held)


def plan_problems(plan: Plan, view: PoolView) -> list[str]:
    """Why a current plan can no longer be served as is (empty when it can)."""
    problems = []
    nodes = view.by_name()
    for node_name in plan.layer_nodes():
        node = nodes.get(node_name)
        if node is None:
            problems.append(f"{node_name}: left the pool")
        elif not node.usable:
            problems.append(f"{node_name}: {node.problem}")
    return problems


def build_ledger_rows(
    view_all: PoolView, meshnodes: Mapping[str, MeshNodeStatus]
) -> list[NodeLedger]:
    """Per-node totals for the MeshPool status (view built with every model's claims)."""
    rows = []
    for node in view_all.nodes:
        status = meshnodes.get(node.name)
        # A pool's device cap bounds the total; the free memory the agent reports
        # is bounded by it as well, or a capped node would show more free than total.
        totals = {d.device: d.total_mib for d in node.devices}
        free = (
            sum(min(d.memory_free_mib, totals.get(d.id, d.memory_free_mib)) for d in status.devices)
            if status
            else 0
        )
        rows.append(
            NodeLedger(
                node=node.name,
                devices=len(node.devices),
                memory_total_mib=sum(d.total_mib for d in node.devices),
                memory_free_mib=free,
                memory_claimed_mib=sum(d.claimed_mib for d in node.devices),
                healthy=node.healthy,
                stale=not node.fresh,
            )
        )
    return rows


def to_inventory(view: PoolView, *, only: Iterable[str] | None = None) -> Inventory:
    """The planner's inventory: usable nodes, free memory as the ledger computes it."""
    keep = set(only) if only is not None else None
    nodes = tuple(
        _inventory_node(node) for node in view.usable_nodes() if keep is None or node.name in keep
    )
    return Inventory.model_construct(nodes=nodes)


@functools.lru_cache(maxsize=8192)
def _inventory_node(node: NodeCapacity) -> InventoryNode:
    # Built without validation (`model_construct`) and cached by value: the
    # values come from validated MeshNodes and the ledger keeps free <= total, and
    # on a pool of hundreds of nodes building them again for every plan would
    # cost more than planning.
    devices = tuple(
        InventoryDevice.model_construct(
            id=d.device,
            backend=d.backend,
            memory_total_mib=d.total_mib,
            memory_free_mib=min(d.total_mib, d.capacity_mib),
            bandwidth_gbps=d.bandwidth_gbps,
            healthy=d.capacity_mib > 0,
        )
        for d in node.devices
    )
    return InventoryNode.model_construct(
        name=node.name,
        rtt_ms=node.rtt_ms,
        cached_models=node.cached_models,
        healthy=True,
        devices=devices,
        host_memory_free_mib=node.host_memory_mib,
        host_memory_bandwidth_gbps=node.host_bandwidth_gbps,
    )


# A serving model looks for a clearly better plan (fewer nodes, faster) when some
# device's capacity has grown by a step since it last looked: smaller changes of
# free memory are noise, and planning is not free.
CONSOLIDATE_STEP_MIB = 1024

Capacity = dict[tuple[str, str], int]


def capacity_steps(view: PoolView) -> Capacity:
    """Usable devices and their capacity in coarse steps (what consolidation watches)."""
    return {
        (d.node, d.device): d.capacity_mib // CONSOLIDATE_STEP_MIB
        for n in view.usable_nodes()
        for d in n.devices
    }


def capacity_grew(before: Capacity | None, now: Capacity) -> bool:
    """Whether a device appeared or gained a step: only more room can make a
    better plan possible; other models taking memory never does."""
    if before is None:
        return False
    return any(step > before.get(key, -1) for key, step in now.items())
