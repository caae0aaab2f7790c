"""Placement decisions on small, readable pools."""

from __future__ import annotations

import math
import re

import pytest

from mesh_operator.planner import (
    CurrentPlan,
    PlacementRequest,
    PlacementResult,
    PlannerInputError,
    ServingParams,
    evaluate_layout,
    plan_placement,
    read_model_profile,
)
from mesh_operator.planner.profile import ModelProfile
from tests.unit.planner.builders import device, inventory, node, synthetic_profile
from tests.unit.planner.llama_log import MODEL_HEADERS

pytestmark = pytest.mark.unit

GIB = 1024  # MiB


@pytest.fixture(scope="module")
def llama8b() -> ModelProfile:
    return read_model_profile(MODEL_HEADERS / "llama-3.1-8b.header.gguf")


@pytest.fixture(scope="module")
def moe() -> ModelProfile:
    return read_model_profile(MODEL_HEADERS / "qwen3-30b-a3b.header.gguf")


def _layers(result: PlacementResult) -> list[tuple[int, int]]:
    return [d.layers for d in result.devices]


def test_a_model_that_fits_one_gpu_stays_on_it(llama8b: ModelProfile) -> None:
    pool = inventory(node("a", device(total=24 * GIB)), node("b", device(total=24 * GIB)))
    result = plan_placement(llama8b, pool)
    assert result.feasible
    assert result.rpc == ("a",) and result.host_node == "a"
    assert result.tensor_split == (33,) and _layers(result) == [(0, 33)]
    assert result.reason.startswith("1 node (a), 1 device, host on a")


def test_layers_go_to_the_faster_gpu_first(llama8b: ModelProfile) -> None:
    pool = inventory(
        node("fast", device(total=4 * GIB, bw=1008)),  # holds part of the model
        node("slow", device(total=16 * GIB, bw=320)),
    )
    result = plan_placement(llama8b, pool)
    assert result.feasible and set(result.rpc) == {"fast", "slow"}
    by_node = {d.node: d for d in result.devices}
    assert result.devices[-1].node == "fast"  # the output layer sits on the fast GPU
    # The fast GPU is filled up to its budget; the slow one takes the rest.
    fast = by_node["fast"]
    assert fast.total_bytes > 0.8 * fast.capacity_bytes


def test_the_host_runs_on_the_node_whose_hops_cost_most(llama8b: ModelProfile) -> None:
    pool = inventory(
        node("near", device(total=4 * GIB), rtt=0.2),
        node("far", device(total=4 * GIB), rtt=10.0),
    )
    result = plan_placement(llama8b, pool)
    assert result.feasible and set(result.rpc) == {"near", "far"}
    assert result.host_node == "far"


def test_a_far_node_is_left_out_as_the_host_too(llama8b: ModelProfile) -> None:
    # Two nodes are needed and any two fit; the far one comes first by name, so
    # only its round trip can keep it out, and as the host it would still pay it:
    # every hop to the host crosses its link.
    far = node("a-far", device(total=4 * GIB), rtt=20.0)
    near = [node(n, device(total=4 * GIB), rtt=0.3) for n in ("b", "c")]
    result = plan_placement(llama8b, inventory(far, *near))
    assert result.feasible and set(result.rpc) == {"b", "c"}
    assert result.predicted_token_ms == plan_placement(llama8b, inventory(*near)).predicted_token_ms


def test_fewer_nodes_win_and_cached_nodes_break_ties(llama8b: ModelProfile) -> None:
    pool = inventory(
        node("a", device(total=24 * GIB)),
        node("b", device(total=24 * GIB), cached=["llama-3.1-8b.header.gguf"]),
        node("c", device(total=24 * GIB)),
    )
    result = plan_placement(llama8b, pool)
    assert result.rpc == ("b",)


def test_unhealthy_devices_and_nodes_are_not_used(llama8b: ModelProfile) -> None:
    pool = inventory(
        node("sick", device(total=80 * GIB, bw=3000, healthy=False)),
        node("down", device(total=80 * GIB, bw=3000), healthy=False),
        node("ok", device(total=24 * GIB, bw=300)),
    )
    assert plan_placement(llama8b, pool).rpc == ("ok",)


def test_nothing_fits_says_why_with_the_numbers(llama8b: ModelProfile) -> None:
    pool = inventory(node("a", device(total=2 * GIB)), node("b", device(total=1 * GIB)))
    result = plan_placement(llama8b, pool)
    assert not result.feasible and not result.devices
    assert re.fullmatch(
        r"VRAM: needs \d+\.\d GiB across <=15 devices; pool has 2\.7 GiB free after the 10% "
        r"reserve in 2 devices \(largest 1\.8 GiB\); "
        r"RAM: no node offers RAM for layers or experts \(hostMemoryFreeMiB\)",
        result.reason,
    ), result.reason


def test_more_than_sixteen_servers_are_never_planned() -> None:
    profile = synthetic_profile(n_layer=40, layer_mib=400, output_mib=200)
    pool = inventory(*(node(f"n{i:02d}", device(total=1400)) for i in range(20)))
    result = plan_placement(profile, pool)
    assert not result.feasible  # it would need about 17 nodes


def test_at_most_fifteen_devices(llama8b: ModelProfile) -> None:
    gpus = [device(f"CUDA{i}", total=2 * GIB, bw=500) for i in range(8)]
    pool = inventory(node("a", *gpus), node("b", *[dict(g) for g in gpus]))
    result = plan_placement(llama8b, pool, PlacementRequest(strategy="balanced"))
    assert result.feasible and len(result.devices) <= 15


def test_moe_predicts_faster_than_a_dense_model_of_its_size(moe: ModelProfile) -> None:
    dense = synthetic_profile(n_layer=moe.n_layer, layer_mib=moe.layers[0].weight_bytes / 2**20)
    pool = inventory(node("a", device(total=40 * GIB)))
    assert (
        plan_placement(moe, pool).predicted_token_ms
        < plan_placement(dense, pool).predicted_token_ms / 3
    )


def test_balanced_trades_total_time_for_a_shorter_slowest_stage(llama8b: ModelProfile) -> None:
    pool = inventory(
        node("a", device(total=24 * GIB), rtt=0.1), node("b", device(total=24 * GIB), rtt=0.1)
    )
    latency = plan_placement(llama8b, pool, PlacementRequest(strategy="latency"))
    balanced = plan_placement(llama8b, pool, PlacementRequest(strategy="balanced"))
    assert len(latency.rpc) == 1 and len(balanced.rpc) == 2
    assert balanced.bottleneck_ms < latency.bottleneck_ms
    assert latency.predicted_token_ms < balanced.predicted_token_ms


def test_same_input_same_plan_whatever_the_inventory_order(llama8b: ModelProfile) -> None:
    nodes = [node(f"n{i}", device(total=(3 + i) * GIB, bw=300 + 100 * i), rtt=i) for i in range(5)]
    forward = plan_placement(llama8b, inventory(*nodes))
    backward = plan_placement(llama8b, inventory(*reversed(nodes)))
    assert forward == backward and forward.feasible


def test_a_serving_plan_stays_when_free_memory_moves_a_little(llama8b: ModelProfile) -> None:
    def pool(free_a: int) -> list[dict[str, object]]:
        return [
            node("a", device(total=6 * GIB, free=free_a)),
            node("b", device(total=6 * GIB, free=3 * GIB)),
            node("c", device(total=6 * GIB, free=6 * GIB - 1)),
        ]

    first = plan_placement(llama8b, inventory(*pool(4 * GIB)))
    moved = inventory(*pool(int(4 * GIB * 1.04)))
    fresh = plan_placement(llama8b, moved)
    kept = plan_placement(llama8b, moved, current=first)
    assert kept.kept_current and kept.reason.startswith("kept the current plan")
    assert _layers(kept) == _layers(first) and kept.rpc == first.rpc
    assert fresh.feasible


def test_the_stability_margin_never_lets_a_plan_grow_past_capacity(
    llama8b: ModelProfile,
) -> None:
    """A serving plan that needs more memory than it holds (a longer context) is
    kept only where it fits the device outright: the margin is for free memory
    that shrank under a plan, not for a plan that grows."""
    mib = 1 << 20
    short = PlacementRequest(serving=ServingParams(ctx=4096))
    long = PlacementRequest(serving=ServingParams(ctx=8192))
    total = 24 * GIB  # MiB, as the inventory counts
    roomy = inventory(node("a", device(total=total)), node("b", device(total=total)))
    first = plan_placement(llama8b, roomy, short)
    grown = plan_placement(llama8b, roomy, long)
    need = math.ceil(max(d.total_bytes for d in grown.devices) / mib)
    held = math.ceil(max(d.total_bytes for d in first.devices) / mib)
    assert need > held
    # Free memory on "a" such that the longer context fits only with the margin.
    reserve = math.ceil(total * 0.10)
    free = need + reserve - 1  # capacity one MiB short of the need...
    assert math.floor(free / 0.95) - reserve >= need  # ...but within the margin
    tight = inventory(node("a", device(total=total, free=free)), node("b", device(total=total)))
    current = plan_placement(llama8b, tight, short)
    assert current.rpc == ("a",), "the short context fits on a alone"
    result = plan_placement(llama8b, tight, long, current=current)
    assert not result.kept_current, "the grown plan does not fit a outright"
    assert all(d.total_bytes <= (free - reserve) * mib for d in result.devices if d.node == "a")
    # Where the plan does not grow, the same margin keeps it when free memory shrank.
    shrunk = inventory(
        node("a", device(total=total, free=held + reserve - 1)), node("b", device(total=total))
    )
    kept = plan_placement(llama8b, shrunk, short, current=current)
    assert kept.kept_current and kept.rpc == ("a",)


def test_a_plan_moves_when_its_node_is_gone(llama8b: ModelProfile) -> None:
    current = CurrentPlan(layout=(("gone", "CUDA0", (0, 33)),), host_node="gone")
    result = plan_placement(llama8b, inventory(node("new", device())), current=current)
    assert result.rpc == ("new",) and not result.kept_current


def test_a_plan_moves_to_fewer_nodes_when_a_big_gpu_appears(llama8b: ModelProfile) -> None:
    small = [node("a", device(total=4 * GIB)), node("b", device(total=4 * GIB))]
    first = plan_placement(llama8b, inventory(*small))
    assert len(first.rpc) == 2
    grown = inventory(*small, node("big", device(total=48 * GIB)))
    result = plan_placement(llama8b, grown, current=first)
    assert result.rpc == ("big",) and not result.kept_current


def test_evaluate_layout_reports_the_device_that_overflows(llama8b: ModelProfile) -> None:
    pool = inventory(node("a", device(total=2 * GIB)), node("b", device(total=24 * GIB)))
    result = evaluate_layout(llama8b, pool, [("a", "CUDA0", (0, 16)), ("b", "CUDA0", (16, 33))])
    assert not result.feasible
    assert result.reason.startswith("a/CUDA0 needs ")
    assert len(result.devices) == 2


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (PlacementRequest(serving=ServingParams(ctx=0)), "ctx must be > 0"),
        (PlacementRequest(reserve_percent=100), "reserve-percent"),
        (PlacementRequest(strategy="fastest"), "strategy"),  # type: ignore[arg-type]
    ],
)
def test_bad_requests(llama8b: ModelProfile, request_: PlacementRequest, message: str) -> None:
    with pytest.raises(PlannerInputError, match=message):
        plan_placement(llama8b, inventory(node("a")), request_)
