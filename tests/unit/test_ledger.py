"""The memory ledger: capacity per device after other models' claims, staleness."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from mesh_operator.api.meshmodel import Plan, PlannedDraft, PlannedHostTier
from mesh_operator.api.meshnode import MeshNodeStatus
from mesh_operator.api.meshpool import MeshPoolSpec
from mesh_operator.handlers.snapshot import node_info
from mesh_operator.ledger import (
    NodeInfo,
    build_ledger_rows,
    build_pool_view,
    capacity_grew,
    claims_by_device,
    plan_problems,
    to_inventory,
)
from mesh_operator.planning import limit_inventory
from tests.unit.meshnodes import one_gpu_status

pytestmark = pytest.mark.unit

NOW = dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.UTC)


def status(
    free: int = 20000, *, total: int = 24576, others: int = 0, age: int = 5, **kw: Any
) -> MeshNodeStatus:
    return one_gpu_status(NOW, free, total=total, others=others, age=age, **kw)


def plan_on(node: str, mib: int) -> Plan:
    return Plan.model_validate(
        {
            "devices": [
                {
                    "node": node,
                    "device": "CUDA0",
                    "layers": [0, 10],
                    "weightsMiB": mib,
                    "kvMiB": 0,
                    "computeMiB": 0,
                    "totalMiB": mib,
                }
            ],
            "tensorSplit": [10],
            "rpc": [node],
            "hostNode": node,
        }
    )


NODES = [NodeInfo("a", {"pool": "x"}), NodeInfo("b", {"pool": "x"}), NodeInfo("c", {"pool": "y"})]


def capacity(view: Any, node: str) -> int:
    return int(view.by_name()[node].devices[0].capacity_mib)


def test_pool_membership_follows_the_node_selector() -> None:
    view = build_pool_view(
        MeshPoolSpec(node_selector={"pool": "x"}), NODES, {"a": status(), "b": status()}, {}, NOW
    )
    assert [n.name for n in view.nodes] == ["a", "b"]


@pytest.mark.parametrize(
    ("sharing", "claim", "others", "expected"),
    [
        ("shared", 0, 0, 24576),
        ("shared", 8000, 0, 16576),
        ("shared", 8000, 1000, 15576),
        ("exclusive", 8000, 0, 0),  # a device another model holds is not offered
        ("exclusive", 0, 1000, 23576),
    ],
)
def test_capacity_subtracts_other_claims_and_foreign_use(
    sharing: str, claim: int, others: int, expected: int
) -> None:
    pool = MeshPoolSpec.model_validate({"sharing": sharing, "nodeSelector": {"pool": "x"}})
    claims = {"ns/other": plan_on("a", claim)} if claim else {}
    view = build_pool_view(pool, NODES, {"a": status(others=others), "b": status()}, claims, NOW)
    assert capacity(view, "a") == expected


def test_two_plans_at_once_do_not_see_the_same_memory() -> None:
    # Free memory as reported is the same before both plans land; the ledger is not.
    pool = MeshPoolSpec(sharing="shared", node_selector={"pool": "x"})
    first = build_pool_view(pool, NODES, {"a": status(), "b": status()}, {}, NOW)
    second = build_pool_view(
        pool, NODES, {"a": status(), "b": status()}, {"ns/first": plan_on("a", 20000)}, NOW
    )
    assert capacity(first, "a") - capacity(second, "a") == 20000


def test_device_cap_limits_what_a_cpu_pool_offers() -> None:
    pool = MeshPoolSpec.model_validate({"deviceMemoryCapMiB": 300, "nodeSelector": {"pool": "x"}})
    # A CPU node's other processes use 2 GiB of its memory: the cap still fits.
    view = build_pool_view(pool, NODES, {"a": status(others=2048), "b": status()}, {}, NOW)
    assert capacity(view, "a") == 300
    crowded = build_pool_view(pool, NODES, {"a": status(others=24400), "b": status()}, {}, NOW)
    assert capacity(crowded, "a") == 24576 - 24400
    inventory = to_inventory(view)
    assert [d.memory_total_mib for n in inventory.nodes for d in n.devices] == [300, 300]


def test_a_capped_nodes_free_memory_is_not_shown_above_its_total() -> None:
    pool = MeshPoolSpec.model_validate({"deviceMemoryCapMiB": 300, "nodeSelector": {"pool": "x"}})
    statuses = {"a": status(free=20000), "b": status(free=120)}
    view = build_pool_view(pool, NODES, statuses, {}, NOW)
    rows = {r.node: r for r in build_ledger_rows(view, statuses)}
    assert (rows["a"].memory_total_mib, rows["a"].memory_free_mib) == (300, 300)
    assert (rows["b"].memory_total_mib, rows["b"].memory_free_mib) == (300, 120)


def test_stale_and_missing_nodes_are_not_planned_on() -> None:
    pool = MeshPoolSpec(node_selector={"pool": "x"})
    view = build_pool_view(pool, NODES, {"a": status(age=31)}, {}, NOW)
    nodes = view.by_name()
    assert not nodes["a"].usable and "stale" in nodes["a"].problem
    assert not nodes["b"].usable and "no MeshNode" in nodes["b"].problem
    assert to_inventory(view).nodes == ()
    assert plan_problems(plan_on("a", 100), view) == [nodes["a"].name + ": " + nodes["a"].problem]


def test_an_unhealthy_node_breaks_its_plan() -> None:
    pool = MeshPoolSpec(node_selector={"pool": "x"})
    sick = status(health={"state": "Unhealthy", "reason": "XidError", "message": "Xid 79"})
    view = build_pool_view(pool, NODES, {"a": sick, "b": status()}, {}, NOW)
    assert plan_problems(plan_on("a", 100), view) == ["a: XidError: Xid 79"]
    assert plan_problems(plan_on("b", 100), view) == []
    assert plan_problems(plan_on("gone", 100), view) == ["gone: left the pool"]


def test_consolidation_looks_only_when_the_pool_gains_room() -> None:
    before = {("a", "CUDA0"): 10, ("b", "CUDA0"): 4}
    assert not capacity_grew(None, before)
    assert not capacity_grew(before, {("a", "CUDA0"): 9, ("b", "CUDA0"): 4})  # others took memory
    assert capacity_grew(before, {("a", "CUDA0"): 11, ("b", "CUDA0"): 4})
    assert capacity_grew(before, {**before, ("c", "CUDA0"): 1})  # a node came back


@pytest.mark.parametrize(
    ("annotations", "rtt"),
    [
        ({}, None),
        ({"mesh.dev/rtt-ms": "2.5"}, 2.5),
        ({"mesh.dev/rtt-ms": "0"}, 0.0),
        ({"mesh.dev/rtt-ms": "fast"}, None),
        ({"mesh.dev/rtt-ms": "-1"}, None),
        ({"mesh.dev/rtt-ms": "nan"}, None),
        ({"mesh.dev/rtt-ms": "5000"}, None),
    ],
)
def test_a_nodes_declared_round_trip_is_read_from_its_annotation(
    annotations: dict[str, str], rtt: float | None, caplog: pytest.LogCaptureFixture
) -> None:
    body = {"metadata": {"name": "n", "annotations": annotations}}
    assert node_info(body).rtt_ms == rtt
    warned = [r.getMessage() for r in caplog.records]
    if annotations and rtt is None:
        assert len(warned) == 1 and "mesh.dev/rtt-ms" in warned[0] and "ignored" in warned[0]
    else:
        assert warned == []


def test_declared_round_trips_reach_the_planner_and_the_pools_limit() -> None:
    nodes = [NodeInfo("a", {"pool": "x"}, rtt_ms=20.0), NodeInfo("b", {"pool": "x"})]
    meshnodes = {"a": status(), "b": status()}
    view = build_pool_view(MeshPoolSpec(node_selector={"pool": "x"}), nodes, meshnodes, {}, NOW)
    inventory = to_inventory(view)
    assert {n.name: n.rtt_ms for n in inventory.nodes} == {"a": 20.0, "b": None}
    limited = MeshPoolSpec.model_validate({"nodeSelector": {"pool": "x"}, "maxRttMs": 5})
    assert [n.name for n in limit_inventory(inventory, limited).nodes] == ["b"]


def test_ram_tier_claims_leave_a_nodes_ram_to_the_others() -> None:
    pool = MeshPoolSpec(sharing="shared", node_selector={"pool": "x"})
    meshnodes = {
        "a": status(hostMemoryFreeMiB=65536, hostMemoryBandwidthGBps=80.0),
        "b": status(),
    }
    tiered = plan_on("a", 20000)
    tiered.host_tier = PlannedHostTier(node="a", moe_layers=30, cpu_layers=0, memory_mib=40000)
    alone = build_pool_view(pool, NODES, meshnodes, {}, NOW)
    shared = build_pool_view(pool, NODES, meshnodes, {"ns/first": tiered}, NOW)
    assert alone.by_name()["a"].host_memory_mib == 65536
    assert shared.by_name()["a"].host_memory_mib == 65536 - 40000
    assert shared.by_name()["b"].host_memory_mib == 0
    node = to_inventory(shared).node("a")
    assert node is not None
    assert (node.host_memory_free_mib, node.host_memory_bandwidth_gbps) == (25536, 80.0)
    exclusive = MeshPoolSpec(sharing="exclusive", node_selector={"pool": "x"})
    held = build_pool_view(exclusive, NODES, meshnodes, {"ns/first": tiered}, NOW)
    assert held.by_name()["a"].host_memory_mib == 0


def test_a_draft_model_s_memory_is_claimed_on_its_host_node() -> None:
    pool = MeshPoolSpec(sharing="shared", node_selector={"pool": "x"})
    meshnodes = {"a": status(hostMemoryFreeMiB=4096), "b": status(hostMemoryFreeMiB=4096)}
    drafted = plan_on("a", 2000)
    drafted.draft = PlannedDraft(
        node="b", weights_mib=236, kv_mib=21, compute_mib=21, memory_mib=278
    )
    view = build_pool_view(pool, NODES, meshnodes, {"ns/first": drafted}, NOW)
    assert view.by_name()["b"].host_memory_mib == 4096 - 278
    assert view.by_name()["a"].host_memory_mib == 4096


def test_on_a_cpu_node_the_draft_holds_its_cpu_device() -> None:
    plan = plan_on("a", 100)
    plan.draft = PlannedDraft(node="a", weights_mib=1, kv_mib=1, compute_mib=1, memory_mib=300)
    assert claims_by_device({"ns/m": plan})[("a", "CPU")] == 300


def trips(**peers: float) -> list[dict[str, Any]]:
    return [{"node": n, "ms": ms, "samples": 5} for n, ms in peers.items()]


def test_measured_round_trips_make_a_far_node_far_and_its_peers_near() -> None:
    nodes = [NodeInfo(n, {"pool": "x"}) for n in ("a", "b", "far")]
    meshnodes = {
        "a": status(roundTrips=trips(b=0.3, far=20.4)),
        "b": status(roundTrips=trips(a=0.5, far=19.6)),
        # far measured nothing yet: its pairs come from the others' measurements
        "far": status(),
    }
    view = build_pool_view(MeshPoolSpec(node_selector={"pool": "x"}), nodes, meshnodes, {}, NOW)
    # a-b measured both ways counts once at their mean.
    assert {n.name: n.rtt_ms for n in view.nodes} == {"a": 0.4, "b": 0.4, "far": 19.6}


def test_a_declared_round_trip_overrides_the_measured_one() -> None:
    nodes = [NodeInfo("a", {"pool": "x"}, rtt_ms=2.0), NodeInfo("b", {"pool": "x"})]
    meshnodes = {"a": status(roundTrips=trips(b=9.0)), "b": status()}
    view = build_pool_view(MeshPoolSpec(node_selector={"pool": "x"}), nodes, meshnodes, {}, NOW)
    assert {n.name: n.rtt_ms for n in view.nodes} == {"a": 2.0, "b": 9.0}


def test_round_trips_to_nodes_outside_the_pool_do_not_count() -> None:
    nodes = [NodeInfo("a", {"pool": "x"}), NodeInfo("b", {"pool": "x"}), NodeInfo("c", {})]
    meshnodes = {"a": status(roundTrips=trips(b=0.2, c=50.0)), "b": status(), "c": status()}
    pool = MeshPoolSpec.model_validate({"nodeSelector": {"pool": "x"}, "maxRttMs": 5})
    inventory = to_inventory(build_pool_view(pool, nodes, meshnodes, {}, NOW))
    assert {n.name: n.rtt_ms for n in inventory.nodes} == {"a": 0.2, "b": 0.2}
    assert [n.name for n in limit_inventory(inventory, pool).nodes] == ["a", "b"]


def test_a_measured_far_node_is_left_out_by_the_pools_limit() -> None:
    nodes = [NodeInfo(n, {"pool": "x"}) for n in ("a", "b", "far")]
    meshnodes = {
        "a": status(roundTrips=trips(b=0.3, far=30.0)),
        "b": status(roundTrips=trips(a=0.3, far=30.0)),
        "far": status(roundTrips=trips(a=30.0, b=30.0)),
    }
    pool = MeshPoolSpec.model_validate({"nodeSelector": {"pool": "x"}, "maxRttMs": 5})
    inventory = to_inventory(build_pool_view(pool, nodes, meshnodes, {}, NOW))
    assert [n.name for n in limit_inventory(inventory, pool).nodes] == ["a", "b"]


def test_round_trips_listed_by_a_stale_node_do_not_count() -> None:
    nodes = [NodeInfo(n, {"pool": "x"}) for n in ("a", "b", "gone")]
    meshnodes = {
        "a": status(roundTrips=trips(b=0.3)),
        "b": status(),
        "gone": status(age=600, roundTrips=trips(a=40.0, b=40.0)),
    }
    view = build_pool_view(MeshPoolSpec(node_selector={"pool": "x"}), nodes, meshnodes, {}, NOW)
    assert {n.name: n.rtt_ms for n in view.nodes} == {"a": 0.3, "b": 0.3, "gone": None}


def test_a_tier_on_the_hosts_own_device_holds_that_device_not_its_ram() -> None:
    """hostUsesOwnNode: the host's layers sit in its node's CPU device (on a CPU-only
    node that device is the RAM): claimed there once, never from hostMemoryFreeMiB."""
    own = plan_on("b", 100)
    own.host_tier = PlannedHostTier(
        node="a", moe_layers=0, cpu_layers=4, memory_mib=700, device="CPU"
    )
    assert claims_by_device({"ns/m": own}) == {("b", "CUDA0"): 100, ("a", "CPU"): 700}
    pool = MeshPoolSpec(sharing="shared", node_selector={"pool": "x"})
    meshnodes = {"a": status(hostMemoryFreeMiB=4096), "b": status(hostMemoryFreeMiB=4096)}
    view = build_pool_view(pool, NODES, meshnodes, {"ns/m": own}, NOW)
    assert view.by_name()["a"].host_memory_mib == 4096
    # A plan whose every layer is on the host's own node still names that node.
    alone = Plan(host_tier=own.host_tier, host_node="a")
    assert alone.placed() and alone.layer_nodes() == ["a"]
    assert plan_problems(alone, view) == []
    gone = build_pool_view(pool, NODES, {"b": status()}, {}, NOW)
    assert plan_problems(alone, gone) == ["a: no MeshNode (agent not running)"]
