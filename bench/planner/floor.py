"""How often the beam search's plan is kept when the branch and bound runs out of budget.

Owns the figures behind `placement.previous`. Every model of the suite is
planned on every pool of the suite (`scenarios`) with each strategy, the way
`search._search` plans: the branch and bound, and where its work budget ran out
on a pool of at most 16 nodes, the beam search too, keeping the plan the one
ranking rule prefers. The table counts the plans cut short and those where the
beam search's plan is kept, and why: a faster objective, or a rank ahead
within 2% of the fastest (fewer nodes, more cached ones, ...).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.planner.scenarios import Pool, build_pools
from bench.planner.suite import load_models
from mesh_operator.planner import PlacementRequest, ServingParams, Strategy, parse_inventory
from mesh_operator.planner.placement.previous import _PREVIOUS_SEARCH_NODES, _previous_search
from mesh_operator.planner.placement.problem import _cached_nodes, _Candidate, _pool, _Problem
from mesh_operator.planner.placement.ranking import _choose, _ns
from mesh_operator.planner.placement.search import _Search


@dataclass(frozen=True)
class FloorRow:
    model: str
    pool: str
    strategy: Strategy
    nodes: int
    stopped: bool  # the branch and bound ran out of its work budget
    search: _Candidate | None  # the branch and bound's plan
    previous: _Candidate | None  # the beam search's, when it ran

    def kept_previous(self) -> bool:
        """Whether the plan served is the beam search's and not the branch and bound's."""
        if self.previous is None:
            return False
        if self.search is None:
            return True
        chosen = _choose([self.search, self.previous], self.strategy)
        return chosen is self.previous and (
            chosen.signature() != self.search.signature() or chosen.host != self.search.host
        )

    def objectives(self) -> tuple[float, float]:
        """(branch and bound, beam search) objectives, ms; both plans must exist."""
        assert self.search is not None and self.previous is not None
        return self.search.objective(self.strategy), self.previous.objective(self.strategy)


def run_floor(
    pools: Sequence[Pool] | None = None,
    strategies: Sequence[Strategy] = ("latency", "balanced"),
) -> list[FloorRow]:
    pools = pools or build_pools()
    with tempfile.TemporaryDirectory(prefix="mesh-bench-floor-") as tmp:
        models = load_models(Path(tmp))
    rows = []
    for pool in pools:
        inventory = parse_inventory(pool.inventory, source=pool.name)
        for name, profile in models.items():
            for strategy in strategies:
                request = PlacementRequest(
                    serving=ServingParams(ctx=8192, parallel=1), strategy=strategy
                )
                problem = _Problem(profile, request)
                devices = _pool(inventory, request)
                cached = _cached_nodes(inventory, problem.model_file)
                search = _Search(problem, devices, cached)
                best = search.run()
                previous = None
                if search.stopped and len(search.nodes) <= _PREVIOUS_SEARCH_NODES:
                    previous = _previous_search(problem, devices, cached)
                rows.append(
                    FloorRow(
                        model=name,
                        pool=pool.name,
                        strategy=strategy,
                        nodes=pool.nodes,
                        stopped=search.stopped,
                        search=best,
                        previous=previous,
                    )
                )
    return rows


def format_floor(rows: Sequence[FloorRow]) -> str:
    lines = []
    for strategy in dict.fromkeys(r.strategy for r in rows):
        mine = [r for r in rows if r.strategy == strategy]
        stopped = [r for r in mine if r.stopped]
        sizes = sorted({r.nodes for r in stopped})
        where = f" (pools of {', '.join(map(str, sizes))} nodes)" if sizes else ""
        lines.append(
            f"{strategy}: {len(mine)} plans, {len(stopped)} cut short by the work budget{where}"
        )
        kept = [r for r in stopped if r.kept_previous()]
        if not stopped:
            continue
        lines.append(f"  beam search's plan kept: {len(kept)} of {len(stopped)}")
        faster = [r for r in kept if r.search is not None and r.previous is not None]
        faster = [r for r in faster if _ns(r.objectives()[1]) < _ns(r.objectives()[0])]
        if faster:
            worst = max(faster, key=lambda r: 1 - r.objectives()[1] / r.objectives()[0])
            ours, theirs = worst.objectives()
            lines.append(
                f"    {len(faster)} faster, by up to {1 - theirs / ours:.1%} "
                f"({worst.model} on {worst.pool}: {ours:.2f} -> {theirs:.2f} ms)"
            )
        ahead = len(kept) - len(faster)
        if ahead:
            lines.append(f"    {ahead} ranked ahead within 2% of the fastest")
        for r in kept:
            ours, theirs = r.objectives() if r.search else (float("nan"), float("nan"))
            nodes = (
                len(r.search.nodes) if r.search else 0,
                len(r.previous.nodes) if r.previous else 0,
            )
            lines.append(
                f"      {r.model:<18} {r.pool:<18} {ours:7.2f} -> {theirs:7.2f} ms, "
                f"{nodes[0]} -> {nodes[1]} nodes"
            )
    return "\n".join(lines)
