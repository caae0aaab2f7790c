"""The planner's entry points: plan a model on a pool, or time a given layout.

`plan_placement` searches (`search`), falls back on a host's RAM when nothing
fits in VRAM (`ram_tier`), and given the plan a model is served with,
keeps it while it still fits with the stability margin unless the search finds
one that `ranking._better` prefers. `evaluate_layout` estimates and times a
layout without searching.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace

from mesh_operator.planner.inventory import Inventory
from mesh_operator.planner.memory import MIB
from mesh_operator.planner.placement.explain import _describe, _explain, _overflow
from mesh_operator.planner.placement.problem import (
    _cached_nodes,
    _Candidate,
    _Device,
    _finish,
    _pool,
    _Problem,
)
from mesh_operator.planner.placement.ram_tier import _TierSearch, ram_tier_plan, tier_profile
from mesh_operator.planner.placement.ranking import _better
from mesh_operator.planner.placement.search import _search
from mesh_operator.planner.placement.types import (
    MAX_RPC_SERVERS,
    CurrentPlan,
    HostTier,
    Layout,
    PlacementRequest,
    PlacementResult,
)
from mesh_operator.planner.profile import ModelProfile
from mesh_operator.planner.tensor_split import split_for_layers


def _result(
    problem: _Problem, candidate: _Candidate, reason: str, kept: bool = False
) -> PlacementResult:
    devices = candidate.devices
    return PlacementResult(
        feasible=True,
        reason=reason,
        strategy=problem.request.strategy,
        devices=devices,
        tensor_split=tuple(split_for_layers([d.n_layers for d in devices])),
        rpc=candidate.nodes,
        host_node=candidate.host,
        predicted_token_ms=candidate.total_ms,
        bottleneck_ms=candidate.bottleneck_ms,
        host_memory_bytes=candidate.host_bytes,
        kept_current=kept,
        n_device_layers=problem.n,
        host_tier=candidate.tier,
    )


def _layout_candidate(
    problem: _Problem,
    *,
    pool: Sequence[_Device],
    layout: Layout,
    host: str | None,
    cached: frozenset[str],
    slack: float = 1.0,
    held_mib: Mapping[tuple[str, str], int] | None = None,
) -> _Candidate | None:
    index = {(d.node, d.id): d for d in pool}
    order: list[_Device] = []
    for node_name, device_id, _ in layout:
        found = index.get((node_name, device_id))
        if found is None:
            return None
        order.append(found)
    ranges = [(int(r[0]), int(r[1])) for _, _, r in layout]
    expected = 0
    for first, last in ranges:
        if first != expected or last <= first:
            return None
        expected = last
    if expected != problem.n or len({d.node for d in order}) > MAX_RPC_SERVERS:
        return None
    seen: set[str] = set()
    previous = ""
    for d in order:
        if d.node != previous and d.node in seen:
            return None  # a node's devices must be contiguous: one RPC server each
        seen.add(d.node)
        previous = d.node
    return _finish(
        problem,
        order=order,
        ranges=ranges,
        host=host,
        cached=cached,
        slack=slack,
        held_mib=held_mib,
    )


def _tier_key(tier: HostTier | None) -> tuple[str, int, int] | None:
    return None if tier is None else (tier.node, tier.moe_layers, tier.cpu_layers)


def _kept(
    problem: _Problem,
    inventory: Inventory,
    pool: Sequence[_Device],
    cached: frozenset[str],
    current: CurrentPlan,
    *,
    slack: float,
) -> _Candidate | None:
    """The plan a model is served with, if it still fits with the stability margin
    (its RAM tier too, on the same host)."""
    held = dict(current.held_mib) if current.held_mib else None
    if current.tier is None:
        return _layout_candidate(
            problem,
            pool=pool,
            layout=current.layout,
            host=current.host_node,
            cached=cached,
            slack=slack,
            held_mib=held,
        )
    node, moe, cpu = current.tier
    host = inventory.node(node)
    if host is None or not host.healthy or node != current.host_node:
        return None
    devices_see = _Problem(tier_profile(problem.profile, moe, cpu), problem.request)
    layout = [(n, d, (int(r[0]) - cpu, int(r[1]) - cpu)) for n, d, r in current.layout]
    found = _layout_candidate(
        devices_see,
        pool=pool,
        layout=layout,
        host=node,
        cached=cached,
        slack=slack,
        held_mib=held,
    )
    if found is None or found.host != node:
        return None
    search = _TierSearch(problem.profile, inventory, problem.request, pool, cached)
    return search.attach(found, host, moe, cpu, slack)


def evaluate_layout(
    profile: ModelProfile,
    inventory: Inventory,
    layout: Layout,
    request: PlacementRequest | None = None,
    host_node: str | None = None,
) -> PlacementResult:
    """Estimate and time a given layout (e.g. a baseline's split); no search.

    The result is infeasible (with the devices still filled in, when they exist)
    if a device's estimate exceeds its free memory minus the reserve.
    """
    request = request or PlacementRequest()
    request.validate()
    problem = _Problem(profile, request)
    pool = _pool(inventory, request)
    cached = _cached_nodes(inventory, problem.model_file)
    candidate = _layout_candidate(problem, pool=pool, layout=layout, host=host_node, cached=cached)
    if candidate is not None:
        return _result(problem, candidate, _describe(candidate))
    # Report what does not fit, with the capacity check relaxed to show the numbers.
    relaxed = [replace(d, capacity=1 << 62) for d in pool]
    loose = _layout_candidate(problem, pool=relaxed, layout=layout, host=host_node, cached=cached)
    if loose is None:
        return PlacementResult(
            feasible=False,
            reason="layout names unknown or unhealthy devices, or its layers do not tile the model",
            strategy=request.strategy,
            n_device_layers=problem.n,
        )
    capacity = {(d.node, d.id): d.capacity for d in pool}
    budget = problem.range_bytes(len(loose.devices) > 1)
    needs = {
        (d.node, d.device): max(d.total_bytes, budget(d.first_layer, d.last_layer))
        for d in loose.devices
    }
    over = [d for d in loose.devices if needs[(d.node, d.device)] > capacity[(d.node, d.device)]]
    worst = over[0]
    key = (worst.node, worst.device)
    devices = tuple(replace(d, capacity_bytes=capacity[(d.node, d.device)]) for d in loose.devices)
    return replace(
        _result(problem, replace(loose, devices=devices), ""),
        feasible=False,
        reason=_overflow(worst, capacity[key], request, needs[key]),
    )


def plan_placement(
    profile: ModelProfile,
    inventory: Inventory,
    request: PlacementRequest | None = None,
    current: CurrentPlan | PlacementResult | None = None,
) -> PlacementResult:
    """Choose devices, order, split and host for a model. Pure and deterministic."""
    request = request or PlacementRequest()
    request.validate()
    problem = _Problem(profile, request)
    pool = _pool(inventory, request)
    cached = _cached_nodes(inventory, problem.model_file)
    if isinstance(current, PlacementResult):
        current = (
            CurrentPlan(
                tuple(current.layout()),
                current.host_node,
                tuple(
                    ((d.node, d.device), math.ceil(d.total_bytes / MIB)) for d in current.devices
                ),
                _tier_key(current.host_tier),
            )
            if current.feasible
            else None
        )
    if current is not None and current.layout:
        margin = 1 - request.stability_percent / 100
        kept = _kept(problem, inventory, pool, cached, current, slack=1 / margin)
        if kept is not None:
            margin_pool = _pool(inventory, request, margin)
            challenger = _search(problem, margin_pool, cached)
            if challenger is None and kept.tier is not None:
                challenger = ram_tier_plan(profile, inventory, request, margin_pool, cached)
            if challenger is None or not _better(challenger, kept, request):
                return _result(
                    problem, kept, "kept the current plan: " + _describe(kept), kept=True
                )
            if challenger.tier is None:
                fitted = _layout_candidate(
                    problem,
                    pool=pool,
                    layout=[(d.node, d.device, d.layers) for d in challenger.devices],
                    host=challenger.host,
                    cached=cached,
                )
                if fitted is not None:
                    return _result(problem, fitted, _describe(fitted))
    best = _search(problem, pool, cached)
    if best is None:
        # Only when nothing fits in VRAM: part of the model in a host's RAM.
        tiered = ram_tier_plan(profile, inventory, request, pool, cached)
        if tiered is not None:
            return _result(problem, tiered, _describe(tiered))
        return PlacementResult(
            feasible=False,
            reason=_explain(problem, pool, request, inventory),
            strategy=request.strategy,
            n_device_layers=problem.n,
        )
    return _result(problem, best, _describe(best))
