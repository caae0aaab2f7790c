"""The host running its own node's CPU layers itself (a pool's `hostUsesOwnNode`)."""

from __future__ import annotations

import dataclasses

import pytest

from mesh_operator.planner import (
    PlacementRequest,
    PlacementResult,
    ServerSettings,
    ServingParams,
    build_llama_server_args,
    build_rpc_server_commands,
    current_plan_from_api,
    evaluate_layout,
    host_on_own_node,
    plan_placement,
    to_api_plan,
)
from mesh_operator.planner.memory import host_layers_buffers
from mesh_operator.planner.placement import HostTier
from tests.unit.planner.builders import device, inventory, node, synthetic_profile

pytestmark = pytest.mark.unit

PROFILE = synthetic_profile(n_layer=8, layer_mib=100, output_mib=100, vocab=32000)
REQUEST = PlacementRequest(serving=ServingParams(ctx=1024), reserve_percent=0)


def _cpu(mib: int) -> dict[str, object]:
    return device("CPU", total=mib, bw=20.0, backend="cpu")


def _two_nodes(mib: int = 700) -> PlacementResult:
    """Two CPU nodes, neither holding the model alone."""
    pool = inventory(node("a", _cpu(mib)), node("b", _cpu(mib)))
    plan = plan_placement(PROFILE, pool, REQUEST)
    assert plan.feasible and len(plan.rpc) == 2, plan.reason
    return plan


def test_host_nodes_layers_become_the_host_tier() -> None:
    pool = inventory(node("a", _cpu(700)), node("b", _cpu(700)))
    plan = _two_nodes()
    own = host_on_own_node(plan, PROFILE, pool, REQUEST)
    first = plan.devices[0]
    assert plan.host_node == first.node
    tier = own.host_tier
    assert tier is not None and tier.device == "CPU" and tier.node == first.node
    assert (tier.moe_layers, tier.cpu_layers) == (0, first.last_layer)
    # The host's CPU buffers for those layers: their weights and KV, one compute
    # buffer.
    memory = host_layers_buffers(PROFILE, REQUEST.serving, first.last_layer, n_devices=1)
    assert (tier.weights_bytes, tier.kv_bytes, tier.compute_bytes) == (
        memory.weights,
        memory.kv,
        memory.compute,
    )
    assert memory.weights == first.weights_bytes
    assert memory.kv == first.kv_bytes
    assert own.devices == plan.devices[1:]
    assert own.rpc == tuple(n for n in plan.rpc if n != first.node)
    assert own.tensor_split == tuple(d.n_layers for d in own.devices)
    assert own.host_node == plan.host_node
    # No round trip for the host's own layers; nothing else changes.
    saved = REQUEST.cost.hop_ms(0.0, local=True)
    assert own.predicted_token_ms == pytest.approx(plan.predicted_token_ms - saved)
    assert tier.time_ms == pytest.approx(first.time_ms - saved)
    assert f"layers 0-{first.last_layer - 1} on its own CPU" in own.reason


def test_args_lower_ngl_and_drop_the_host_nodes_server() -> None:
    pool = inventory(node("a", _cpu(700)), node("b", _cpu(700)))
    own = host_on_own_node(_two_nodes(), PROFILE, pool, REQUEST)
    assert own.host_tier is not None
    cpu = own.host_tier.cpu_layers
    ((other, devices),) = build_rpc_server_commands(own, host="127.0.0.1").items()
    assert other != own.host_node and devices[devices.index("-d") + 1] == "CPU"
    for plan in (own, to_api_plan(own)):
        args = build_llama_server_args(plan, "m.gguf", ServerSettings(), {other: "w:1"})
        assert args[args.index("--rpc") + 1] == "w:1"
        assert args[args.index("-ts") + 1] == str(PROFILE.n_device_layers - cpu)
        # llama.cpp: the first n_layer + 1 - ngl layers on the host's CPU, the
        # output layer on the last offloaded device.
        assert args[args.index("-ngl") + 1] == str(PROFILE.n_device_layers - cpu)
        assert args[args.index("-lm") + 1] == "none"
        assert "--n-cpu-moe" not in args


def test_one_node_plan_is_a_host_without_rpc() -> None:
    pool = inventory(node("a", _cpu(4096)), node("b", _cpu(700)))
    plan = plan_placement(PROFILE, pool, REQUEST)
    assert plan.rpc == ("a",)
    own = host_on_own_node(plan, PROFILE, pool, REQUEST)
    assert own.feasible and own.devices == () and own.rpc == () and own.tensor_split == ()
    assert own.host_node == "a"
    assert own.host_tier is not None and own.host_tier.cpu_layers == PROFILE.n_device_layers
    assert build_rpc_server_commands(own, host="127.0.0.1") == {}
    for p in (own, to_api_plan(own)):
        args = build_llama_server_args(p, "m.gguf", ServerSettings(), {})
        assert "--rpc" not in args and "-ts" not in args
        assert args[args.index("-ngl") + 1] == "0"
    stored = to_api_plan(own)
    assert stored.host_tier is not None and stored.host_tier.device == "CPU"
    assert stored.host_tier.memory_mib == -(-own.host_tier.total_bytes // (1 << 20))


@pytest.mark.parametrize("kind", ["two nodes", "one node"])
def test_stored_plan_comes_back_as_the_planners_own(kind: str) -> None:
    """The stability rule sees the plan without the transform: the same plan is
    kept, and the transform gives the same result again."""
    big = 700 if kind == "two nodes" else 4096
    pool = inventory(node("a", _cpu(big)), node("b", _cpu(700)))
    plan = plan_placement(PROFILE, pool, REQUEST)
    own = host_on_own_node(plan, PROFILE, pool, REQUEST)
    current = current_plan_from_api(to_api_plan(own))
    assert current is not None and current.tier is None
    assert current.layout == tuple(plan.layout())
    again = plan_placement(PROFILE, pool, REQUEST, current)
    assert again.kept_current
    assert host_on_own_node(again, PROFILE, pool, REQUEST).host_tier == own.host_tier


def test_a_plan_hosted_elsewhere_moves_its_host_to_its_first_node() -> None:
    pool = inventory(node("a", _cpu(700)), node("b", _cpu(700)))
    plan = _two_nodes()
    elsewhere = evaluate_layout(PROFILE, pool, plan.layout(), REQUEST, host_node=plan.rpc[-1])
    assert elsewhere.host_node != plan.devices[0].node
    own = host_on_own_node(elsewhere, PROFILE, pool, REQUEST)
    assert own.host_node == plan.devices[0].node
    assert own.host_tier is not None and own.host_tier.node == own.host_node
    assert own.predicted_token_ms <= elsewhere.predicted_token_ms


def test_not_when_the_first_node_is_far() -> None:
    """Hosting on a first node behind a slow link would make every other hop cross
    it, more than the local round trip saved: the plan stays as it is."""
    pool = inventory(
        node("a", _cpu(700), rtt=20.0), node("b", _cpu(700), rtt=0.1), node("c", _cpu(700), rtt=0.1)
    )
    layout = [("a", "CPU", (0, 3)), ("b", "CPU", (3, 6)), ("c", "CPU", (6, 9))]
    plan = evaluate_layout(PROFILE, pool, layout, REQUEST, host_node="b")
    assert plan.feasible
    assert host_on_own_node(plan, PROFILE, pool, REQUEST) == plan


@pytest.mark.parametrize("case", ["infeasible", "gpu first", "ram tier"])
def test_left_as_it_is(case: str) -> None:
    if case == "infeasible":
        pool = inventory(node("a", _cpu(100)))
    elif case == "gpu first":
        pool = inventory(node("a", device("CUDA0", total=4096)))
    else:
        pool = inventory(node("a", _cpu(4096)))
    plan = plan_placement(PROFILE, pool, REQUEST)
    if case == "ram tier":
        plan = dataclasses.replace(plan, host_tier=HostTier("a", 1, 0, 1, 0, 0, 0, 40.0, 0.0))
    assert host_on_own_node(plan, PROFILE, pool, REQUEST) == plan
