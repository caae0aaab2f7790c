"""A CPU pool with `hostUsesOwnNode`: the host runs its own node's layers, no
worker runs there, the ledger claims those layers on the node's CPU device."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping
from typing import Any

import pytest

from mesh_operator.api.contract import HOST_COMPONENT, RPC_COMPONENT
from mesh_operator.api.meshmodel import Plan
from mesh_operator.api.meshnode import MeshNodeStatus
from mesh_operator.api.meshpool import MeshPoolSpec
from mesh_operator.handlers.decision import Decision, decide
from mesh_operator.handlers.snapshot import PoolInfo
from mesh_operator.ledger import build_pool_view, claims_by_device, claims_by_host
from mesh_operator.planner.memory import MIB
from tests.unit.planner.builders import synthetic_profile
from tests.unit.test_decision import (
    MODEL,
    NODES,
    NOW,
    SPEC,
    conditions,
    conditions_message,
    existing,
    host_deployment,
    kinds,
    pod,
    snapshot,
)

pytestmark = pytest.mark.unit

# 8 layers of 100 MiB: about 1 GiB with its output and compute.
PROFILE = synthetic_profile(n_layer=8, layer_mib=100, output_mib=100, vocab=32000)


def cpu_node(total: int) -> MeshNodeStatus:
    beat = (NOW - dt.timedelta(seconds=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return MeshNodeStatus.model_validate(
        {
            "heartbeatTime": beat,
            "intervalSeconds": 10,
            "devices": [
                {
                    "id": "CPU",
                    "index": 0,
                    "backend": "cpu",
                    "memoryTotalMiB": total,
                    "memoryFreeMiB": total,
                    "bandwidthGBps": 20.0,
                }
            ],
        }
    )


def pool(own: bool) -> PoolInfo:
    spec = {"nodeSelector": {"pool": "p"}, "backend": "cpu", "sharing": "shared"}
    return PoolInfo(
        spec=MeshPoolSpec.model_validate({**spec, "hostUsesOwnNode": own}), generation=1
    )


def first(total: int, own: bool = True) -> Decision:
    """The first decision on three CPU nodes of `total` MiB each."""
    meshnodes = {n.name: cpu_node(total) for n in NODES}
    return decide(
        snapshot(
            pool=pool(own),
            meshnodes=meshnodes,
            profile=PROFILE,
            spec={**SPEC, "contextSize": 1024},
        )
    )


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def host_container(d: Decision) -> Mapping[str, Any]:
    containers = host_deployment(d)["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "llama-server")


def daemonset_nodes(d: Decision) -> list[str]:
    out = []
    for ds in (c for c in d.children if c["kind"] == "DaemonSet"):
        affinity = ds["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]
        terms = affinity["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        out += [v for t in terms for v in t["matchFields"][0]["values"]]
    return out


def test_two_nodes_no_worker_on_the_hosts_node() -> None:
    d = first(900)
    plan = d.status.plan
    assert plan is not None and plan.host_tier is not None, d.status
    tier = plan.host_tier
    assert tier.device == "CPU" and tier.node == plan.host_node and tier.moe_layers == 0
    assert len(plan.devices) == 1 and plan.devices[0].layers == [tier.cpu_layers, 9]
    assert plan.rpc == [plan.devices[0].node] and plan.host_node not in plan.rpc
    assert daemonset_nodes(d) == plan.rpc
    assert d.status.nodes == f"{plan.host_node},{plan.rpc[0]}"
    args = host_container(d)["args"]
    assert flag(args, "-ngl") == str(9 - tier.cpu_layers)
    assert flag(args, "-ts") == str(9 - tier.cpu_layers)
    assert flag(args, "-lm") == "none"
    assert host_container(d)["resources"]["requests"]["memory"] == f"{tier.memory_mib}Mi"
    # The ledger claims the host's layers on its node's CPU device, not its RAM.
    assert d.claim == plan
    claimed = claims_by_device({"ns/m": plan})
    assert claimed[(plan.host_node, "CPU")] == tier.memory_mib
    assert claimed[(plan.rpc[0], "CPU")] == plan.devices[0].total_mib
    assert claims_by_host({"ns/m": plan}) == {}
    view = build_pool_view(pool(True).spec, NODES, {n.name: cpu_node(900) for n in NODES},
                           {"ns/m": plan}, NOW)  # fmt: skip
    held = {(n.name, dv.device): dv.claimed_mib for n in view.nodes for dv in n.devices}
    assert held[(plan.host_node, "CPU")] == tier.memory_mib


def test_without_the_option_a_worker_runs_on_every_planned_node() -> None:
    d = first(900, own=False)
    plan = d.status.plan
    assert plan is not None and plan.host_tier is None and len(plan.rpc) == 2
    assert sorted(daemonset_nodes(d)) == sorted(plan.rpc)


def test_the_other_nodes_claims_do_not_change_with_the_option() -> None:
    own, workers = first(900).status.plan, first(900, own=False).status.plan
    assert own is not None and workers is not None and own.host_tier is not None
    with_option, without = claims_by_device({"m": own}), claims_by_device({"m": workers})
    host = (own.host_tier.node, "CPU")
    assert {k: v for k, v in with_option.items() if k != host} == {
        k: v for k, v in without.items() if k != host
    }
    assert with_option[host] == own.host_tier.memory_mib


def test_one_node_is_a_host_alone() -> None:
    d = first(4096)
    plan = d.status.plan
    assert plan is not None and plan.host_tier is not None, d.status
    assert plan.devices == [] and plan.rpc == [] and plan.tensor_split == []
    assert plan.host_tier.cpu_layers == PROFILE.n_device_layers
    assert "DaemonSet" not in kinds(d.children)
    assert conditions(d)["WorkersReady"][0] == "True"
    assert conditions_message(d, "WorkersReady") == (
        "no RPC servers: each host runs every layer itself"
    )
    assert host_deployment(d)["spec"]["replicas"] == 1, "no worker to wait for"
    args = host_container(d)["args"]
    assert "--rpc" not in args and "-ts" not in args and flag(args, "-ngl") == "0"
    expected = -(-sum(layer.weight_bytes for layer in PROFILE.layers) // MIB)
    assert plan.host_tier.memory_mib > expected
    assert claims_by_device({"m": plan}) == {(plan.host_node, "CPU"): plan.host_tier.memory_mib}


@pytest.mark.parametrize("total", [900, 4096])
def test_serving_keeps_its_plan(total: int) -> None:
    d = first(total)
    plan = d.status.plan
    assert plan is not None
    pods = [pod(f"w-{n}", RPC_COMPONENT, n) for n in plan.rpc]
    pods.append(pod("host-0", HOST_COMPONENT, plan.host_node or ""))
    meshnodes = {n.name: cpu_node(total) for n in NODES}
    base = snapshot(
        pool=pool(True), meshnodes=meshnodes, profile=PROFILE, spec={**SPEC, "contextSize": 1024}
    )
    up = decide(dataclasses.replace(base, status=d.status, pods=pods, children=existing(d)))
    assert conditions(up)["Ready"] == ("True", "Serving"), up.status.conditions
    steady = decide(dataclasses.replace(base, status=up.status, pods=pods, children=existing(up)))
    assert steady.reason == "PlanKept" and steady.apply == []
    assert steady.status.plan == plan and isinstance(steady.claim, Plan)
    assert MODEL.name in host_deployment(steady)["metadata"]["name"]


@pytest.mark.parametrize("own", [True, False])
def test_turning_the_option_on_or_off_on_a_serving_pool_plans_again(own: bool) -> None:
    """A serving model sees its pool's `hostUsesOwnNode` change (PoolChanged) and
    is planned again with it: the host's node loses or gets back its worker."""
    d = first(900, own=not own)
    plan = d.status.plan
    assert plan is not None
    pods = [pod(f"w-{n}", RPC_COMPONENT, n) for n in plan.rpc]
    pods.append(pod("host-0", HOST_COMPONENT, plan.host_node or ""))
    meshnodes = {n.name: cpu_node(900) for n in NODES}
    base = snapshot(
        pool=pool(not own), meshnodes=meshnodes, profile=PROFILE, spec={**SPEC, "contextSize": 1024}
    )
    up = decide(dataclasses.replace(base, status=d.status, pods=pods, children=existing(d)))
    assert conditions(up)["Ready"] == ("True", "Serving"), up.status.conditions

    toggled = dataclasses.replace(pool(own), generation=2)
    after = decide(
        dataclasses.replace(base, pool=toggled, status=up.status, pods=pods, children=existing(up))
    )
    assert after.reason == "PoolChanged", after.reason
    new = after.status.plan
    assert new is not None and new.host_node is not None
    assert (new.host_tier is not None) is own, new
    if own:
        assert new.host_node not in daemonset_nodes(after), daemonset_nodes(after)
        assert new.host_tier is not None and new.host_tier.device == "CPU"
    else:
        assert new.host_node in daemonset_nodes(after), daemonset_nodes(after)
    assert sorted(daemonset_nodes(after)) == sorted(new.rpc)
