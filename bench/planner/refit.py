"""The suite's plans under a changed time model (`--compare-round-trips K`).

Owns the check that a refit of the time model costs no pair a slower plan:
every model of the suite on every pool is planned twice, once with K round
trips per remote device and token (the constant before the refit) and once
with today's constants, and both plans are judged by today's time model. A pair
whose new plan is slower than the old plan so judged would mean the search
missed a plan it could have kept.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from bench.planner.scenarios import build_pools
from bench.planner.suite import REQUEST, load_models
from mesh_operator.planner import PlacementResult, evaluate_layout, parse_inventory, plan_placement
from mesh_operator.planner.timing import CostModel

EPSILON_MS = 1e-6


@dataclass(frozen=True)
class RefitRow:
    model: str
    pool: str
    old: PlacementResult  # planned with the old constant, judged by today's model
    new: PlacementResult

    @property
    def slower(self) -> bool:
        return self.new.predicted_token_ms > self.old.predicted_token_ms + EPSILON_MS

    @property
    def faster(self) -> bool:
        return self.new.predicted_token_ms < self.old.predicted_token_ms - EPSILON_MS


def run_refit(old_round_trips: float) -> list[RefitRow]:
    with tempfile.TemporaryDirectory(prefix="mesh-bench-") as tmp:
        models = load_models(Path(tmp))
    old_request = replace(REQUEST, cost=CostModel(round_trips_per_device=old_round_trips))
    rows = []
    for pool in build_pools():
        inventory = parse_inventory(pool.inventory, source=pool.name)
        for name, profile in models.items():
            before = plan_placement(profile, inventory, old_request)
            if not before.feasible:
                continue
            layout = [(d.node, d.device, d.layers) for d in before.devices]
            judged = evaluate_layout(profile, inventory, layout, REQUEST, before.host_node)
            after = plan_placement(profile, inventory, REQUEST)
            rows.append(RefitRow(name, pool.name, judged, after))
    return rows


def _shape(plan: PlacementResult) -> tuple[object, ...]:
    return (plan.host_node, *((d.node, d.device, d.layers) for d in plan.devices))


def format_refit(rows: list[RefitRow], old_round_trips: float) -> str:
    today = CostModel().round_trips_per_device
    slower = [r for r in rows if r.slower]
    faster = [r for r in rows if r.faster]
    changed = [r for r in rows if _shape(r.old) != _shape(r.new)]
    lines = [
        f"{len(rows)} pairs placed with {old_round_trips:g} round trips per remote device; "
        f"planned again with {today:g}, both judged by today's time model:",
        f"  new plan slower: {len(slower)}, faster: {len(faster)}, "
        f"same time: {len(rows) - len(slower) - len(faster)} ({len(changed)} plans changed)",
    ]
    for r in slower[:10]:
        lines.append(
            f"  slower: {r.model} on {r.pool}: {r.old.predicted_token_ms:.2f} -> "
            f"{r.new.predicted_token_ms:.2f} ms/token"
        )
    if faster:
        gain = max(faster, key=lambda r: r.old.predicted_token_ms / r.new.predicted_token_ms)
        lines.append(
            f"  largest gain: {gain.model} on {gain.pool}: {gain.old.predicted_token_ms:.2f} -> "
            f"{gain.new.predicted_token_ms:.2f} ms/token"
        )
    return "\n".join(lines)
