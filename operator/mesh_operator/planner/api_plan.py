"""Conversion between the planner's result and the plan stored in MeshModel status.

Owns the rounding: the API keeps integers only (MiB rounded up, microseconds per
token), and a stored plan comes back as the `CurrentPlan` the stability rule
compares new plans against.
"""

from __future__ import annotations

import math

from mesh_operator.api.meshmodel import Plan, PlannedDevice, PlannedHostTier
from mesh_operator.planner.memory import MIB
from mesh_operator.planner.placement import (
    CurrentPlan,
    DevicePlacement,
    HostTier,
    PlacementResult,
)


def mib_ceil(n_bytes: int) -> int:
    return math.ceil(n_bytes / MIB)


def planned_device(d: DevicePlacement) -> PlannedDevice:
    """One planned device as MeshModel status (and `mesh plan`) shows it."""
    return PlannedDevice(
        node=d.node,
        device=d.device,
        layers=[d.first_layer, d.last_layer],
        weights_mib=mib_ceil(d.weights_bytes),
        kv_mib=mib_ceil(d.kv_bytes),
        compute_mib=mib_ceil(d.compute_bytes),
        total_mib=mib_ceil(d.total_bytes),
    )


def planned_host_tier(tier: HostTier | None) -> PlannedHostTier | None:
    """What sits in the host's RAM, as MeshModel status shows it."""
    if tier is None:
        return None
    return PlannedHostTier(
        node=tier.node,
        moe_layers=tier.moe_layers,
        cpu_layers=tier.cpu_layers,
        memory_mib=mib_ceil(tier.total_bytes),
        device=tier.device,
    )


def to_api_plan(result: PlacementResult) -> Plan:
    """The plan as MeshModel status stores it (an infeasible one keeps its reason)."""
    if not result.feasible:
        return Plan(strategy=result.strategy, reason=result.reason)
    return Plan(
        devices=[planned_device(d) for d in result.devices],
        host_tier=planned_host_tier(result.host_tier),
        tensor_split=list(result.tensor_split),
        rpc=list(result.rpc),
        host_node=result.host_node,
        predicted_token_us=round(result.predicted_token_ms * 1000),
        strategy=result.strategy,
        reason=result.reason,
    )


def current_plan_from_api(plan: Plan | None) -> CurrentPlan | None:
    """The stored plan as the input of the stability rule, or None if empty.

    A tier the host runs on its own node's device (`hostUsesOwnNode`) is that
    device again, first in the layout: the planner plans and keeps plans without
    it, and the transform applies after."""
    if plan is None or not (plan.devices or plan.host_tier):
        return None
    layout = tuple((d.node, d.device, (d.layers[0], d.layers[1])) for d in plan.devices)
    held = tuple(((d.node, d.device), d.total_mib) for d in plan.devices)
    tier = plan.host_tier
    if tier is not None and tier.device is not None:
        own = (tier.node, tier.device)
        layout = ((*own, (0, tier.cpu_layers)), *layout)
        held = ((own, tier.memory_mib), *held)
        tier = None
    if not layout:
        return None
    return CurrentPlan(
        layout=layout,
        host_node=plan.host_node,
        held_mib=held,
        tier=(tier.node, tier.moe_layers, tier.cpu_layers) if tier else None,
    )
