"""The one rule that ranks plans, and the rule that keeps a serving plan.

Objectives (the summed time for `latency`, the slowest stage for `balanced`)
compare in whole nanoseconds, so float noise never orders two plans that are
equally fast. Among plans within 2% of the fastest (`_window`), fewer nodes win,
then more nodes that cache the model, then the faster, then the smaller summed
time, then fewer devices, then lower node names (then device order and host,
so that no two plans tie). `_rank` is that order; the branch and bound ranks
the plans it finds with it, and `_choose` applies it to any list of plans.

`_better` is the stability rule: a challenger replaces the plan a model is
served with only if it is `improvement_percent` faster, or uses fewer nodes at
no cost.
"""

from __future__ import annotations

from collections.abc import Sequence

from mesh_operator.planner.placement.problem import _Candidate
from mesh_operator.planner.placement.types import PlacementRequest, Strategy

_TIE = 0.02  # plans within 2% of the best count as equally fast


def _ns(ms: float) -> int:
    """An objective in whole nanoseconds; names break the ties it leaves."""
    return round(ms * 1e6)


def _window(fastest_ns: float) -> float:
    """The largest objective (in `_ns` units) within 2% of the fastest."""
    return fastest_ns * (1 + _TIE) + 1e-3


def _rank(candidate: _Candidate, strategy: Strategy) -> tuple[object, ...]:
    """A plan's place among plans within 2% of the fastest: smaller ranks first."""
    return (
        len(candidate.nodes),
        -candidate.cached,
        _ns(candidate.objective(strategy)),
        _ns(candidate.total_ms),
        len(candidate.devices),
        tuple(sorted(candidate.nodes)),
        candidate.nodes,
        candidate.signature(),
        candidate.host,
    )


def _choose(candidates: Sequence[_Candidate], strategy: Strategy) -> _Candidate:
    """The best-ranked of plans within 2% of the fastest of `candidates` (not empty)."""
    window = _window(min(_ns(c.objective(strategy)) for c in candidates))
    near = [c for c in candidates if _ns(c.objective(strategy)) <= window]
    return min(near, key=lambda c: _rank(c, strategy))


def _better(challenger: _Candidate, current: _Candidate, request: PlacementRequest) -> bool:
    """Whether `challenger` replaces the plan a model is served with."""
    strategy = request.strategy
    ours = current.objective(strategy)
    theirs = challenger.objective(strategy)
    if theirs < ours * (1 - request.improvement_percent / 100):
        return True
    return len(challenger.nodes) < len(current.nodes) and theirs <= ours
