"""The planner's sentences: what a plan is, and why there is none.

`_describe` is the reason of a feasible plan (nodes, devices, host, what sits in
RAM, predicted time); `_explain` says why no plan fits the pool, in VRAM and in
RAM; `_overflow` names the device
of a given layout that does not fit.
"""

from __future__ import annotations

from collections.abc import Sequence

from mesh_operator.planner.inventory import Inventory
from mesh_operator.planner.memory import MIB
from mesh_operator.planner.placement.problem import _Candidate, _Device, _Problem
from mesh_operator.planner.placement.types import MAX_DEVICES, DevicePlacement, PlacementRequest

_GIB = 1 << 30


def _gib(n: float) -> str:
    return f"{n / _GIB:.1f} GiB"


def _explain(
    problem: _Problem,
    pool: Sequence[_Device],
    request: PlacementRequest,
    inventory: Inventory | None = None,
) -> str:
    """Why nothing fits: VRAM, then (with the inventory) the RAM tier."""
    vram = _explain_vram(problem, pool, request)
    if inventory is None:
        return vram
    return f"VRAM: {vram}; {_explain_ram(inventory)}"


def _explain_ram(inventory: Inventory) -> str:
    offered = sorted(
        ((n.host_memory_free_mib, n.name) for n in inventory.nodes if n.healthy),
        reverse=True,
    )
    offered = [(mib, name) for mib, name in offered if mib > 0]
    if not offered:
        return "RAM: no node offers RAM for layers or experts (hostMemoryFreeMiB)"
    total = sum(mib for mib, _ in offered) * MIB
    mib, name = offered[0]
    nodes = f"{len(offered)} node{'s' * (len(offered) > 1)}"
    return (
        f"RAM: {_gib(total)} on {nodes} (largest {_gib(mib * MIB)} on {name}), "
        f"not enough with any host's RAM holding experts or layers"
    )


def _explain_vram(problem: _Problem, pool: Sequence[_Device], request: PlacementRequest) -> str:
    usable = [d for d in pool if d.capacity > 0]
    need = problem.mem_prefix[-1] + problem.compute_single
    reserve = f"{request.reserve_percent:g}% reserve"
    if not usable:
        return (
            f"needs {_gib(need)}; the pool has no healthy device with free memory "
            f"after the {reserve}"
        )
    usable.sort(key=lambda d: -d.capacity)
    top = usable[:MAX_DEVICES]
    avail = sum(d.capacity for d in top)
    largest = usable[0].capacity
    summary = (
        f"pool has {_gib(sum(d.capacity for d in usable))} free after the {reserve} in "
        f"{len(usable)} device{'s' * (len(usable) > 1)} (largest {_gib(largest)})"
    )
    if avail < need:
        return f"needs {_gib(need)} across <={MAX_DEVICES} devices; {summary}"
    if problem.largest_layer + problem.compute_multi > largest:
        return (
            f"needs {_gib(need)}; {summary}, but its largest layer with a compute buffer "
            f"needs {_gib(problem.largest_layer + problem.compute_multi)}"
        )
    return (
        f"needs {_gib(need)} plus {_gib(problem.compute_multi)} of compute buffer per device; "
        f"{summary}, and no split of {problem.n} layers over <={MAX_DEVICES} devices fits"
    )


def _describe(candidate: _Candidate) -> str:
    nodes = ", ".join(candidate.nodes)
    count = len(candidate.devices)
    ram = ""
    tier = candidate.tier
    if tier is not None:
        parts = []
        if tier.cpu_layers:
            parts.append(f"layers 0-{tier.cpu_layers - 1}")
        experts = tier.moe_layers - tier.cpu_layers
        if experts > 0:
            parts.append(f"experts of {experts} layer{'s' * (experts > 1)}")
        size = tier.total_bytes
        shown = _gib(size) if size >= _GIB else f"{size / MIB:.0f} MiB"
        ram = f", {' and '.join(parts)} in RAM on {tier.node} ({shown})"
    return (
        f"{len(candidate.nodes)} node{'s' * (len(candidate.nodes) > 1)} ({nodes}), "
        f"{count} device{'s' * (count > 1)}, host on {candidate.host}{ram}, "
        f"{candidate.total_ms:.1f} ms/token predicted"
    )


def _overflow(
    device: DevicePlacement, capacity: int, request: PlacementRequest, needs: int | None = None
) -> str:
    """Why a layout does not fit: its first device over its budget (`needs`: what
    placement budgets for it, when more than its estimate)."""
    return (
        f"{device.node}/{device.device} needs {_gib(needs or device.total_bytes)}, has "
        f"{_gib(max(0, capacity))} after the {request.reserve_percent:g}% reserve"
    )
