"""Replicas: several copies of one model, each its own plan on its own nodes.

Owns the choice of nodes per replica. An RPC server serves one client at a
time, so two replicas never share a node: each replica is planned on nodes no
other replica uses. A replica already serving (`current`) is planned first, on
its own nodes only, by the single-model planner and its stability rule: it
stays as it is while it fits (moving a serving replica is the operator's call,
for the reasons it re-plans a model); one that no longer fits there is planned
as a new one. The new replicas then take the nodes left, one after the other, each the
best plan on what remains. Going first gets the best nodes, so the last
replica is the slowest. The goal is the slowest replica's predicted time per
token, so the new replicas are placed again under a bound found by bisection
between the fastest and the slowest of them: each in turn on the weakest free
nodes whose plan meets the bound, leaving the stronger ones to the replicas
still to come. A unit test compares the result with every split of small pools
among the replicas.

When fewer replicas fit than were asked for, the result is infeasible and says
how many fit, with the reason the next one did not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mesh_operator.planner.inventory import Inventory, InventoryNode
from mesh_operator.planner.placement.plan import plan_placement
from mesh_operator.planner.placement.types import CurrentPlan, PlacementRequest, PlacementResult
from mesh_operator.planner.profile import ModelProfile

_EPSILON_MS = 1e-9
# Halvings of the range between the fastest and the slowest greedy replica.
_BISECTIONS = 8


@dataclass(frozen=True)
class ReplicaPlan:
    """Plans of a model's replicas, in replica order (all of them when feasible)."""

    feasible: bool
    reason: str
    replicas: tuple[PlacementResult, ...]
    fitting: int  # how many replicas the pool holds (all asked, when feasible)
    # The replica (index in 0..count-1) each of `replicas` is for.
    slots: tuple[int, ...] = ()
    # Why the next replica did not fit (the single-model planner's reason);
    # empty when all fit.
    cause: str = ""

    @property
    def slowest_ms(self) -> float:
        return max((r.predicted_token_ms for r in self.replicas), default=0.0)


def _without(inventory: Inventory, taken: set[str]) -> Inventory:
    return Inventory(nodes=tuple(n for n in inventory.nodes if n.name not in taken))


def _only(inventory: Inventory, names: set[str]) -> Inventory:
    return Inventory(nodes=tuple(n for n in inventory.nodes if n.name in names))


def plan_replicas(
    profile: ModelProfile,
    inventory: Inventory,
    request: PlacementRequest,
    count: int,
    current: Sequence[CurrentPlan | PlacementResult | None] = (),
) -> ReplicaPlan:
    """Plan `count` replicas on disjoint nodes (see the module). Pure and deterministic."""
    if count < 1:
        raise ValueError("a model has at least one replica")
    serving = list(current[:count]) + [None] * max(0, count - len(current))
    plans: list[PlacementResult | None] = [None] * count
    held: dict[int, set[str]] = {}
    for i, cur in enumerate(serving):
        if cur is None:
            continue
        nodes = (
            set(cur.nodes) if isinstance(cur, PlacementResult) else {n for n, _, _ in cur.layout}
        )
        held[i] = nodes
    # Serving replicas first, each on its own nodes only: the single-model rules
    # keep it there while it fits; one that no longer fits is planned as new.
    for i, cur in enumerate(serving):
        kept = {n for p in plans if p is not None for n in p.nodes}
        if cur is None or held[i] & kept:
            continue
        result = plan_placement(profile, _only(inventory, held[i]), request, cur)
        if result.feasible:
            plans[i] = result
    fresh = [i for i, p in enumerate(plans) if p is None]
    for i in fresh:
        used = {n for p in plans if p is not None for n in p.nodes}
        result = plan_placement(profile, _without(inventory, used), request)
        if not result.feasible:
            fitting = sum(1 for p in plans if p is not None)
            return ReplicaPlan(
                feasible=False,
                reason=f"{fitting} of {count} replicas fit: replica {fitting + 1}: {result.reason}",
                replicas=tuple(p for p in plans if p is not None),
                fitting=fitting,
                slots=tuple(j for j, p in enumerate(plans) if p is not None),
                cause=result.reason,
            )
        plans[i] = result
    done = [p for p in plans if p is not None]
    assert len(done) == count
    _balance(_Model(profile, inventory, request), plans, fresh)
    final = tuple(p for p in plans if p is not None)
    slowest = max(final, key=lambda r: r.predicted_token_ms)
    return ReplicaPlan(
        feasible=True,
        reason=f"{count} replica(s), slowest {slowest.predicted_token_ms:.1f} ms/token predicted",
        replicas=final,
        fitting=count,
        slots=tuple(range(count)),
    )


def _strength(node: InventoryNode) -> tuple[float, float, str]:
    """How much a node offers a replica: free memory, then bandwidth (weakest first)."""
    devices = [d for d in node.devices if d.healthy]
    return (
        float(sum(d.memory_free_mib for d in devices)),
        sum(d.bandwidth_gbps for d in devices),
        node.name,
    )


@dataclass(frozen=True)
class _Model:
    """The model and the pool the replicas are planned on."""

    profile: ModelProfile
    inventory: Inventory
    request: PlacementRequest

    def plan_on(self, names: set[str]) -> PlacementResult:
        return plan_placement(self.profile, _only(self.inventory, names), self.request)


def _frugal(
    model: _Model, free: Sequence[InventoryNode], bound_ms: float
) -> PlacementResult | None:
    """A plan within `bound_ms` on the weakest of `free` that suffice, or None."""
    lo, hi = 1, len(free)
    best: PlacementResult | None = None
    while lo <= hi:
        mid = (lo + hi) // 2
        names = {n.name for n in free[:mid]}
        result = model.plan_on(names)
        if result.feasible and result.predicted_token_ms <= bound_ms + _EPSILON_MS:
            best, hi = result, mid - 1
        else:
            lo = mid + 1
    return best


def _within(
    model: _Model, taken: set[str], count: int, bound_ms: float
) -> list[PlacementResult] | None:
    """`count` plans within `bound_ms` on nodes not `taken`, each on the weakest
    nodes that meet the bound, so the stronger ones stay for the replicas to come."""
    free = sorted((n for n in model.inventory.nodes if n.name not in taken), key=_strength)
    out = []
    for _ in range(count):
        result = _frugal(model, free, bound_ms)
        if result is None:
            return None
        out.append(result)
        free = [n for n in free if n.name not in result.nodes]
    return out


def _balance(model: _Model, plans: list[PlacementResult | None], fresh: Sequence[int]) -> None:
    """Lower the slowest new replica: bisect on a bound every new replica must meet,
    placing each on the weakest free nodes that meet it."""
    if len(fresh) < 2:
        return
    taken = {n for j, p in enumerate(plans) if p is not None and j not in fresh for n in p.nodes}
    times = [_ms(plans[i]) for i in fresh]
    low, high = min(times), max(times)
    best: list[PlacementResult] | None = None
    for _ in range(_BISECTIONS):
        if high - low <= _EPSILON_MS + high * 1e-3:
            break
        middle = (low + high) / 2
        found = _within(model, taken, len(fresh), middle)
        if found is None:
            low = middle
        else:
            best = found
            high = max(r.predicted_token_ms for r in found)
    if best is None:
        return
    # The fastest of the new plans goes to the first new replica.
    for i, result in zip(fresh, sorted(best, key=lambda r: r.predicted_token_ms), strict=True):
        plans[i] = result


def _ms(plan: PlacementResult | None) -> float:
    assert plan is not None
    return plan.predicted_token_ms
