"""Replicas: disjoint nodes, serving replicas kept, the slowest as fast as the pool allows."""

from __future__ import annotations

import itertools
import random

import pytest

from mesh_operator.planner import PlacementRequest, ServingParams, plan_placement
from mesh_operator.planner.inventory import Inventory
from mesh_operator.planner.placement.replicas import plan_replicas
from mesh_operator.planner.profile import ModelProfile
from tests.unit.planner.builders import device, inventory, node, synthetic_profile

pytestmark = pytest.mark.unit

REQUEST = PlacementRequest(serving=ServingParams(ctx=4096))


@pytest.fixture(scope="module")
def model() -> ModelProfile:
    # 32 layers of 100 MiB and a 400 MiB output layer: about 3.6 GiB of weights.
    return synthetic_profile()


def _nodes(*plans: object) -> list[set[str]]:
    return [set(p.nodes) for p in plans]  # type: ignore[attr-defined]


def test_each_replica_has_nodes_of_its_own(model: ModelProfile) -> None:
    pool = inventory(*(node(f"n{i}", device(total=8192)) for i in range(4)))
    result = plan_replicas(model, pool, REQUEST, 3)
    assert result.feasible and result.fitting == 3 and len(result.replicas) == 3
    sets = _nodes(*result.replicas)
    assert all(not (a & b) for a, b in itertools.combinations(sets, 2)), sets


def test_too_many_replicas_say_how_many_fit(model: ModelProfile) -> None:
    pool = inventory(*(node(f"n{i}", device(total=8192)) for i in range(2)))
    result = plan_replicas(model, pool, REQUEST, 3)
    assert not result.feasible and result.fitting == 2
    assert result.reason.startswith("2 of 3 replicas fit: replica 3: "), result.reason
    # The single-model planner's reason, for callers that number replicas their way.
    assert result.cause.startswith("VRAM: ") and result.reason.endswith(result.cause)
    assert len(result.replicas) == 2


def test_a_serving_replica_stays_where_it_is(model: ModelProfile) -> None:
    pool = inventory(
        node("big", device(total=24576, bw=1008)),
        node("mid", device(total=8192, bw=600)),
        node("small", device(total=8192, bw=300)),
    )
    # Replica 1 serves on the slowest node; replica 0 is new. Alone, a new replica
    # would take "big"; the serving one is not moved for it.
    current = plan_placement(model, inventory(pool.nodes[2].model_dump(by_alias=True)), REQUEST)
    assert current.feasible and current.nodes == ("small",)
    result = plan_replicas(model, pool, REQUEST, 2, [None, current])
    assert result.feasible
    assert (
        result.replicas[1].nodes == ("small",) and result.replicas[1].layout() == current.layout()
    )
    assert "small" not in result.replicas[0].nodes


def test_a_lost_replica_is_planned_around_the_others(model: ModelProfile) -> None:
    pool = inventory(*(node(f"n{i}", device(total=8192)) for i in range(3)))
    first = plan_replicas(model, pool, REQUEST, 2)
    lost = first.replicas[1].nodes[0]
    shrunk = Inventory(nodes=tuple(n for n in pool.nodes if n.name != lost))
    again = plan_replicas(model, shrunk, REQUEST, 2, [first.replicas[0], None])
    assert again.feasible
    assert again.replicas[0].layout() == first.replicas[0].layout()
    assert lost not in again.replicas[1].nodes


def _best_split(model: ModelProfile, pool: Inventory, count: int) -> float:
    """The least slowest-replica time over every assignment of nodes to replicas."""
    names = [n.name for n in pool.nodes]
    best = float("inf")
    for owners in itertools.product(range(count + 1), repeat=len(names)):  # count: unused
        groups = [{n for n, o in zip(names, owners, strict=True) if o == r} for r in range(count)]
        if any(not g for g in groups):
            continue
        times = []
        for group in groups:
            only = Inventory(nodes=tuple(n for n in pool.nodes if n.name in group))
            result = plan_placement(model, only, REQUEST)
            if not result.feasible:
                break
            times.append(result.predicted_token_ms)
        else:
            best = min(best, max(times))
    return best


@pytest.mark.parametrize(("seed", "count"), [*((s, 2) for s in range(8)), (101, 3), (103, 3)])
def test_the_slowest_replica_against_every_split_of_a_small_pool(
    model: ModelProfile, seed: int, count: int
) -> None:
    rng = random.Random(seed)
    # Most nodes cannot hold the model alone: most of these replicas split.
    sizes = [2048, 3072, 4096, 8192]
    pool = inventory(
        *(
            node(
                f"n{i}",
                *(
                    device(f"CUDA{j}", total=rng.choice(sizes), bw=rng.choice([300.0, 1008.0]))
                    for j in range(rng.choice([1, 1, 2]))
                ),
                rtt=rng.choice([0.2, 1.0, 5.0]),
            )
            for i in range(5)
        )
    )
    optimum = _best_split(model, pool, count)
    result = plan_replicas(model, pool, REQUEST, count)
    if optimum == float("inf"):
        assert not result.feasible
        return
    assert result.feasible
    sets = _nodes(*result.replicas)
    assert all(not (a & b) for a, b in itertools.combinations(sets, 2)), sets
    # A heuristic, yet on these pools (and some 50 more of two and three replicas
    # on five and six nodes, tried while it was written) it finds the optimum.
    assert result.slowest_ms == pytest.approx(optimum, rel=1e-9)


def test_no_replica_is_asked_for_is_refused(model: ModelProfile) -> None:
    with pytest.raises(ValueError, match="at least one replica"):
        plan_replicas(model, inventory(node("a")), REQUEST, 0)
