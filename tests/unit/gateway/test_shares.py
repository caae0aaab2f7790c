"""A node's share of a model's tokens, from the plan's layers (gateway.shares)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from mesh_operator.gateway.admission import ModelGate, Router
from mesh_operator.gateway.kube_discovery import build_records
from mesh_operator.gateway.metrics import GatewayMetrics
from mesh_operator.gateway.routing import ModelRecord
from mesh_operator.gateway.shares import host_shares, layer_shares, node_layers
from mesh_operator.gateway.sse import Usage
from tests.unit.gateway.test_kube_records import MESHMODEL, SLICE, variant

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


def test_each_replicas_host_follows_its_own_plan() -> None:
    """Two replicas: a host's tokens are shared by the plan of the replica whose
    host runs on the endpoint's node; the model's own shares are left empty."""
    second = {
        "devices": [device("node-c", "CPU", 0, 19)],
        "rpc": ["node-c"],
        "tensorSplit": [19],
        "hostNode": "node-c",
    }
    model = copy.deepcopy(MESHMODEL)
    model["status"]["plan"] = TWO_NODES
    model["status"]["replicaPlans"] = [second]
    endpoints = copy.deepcopy(SLICE)
    endpoints["endpoints"].append(
        {**endpoints["endpoints"][0], "addresses": ["10.244.2.7"], "nodeName": "node-c"}
    )
    [record] = build_records([model], [endpoints])
    assert record.node_shares == ()
    assert dict(record.backend_shares) == {
        "http://10.244.0.1:8080": (("node-a", 12 / 19), ("node-b", 7 / 19)),
        "http://10.244.2.7:8080": (("node-c", 1.0),),
    }
    assert host_shares(model["status"]) == {
        "node-a": (("node-a", 12 / 19), ("node-b", 7 / 19)),
        "node-c": (("node-c", 1.0),),
    }


def test_a_host_on_an_unplanned_node_has_no_shares() -> None:
    model = copy.deepcopy(MESHMODEL)
    model["status"]["plan"] = TWO_NODES
    stray = variant(SLICE, endpoints=[{**SLICE["endpoints"][0], "nodeName": "node-z"}])
    [record] = build_records([model], [stray])
    # One replica: the model's shares still count the answer; no host's own.
    assert record.backend_shares == ()
    assert record.node_shares == (("node-a", 12 / 19), ("node-b", 7 / 19))


async def _healthy(url: str) -> bool:
    return True


def test_usage_per_node_follows_the_replica_that_answered() -> None:
    a, c = "http://10.0.0.1:8080", "http://10.0.0.3:8080"
    record = ModelRecord(
        namespace="ns",
        name="gemma",
        served_names=("gemma",),
        slots=1,
        ready=True,
        backends=(a, c),
        backend_shares=((a, (("node-a", 0.5), ("node-b", 0.5))), (c, (("node-c", 1.0),))),
    )
    router = Router(_healthy, max_queue=4)
    # The gate as Router.apply makes it, without starting its health probes.
    router.gates[record.key] = ModelGate(record, max_queue=4)
    metrics = GatewayMetrics()
    metrics.watch(router)
    metrics.count_usage(record.key, "-", Usage(prompt_tokens=10, completion_tokens=4), host=c)
    metrics.count_usage(record.key, "-", Usage(prompt_tokens=6, completion_tokens=2), host=a)
    metrics.count_usage(record.key, "-", Usage(prompt_tokens=5, completion_tokens=5), host=None)

    def sample(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, {"model": record.key, **labels})

    node = "mesh_gateway_node_tokens_total"
    assert sample(node, node="node-c", kind="prompt") == 10
    assert sample(node, node="node-c", kind="completion") == 4
    assert sample(node, node="node-a", kind="prompt") == 3
    assert sample(node, node="node-b", kind="completion") == 1
    # A host not known with several replicas: counted for the model, on no node.
    assert sample("mesh_gateway_tokens_total", kind="prompt") == 21
