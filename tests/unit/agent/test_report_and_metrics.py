"""The MeshNode status built from a recorded node, and /metrics parsed back."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pynvml
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from mesh_agent.health import HealthRules
from mesh_agent.inventory import (
    BackendMode,
    CollectorConfig,
    Inventory,
    InventoryCollector,
    host_memory_free,
)
from mesh_agent.inventory.nvml import NvmlReader
from mesh_agent.metrics import AgentMetrics, Snapshot
from mesh_agent.report import build_status, build_status_body
from mesh_agent.rpc_liveness import RpcProbe, RpcState, RpcTarget
from mesh_agent.transitions import TransitionLog
from mesh_operator.api.meshnode import MAX_ROUND_TRIPS, MeshNodeStatus, RoundTrip
from tests.fixtures.nvml.double import FakeNvml, load_fixture

pytestmark = pytest.mark.unit

NOW = dt.datetime(2025, 6, 1, 12, 0, tzinfo=dt.UTC)
MIB = 1024 * 1024


def collect(fake: FakeNvml, tmp_path: Path, mode: BackendMode = BackendMode.AUTO) -> Inventory:
    reader = NvmlReader(lambda: fake, transitions=TransitionLog())
    config = CollectorConfig(
        mode=mode,
        bandwidth_cache=tmp_path / "bw.json",
        bandwidth_size_mib=16,
        bandwidth_streams=1,
    )
    return InventoryCollector(config, reader).collect()


PROBES = (
    RpcProbe(RpcTarget("ns/gemma", "10.0.0.5", 50052), RpcState.SERVING),
    RpcProbe(RpcTarget("ns/qwen", "10.0.0.5", 50053), RpcState.DOWN, detail="refused"),
)


def test_gpu_node_status(tmp_path: Path) -> None:
    fake = FakeNvml.from_fixtures("rtx-4090", "rtx-3060-12gb")
    fake.add_process(1, 77, "ggml-rpc-server", 2048 * MIB)
    inventory = collect(fake, tmp_path)
    status = build_status(inventory, PROBES, now=NOW, interval_seconds=10, rules=HealthRules())
    assert [d.id for d in status.devices] == ["CUDA0", "CUDA1"]  # no CPU device
    rtx3060 = status.devices[1]
    recorded = load_fixture("rtx-3060-12gb")["memory"]
    assert rtx3060.memory_total_mib == recorded["total"] // MIB
    assert rtx3060.memory_free_mib == (recorded["free"] - 2048 * MIB) // MIB
    assert rtx3060.memory_used_by_mesh_mib == 2048
    assert rtx3060.bandwidth_gbps == pytest.approx(360, rel=0.01)
    assert status.system is not None and status.system.nvml
    assert status.system.driver_version == load_fixture("rtx-4090")["driverVersion"]
    assert [(r.model, r.answering) for r in status.rpc_servers] == [
        ("ns/gemma", True),
        ("ns/qwen", False),
    ]
    assert (status.health.state, status.health.reason) == ("Degraded", "RpcServerDown")
    assert status.heartbeat_time == "2025-06-01T12:00:00Z"
    # Beside its GPUs the node offers its RAM as a tier: what processes that are
    # not mesh's leave, less the 20% reserve, at the measured bandwidth.
    cpu = inventory.cpu
    offered = cpu.memory_total_bytes - cpu.memory_used_by_others_bytes
    offered -= int(cpu.memory_total_bytes * 0.2)
    assert status.host_memory_free_mib == max(0, offered) // MIB > 0
    assert status.host_memory_bandwidth_gbps > 0


def test_host_memory_offered_leaves_the_reserve(tmp_path: Path) -> None:
    fake = FakeNvml.from_fixtures("rtx-4090")
    reader = NvmlReader(lambda: fake, transitions=TransitionLog())
    config = CollectorConfig(
        bandwidth_cache=tmp_path / "bw.json",
        bandwidth_size_mib=16,
        bandwidth_streams=1,
        host_memory_reserve_percent=100,
    )
    inventory = InventoryCollector(config, reader).collect()
    assert inventory.host_memory_free_bytes == 0
    assert host_memory_free(inventory.cpu, 0) == (
        inventory.cpu.memory_total_bytes - inventory.cpu.memory_used_by_others_bytes
    )


def test_cpu_node_status_and_apply_body(tmp_path: Path) -> None:
    fake = FakeNvml([], init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    status = build_status(
        collect(fake, tmp_path), (), now=NOW, interval_seconds=5, rules=HealthRules()
    )
    (cpu,) = status.devices
    assert (cpu.id, cpu.backend) == ("CPU", "cpu")
    assert cpu.bandwidth_gbps > 0
    assert status.health.state == "Healthy"
    body = build_status_body("node-a", status)
    wire = body["status"]
    assert isinstance(wire, dict)
    assert "conditions" not in wire  # the operator's, never claimed by the agent
    assert wire["intervalSeconds"] == 5
    assert wire["devices"][0]["memoryTotalMiB"] == cpu.memory_total_mib
    # What goes on the wire reads back into the API model unchanged.
    assert MeshNodeStatus.model_validate(wire).devices == status.devices


def test_cuda_mode_without_nvml_is_unhealthy_and_offers_no_cpu(tmp_path: Path) -> None:
    fake = FakeNvml([], init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
    inventory = collect(fake, tmp_path, BackendMode.CUDA)
    status = build_status(
        inventory, (), now=NOW, interval_seconds=10, rules=HealthRules(require_gpu=True)
    )
    assert status.devices == []
    assert (status.health.state, status.health.reason) == ("Unhealthy", "NvmlUnavailable")


def scrape(metrics: AgentMetrics) -> dict[str, list[tuple[dict[str, str], float]]]:
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def test_metrics_expose_the_inventory(tmp_path: Path) -> None:
    fake = FakeNvml.from_fixtures("a100-sxm4-40gb", "rtx-4090")
    reader = NvmlReader(lambda: fake, transitions=TransitionLog())
    collector = InventoryCollector(CollectorConfig(), reader)
    collector.collect()
    fake.inject_xid(1, 79)
    fake.inject_xid(1, 79)
    inventory = collector.collect()
    status = build_status(inventory, PROBES, now=NOW, interval_seconds=10, rules=HealthRules())
    metrics = AgentMetrics("node-a")
    metrics.update(Snapshot(inventory, status, PROBES, 0.01))
    metrics.stats.count("ok")
    samples = scrape(metrics)
    assert samples["mesh_node_host_memory_free_bytes"] == [
        ({"node": "node-a"}, float(inventory.host_memory_free_bytes))
    ]

    free = {labels["uuid"]: value for labels, value in samples["mesh_gpu_memory_free_bytes"]}
    for gpu in inventory.nvml.gpus:
        assert free[gpu.uuid] == gpu.memory_free_bytes
    labels, _ = samples["mesh_gpu_memory_free_bytes"][0]
    assert set(labels) == {"node", "gpu", "uuid", "device"}
    assert labels["node"] == "node-a"
    xids = samples["mesh_gpu_xid_errors_total"]
    assert [(lbl["device"], lbl["xid"], v) for lbl, v in xids] == [("CUDA1", "79", 2.0)]
    health = {lbl["device"]: lbl["reason"] for lbl, _ in samples["mesh_gpu_health_state"]}
    assert health == {"CUDA0": "AsExpected", "CUDA1": "XidError"}
    up = {lbl["model"]: v for lbl, v in samples["mesh_rpc_server_up"]}
    assert up == {"ns/gemma": 1.0, "ns/qwen": 0.0}
    temps = {lbl["device"]: v for lbl, v in samples["mesh_gpu_temperature_celsius"]}
    assert temps["CUDA0"] == load_fixture("a100-sxm4-40gb")["temperatureC"]
    util = {lbl["device"]: v for lbl, v in samples["mesh_gpu_utilization_ratio"]}
    assert util["CUDA0"] == pytest.approx(
        load_fixture("a100-sxm4-40gb")["utilization"]["gpu"] / 100
    )
    assert samples["mesh_agent_publish_total"] == [({"node": "node-a", "result": "ok"}, 1.0)]
    # GeForce has no ECC counter: no sample rather than a fake zero.
    ecc = {lbl["device"] for lbl, _ in samples["mesh_gpu_ecc_uncorrectable_errors_total"]}
    assert ecc == {"CUDA0"}
    metrics.shutdown()


def test_metrics_before_the_first_cycle_are_empty_not_failing() -> None:
    metrics = AgentMetrics("node-a")
    assert scrape(metrics) == {}
    metrics.shutdown()


def test_round_trips_go_out_with_the_endpoint_and_their_summary(tmp_path: Path) -> None:
    fake = FakeNvml([], init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    trips = [RoundTrip(node="b", ms=0.41, samples=9), RoundTrip(node="far", ms=30.2, samples=3)]
    status = build_status(
        collect(fake, tmp_path),
        (),
        now=NOW,
        interval_seconds=5,
        rules=HealthRules(),
        probe_endpoint="10.1.0.7:9464",
        round_trips=trips,
        round_trip_ms=0.41,
    )
    wire = build_status_body("node-a", status)["status"]
    assert isinstance(wire, dict)
    assert wire["probeEndpoint"] == "10.1.0.7:9464"
    assert wire["roundTrips"] == [
        {"node": "b", "ms": 0.41, "samples": 9},
        {"node": "far", "ms": 30.2, "samples": 3},
    ]
    assert wire["roundTripMs"] == 0.41
    assert MeshNodeStatus.model_validate(wire).round_trips == trips
    metrics = AgentMetrics("node-a")
    try:
        metrics.update(Snapshot(None, status, (), 0.1))
        text = metrics.render().decode()
    finally:
        metrics.shutdown()
    seen = {
        s.labels["peer"]: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "mesh_node_round_trip_seconds"
    }
    assert seen == {"b": pytest.approx(0.00041), "far": pytest.approx(0.0302)}


def test_a_meshnode_lists_a_bounded_number_of_round_trips() -> None:
    trips = [{"node": f"n{i}", "ms": 1.0, "samples": 1} for i in range(MAX_ROUND_TRIPS + 1)]
    with pytest.raises(ValidationError, match="roundTrips"):
        MeshNodeStatus.model_validate({"roundTrips": trips})
