"""A node's share of a model's tokens, from the plan's layers (gateway.shares)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from mesh_operator.gateway.kube_discovery import build_records
from mesh_operator.gateway.shares import layer_shares, node_layers
from tests.unit.gateway.test_kube_records import MESHMODEL

pytestmark = pytest.mark.unit


def device(node: str, name: str, first: int, last: int) -> dict[str, Any]:
    return {
        "node": node,
        "device": name,
        "layers": [first, last],
        "weightsMiB": 100,
        "kvMiB": 10,
        "computeMiB": 5,
        "totalMiB": 115,
    }


# gemma-3-270m's 18 layers (plus the output layer) on two nodes, as the
# operator writes them: node-a holds [0, 12), node-b [12, 19).
TWO_NODES: dict[str, Any] = {
    "devices": [device("node-a", "CPU", 0, 12), device("node-b", "CPU", 12, 19)],
    "rpc": ["node-b"],
    "tensorSplit": [12, 7],
    "hostNode": "node-a",
}


def test_shares_follow_the_layers_of_each_node() -> None:
    assert node_layers(TWO_NODES) == {"node-a": 12, "node-b": 7}
    shares = dict(layer_shares(TWO_NODES))
    assert shares == {"node-a": 12 / 19, "node-b": 7 / 19}
    assert sum(shares.values()) == pytest.approx(1.0)


def test_devices_of_one_node_add_up() -> None:
    plan = {
        "devices": [
            device("gpu-1", "CUDA0", 0, 10),
            device("gpu-1", "CUDA1", 10, 20),
            device("gpu-2", "CUDA0", 20, 40),
        ]
    }
    assert layer_shares(plan) == (("gpu-1", 0.5), ("gpu-2", 0.5))


def test_the_hosts_cpu_layers_count_for_the_host_node() -> None:
    # Layers [0, 8) on the host's CPU, the devices from layer 8 on.
    plan = {
        "devices": [device("gpu-1", "CUDA0", 8, 24), device("gpu-2", "CUDA0", 24, 32)],
        "hostTier": {"node": "gpu-2", "moeLayers": 12, "cpuLayers": 8, "memoryMiB": 900},
    }
    assert node_layers(plan) == {"gpu-1": 16, "gpu-2": 16}
    assert layer_shares(plan) == (("gpu-1", 0.5), ("gpu-2", 0.5))


def test_one_node_takes_everything() -> None:
    assert layer_shares({"devices": [device("solo", "CPU", 0, 19)]}) == (("solo", 1.0),)


@pytest.mark.parametrize(
    "plan",
    [
        None,
        {},
        {"devices": []},
        {"devices": [device("n", "CPU", 5, 5)]},
        {"devices": [{"node": "n", "layers": [3]}]},
        {"devices": [{"node": "n", "layers": ["0", "4"]}]},
        {"devices": [{"node": "", "layers": [0, 4]}]},
        {"devices": ["not a device"]},
        {"hostTier": {"node": "n", "cpuLayers": 0}},
        "not a plan",
    ],
)
def test_no_usable_plan_no_shares(plan: Any) -> None:
    assert layer_shares(plan) == ()


def test_records_carry_the_shares_of_the_models_plan() -> None:
    planned = copy.deepcopy(MESHMODEL)
    planned["status"]["plan"] = TWO_NODES
    [record] = build_records([planned], [])
    assert record.node_shares == (("node-a", 12 / 19), ("node-b", 7 / 19))
    [unplanned] = build_records([MESHMODEL], [])
    assert "plan" not in MESHMODEL["status"]
    assert unplanned.node_shares == ()
