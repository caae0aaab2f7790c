"""A beam search over node sets, the floor of the branch and bound when out of budget.

Every node set while there are at most 128 of a size, beyond that a beam of the
12 best sets (stopping two sizes after the best last improved, except on pools
of at most 8 nodes), output nodes and hosts by rules of thumb, every device
budgeted for the largest compute buffer. Its plans are all in the branch and
bound's scope, so it runs only when the work budget cuts the branch and bound
short, on pools of up to 16 nodes (on bigger ones it takes minutes), and
`search._search` keeps the plan `ranking._choose` prefers.

It stays because it still changes plans: `balanced` on pools of many equal or
near-equal nodes runs out of budget, and there the beam search's plan often
wins. `python -m bench planner --no-suite --no-real --floor` (the suite's 32
pools x 12 models): `latency` 384 plans, none cut short; `balanced` 384 plans,
44 cut short (pools of 8, 12 and 16 nodes), the beam search's plan kept in 18:
8 with a shorter slowest stage, by up to 18.3% (mixtral-8x7b on 16 T4 nodes,
4.92 -> 4.02 ms), 10 on fewer nodes within 2% of the fastest (7 of them at
the same slowest stage).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence

from mesh_operator.planner.placement.problem import (
    _Candidate,
    _Device,
    _finish,
    _fixed_ms,
    _host_rtt,
    _node_devices,
    _Problem,
)
from mesh_operator.planner.placement.ranking import _TIE, _choose
from mesh_operator.planner.placement.split import _split_balanced, _split_latency
from mesh_operator.planner.placement.types import MAX_DEVICES, MAX_RPC_SERVERS

_PREVIOUS_SEARCH_NODES = 16  # pools it runs on: beyond, it took minutes
_EXHAUSTIVE_LIMIT = 128  # node sets per size searched exhaustively
_BEAM_WIDTH = 12
_EXTRA_NODES = 2  # sizes explored past the last that improved
_SMALL_POOL = 8  # pools this small are searched at every size
_ALL_OUTPUTS = 4  # node sets this small try every node as the output node


def _previous_order(devices: Sequence[_Device], output_node: str) -> list[_Device]:
    by_node: dict[str, list[_Device]] = {}
    for d in devices:
        by_node.setdefault(d.node, []).append(d)
    names = [*sorted(n for n in by_node if n != output_node), output_node]
    return [d for name in names for d in _node_devices(by_node[name])]


def _previous_plans(
    problem: _Problem, devices: Sequence[_Device], cached: frozenset[str]
) -> list[_Candidate]:
    if len(devices) > MAX_DEVICES:
        devices = sorted(devices, key=lambda d: (-d.bandwidth, d.node, d.id))[:MAX_DEVICES]
    nodes = sorted({d.node for d in devices})
    potential: dict[str, float] = {}
    for d in devices:
        potential[d.node] = potential.get(d.node, 0.0) + d.rtt
    hosts = sorted(nodes, key=lambda n: (-potential[n], n))[:2]
    if len(nodes) <= _ALL_OUTPUTS:
        outputs = nodes
    else:
        fastest = min(devices, key=lambda d: (-d.bandwidth, d.node, d.id))
        roomiest = min(devices, key=lambda d: (-d.capacity, d.node, d.id))
        outputs = list(dict.fromkeys([fastest.node, roomiest.node, *hosts]))
    plans = list(dict.fromkeys((o, h) for o in outputs for h in dict.fromkeys([*hosts, o])))
    out = []
    for output_node, host in plans:
        order = _previous_order(devices, output_node)
        caps = [d.capacity for d in order]
        fixed = [_fixed_ms(problem, d, host, _host_rtt(devices, host)) for d in order]
        per_byte = [problem.cost.ms_per_byte(d.bandwidth) for d in order]
        if problem.request.strategy == "latency":
            ranges = _split_latency(problem, caps, fixed, per_byte, worst_case=True)
        else:
            ranges = _split_balanced(problem, caps, fixed, per_byte, worst_case=True)
        if ranges is None:
            continue
        candidate = _finish(problem, order=order, ranges=ranges, host=host, cached=cached)
        if candidate is not None:
            out.append(candidate)
    return out


def _previous_search(
    problem: _Problem, pool: Sequence[_Device], cached: frozenset[str]
) -> _Candidate | None:
    by_node: dict[str, list[_Device]] = {}
    for d in pool:
        if d.capacity > 0:
            by_node.setdefault(d.node, []).append(d)
    names = sorted(by_node)
    if not names:
        return None
    capacity = {n: sum(d.capacity for d in by_node[n]) for n in names}
    need = problem.mem_prefix[-1] + problem.compute_single
    strategy = problem.request.strategy
    found: list[_Candidate] = []
    beam: list[tuple[str, ...]] = [()]
    best = math.inf
    improved_at: int | None = None
    for k in range(1, min(MAX_RPC_SERVERS, len(names)) + 1):
        if len(names) > _SMALL_POOL and improved_at is not None and k > improved_at + _EXTRA_NODES:
            break
        if math.comb(len(names), k) <= _EXHAUSTIVE_LIMIT:
            subsets: Iterable[tuple[str, ...]] = itertools.combinations(names, k)
        else:
            subsets = sorted({tuple(sorted((*s, n))) for s in beam for n in names if n not in s})
        ranked: list[tuple[tuple[int, float, float], tuple[str, ...]]] = []
        for subset in subsets:
            total_cap = sum(capacity[n] for n in subset)
            chosen = None
            if total_cap >= need:
                devices = [d for n in subset for d in by_node[n]]
                plans = _previous_plans(problem, devices, cached)
                chosen = _choose(plans, strategy) if plans else None
            if chosen is None:
                ranked.append(((1, -float(total_cap), 0.0), subset))
                continue
            found.append(chosen)
            objective = chosen.objective(strategy)
            ranked.append(((0, objective, -float(total_cap)), subset))
            if objective < best * (1 - _TIE):
                improved_at = k
            best = min(best, objective)
        ranked.sort()
        beam = [s for _, s in ranked[:_BEAM_WIDTH]]
    return _choose(found, strategy) if found else None
