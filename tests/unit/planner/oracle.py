"""The definition the branch and bound is tested against: plan every node set.

`search_every_set` plans every set of nodes with every member as the output
node and as the host, and ranks all the plans by the planner's one rule
(`ranking._choose`). Exponential in the pool's size: for small pools in tests.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from mesh_operator.planner.placement.problem import _Candidate, _Device, _Problem
from mesh_operator.planner.placement.ranking import _choose
from mesh_operator.planner.placement.search import _Search
from mesh_operator.planner.placement.types import MAX_RPC_SERVERS


def search_every_set(
    problem: _Problem, pool: Sequence[_Device], cached: frozenset[str]
) -> _Candidate | None:
    """What `search._search` finds, by planning every node set, output node and host."""
    search = _Search(problem, pool, cached)
    count = len(search.nodes)
    plans = [
        plan
        for k in range(1, min(MAX_RPC_SERVERS, count) + 1)
        for members in itertools.combinations(range(count), k)
        for output in members
        for host in members
        if (plan := search.evaluate(members, output, host)) is not None
    ]
    return _choose(plans, search.strategy) if plans else None
