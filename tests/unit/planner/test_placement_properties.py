"""Invariants of placement on generated models and pools (hypothesis).

Every feasible plan keeps each device within its free memory minus the reserve,
gives every device a contiguous range with the ranges covering 0..n_layer, has
a positive integer split matching those ranges, is deterministic (also under a
reordered inventory), stays put when free memory moves by less than 5%, and on
tiny pools is as fast as the best of every possible layout.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh_operator.planner import (
    MAX_DEVICES,
    MAX_RPC_SERVERS,
    PlacementRequest,
    PlacementResult,
    ServingParams,
    evaluate_layout,
    layers_for_split,
    parse_inventory,
    plan_placement,
)
from mesh_operator.planner.profile import ModelProfile
from tests.unit.planner.builders import synthetic_profile

pytestmark = pytest.mark.unit

MIB = 1 << 20
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def profiles(draw: st.DrawFn) -> ModelProfile:
    moe = draw(st.booleans())
    return synthetic_profile(
        n_layer=draw(st.integers(1, 48)),
        layer_mib=draw(st.floats(1, 800)),
        output_mib=draw(st.floats(1, 1500)),
        n_embd=draw(st.sampled_from([1024, 2048, 4096, 8192])),
        kv_heads=draw(st.sampled_from([1, 4, 8])),
        swa_every=draw(st.sampled_from([0, 2, 6])),
        window=draw(st.sampled_from([128, 1024, 4096])),
        experts=64 if moe else 0,
        experts_used=8 if moe else 0,
        expert_share=0.9 if moe else 0.0,
    )


@st.composite
def pools(draw: st.DrawFn) -> dict[str, Any]:
    nodes = []
    for i in range(draw(st.integers(1, 6))):
        devices = []
        for j in range(draw(st.integers(1, 3))):
            total = draw(st.integers(512, 81920))
            devices.append(
                {
                    "id": f"CUDA{j}",
                    "backend": "cuda",
                    "memoryTotalMiB": total,
                    "memoryFreeMiB": draw(st.integers(total // 4, total)),
                    "bandwidthGBps": draw(st.sampled_from([272.0, 320.0, 600.0, 936.0, 2039.0])),
                }
            )
        nodes.append(
            {
                "name": f"node-{i}",
                "rttMs": draw(st.sampled_from([0.2, 0.5, 2.0, 5.0, 20.0])),
                "devices": devices,
            }
        )
    return {"nodes": nodes}


@st.composite
def requests(draw: st.DrawFn) -> PlacementRequest:
    cache = draw(st.sampled_from(["f16", "q8_0", "q4_0"]))
    return PlacementRequest(
        serving=ServingParams(
            ctx=draw(st.sampled_from([512, 2048, 8192, 32768])),
            parallel=draw(st.integers(1, 4)),
            cache_type_k=cache,
            cache_type_v=cache,
        ),
        strategy=draw(st.sampled_from(["latency", "balanced"])),
        reserve_percent=draw(st.sampled_from([0.0, 5.0, 10.0, 25.0])),
    )


def _capacity_bytes(pool: dict[str, Any], node: str, device: str, reserve: float) -> int:
    for n in pool["nodes"]:
        for d in n["devices"]:
            if n["name"] == node and d["id"] == device:
                reserve_mib = math.ceil(int(d["memoryTotalMiB"]) * reserve / 100)
                return (int(d["memoryFreeMiB"]) - reserve_mib) * MIB
    raise AssertionError(f"{node}/{device} not in the pool")


def _check_plan(
    result: PlacementResult, profile: ModelProfile, pool: dict[str, Any], reserve: float
) -> None:
    if not result.feasible:
        assert result.reason.startswith("VRAM: needs ")
        assert not result.devices and not result.tensor_split
        return
    for d in result.devices:
        assert d.total_bytes <= _capacity_bytes(pool, d.node, d.device, reserve), d
        assert d.n_layers > 0
    ranges = [d.layers for d in result.devices]
    assert ranges[0][0] == 0 and ranges[-1][1] == profile.n_device_layers
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    assert all(s > 0 for s in result.tensor_split) and sum(result.tensor_split) > 0
    assert layers_for_split(result.tensor_split, profile.n_device_layers) == ranges
    nodes = [d.node for d in result.devices]
    assert list(dict.fromkeys(nodes)) == list(result.rpc)  # each node's devices together
    assert result.host_node in result.rpc
    assert len(result.rpc) <= MAX_RPC_SERVERS and len(result.devices) <= MAX_DEVICES
    assert result.predicted_token_ms > 0


@SETTINGS
@given(profile=profiles(), pool=pools(), request=requests())
def test_plans_respect_memory_and_cover_every_layer(
    profile: ModelProfile, pool: dict[str, Any], request: PlacementRequest
) -> None:
    result = plan_placement(profile, parse_inventory(pool), request)
    _check_plan(result, profile, pool, request.reserve_percent)


@SETTINGS
@given(profile=profiles(), pool=pools(), request=requests())
def test_plans_are_deterministic(
    profile: ModelProfile, pool: dict[str, Any], request: PlacementRequest
) -> None:
    first = plan_placement(profile, parse_inventory(pool), request)
    again = plan_placement(profile, parse_inventory(pool), request)
    shuffled = {"nodes": list(reversed(pool["nodes"]))}
    assert first == again == plan_placement(profile, parse_inventory(shuffled), request)


@SETTINGS
@given(
    profile=profiles(),
    pool=pools(),
    request=requests(),
    moves=st.lists(st.floats(-0.049, 0.049), min_size=18, max_size=18),
)
def test_small_changes_of_free_memory_do_not_move_a_plan(
    profile: ModelProfile, pool: dict[str, Any], request: PlacementRequest, moves: list[float]
) -> None:
    first = plan_placement(profile, parse_inventory(pool), request)
    if not first.feasible:
        return
    moved: dict[str, Any] = {"nodes": []}
    index = 0
    for n in pool["nodes"]:
        devices = []
        for d in n["devices"]:
            free = d["memoryFreeMiB"]
            delta = math.trunc(free * moves[index])  # strictly under 5% of free
            index += 1
            devices.append({**d, "memoryFreeMiB": min(d["memoryTotalMiB"], max(0, free + delta))})
        moved["nodes"].append({**n, "devices": devices})
    again = plan_placement(profile, parse_inventory(moved), request, current=first)
    assert again.kept_current, again.reason
    assert again.layout() == first.layout() and again.host_node == first.host_node
    assert again.tensor_split == first.tensor_split


def _compositions(total: int, parts: int) -> list[list[int]]:
    if parts == 1:
        return [[total]]
    return [[k, *rest] for k in range(total + 1) for rest in _compositions(total - k, parts - 1)]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n_layer=st.integers(1, 5),
    layer_mib=st.floats(50, 3000),
    output_mib=st.floats(50, 3000),
    nodes=st.lists(
        st.tuples(
            st.integers(1024, 16384),
            st.sampled_from([300.0, 900.0, 2000.0]),
            st.sampled_from([0.2, 2.0, 10.0]),
        ),
        min_size=1,
        max_size=3,
    ),
)
def test_latency_plans_match_an_exhaustive_search(
    n_layer: int, layer_mib: float, output_mib: float, nodes: list[tuple[int, float, float]]
) -> None:
    profile = synthetic_profile(n_layer=n_layer, layer_mib=layer_mib, output_mib=output_mib)
    pool = parse_inventory(
        {
            "nodes": [
                {
                    "name": f"n{i}",
                    "rttMs": rtt,
                    "devices": [
                        {"id": "CUDA0", "memoryTotalMiB": mib, "memoryFreeMiB": mib,
                         "bandwidthGBps": bw}
                    ],
                }
                for i, (mib, bw, rtt) in enumerate(nodes)
            ]
        }
    )  # fmt: skip
    request = PlacementRequest(serving=ServingParams(ctx=2048))
    best = math.inf
    names = [n.name for n in pool.nodes]
    for order in itertools.permutations(names):
        for counts in _compositions(profile.n_device_layers, len(order)):
            layout, start = [], 0
            for name, count in zip(order, counts, strict=True):
                if count:
                    layout.append((name, "CUDA0", (start, start + count)))
                start += count
            for host in {n for n, _, _ in layout}:
                result = evaluate_layout(profile, pool, layout, request, host_node=host)
                if result.feasible:
                    best = min(best, result.predicted_token_ms)
    planned = plan_placement(profile, pool, request)
    if best == math.inf:
        assert not planned.feasible
    else:
        assert planned.feasible
        assert planned.predicted_token_ms <= best * 1.02 + 1e-9
