"""The suite again with system RAM offered on every node (`--ram-tier GIB`).

Owns the RAM tier's figures: every model of the suite on every pool, planned
once as the suite plans it and once with `hostMemoryFreeMiB` set on every node.
A pair that fits in VRAM must keep exactly its plan (the tier is only a
fallback); the pairs that fit only with RAM are counted with what sits in RAM
and their predicted time.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.planner.scenarios import build_pools
from bench.planner.suite import REQUEST, load_models
from mesh_operator.planner import PlacementResult, parse_inventory, plan_placement


@dataclass(frozen=True)
class TierRow:
    model: str
    pool: str
    without: PlacementResult
    with_ram: PlacementResult


def run_ram_tier(ram_gib: int) -> list[TierRow]:
    with tempfile.TemporaryDirectory(prefix="mesh-bench-") as tmp:
        models = load_models(Path(tmp))
    rows = []
    for pool in build_pools():
        plain = parse_inventory(pool.inventory, source=pool.name)
        offered = copy.deepcopy(pool.inventory)
        for node in offered["nodes"]:
            node["hostMemoryFreeMiB"] = ram_gib * 1024
        tiered = parse_inventory(offered, source=pool.name)
        for name, profile in models.items():
            rows.append(
                TierRow(
                    model=name,
                    pool=pool.name,
                    without=plan_placement(profile, plain, REQUEST),
                    with_ram=plan_placement(profile, tiered, REQUEST),
                )
            )
    return rows


def _same(a: PlacementResult, b: PlacementResult) -> bool:
    return (a.layout(), a.host_node, a.predicted_token_ms, a.host_tier) == (
        b.layout(),
        b.host_node,
        b.predicted_token_ms,
        b.host_tier,
    )


def format_ram_tier(rows: Sequence[TierRow], ram_gib: int) -> str:
    fit = [r for r in rows if r.without.feasible]
    same = sum(_same(r.without, r.with_ram) for r in fit)
    slower = sum(r.with_ram.predicted_token_ms > r.without.predicted_token_ms for r in fit)
    new = [r for r in rows if not r.without.feasible and r.with_ram.feasible]
    experts = [r for r in new if r.with_ram.host_tier and not r.with_ram.host_tier.cpu_layers]
    layers = len(new) - len(experts)
    placed = len(fit) + len(new)
    lines = [
        f"{ram_gib} GiB of system RAM offered on every node (hostMemoryFreeMiB)",
        f"pairs placed in VRAM alone: {len(fit)}/{len(rows)}; with the RAM offered: "
        f"{same} the same plan, {slower} slower, {len(fit) - same} changed",
        f"pairs placed only with RAM: {len(new)} (now {placed}/{len(rows)}): "
        f"{len(experts)} with routed experts in RAM, {layers} with whole layers in RAM",
    ]
    if new:
        lines.append(
            "model               pool               in RAM                        ms/token"
        )
        for r in sorted(new, key=lambda r: (r.model, r.pool)):
            tier = r.with_ram.host_tier
            assert tier is not None
            what = (
                f"layers 0-{tier.cpu_layers - 1}"
                if tier.cpu_layers
                else f"experts of {tier.moe_layers} layers"
            )
            what += f", {tier.total_bytes / 2**30:.1f} GiB"
            lines.append(
                f"{r.model:19s} {r.pool:18s} {what:29s} {r.with_ram.predicted_token_ms:8.1f}"
            )
        median = statistics.median(r.with_ram.predicted_token_ms for r in new)
        lines.append(f"median ms/token of the pairs placed only with RAM: {median:.1f}")
    return "\n".join(lines)
