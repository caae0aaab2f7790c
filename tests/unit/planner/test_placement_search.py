"""The branch and bound against its definition, its bounds, and its speed.

`search_every_set` (`oracle`) plans every node set with every output node and
host; the search must return exactly its plan (same devices, layers and host) while
planning only a few sets. The bounds it prunes with must never exceed the time
of a plan they bound. Pools mix a few node kinds so that equal nodes, exact
ties and near ties (2%) are common.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from bench.planner_speed.run import mixed_pool
from mesh_operator.planner import (
    PlacementRequest,
    ServingParams,
    parse_inventory,
    plan_placement,
    read_model_profile,
)
from mesh_operator.planner.bounds import Envelope, ReadCurve, reads_lower_bound
from mesh_operator.planner.placement import search
from mesh_operator.planner.placement.previous import _previous_search
from mesh_operator.planner.placement.problem import (
    _cached_nodes,
    _Candidate,
    _Device,
    _pool,
    _Problem,
)
from mesh_operator.planner.placement.ranking import _choose
from mesh_operator.planner.placement.search import _Search, _search
from mesh_operator.planner.placement.types import Strategy
from mesh_operator.planner.profile import ModelProfile
from tests.unit.planner.builders import synthetic_profile
from tests.unit.planner.llama_log import MODEL_HEADERS
from tests.unit.planner.oracle import search_every_set

pytestmark = pytest.mark.unit

SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# (memory MiB, bandwidth GB/s) of the node kinds pools are drawn from.
KINDS = ((8192, 272.0), (12288, 360.0), (24576, 936.0), (24576, 1008.0), (81920, 2039.0))
MODEL_FILE = "model.gguf"


@st.composite
def profiles(draw: st.DrawFn) -> ModelProfile:
    moe = draw(st.booleans())
    return synthetic_profile(
        n_layer=draw(st.integers(1, 12)),
        layer_mib=draw(st.floats(50, 6000)),
        output_mib=draw(st.floats(10, 4000)),
        n_embd=draw(st.sampled_from([1024, 4096])),
        swa_every=draw(st.sampled_from([0, 3])),
        window=1024,
        experts=64 if moe else 0,
        experts_used=8 if moe else 0,
        expert_share=0.9 if moe else 0.0,
        name=MODEL_FILE,
    )


@st.composite
def pools(draw: st.DrawFn, max_nodes: int = 7) -> dict[str, Any]:
    """Nodes of a few kinds; free memory either equal within a kind or jittered."""
    kinds = draw(st.lists(st.sampled_from(KINDS), min_size=1, max_size=3))
    jitter = draw(st.booleans())
    nodes = []
    for i in range(draw(st.integers(2, max_nodes))):
        total, bandwidth = draw(st.sampled_from(kinds))
        devices = []
        for j in range(draw(st.sampled_from([1, 1, 2, 4]))):
            free = total - draw(st.integers(0, total // 3)) if jitter else total * 9 // 10
            devices.append(
                {
                    "id": f"CUDA{j}",
                    "memoryTotalMiB": total,
                    "memoryFreeMiB": free,
                    "bandwidthGBps": bandwidth,
                }
            )
        nodes.append(
            {
                "name": f"n{draw(st.integers(0, 99)):02d}-{i}",
                "rttMs": draw(st.sampled_from([0.02, 0.5, 0.5, 2.0, 10.0])),
                "cachedModels": [MODEL_FILE] if draw(st.integers(0, 5)) == 0 else [],
                "devices": devices,
            }
        )
    return {"nodes": nodes}


@st.composite
def requests(draw: st.DrawFn) -> PlacementRequest:
    return PlacementRequest(
        serving=ServingParams(ctx=draw(st.sampled_from([512, 4096])), parallel=1),
        strategy=draw(st.sampled_from(["latency", "latency", "balanced"])),
    )


def _setup(
    profile: ModelProfile, pool: dict[str, Any], request: PlacementRequest
) -> tuple[_Problem, list[_Device], frozenset[str]]:
    problem = _Problem(profile, request)
    inventory = parse_inventory(pool)
    return problem, _pool(inventory, request), _cached_nodes(inventory, problem.model_file)


def _same(a: _Candidate | None, b: _Candidate | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.signature() == b.signature() and a.host == b.host and a.total_ms == b.total_ms


@SETTINGS
@given(profile=profiles(), pool=pools(), request=requests())
def test_the_search_finds_the_plan_of_every_set_planned(
    profile: ModelProfile, pool: dict[str, Any], request: PlacementRequest
) -> None:
    problem, devices, cached = _setup(profile, pool, request)
    search = _Search(problem, devices, cached)
    fast = search.run()
    slow = search_every_set(problem, devices, cached)
    if search.stopped:
        # The work budget ran out (`balanced` on many equal nodes): still a plan
        # whenever there is one, and never worse than the previous search's.
        event("work budget ran out")
        plan = _search(problem, devices, cached)
        previous = _previous_search(problem, devices, cached)
        assert (plan is None) == (slow is None)
        if plan is not None and previous is not None:
            assert _choose([plan, previous], request.strategy) is plan
        return
    assert _same(fast, slow), (fast, slow)


@SETTINGS
@given(profile=profiles(), pool=pools(max_nodes=5), request=requests())
def test_bounds_never_exceed_a_plan_they_bound(
    profile: ModelProfile, pool: dict[str, Any], request: PlacementRequest
) -> None:
    search = _Search(*_setup(profile, pool, request))
    count = len(search.nodes)
    for k in range(1, count + 1):
        for members in itertools.combinations(range(count), k):
            node_set = search.node_set(members)
            bounds = {(h, o): (b, t) for b, t, h, o in node_set.plans} if node_set else {}
            for h, host in enumerate(members):
                for o, output in enumerate(members):
                    plan = search.evaluate(members, output, host)
                    if plan is None:
                        continue
                    objective, total = bounds[h, o]
                    assert total <= plan.total_ms * (1 + 1e-9)
                    assert objective <= plan.objective(request.strategy) * (1 + 1e-9)


@settings(max_examples=40, deadline=None)
@given(
    profile=profiles(),
    caps=st.lists(st.floats(0, 5e10), min_size=1, max_size=6),
    speeds=st.lists(st.floats(1e-9, 1e-7), min_size=1, max_size=6),
)
def test_the_reads_bound_is_below_any_split_in_any_order(
    profile: ModelProfile, caps: list[float], speeds: list[float]
) -> None:
    """The fractional bound against every contiguous split of the layers over
    the devices in every order (small cases, by brute force)."""
    size = min(len(caps), len(speeds), 4)
    caps, speeds = caps[:size], speeds[:size]
    problem = _Problem(profile, PlacementRequest())
    memory = [b - a for a, b in itertools.pairwise(problem.mem_prefix)]
    reads = [b - a for a, b in itertools.pairwise(problem.read_prefix)]
    curve = ReadCurve(memory, reads)
    ranked = sorted(zip(speeds, caps, strict=True))
    bound = reads_lower_bound(
        curve,
        [s for s, _ in ranked],
        list(itertools.accumulate(c for _, c in ranked)),
    )
    layers = len(memory)
    best = float("inf")
    for order in itertools.permutations(range(size)):
        for cuts in itertools.combinations_with_replacement(range(layers + 1), size - 1):
            edges = [0, *cuts, layers]
            cost = 0.0
            for device, (a, b) in zip(order, itertools.pairwise(edges), strict=True):
                if sum(memory[a:b]) > caps[device]:
                    break
                cost += sum(reads[a:b]) * speeds[device]
            else:
                best = min(best, cost)
    assert bound <= best * (1 + 1e-9)


@settings(max_examples=40, deadline=None)
@given(
    profiles_=st.lists(st.lists(st.floats(0, 1e6), min_size=3, max_size=3), min_size=1, max_size=7),
    r=st.integers(0, 3),
)
def test_the_envelope_covers_every_choice_of_nodes(profiles_: list[list[float]], r: int) -> None:
    cumulative = [list(itertools.accumulate(p)) for p in profiles_]
    envelope = Envelope(cumulative, 3)
    for start in range(len(cumulative) + 1):
        top = envelope.at(start, r)
        for chosen in itertools.combinations(cumulative[start:], r):
            for t in range(3):
                assert sum(p[t] for p in chosen) <= top[t] + 1e-6


@pytest.mark.parametrize("strategy", ["latency", "balanced"])
def test_a_search_out_of_budget_still_returns_a_plan(
    monkeypatch: pytest.MonkeyPatch, strategy: Strategy
) -> None:
    profile = read_model_profile(MODEL_HEADERS / "llama-3.1-8b.header.gguf")
    # `balanced` on many near-equal nodes exhausts the budget (docs/planner.md):
    # a small pool lets its search finish, to compare with the one cut short.
    request = PlacementRequest(serving=ServingParams(ctx=8192), strategy=strategy)
    problem = _Problem(profile, request)
    inventory = mixed_pool(40 if strategy == "latency" else 6, random.Random(3))
    devices = _pool(inventory, request)
    exact = _Search(problem, devices, frozenset())
    best = exact.run()
    monkeypatch.setattr(search, "_WORK_BUDGET", 10)
    short = _Search(problem, devices, frozenset())
    found = short.run()
    assert short.stopped and not exact.stopped
    assert best is not None and found is not None
    assert found.bottleneck_ms >= best.bottleneck_ms


def test_a_500_node_pool_is_planned_within_the_work_budget() -> None:
    """The budget is about a second of this Python (`python -m bench planner_speed`
    has the times); a latency plan of a big pool is exact within it."""
    profile = read_model_profile(MODEL_HEADERS / "llama-3.1-8b.header.gguf")
    pool = mixed_pool(500, random.Random(7))
    request = PlacementRequest(serving=ServingParams(ctx=8192))
    search = _Search(_Problem(profile, request), _pool(pool, request), frozenset())
    assert search.run() is not None
    assert not search.stopped
    assert plan_placement(profile, pool, request).feasible
